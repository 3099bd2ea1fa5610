"""Run history: one SQLite row per backup run, daemon or one-shot.

The database is ``<state_dir>/history.sqlite3``.  Design choices:

* **WAL journal and short transactions.**  The daemon and a one-shot ``pull``
  may write at the same time; WAL lets readers proceed during a write, every
  write is a single ``BEGIN IMMEDIATE`` transaction (taking the write lock up
  front, so the busy timeout applies and there is no read-then-upgrade
  deadlock), and a busy timeout makes a second writer wait instead of failing.
* **Timestamps are UTC ISO-8601 text** with microseconds and a ``+00:00``
  offset, always the same width, so they sort correctly as text, read well in
  the ``sqlite3`` shell and round-trip exactly.  The API only deals in aware
  ``datetime`` objects.
* **Schema version in ``PRAGMA user_version``**, with migrations applied in
  order on open; a database written by a newer borgtunnel is refused rather
  than misread.
* **The file is 0600** (created that way before SQLite touches it; SQLite gives
  its ``-wal``/``-shm`` files the database's mode).  Client names and error
  texts are not secrets, but nothing else needs to read them either.

Detecting interrupted runs
--------------------------
A run is inserted as ``running`` and updated when it ends.  If its process
dies in between, the row stays ``running``; :meth:`History.recover_interrupted`
(called on start-up) marks such rows ``interrupted``.  A row belongs to a
process identified by its pid **plus** that process's start time (field 22 of
``/proc/<pid>/stat``, clock ticks since boot) **plus** the kernel boot id.  A
row is left alone only if exactly that process is still alive and not a zombie,
so

* a one-shot ``pull`` never marks the daemon's live run (or vice versa): the
  daemon is alive with the recorded start time;
* a recycled pid is not mistaken for the original owner: its start time
  differs (and after a reboot the boot id differs);
* the calling process's own rows are alive by definition and are left alone.

This was preferred over probing the per-client run lock because probing takes
the lock for a moment and could make a concurrent, legitimate acquisition fail
with "busy".  Without ``/proc`` (not Linux) it falls back to ``kill(pid, 0)``,
which cannot detect pid reuse.  All processes sharing a ``state_dir`` must see
the same pid namespace (do not share it between containers).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import TracebackType

__all__ = [
    "DB_FILENAME",
    "SCHEMA_VERSION",
    "History",
    "HistoryError",
    "ProcessIdentity",
    "RunRecord",
    "RunResult",
    "RunStats",
]

DB_FILENAME: Final = "history.sqlite3"
BUSY_TIMEOUT_SECONDS: Final = 30.0

# _MIGRATIONS[n] upgrades a database from user_version n to n + 1.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE runs (
            id                INTEGER PRIMARY KEY AUTOINCREMENT,
            client            TEXT    NOT NULL,
            trigger           TEXT    NOT NULL,
            started           TEXT    NOT NULL,
            finished          TEXT,
            result            TEXT    NOT NULL,
            exit_code         INTEGER,
            archive           TEXT,
            original_size     INTEGER,
            compressed_size   INTEGER,
            deduplicated_size INTEGER,
            nfiles            INTEGER,
            duration          REAL,
            error             TEXT,
            pid               INTEGER NOT NULL,
            pid_start         INTEGER,
            boot_id           TEXT
        )
        """,
        "CREATE INDEX runs_by_client ON runs (client, started DESC, id DESC)",
        "CREATE INDEX runs_running ON runs (result) WHERE result = 'running'",
    ),
    (
        # The id the server's own borg read for the run's archive: a later run that names an
        # already recorded id has not written a new archive.
        "ALTER TABLE runs ADD COLUMN archive_id TEXT",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

_COLUMNS: Final = (
    "id, client, trigger, started, finished, result, exit_code, archive, original_size,"
    " compressed_size, deduplicated_size, nfiles, duration, error, pid"
)
_NEWEST_FIRST: Final = "ORDER BY started DESC, id DESC"


class HistoryError(Exception):
    """The history database cannot be used as asked."""


class RunResult(StrEnum):
    """Outcome of a run; ``RUNNING`` only while it is in progress."""

    RUNNING = "running"
    OK = "ok"
    WARNING = "warning"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


_SUCCESSES: Final = (RunResult.OK, RunResult.WARNING)


@dataclass(frozen=True)
class RunStats:
    """What borg reported about the archive it created; unknown values are None.

    ``duration`` is borg's own figure in seconds, which excludes connecting.
    """

    original_size: int | None = None
    compressed_size: int | None = None
    deduplicated_size: int | None = None
    nfiles: int | None = None
    duration: float | None = None


@dataclass(frozen=True)
class RunRecord:
    """One row of the history."""

    id: int
    client: str
    trigger: str
    started: datetime
    finished: datetime | None
    result: RunResult
    exit_code: int | None
    archive: str | None
    stats: RunStats
    error: str | None
    pid: int

    @property
    def succeeded(self) -> bool:
        """Whether an archive was created (borg's warnings still leave one behind)."""
        return self.result in _SUCCESSES


@dataclass(frozen=True)
class ProcessIdentity:
    """A process, told apart from later processes that reuse its pid.

    ``start_ticks`` and ``boot_id`` are None where ``/proc`` does not provide them.
    """

    pid: int
    start_ticks: int | None
    boot_id: str | None

    @classmethod
    def current(cls) -> ProcessIdentity:
        """The identity of the calling process."""
        pid = os.getpid()
        stat = _read_proc_stat(pid)
        return cls(pid, stat[1] if stat else None, _boot_id())

    def is_alive(self) -> bool:
        """Whether this very process still runs (zombies count as dead)."""
        current_boot = _boot_id()
        if self.boot_id is not None and current_boot is not None and self.boot_id != current_boot:
            return False  # rebooted since: every process of that boot is gone
        if not Path("/proc/self/stat").exists():
            return _pid_exists(self.pid)
        stat = _read_proc_stat(self.pid)
        if stat is None:
            return False
        state, start_ticks = stat
        if state in {"Z", "X"}:
            return False
        return self.start_ticks is None or start_ticks == self.start_ticks


def _read_proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in ticks) of *pid* from ``/proc``, or None if there is no such process.

    The command name (field 2) may contain spaces and parentheses, so the
    fields are counted from the last ``)``.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime)
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _utc_text(when: datetime) -> str:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"timestamps must be timezone-aware, got naive {when!r}")
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def _from_utc_text(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _now() -> datetime:
    return datetime.now(UTC)


def _record(row: sqlite3.Row) -> RunRecord:
    finished = row["finished"]
    return RunRecord(
        id=row["id"],
        client=row["client"],
        trigger=row["trigger"],
        started=_from_utc_text(row["started"]),
        finished=_from_utc_text(finished) if finished is not None else None,
        result=RunResult(row["result"]),
        exit_code=row["exit_code"],
        archive=row["archive"],
        stats=RunStats(
            original_size=row["original_size"],
            compressed_size=row["compressed_size"],
            deduplicated_size=row["deduplicated_size"],
            nfiles=row["nfiles"],
            duration=row["duration"],
        ),
        error=row["error"],
        pid=row["pid"],
    )


def _create_private_file(path: Path) -> None:
    """Make sure *path* exists with mode 0600 before SQLite opens it.

    An existing database is never opened (and so never closed) from Python: POSIX drops all of
    a process's fcntl locks on a file when *any* descriptor of it is closed, and SQLite relies
    on those locks. Another process would then think it is the last user and delete the WAL
    under our live connection ("database disk image is malformed").
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.lstat().st_mode) & 0o077:
            path.chmod(0o600)
        return
    os.close(fd)  # a brand-new file: no SQLite connection can have locks on it yet


class History:
    """The run history of one borgtunnel server.

    Calls are short and synchronous; the daemon calls them from the event loop
    directly.  One object per thread (SQLite's default thread check applies).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        """Wrap an already prepared connection; use :meth:`open` instead."""
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, state_dir: Path) -> History:
        """Open (creating and migrating as needed) the history in *state_dir*."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = state_dir / DB_FILENAME
        _create_private_file(path)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            _configure(conn)
            _migrate(conn, path)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        """Close the database; further calls fail."""
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start_run(self, client: str, trigger: str, started: datetime | None = None) -> int:
        """Record that a run of *client* begins now (or at *started*); returns its id."""
        me = ProcessIdentity.current()  # per call: a forked child records its own pid
        when = _now() if started is None else started
        with _write(self._conn):
            cursor = self._conn.execute(
                "INSERT INTO runs (client, trigger, started, result, pid, pid_start, boot_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    client,
                    trigger,
                    _utc_text(when),
                    RunResult.RUNNING.value,
                    me.pid,
                    me.start_ticks,
                    me.boot_id,
                ),
            )
        run_id = cursor.lastrowid
        if run_id is None:  # pragma: no cover - sqlite always sets it after an INSERT
            raise HistoryError("SQLite did not report the new run's id")
        return run_id

    def finish_run(
        self,
        run_id: int,
        result: RunResult,
        *,
        exit_code: int | None = None,
        archive: str | None = None,
        archive_id: str | None = None,
        stats: RunStats | None = None,
        error: str | None = None,
        finished: datetime | None = None,
    ) -> None:
        """Record how run *run_id* ended.

        A run already marked ``interrupted`` (its process was wrongly taken for
        dead) is overwritten: the real outcome is better information.
        """
        if result is RunResult.RUNNING:
            raise ValueError("a run cannot finish as 'running'")
        stats = stats or RunStats()
        when = _now() if finished is None else finished
        with _write(self._conn):
            cursor = self._conn.execute(
                "UPDATE runs SET finished = ?, result = ?, exit_code = ?, archive = ?,"
                " archive_id = ?, original_size = ?, compressed_size = ?, deduplicated_size = ?,"
                " nfiles = ?, duration = ?, error = ? WHERE id = ?",
                (
                    _utc_text(when),
                    RunResult(result).value,
                    exit_code,
                    archive,
                    archive_id,
                    stats.original_size,
                    stats.compressed_size,
                    stats.deduplicated_size,
                    stats.nfiles,
                    stats.duration,
                    error,
                    run_id,
                ),
            )
        if cursor.rowcount != 1:
            raise HistoryError(f"no run with id {run_id} in {self.path}")

    def recover_interrupted(self) -> int:
        """Mark ``running`` rows whose process is gone as ``interrupted``; returns how many.

        See the module docstring for how a row's process is identified.  The
        finish time stays empty because when the process died is unknown.
        """
        with _write(self._conn):
            rows = self._conn.execute(
                "SELECT id, pid, pid_start, boot_id FROM runs WHERE result = ?",
                (RunResult.RUNNING.value,),
            ).fetchall()
            dead = [
                row
                for row in rows
                if not ProcessIdentity(row["pid"], row["pid_start"], row["boot_id"]).is_alive()
            ]
            detected = _utc_text(_now())
            for row in dead:
                error = (
                    f"process {row['pid']} recording this run ended before the run"
                    f" finished (noticed by pid {os.getpid()} at {detected})"
                )
                self._conn.execute(
                    "UPDATE runs SET result = ?, error = ? WHERE id = ? AND result = ?",
                    (RunResult.INTERRUPTED.value, error, row["id"], RunResult.RUNNING.value),
                )
        return len(dead)

    def get(self, run_id: int) -> RunRecord | None:
        """The run with id *run_id*, if any."""
        row = self._conn.execute(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()  # noqa: S608 - constant column list
        return _record(row) if row is not None else None

    def last_runs(self, client: str, limit: int = 10) -> list[RunRecord]:
        """The *limit* most recently started runs of *client*, newest first."""
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM runs WHERE client = ? {_NEWEST_FIRST} LIMIT ?",  # noqa: S608 - constants only
            (client, limit),
        ).fetchall()
        return [_record(row) for row in rows]

    def last_run(self, client: str) -> RunRecord | None:
        """The most recently started run of *client*, whatever its state."""
        runs = self.last_runs(client, 1)
        return runs[0] if runs else None

    def last_success(self, client: str) -> RunRecord | None:
        """The newest run of *client* that created an archive (``ok`` or ``warning``)."""
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM runs WHERE client = ? AND result IN (?, ?)"  # noqa: S608 - constants only
            f" {_NEWEST_FIRST} LIMIT 1",
            (client, *(result.value for result in _SUCCESSES)),
        ).fetchone()
        return _record(row) if row is not None else None

    def archive_ids(self, client: str) -> set[str]:
        """Every archive id recorded for *client* (verified runs only record one)."""
        rows = self._conn.execute(
            "SELECT archive_id FROM runs WHERE client = ? AND archive_id IS NOT NULL", (client,)
        ).fetchall()
        return {row["archive_id"] for row in rows}

    def clients(self) -> list[str]:
        """Every client that has at least one recorded run, sorted."""
        rows = self._conn.execute("SELECT DISTINCT client FROM runs ORDER BY client").fetchall()
        return [row["client"] for row in rows]


@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """A ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction, rolled back on any error.

    ``IMMEDIATE`` takes the write lock at the start, so a concurrent writer
    waits in the busy handler instead of failing later with SQLITE_BUSY when
    upgrading a read transaction.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise HistoryError(f"cannot switch the history database to WAL mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode, fewer fsyncs


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to :data:`SCHEMA_VERSION` in one transaction."""
    with _write(conn):
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"{path} has schema version {version}, newer than this borgtunnel"
                f" understands ({SCHEMA_VERSION}); upgrade borgtunnel"
            )
        for statement in _pending_statements(version):
            conn.execute(statement)
        if version != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _pending_statements(version: int) -> Iterator[str]:
    for migration in _MIGRATIONS[version:]:
        yield from migration
