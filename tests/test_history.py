"""Tests for borgtunnel.history: the SQLite run history."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest

from borgtunnel.history import (
    _MIGRATIONS,
    DB_FILENAME,
    SCHEMA_VERSION,
    SOURCE_FAILED,
    SOURCE_OK,
    History,
    HistoryError,
    ProcessIdentity,
    RunRecord,
    RunResult,
    RunStats,
    SourceSummary,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    Spawn = Callable[..., subprocess.Popen[str]]

T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)

# A child that records a run and then either exits at once ("exit") or says
# "started" and sleeps until it is killed ("sleep").
_CHILD_RUN = """
import sys, time
from pathlib import Path
from borgtunnel.history import History
h = History.open(Path(sys.argv[1]))
h.start_run(sys.argv[2], "daemon")
h.close()
if sys.argv[3] == "sleep":
    print("started", flush=True)
    time.sleep(60)
"""

# A child that waits for a go-file and then records many runs as fast as it can.
_CHILD_WRITER = """
import sys, time
from pathlib import Path
from borgtunnel.history import History, RunResult
state, client, count, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
with History.open(state) as h:
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    for n in range(count):
        run = h.start_run(client, "pull")
        h.finish_run(run, RunResult.OK, exit_code=0, archive=f"{client}-{n}")
