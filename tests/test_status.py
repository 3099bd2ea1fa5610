"""``borgtunnel status`` and ``borgtunnel history``: fields computed from a real history database,
rendered as JSON and as a table, and the real commands (JSON on a pipe, a table on a terminal)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from borgtunnel.config import load_config
from borgtunnel.history import History, RunResult, RunStats
from borgtunnel.lock import acquire_client_lock
from borgtunnel.pauses import Pause
from borgtunnel.reporting.status import (
    client_status,
    history_json,
    history_table,
    status_json,
    status_table,
)
from tests.daemon_support import BORGTUNNEL, offline_client, write_config

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
STATUS_KEYS = {
    "last_check",
    "last_check_result",
    "last_maintain_result",
    "client",
    "last_success",
    "last_result",
    "next_run",
    "running",
    "last_success_age_seconds",
    "stale",
    "paused",
    "paused_until",
    "last_error",
    "failed_sources",
}


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    clients = {
        "web1": offline_client(tmp_path / "w", schedule="0 2 * * *", jitter=600),
        "db1": offline_client(
            tmp_path / "d", schedule="30 1 * * *", blackout=["daily 01:00-02:00"]
        ),
        "laptop": offline_client(tmp_path / "l"),  # pulled on demand only
    }
    return write_config(tmp_path / "borgtunnel.toml", tmp_path, clients=clients)


def record(history: History, client: str, started: datetime, result: RunResult, **kw) -> int:
    run_id = history.start_run(client, "daemon", started=started)
    history.finish_run(run_id, result, finished=started + timedelta(seconds=90), **kw)
    return run_id


def dead_running_row(state_dir: Path, client: str) -> None:
    """A ``running`` row whose process has exited (a crash before the run ended)."""
    code = (
        "import sys; from pathlib import Path; from borgtunnel.history import History; "
        "h = History.open(Path(sys.argv[1])); h.start_run(sys.argv[2], 'pull'); h.close()"
    )
    subprocess.run([sys.executable, "-c", code, str(state_dir), client], check=True, timeout=60)


def test_status_fields_from_the_history(config_path):
    config = load_config(config_path)
    with History.open(config.server.state_dir) as history:
        record(history, "web1", NOW - timedelta(hours=10), RunResult.OK, archive="web1-a")
        record(history, "web1", NOW - timedelta(hours=3), RunResult.WARNING, archive="web1-b")
        record(history, "web1", NOW - timedelta(hours=1), RunResult.FAILED, error="offline")
        web1, db1, laptop = (
            client_status(config, history, c, NOW) for c in config.clients.values()
        )
    assert web1.last_success == NOW - timedelta(hours=3)  # a warning still made an archive
    assert web1.last_result is RunResult.FAILED
    assert web1.next_run == datetime(2026, 3, 3, 2, 0, tzinfo=UTC)  # without the jitter
    assert web1.running is False
    assert db1.next_run == datetime(2026, 3, 3, 2, 0, tzinfo=UTC)  # 01:30 is in the blackout
    assert (db1.last_success, db1.last_result) == (None, None)
    assert laptop.next_run is None

    rows = status_json([web1, db1, laptop], NOW)
    assert all(set(row) == STATUS_KEYS for row in rows)
    assert rows[0] == {
        "client": "web1",
        "last_success": "2026-03-02T09:00:00+00:00",
        "last_result": "failed",
        "next_run": "2026-03-03T02:00:00+00:00",
        "running": False,
        "last_success_age_seconds": 3 * 3600,
        "last_check": None,
        "last_check_result": None,
        "last_maintain_result": None,
        "stale": False,
        "paused": False,
        "paused_until": None,
        "last_error": "offline",
        "failed_sources": [],
    }
    assert rows[1]["last_success_age_seconds"] is None
    assert rows[2]["next_run"] is None


def test_running_needs_a_live_running_row_and_the_held_lock(config_path):
    config = load_config(config_path)
    web1 = config.clients["web1"]
    with History.open(config.server.state_dir) as history:
        record(history, "web1", NOW - timedelta(days=1), RunResult.OK)
        history.start_run("web1", "pull")  # this process: alive
        lock = acquire_client_lock(config.server.state_dir, "web1", wait=False)
        try:
            status = client_status(config, history, web1, NOW)
        finally:
            lock.release()
        assert status.running is True
        assert status.last_result is RunResult.OK  # the newest *finished* run
        # The same row without the lock held: stale (e.g. its pid was reused), not running.
        assert client_status(config, history, web1, NOW).running is False


def test_a_running_row_of_a_dead_process_shows_as_interrupted(config_path):
    config = load_config(config_path)
    with History.open(config.server.state_dir) as history:
        record(history, "web1", NOW - timedelta(days=1), RunResult.OK)
    dead_running_row(config.server.state_dir, "web1")
    with History.open(config.server.state_dir) as history:
        status = client_status(config, history, config.clients["web1"], NOW)
        assert (status.last_result, status.running) == (RunResult.INTERRUPTED, False)
        last = history.last_run("web1")
        assert last is not None
        assert last.result is RunResult.RUNNING  # status only reads


def test_status_table_is_readable(config_path):
    config = load_config(config_path)
    with History.open(config.server.state_dir) as history:
        record(history, "web1", NOW - timedelta(hours=26, minutes=5), RunResult.OK)
        rows = [client_status(config, history, c, NOW) for c in config.clients.values()]
    columns = [re.split(r"\s{2,}", line) for line in status_table(rows, NOW).splitlines()]
    assert columns == [
        [
            "CLIENT",
            "LAST SUCCESS",
            "AGE",
            "LAST RESULT",
            "NEXT RUN",
            "RUNNING",
            "LAST CHECK",
            "MAINTENANCE",
            "STALE",
            "PAUSED",
        ],
        [
            *("web1", "2026-03-01 09:55 UTC", "1d 2h", "ok", "2026-03-03 02:00 UTC"),
            *("no", "never", "-", "no", "no"),
        ],
        ["db1", "never", "-", "-", "2026-03-03 02:00 UTC", "no", "never", "-", "no", "no"],
        ["laptop", "never", "-", "-", "not scheduled", "no", "never", "-", "no", "no"],
    ]


def test_a_paused_client_shows_the_pause_and_its_next_run_after_it(config_path):
    config = load_config(config_path)
    web1, db1 = config.clients["web1"], config.clients["db1"]
    forever = Pause(since=NOW)
    until = Pause(since=NOW, until=datetime(2026, 3, 4, 12, 0, tzinfo=UTC))
    with History.open(config.server.state_dir) as history:
        paused = client_status(config, history, web1, NOW, forever)
        later = client_status(config, history, db1, NOW, until)
    assert (paused.paused, paused.paused_until, paused.next_run) == (True, None, None)
    assert later.paused_until == until.until
    assert later.next_run == datetime(2026, 3, 5, 2, 0, tzinfo=UTC)  # first slot after it
    rows = status_json([paused, later], NOW)
    assert (rows[0]["paused"], rows[0]["paused_until"], rows[0]["next_run"]) == (True, None, None)
    assert rows[1]["paused_until"] == "2026-03-04T12:00:00+00:00"
    table = [re.split(r"\s{2,}", line) for line in status_table([paused, later], NOW).splitlines()]
    assert table[1][4] == "paused"
    assert table[1][-1] == "yes"
    assert table[2][-1] == "until 2026-03-04 12:00 UTC"


def test_history_json_and_table(config_path):
    config = load_config(config_path)
    with History.open(config.server.state_dir) as history:
        stats = RunStats(original_size=5_000_000, deduplicated_size=1_234_000, nfiles=12)
        record(
            history, "web1", NOW - timedelta(hours=2), RunResult.OK, archive="web1-x", stats=stats
        )
        record(history, "web1", NOW - timedelta(hours=1), RunResult.FAILED, error="host down")
        runs = history.last_runs("web1", 10)
    data = history_json(runs)
    assert [(r["result"], r["archive"], r["error"]) for r in data] == [
        ("failed", None, "host down"),
        ("ok", "web1-x", None),
    ]
    assert data[1]["deduplicated_size"] == 1_234_000
    lines = history_table(runs, UTC).splitlines()
    assert lines[0].split()[:3] == ["STARTED", "TOOK", "RESULT"]
    assert lines[1].split()[3:] == [
        "90.0s",
        "failed",
        "pull",
        "daemon",
        "-",
        "-",
        "-",
        "host",
        "down",
    ]
    assert lines[2].split()[3:] == ["90.0s", "ok", "pull", "daemon", "web1-x", "12", "1.2MB"]


# --- the commands ------------------------------------------------------------------------


def cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BORGTUNNEL, "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_and_history_print_json_on_a_pipe(config_path):
    config = load_config(config_path)
    with History.open(config.server.state_dir) as history:
        record(history, "web1", datetime.now(UTC) - timedelta(minutes=5), RunResult.OK)
        record(history, "web1", datetime.now(UTC) - timedelta(minutes=2), RunResult.FAILED)
    status = cli(config_path, "status")
    assert status.returncode == 1, status.stderr  # web1's last run failed: a check must say so
    rows = json.loads(status.stdout)
    assert [row["client"] for row in rows] == ["web1", "db1", "laptop"]
    assert 290 <= rows[0]["last_success_age_seconds"] < 400
    listed = cli(config_path, "history", "web1", "--limit", "1")
    assert listed.returncode == 0, listed.stderr
    assert [run["result"] for run in json.loads(listed.stdout)] == ["failed"]
    assert json.loads(cli(config_path, "history", "db1", "--json").stdout) == []


def test_history_rejects_a_limit_below_one(config_path):
    result = cli(config_path, "history", "web1", "--limit", "0")
    assert result.returncode == 2
    assert "--limit" in result.stderr


def test_status_prints_a_table_on_a_terminal(config_path):
    primary, secondary = os.openpty()
    try:
        process = subprocess.run(
            [BORGTUNNEL, "--config", str(config_path), "status"],
            stdout=secondary,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
        os.close(secondary)
        secondary = -1
        output = b""
        while chunk := _read_pty(primary):
            output += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert process.returncode == 0, process.stderr
    text = output.decode()
    assert text.startswith("CLIENT"), text
    assert "not scheduled" in text


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the other end is closed and everything has been read
        return b""


# --- staleness and the exit code ---------------------------------------------------------


def stale_config(tmp_path: Path, **defaults) -> Path:
    clients = {
        "web1": offline_client(tmp_path / "w", max_age="36h"),
        "db1": offline_client(tmp_path / "d"),  # inherits [defaults] max_age, if any
    }
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, clients=clients)
    if defaults:
        path.write_text(
            path.read_text()
            + "[defaults]\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in defaults.items())
        )
    return path


def test_stale_is_older_than_max_age_or_never(tmp_path):
    config = load_config(stale_config(tmp_path, max_age="2d"))
    with History.open(config.server.state_dir) as history:
        record(history, "web1", NOW - timedelta(hours=37), RunResult.OK)
        record(history, "db1", NOW - timedelta(hours=40), RunResult.OK)
        web1, db1 = (client_status(config, history, c, NOW) for c in config.clients.values())
        assert (web1.stale, db1.stale) == (True, False)  # 37 h > 36 h; 40 h < 2 d
        record(history, "web1", NOW - timedelta(hours=1), RunResult.SKIPPED)
        assert client_status(config, history, config.clients["web1"], NOW).stale is True
        record(history, "web1", NOW - timedelta(minutes=30), RunResult.OK)
        fresh = client_status(config, history, config.clients["web1"], NOW)
    assert fresh.stale is False
    assert status_json([fresh], NOW)[0]["stale"] is False


def test_status_exits_1_on_a_stale_client_and_0_when_all_is_well(tmp_path):
    path = stale_config(tmp_path)
    never = cli(path, "status")
    assert never.returncode == 1, never.stderr  # web1 never had an archive and has max_age
    assert {row["client"]: row["stale"] for row in json.loads(never.stdout)} == {
        "web1": True,
        "db1": False,  # no max_age anywhere: never stale
    }
    config = load_config(path)
    with History.open(config.server.state_dir) as history:
        record(history, "web1", datetime.now(UTC) - timedelta(hours=1), RunResult.OK)
        record(history, "db1", datetime.now(UTC) - timedelta(hours=1), RunResult.SKIPPED)
    fine = cli(path, "status", "--json")
    assert fine.returncode == 0, fine.stdout
    assert [row["last_result"] for row in json.loads(fine.stdout)] == ["ok", "skipped"]


def test_the_table_names_the_sources_the_newest_pull_failed_because_of(config_path):
    config = load_config(config_path)
    with History.open(config.server.state_dir) as history:
        run_id = history.start_run("web1", "pull", started=NOW - timedelta(hours=1))
        history.finish_run(
            run_id, RunResult.FAILED, error="source 'app' ...", sources={"app": "failed"}
        )
        status = client_status(config, history, config.clients["web1"], NOW)
    assert status.failed_sources == ("app",)
    assert "  failed (sources: app)  " in status_table([status], NOW)
