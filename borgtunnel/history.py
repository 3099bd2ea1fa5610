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

from borgtunnel.privatedir import check_private_file, ensure_private_dir

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping
    from types import TracebackType

__all__ = [
    "DB_FILENAME",
    "KIND_MAINTAIN",
    "KIND_PULL",
    "KIND_RESTORE",
    "SCHEMA_VERSION",
    "SOURCE_FAILED",
    "SOURCE_OK",
    "History",
    "HistoryError",
    "Operation",
    "ProcessIdentity",
    "RunRecord",
    "RunResult",
    "RunStats",
    "SentNotification",
    "SourceSummary",
    "VerifiedArchive",
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
    # 2 -> 3: runs get a kind (pull, maintain, restore; old rows are pulls); what each
    # maintenance step did; the archives our own prune removed (or an administrator accepted as
    # gone), which the tamper check subtracts from the archives verified pulls created.
    (
        "ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'pull'",
        """
        CREATE TABLE operations (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id    INTEGER NOT NULL REFERENCES runs (id),
            client    TEXT    NOT NULL,
            operation TEXT    NOT NULL,
            started   TEXT    NOT NULL,
            finished  TEXT    NOT NULL,
            result    TEXT    NOT NULL,
            exit_code INTEGER,
            detail    TEXT
        )
        """,
        "CREATE INDEX operations_by_client ON operations (client, operation, started DESC)",
        """
        CREATE TABLE archive_removals (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            client  TEXT    NOT NULL,
            archive TEXT    NOT NULL,
            reason  TEXT    NOT NULL,
            run_id  INTEGER REFERENCES runs (id),
            at      TEXT    NOT NULL
        )
        """,
        "CREATE INDEX removals_by_client ON archive_removals (client, archive)",
        # The id each archive of ours had when maintenance first saw it: an archive deleted and
        # made again under the same name (through the client's tunnel) has another id.
        """
        CREATE TABLE archive_ids (
            client  TEXT NOT NULL,
            archive TEXT NOT NULL,
            id      TEXT NOT NULL,
            seen    TEXT NOT NULL,
            PRIMARY KEY (client, archive)
        )
        """,
    ),
    # 3 -> 4: what was notified, so a restarted daemon neither repeats nor forgets a message.
    (
        """
        CREATE TABLE notifications (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,
            client    TEXT    NOT NULL,
            kind      TEXT    NOT NULL,
            created   TEXT    NOT NULL,
            run_id    INTEGER,
            title     TEXT    NOT NULL,
            body      TEXT    NOT NULL,
            state     TEXT    NOT NULL,
            attempts  INTEGER NOT NULL DEFAULT 0,
            finished  TEXT,
            error     TEXT
        )
        """,
        "CREATE INDEX notifications_by_client ON notifications (client, id DESC)",
        "CREATE INDEX notifications_pending ON notifications (state) WHERE state = 'pending'",
    ),
    # 4 -> 5: when the daemon first saw each client, so a client that was never backed up is
    # not stale before its first slot, and a slot missed before its first run is caught up.
    (
        """
        CREATE TABLE clients_seen (
            client     TEXT PRIMARY KEY,
            first_seen TEXT NOT NULL
        )
        """,
    ),
    # 5 -> 6: what each pull with sources said about each source (by its configured name):
    # ``ok`` (its dump is in the verified archive) or ``failed`` (the dump failed, or its file is
    # missing or empty in the archive). A run that failed for another reason records none.
    (
        """
        CREATE TABLE run_sources (
            run_id INTEGER NOT NULL REFERENCES runs (id),
            client TEXT    NOT NULL,
            source TEXT    NOT NULL,
            result TEXT    NOT NULL
        )
        """,
        "CREATE INDEX run_sources_by_client ON run_sources (client, source)",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

_COLUMNS: Final = (
    "id, client, trigger, started, finished, result, exit_code, archive, original_size,"
    " compressed_size, deduplicated_size, nfiles, duration, error, pid, kind"
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
    # A ``before`` hook asked to skip this run (exit 75): no archive, and not a failure either.
    SKIPPED = "skipped"


_SUCCESSES: Final = (RunResult.OK, RunResult.WARNING)

# What a run does (the ``kind`` column). Rows from before schema version 2 are pulls.
KIND_PULL: Final = "pull"
KIND_MAINTAIN: Final = "maintain"
KIND_RESTORE: Final = "restore"


@dataclass(frozen=True)
class Operation:
    """One step of a maintenance run: ``prune``, ``compact``, ``check`` or ``accept``.

    ``detail`` is a short human-readable text (what was removed, freed, found).
    """

    operation: str
    started: datetime
    finished: datetime
    result: RunResult
    exit_code: int | None = None
    detail: str | None = None


@dataclass(frozen=True)
class VerifiedArchive:
    """An archive a verified pull made: its name, its id (None in rows older than schema 2)
    and when the server started that pull."""

    name: str
    id: str | None
    time: datetime


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
    kind: str = "pull"

    @property
    def succeeded(self) -> bool:
        """Whether an archive was created (borg's warnings still leave one behind)."""
        return self.result in _SUCCESSES


# What a run says about one of its sources (the ``run_sources`` table).
SOURCE_OK: Final = "ok"
SOURCE_FAILED: Final = "failed"


@dataclass(frozen=True)
class SourceSummary:
    """Everything the history says about one source of one client.

    ``last_success``: start of the newest verified pull whose archive holds the source's dump;
    ``last_failure``: start of the newest pull that failed because of it; ``failures``: how many
    pulls did.
    """

    last_success: datetime | None = None
    last_failure: datetime | None = None
    failures: int = 0


@dataclass(frozen=True)
class SentNotification:
    """One notification as recorded: decided (``pending``), then ``sent`` or ``failed``."""

    id: int
    client: str
    kind: str
    created: datetime
    run_id: int | None
    title: str
    body: str
    state: str
    attempts: int
    error: str | None


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
        kind=row["kind"],
    )


def _notification(row: sqlite3.Row) -> SentNotification:
    return SentNotification(
        id=row["id"],
        client=row["client"],
        kind=row["kind"],
        created=_from_utc_text(row["created"]),
        run_id=row["run_id"],
        title=row["title"],
        body=row["body"],
        state=row["state"],
        attempts=row["attempts"],
        error=row["error"],
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
        # lstat, not stat: a planted symlink is refused, never followed by chmod. Between the
        # check and the chmod only we (or root) can swap it: the directory passed
        # ensure_private_dir.
        info = check_private_file(path)
        if stat.S_IMODE(info.st_mode) & 0o077:
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
        ensure_private_dir(state_dir)  # refuses (never chmods) a shared or foreign one
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

    def start_run(
        self, client: str, trigger: str, started: datetime | None = None, *, kind: str = KIND_PULL
    ) -> int:
        """Record that a run of *client* begins now (or at *started*); returns its id.

        *kind* is what the run does: ``pull`` (the default), ``maintain`` or ``restore``.
        """
        me = ProcessIdentity.current()  # per call: a forked child records its own pid
        when = _now() if started is None else started
        with _write(self._conn):
            cursor = self._conn.execute(
                "INSERT INTO runs (client, trigger, started, result, pid, pid_start, boot_id,"
                " kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    client,
                    trigger,
                    _utc_text(when),
                    RunResult.RUNNING.value,
                    me.pid,
                    me.start_ticks,
                    me.boot_id,
                    kind,
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
        sources: Mapping[str, str] | None = None,
    ) -> None:
        """Record how run *run_id* ended.

        A run already marked ``interrupted`` (its process was wrongly taken for
        dead) is overwritten: the real outcome is better information.
        *sources* maps a configured source's name to :data:`SOURCE_OK` or
        :data:`SOURCE_FAILED` (only the sources the run has a word on).
        """
        for verdict in (sources or {}).values():
            if verdict not in (SOURCE_OK, SOURCE_FAILED):
                raise ValueError(f"a source cannot end as {verdict!r}")
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
            if sources:
                self._conn.execute("DELETE FROM run_sources WHERE run_id = ?", (run_id,))
                self._conn.executemany(
                    "INSERT INTO run_sources (run_id, client, source, result)"
                    " SELECT id, client, ?, ? FROM runs WHERE id = ?",
                    [(name, verdict, run_id) for name, verdict in sources.items()],
                )

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

    def last_runs(
        self, client: str, limit: int = 10, *, kind: str | None = None
    ) -> list[RunRecord]:
        """The *limit* most recently started runs of *client*, newest first (only *kind*)."""
        if kind is None:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM runs WHERE client = ? {_NEWEST_FIRST} LIMIT ?",  # noqa: S608 - constants only
                (client, limit),
            ).fetchall()
        else:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM runs WHERE client = ? AND kind = ?"  # noqa: S608 - constants only
                f" {_NEWEST_FIRST} LIMIT ?",
                (client, kind, limit),
            ).fetchall()
        return [_record(row) for row in rows]

    def last_run(self, client: str) -> RunRecord | None:
        """The most recently started run of *client*, whatever its state."""
        runs = self.last_runs(client, 1)
        return runs[0] if runs else None

    def last_success(self, client: str) -> RunRecord | None:
        """The newest pull of *client* that created an archive (``ok`` or ``warning``)."""
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM runs WHERE client = ? AND result IN (?, ?)"  # noqa: S608 - constants only
            f" AND kind = '{KIND_PULL}' {_NEWEST_FIRST} LIMIT 1",
            (client, *(result.value for result in _SUCCESSES)),
        ).fetchone()
        return _record(row) if row is not None else None

    def recorded_archive_ids(self, client: str) -> set[str]:
        """Every archive id a verified run of *client* recorded."""
        rows = self._conn.execute(
            "SELECT archive_id FROM runs WHERE client = ? AND archive_id IS NOT NULL", (client,)
        ).fetchall()
        return {row["archive_id"] for row in rows}

    # --- maintenance -----------------------------------------------------------------------

    def record_operation(self, run_id: int, client: str, operation: Operation) -> None:
        """Record one finished maintenance step (prune, compact, check, accept) of run *run_id*."""
        with _write(self._conn):
            self._conn.execute(
                "INSERT INTO operations (run_id, client, operation, started, finished, result,"
                " exit_code, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    client,
                    operation.operation,
                    _utc_text(operation.started),
                    _utc_text(operation.finished),
                    RunResult(operation.result).value,
                    operation.exit_code,
                    operation.detail,
                ),
            )

    def last_operation(
        self, client: str, operation: str, *, succeeded: bool = False
    ) -> Operation | None:
        """The newest recorded step *operation* (e.g. ``check``) of *client*; with
        *succeeded*, the newest that ended ``ok`` or ``warning``."""
        wanted = _SUCCESSES if succeeded else tuple(RunResult)
        marks = ", ".join("?" for _ in wanted)
        row = self._conn.execute(
            "SELECT operation, started, finished, result, exit_code, detail FROM operations"  # noqa: S608 - placeholders only
            f" WHERE client = ? AND operation = ? AND result IN ({marks})"
            " ORDER BY started DESC, id DESC LIMIT 1",
            (client, operation, *(result.value for result in wanted)),
        ).fetchone()
        if row is None:
            return None
        return Operation(
            operation=row["operation"],
            started=_from_utc_text(row["started"]),
            finished=_from_utc_text(row["finished"]),
            result=RunResult(row["result"]),
            exit_code=row["exit_code"],
            detail=row["detail"],
        )

    def record_removals(
        self, client: str, archives: Iterable[str], reason: str, run_id: int | None
    ) -> None:
        """Archives that left the repository with our knowledge: ``pruned`` by our own prune,
        or ``accepted`` by an administrator after a tamper report."""
        when = _utc_text(_now())
        names = list(archives)
        with _write(self._conn):
            self._conn.executemany(
                "INSERT INTO archive_removals (client, archive, reason, run_id, at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(client, name, reason, run_id, when) for name in names],
            )
            # A name made again later (by a legitimate pull) starts with a new id.
            self._conn.executemany(
                "DELETE FROM archive_ids WHERE client = ? AND archive = ?",
                [(client, name) for name in names],
            )

    def archive_ids(self, client: str) -> dict[str, str]:
        """Archive name -> the id maintenance first saw it with."""
        rows = self._conn.execute(
            "SELECT archive, id FROM archive_ids WHERE client = ?", (client,)
        ).fetchall()
        return {row["archive"]: row["id"] for row in rows}

    def remember_archive_ids(
        self, client: str, ids: Mapping[str, str], *, replace: bool = False
    ) -> None:
        """Record ids of archives not known yet (``replace``: overwrite, for an accepted
        replacement)."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        when = _utc_text(_now())
        with _write(self._conn):
            self._conn.executemany(
                f"{verb} INTO archive_ids (client, archive, id, seen) VALUES (?, ?, ?, ?)",
                [(client, name, archive_id, when) for name, archive_id in ids.items()],
            )

    def last_removal(self, client: str, reason: str) -> datetime | None:
        """When archives of *client* were last removed for *reason* (``pruned``, ``accepted``)."""
        row = self._conn.execute(
            "SELECT MAX(at) AS at FROM archive_removals WHERE client = ? AND reason = ?",
            (client, reason),
        ).fetchone()
        return _from_utc_text(row["at"]) if row is not None and row["at"] else None

    def verified_archives(self, client: str, *, by_id: bool = False) -> dict[str, VerifiedArchive]:
        """The archives verified pulls of *client* made that should still be in its repository
        (minus those removed with our knowledge since; a name created again later counts
        again), keyed by name, or by id with ``by_id`` (borg 2, whose names are series; its
        removals are recorded by id too). Each with the time the server started its pull:
        retention's clock, never the time the client wrote into the archive.
        """
        column = "archive_id" if by_id else "archive"
        created: dict[str, tuple[str, VerifiedArchive]] = {}
        for row in self._conn.execute(
            f"SELECT {column} AS archive_key, archive, archive_id, started,"  # noqa: S608 - one of two fixed names
            " COALESCE(finished, started) AS at FROM runs"
            f" WHERE client = ? AND kind = ? AND {column} IS NOT NULL AND archive IS NOT NULL"
            " AND result IN (?, ?)",
            (client, KIND_PULL, *(result.value for result in _SUCCESSES)),
        ):
            key = row["archive_key"]
            if key not in created or created[key][0] < row["at"]:
                made = VerifiedArchive(
                    row["archive"], row["archive_id"], _from_utc_text(row["started"])
                )
                created[key] = (row["at"], made)
        for row in self._conn.execute(
            "SELECT archive, MAX(at) AS at FROM archive_removals WHERE client = ? GROUP BY archive",
            (client,),
        ):
            if row["archive"] in created and created[row["archive"]][0] <= row["at"]:
                del created[row["archive"]]
        return {key: made for key, (_, made) in created.items()}

    def expected_archives(self, client: str, *, by_id: bool = False) -> set[str]:
        """The keys of :meth:`verified_archives`: what should be in the repository."""
        return set(self.verified_archives(client, by_id=by_id))

    def result_counts(self) -> dict[tuple[str, RunResult], int]:
        """(client, result) -> how many finished runs: the ``runs_total`` metric."""
        rows = self._conn.execute(
            "SELECT client, result, count(*) AS n FROM runs WHERE result != ?"
            " GROUP BY client, result",
            (RunResult.RUNNING.value,),
        ).fetchall()
        return {(row["client"], RunResult(row["result"])): row["n"] for row in rows}

    # --- sources ---------------------------------------------------------------------

    def run_sources(self, run_id: int) -> dict[str, str]:
        """Source name -> ``ok``/``failed`` as run *run_id* recorded them (in that order)."""
        rows = self._conn.execute(
            "SELECT source, result FROM run_sources WHERE run_id = ? ORDER BY rowid", (run_id,)
        ).fetchall()
        return {row["source"]: row["result"] for row in rows}

    def source_summaries(self) -> dict[tuple[str, str], SourceSummary]:
        """(client, source) -> its :class:`SourceSummary`: the per-source metrics."""
        found: dict[tuple[str, str], SourceSummary] = {}
        for row in self._conn.execute(
            "SELECT s.client, s.source, s.result, count(*) AS n, max(r.started) AS newest"
            " FROM run_sources s JOIN runs r ON r.id = s.run_id GROUP BY s.client, s.source,"
            " s.result"
        ):
            key = (row["client"], row["source"])
            known = found.get(key, SourceSummary())
            newest = _from_utc_text(row["newest"])
            if row["result"] == SOURCE_OK:
                known = SourceSummary(newest, known.last_failure, known.failures)
            elif row["result"] == SOURCE_FAILED:
                known = SourceSummary(known.last_success, newest, row["n"])
            found[key] = known
        return found

    # --- notifications ---------------------------------------------------------------

    def add_notification(
        self,
        client: str,
        kind: str,
        title: str,
        body: str,
        *,
        run_id: int | None = None,
        created: datetime | None = None,
    ) -> int:
        """Record a decided notification as ``pending`` before it is sent; returns its id."""
        when = _now() if created is None else created
        with _write(self._conn):
            cursor = self._conn.execute(
                "INSERT INTO notifications (client, kind, created, run_id, title, body, state)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                (client, kind, _utc_text(when), run_id, title, body),
            )
        if cursor.lastrowid is None:  # pragma: no cover - sqlite always sets it
            raise HistoryError("SQLite did not report the new notification's id")
        return cursor.lastrowid

    def finish_notification(
        self, notification_id: int, state: str, *, attempts: int, error: str | None = None
    ) -> None:
        """``sent``, ``failed`` (every attempt failed) or ``muted`` (deliberately not sent)."""
        if state not in {"sent", "failed", "muted"}:
            raise ValueError(f"a notification cannot finish as {state!r}")
        with _write(self._conn):
            self._conn.execute(
                "UPDATE notifications SET state = ?, attempts = ?, finished = ?, error = ?"
                " WHERE id = ?",
                (state, attempts, _utc_text(_now()), error, notification_id),
            )

    def notifications(self, client: str, limit: int = 100) -> list[SentNotification]:
        """The client's notifications, newest first."""
        rows = self._conn.execute(
            "SELECT * FROM notifications WHERE client = ? ORDER BY id DESC LIMIT ?",
            (client, limit),
        ).fetchall()
        return [_notification(row) for row in rows]

    def pending_notifications(self) -> list[SentNotification]:
        """Decided but never finished (the process stopped while sending), oldest first."""
        rows = self._conn.execute(
            "SELECT * FROM notifications WHERE state = 'pending' ORDER BY id"
        ).fetchall()
        return [_notification(row) for row in rows]

    # --- clients ---------------------------------------------------------------------

    def record_first_seen(self, clients: Iterable[str], when: datetime) -> None:
        """Remember ``when`` as the first sighting of each client not seen before."""
        with _write(self._conn):
            self._conn.executemany(
                "INSERT OR IGNORE INTO clients_seen (client, first_seen) VALUES (?, ?)",
                [(client, _utc_text(when)) for client in clients],
            )

    def first_seen(self, client: str) -> datetime | None:
        """The earlier of the client's first sighting by a daemon and its first recorded run;
        None when neither exists (no daemon ever ran with it and it never ran)."""
        row = self._conn.execute(
            "SELECT min(seen) FROM (SELECT first_seen AS seen FROM clients_seen WHERE client = ?"
            " UNION ALL SELECT min(started) FROM runs WHERE client = ?)",
            (client, client),
        ).fetchone()
        return _from_utc_text(row[0]) if row is not None and row[0] is not None else None

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