"""


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def history(state_dir: Path) -> Iterator[History]:
    with History.open(state_dir) as h:
        yield h


def _expect_line(child: subprocess.Popen[str], expected: str) -> None:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    assert line == expected, f"child said {line!r}, exit status {child.poll()}"


def _raw(state_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(state_dir / DB_FILENAME, isolation_level=None)


def _run_child_to_exit(spawn: Spawn, state_dir: Path, client: str) -> int:
    child = spawn(sys.executable, "-c", _CHILD_RUN, str(state_dir), client, "exit")
    assert child.wait(timeout=30) == 0
    return child.pid


# --- recording runs -------------------------------------------------------------


def test_round_trip(history: History) -> None:
    stats = RunStats(
        original_size=10_000_000_000,
        compressed_size=4_000_000_000,
        deduplicated_size=12_345,
        nfiles=321,
        duration=42.5,
    )
    run_id = history.start_run("alpha", "daemon", started=T0)
    history.finish_run(
        run_id,
        RunResult.WARNING,
        exit_code=1,
        archive="alpha-2024-03-01T12:00:00",
        stats=stats,
        error="file changed while we read it",
        finished=T0 + timedelta(minutes=3),
    )
    expected = RunRecord(
        id=run_id,
        client="alpha",
        trigger="daemon",
        started=T0,
        finished=T0 + timedelta(minutes=3),
        result=RunResult.WARNING,
        exit_code=1,
        archive="alpha-2024-03-01T12:00:00",
        stats=stats,
        error="file changed while we read it",
        pid=os.getpid(),
    )
    assert history.get(run_id) == expected
    assert history.last_run("alpha") == expected
    assert history.get(run_id + 1) is None


def test_started_run_is_running_with_defaults(history: History) -> None:
    before = datetime.now(UTC)
    run_id = history.start_run("alpha", "pull")
    record = history.get(run_id)
    assert record is not None
    assert record.result is RunResult.RUNNING
    assert before <= record.started <= datetime.now(UTC)
    assert record.started.tzinfo == UTC
    assert record.finished is None
    assert record.stats == RunStats()
    assert (record.exit_code, record.archive, record.error) == (None, None, None)


def test_finish_defaults_to_now_and_empty_stats(history: History) -> None:
    run_id = history.start_run("alpha", "pull", started=T0)
    history.finish_run(run_id, RunResult.FAILED, exit_code=2, error="connection refused")
    record = history.get(run_id)
    assert record is not None
    assert record.finished is not None
    assert record.finished > T0
    assert record.stats == RunStats()
    assert record.result is RunResult.FAILED
    assert not record.succeeded


def test_timestamps_are_stored_as_utc(history: History, state_dir: Path) -> None:
    cest = timezone(timedelta(hours=2))
    run_id = history.start_run("alpha", "pull", started=datetime(2024, 6, 1, 14, 0, tzinfo=cest))
    record = history.get(run_id)
    assert record is not None
    assert record.started == datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    assert record.started.tzinfo == UTC
    with _raw(state_dir) as conn:
        (text,) = conn.execute("SELECT started FROM runs WHERE id = ?", (run_id,)).fetchone()
    conn.close()
    assert text == "2024-06-01T12:00:00.000000+00:00"


def test_naive_datetimes_are_refused(history: History) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        history.start_run("alpha", "pull", started=datetime(2024, 1, 1))  # noqa: DTZ001
    run_id = history.start_run("alpha", "pull")
    with pytest.raises(ValueError, match="timezone-aware"):
        history.finish_run(run_id, RunResult.OK, finished=datetime(2024, 1, 1))  # noqa: DTZ001


def test_finish_rejects_running_and_unknown_ids(history: History) -> None:
    run_id = history.start_run("alpha", "pull")
    with pytest.raises(ValueError, match="running"):
        history.finish_run(run_id, RunResult.RUNNING)
    with pytest.raises(HistoryError, match="no run with id"):
        history.finish_run(run_id + 100, RunResult.OK)


# --- queries ---------------------------------------------------------------------


def test_last_runs_newest_first_with_limit(history: History) -> None:
    # Inserted out of chronological order: ordering must follow `started`, not ids.
    offsets = [3, 1, 4, 0, 2]
    ids = {
        off: history.start_run("alpha", "daemon", started=T0 + timedelta(hours=off))
        for off in offsets
    }
    history.start_run("beta", "daemon", started=T0 + timedelta(hours=10))

    runs = history.last_runs("alpha", 3)
    assert [r.id for r in runs] == [ids[4], ids[3], ids[2]]
    assert all(r.client == "alpha" for r in runs)
    assert [r.id for r in history.last_runs("alpha", 10)] == [ids[o] for o in (4, 3, 2, 1, 0)]
    assert history.last_runs("nobody", 5) == []


def test_same_start_time_orders_by_id(history: History) -> None:
    first = history.start_run("alpha", "daemon", started=T0)
    second = history.start_run("alpha", "pull", started=T0)
    assert [r.id for r in history.last_runs("alpha", 2)] == [second, first]


def test_last_run_is_newest_in_any_state(history: History) -> None:
    assert history.last_run("alpha") is None
    done = history.start_run("alpha", "daemon", started=T0)
    history.finish_run(done, RunResult.OK)
    running = history.start_run("alpha", "daemon", started=T0 + timedelta(hours=1))
    last = history.last_run("alpha")
    assert last is not None
    assert last.id == running
    assert last.result is RunResult.RUNNING


def test_last_success_ignores_unsuccessful_runs(history: History) -> None:
    assert history.last_success("alpha") is None

    def run(hours: int, result: RunResult | None) -> int:
        run_id = history.start_run("alpha", "daemon", started=T0 + timedelta(hours=hours))
        if result is not None:
            history.finish_run(run_id, result)
        return run_id

    ok = run(0, RunResult.OK)
    run(1, RunResult.FAILED)
    run(2, RunResult.INTERRUPTED)
    run(3, None)  # still running
    history.start_run("beta", "daemon", started=T0 + timedelta(hours=5))

    success = history.last_success("alpha")
    assert success is not None
    assert success.id == ok

    # borg's "warning" still produced an archive, so it counts as a success.
    warning = run(4, RunResult.WARNING)
    success = history.last_success("alpha")
    assert success is not None
    assert success.id == warning
    assert success.succeeded
    assert history.last_success("beta") is None


def test_clients_sorted_and_distinct(history: History) -> None:
    assert history.clients() == []
    for client in ["zulu", "alpha", "mike", "alpha"]:
        history.start_run(client, "daemon")
    assert history.clients() == ["alpha", "mike", "zulu"]


# --- interrupted runs --------------------------------------------------------------


def test_recover_marks_run_of_dead_process(history: History, state_dir: Path, spawn: Spawn) -> None:
    dead_pid = _run_child_to_exit(spawn, state_dir, "alpha")
    (record,) = history.last_runs("alpha", 10)
    assert record.pid == dead_pid
    assert record.result is RunResult.RUNNING

    assert history.recover_interrupted() == 1

    recovered = history.get(record.id)
    assert recovered is not None
    assert recovered.result is RunResult.INTERRUPTED
    assert recovered.error is not None
    assert f"process {dead_pid}" in recovered.error
    assert recovered.finished is None
    assert history.recover_interrupted() == 0


def test_recover_leaves_live_other_process_alone(
    history: History, state_dir: Path, spawn: Spawn
) -> None:
    child = spawn(sys.executable, "-c", _CHILD_RUN, str(state_dir), "alpha", "sleep")
    _expect_line(child, "started")
    (record,) = history.last_runs("alpha", 1)
    assert record.pid == child.pid

    assert history.recover_interrupted() == 0
    still = history.get(record.id)
    assert still is not None
    assert still.result is RunResult.RUNNING

    child.kill()
    child.wait(timeout=10)
    assert history.recover_interrupted() == 1
    gone = history.get(record.id)
    assert gone is not None
    assert gone.result is RunResult.INTERRUPTED


def test_recover_leaves_own_running_run_alone(history: History) -> None:
    run_id = history.start_run("alpha", "daemon")
    assert history.recover_interrupted() == 0
    record = history.get(run_id)
    assert record is not None
    assert record.result is RunResult.RUNNING


def test_recover_from_second_history_object_in_same_process(state_dir: Path) -> None:
    # A second open of the DB in the same process (e.g. the CLI reusing the library)
    # must not take the first object's run for dead.
    with History.open(state_dir) as first, History.open(state_dir) as second:
        run_id = first.start_run("alpha", "daemon")
        assert second.recover_interrupted() == 0
        record = first.get(run_id)
        assert record is not None
        assert record.result is RunResult.RUNNING


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param("pid_start", -1, id="pid-reused-by-a-later-process"),
        pytest.param("boot_id", "00000000-not-this-boot", id="before-a-reboot"),
    ],
)
def test_recover_detects_reused_pid(
    history: History, state_dir: Path, column: str, value: object
) -> None:
    # The row names *this* pid, but a process that started at another time (or
    # before a reboot): the pid has been recycled, the recorder is gone.
    run_id = history.start_run("alpha", "daemon")
    with _raw(state_dir) as conn:
        conn.execute(f"UPDATE runs SET {column} = ? WHERE id = ?", (value, run_id))  # noqa: S608
    conn.close()
    assert history.recover_interrupted() == 1
    record = history.get(run_id)
    assert record is not None
    assert record.result is RunResult.INTERRUPTED


def test_recover_only_touches_running_rows(history: History, state_dir: Path, spawn: Spawn) -> None:
    dead_pid = _run_child_to_exit(spawn, state_dir, "alpha")
    (record,) = history.last_runs("alpha", 1)
    history.finish_run(record.id, RunResult.OK, exit_code=0)
    assert history.recover_interrupted() == 0
    finished = history.get(record.id)
    assert finished is not None
    assert finished.result is RunResult.OK
    assert finished.pid == dead_pid


def test_finish_overrides_a_wrong_interrupted_mark(history: History, state_dir: Path) -> None:
    run_id = history.start_run("alpha", "daemon")
    with _raw(state_dir) as conn:
        conn.execute("UPDATE runs SET pid_start = -1 WHERE id = ?", (run_id,))
    conn.close()
    assert history.recover_interrupted() == 1
    history.finish_run(run_id, RunResult.OK, exit_code=0)
    record = history.get(run_id)
    assert record is not None
    assert record.result is RunResult.OK
    assert record.error is None


def test_process_identity_of_current_process() -> None:
    me = ProcessIdentity.current()
    assert me.pid == os.getpid()
    assert me.is_alive()
    if me.start_ticks is not None:
        assert not replace(me, start_ticks=me.start_ticks + 1).is_alive()


def test_zombie_counts_as_dead(spawn: Spawn) -> None:
    # An exited but unreaped child still has /proc/<pid>; it must not count as alive.
    child = spawn("true")
    stat_path = f"/proc/{child.pid}/stat"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(stat_path, encoding="ascii") as f:  # noqa: PTH123
            if f.read().rpartition(")")[2].split()[0] == "Z":
                break
        time.sleep(0.01)
    else:  # pragma: no cover - `true` exits at once
        pytest.fail("`true` did not become a zombie")
    assert not ProcessIdentity(child.pid, None, None).is_alive()


# --- storage -----------------------------------------------------------------------


def test_files_and_directory_are_private(state_dir: Path) -> None:
    with History.open(state_dir) as h:
        h.start_run("alpha", "daemon")
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        for name in (DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm"):
            path = state_dir / name
            assert path.exists(), name
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


def test_existing_database_file_is_made_private(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700)
    (state_dir / DB_FILENAME).touch(mode=0o644)
    (state_dir / DB_FILENAME).chmod(0o644)
    with History.open(state_dir):
        pass
    assert stat.S_IMODE((state_dir / DB_FILENAME).stat().st_mode) == 0o600


def test_wal_mode_and_schema_version(history: History, state_dir: Path) -> None:
    with _raw(state_dir) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_reopen_keeps_runs(state_dir: Path) -> None:
    with History.open(state_dir) as h:
        run_id = h.start_run("alpha", "daemon", started=T0)
    with History.open(state_dir) as h:
        record = h.get(run_id)
    assert record is not None
    assert record.started == T0


def test_newer_schema_is_refused(state_dir: Path) -> None:
    History.open(state_dir).close()
    with _raw(state_dir) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(HistoryError, match="newer than this borgtunnel"):
        History.open(state_dir)


def test_closed_history_cannot_be_used(state_dir: Path) -> None:
    h = History.open(state_dir)
    h.close()
    with pytest.raises(sqlite3.ProgrammingError):
        h.start_run("alpha", "daemon")


# --- concurrency -------------------------------------------------------------------


def test_two_processes_write_concurrently(
    history: History, state_dir: Path, spawn: Spawn, tmp_path: Path
) -> None:
    count = 150
    go = tmp_path / "go"
    writers = [
        spawn(sys.executable, "-c", _CHILD_WRITER, str(state_dir), client, str(count), str(go))
        for client in ("alpha", "beta")
    ]
    for writer in writers:
        _expect_line(writer, "ready")
    go.touch()
    # This process writes too, while the children are at it.
    mine = [history.start_run("gamma", "daemon") for _ in range(50)]
    for run_id in mine:
        history.finish_run(run_id, RunResult.OK)
    for writer in writers:
        assert writer.wait(timeout=60) == 0

    for client, expected in (("alpha", count), ("beta", count), ("gamma", 50)):
        runs = history.last_runs(client, 1000)
        assert len(runs) == expected
        assert {r.result for r in runs} == {RunResult.OK}
    assert history.recover_interrupted() == 0


def test_two_history_objects_in_threads_write_concurrently(state_dir: Path) -> None:
    History.open(state_dir).close()  # create the schema once, up front
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(client: str) -> None:
        try:
            with History.open(state_dir) as h:
                barrier.wait(timeout=10)
                for _ in range(100):
                    h.finish_run(h.start_run(client, "pull"), RunResult.OK)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(c,)) for c in ("alpha", "beta")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    with History.open(state_dir) as h:
        assert len(h.last_runs("alpha", 1000)) == 100
        assert len(h.last_runs("beta", 1000)) == 100


def test_writer_waits_for_a_held_write_lock(history: History, state_dir: Path) -> None:
    # Another process holding the write lock makes us wait (busy_timeout), not fail.
    blocker = _raw(state_dir)
    results: list[int] = []

    def write() -> None:  # sqlite3 objects stay in the thread that made them
        with History.open(state_dir) as h:
            results.append(h.start_run("alpha", "daemon"))

    thread = threading.Thread(target=write)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        thread.start()
        thread.join(timeout=0.3)
        assert thread.is_alive(), "the writer should be waiting for the lock"
        blocker.execute("COMMIT")
        thread.join(timeout=30)
    finally:
        blocker.close()
    assert not thread.is_alive()
    assert len(results) == 1
    assert history.get(results[0]) is not None


def test_reopening_in_the_same_process_keeps_sqlite_locks(tmp_path: Path) -> None:
    """A second History.open() in a process with a live connection must not drop its locks.

    Regression: opening and closing the database file from Python released the process's fcntl
    locks, so another process's close deleted the WAL under the live connection.
    """
    first = History.open(tmp_path)
    try:
        run_id = first.start_run("web1", "daemon")
        History.open(tmp_path).close()  # e.g. a status query inside the daemon
        other = subprocess.run(
            [sys.executable, "-c", _OPEN_AND_CLOSE, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert other.returncode == 0, other.stderr
        assert (tmp_path / "history.sqlite3-wal").exists()  # still there for `first`
        first.finish_run(run_id, RunResult.OK)
        record = first.get(run_id)
        assert record is not None
        assert record.result is RunResult.OK
    finally:
        first.close()


_OPEN_AND_CLOSE = """
import sys
from pathlib import Path
from borgtunnel.history import History
History.open(Path(sys.argv[1])).close()
"""


def test_a_version_5_database_gets_the_run_sources_table_and_keeps_its_runs(
    state_dir: Path,
) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(state_dir / DB_FILENAME)
    for migration in _MIGRATIONS[:5]:
        for statement in migration:
            conn.execute(statement)
    conn.execute(
        "INSERT INTO runs (client, trigger, started, finished, result, pid)"
        " VALUES ('db1', 'daemon', ?, ?, 'ok', 1)",
        (T0.isoformat(), T0.isoformat()),
    )
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    with History.open(state_dir) as history:
        (old,) = history.last_runs("db1")
        assert history.run_sources(old.id) == {}  # nothing was recorded per source then
        assert history.source_summaries() == {}
        run_id = history.start_run("db1", "pull", started=T0 + timedelta(hours=1))
        history.finish_run(run_id, RunResult.OK, sources={"app": SOURCE_OK})
        assert history.run_sources(run_id) == {"app": SOURCE_OK}


def test_source_results_are_recorded_per_run_and_summarised(history: History) -> None:
    def pull(hours: int, result: RunResult, sources: dict[str, str]) -> int:
        run_id = history.start_run("db1", "daemon", started=T0 + timedelta(hours=hours))
        history.finish_run(run_id, result, sources=sources)
        return run_id

    pull(0, RunResult.OK, {"app": SOURCE_OK, "ldap": SOURCE_OK})
    failed = pull(1, RunResult.FAILED, {"ldap": SOURCE_FAILED})
    pull(2, RunResult.FAILED, {})  # offline: no word on any source
    pull(3, RunResult.WARNING, {"app": SOURCE_OK, "ldap": SOURCE_OK})
    pull(4, RunResult.FAILED, {"app": SOURCE_FAILED, "ldap": SOURCE_FAILED})
    other = history.start_run("web1", "daemon", started=T0)
    history.finish_run(other, RunResult.FAILED, sources={"app": SOURCE_FAILED})

    assert history.run_sources(failed) == {"ldap": SOURCE_FAILED}
    summaries = history.source_summaries()
    assert summaries[("db1", "app")] == SourceSummary(
        last_success=T0 + timedelta(hours=3), last_failure=T0 + timedelta(hours=4), failures=1
    )
    assert summaries[("db1", "ldap")] == SourceSummary(
        last_success=T0 + timedelta(hours=3), last_failure=T0 + timedelta(hours=4), failures=2
    )
    assert summaries[("web1", "app")] == SourceSummary(last_failure=T0, failures=1)
    with pytest.raises(ValueError, match="cannot end as"):
        history.finish_run(other, RunResult.FAILED, sources={"app": "maybe"})
    # Finishing a run again (a wrong `interrupted` mark overwritten) replaces its rows.
    history.finish_run(failed, RunResult.FAILED, sources={"app": SOURCE_FAILED})
    assert history.run_sources(failed) == {"app": SOURCE_FAILED}
