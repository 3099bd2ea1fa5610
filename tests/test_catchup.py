"""Catch-up of missed slots and "most overdue first" (borgtunnel/scheduling/catchup.py).

* the pure rules with fixed datetimes;
* the daemon in-process with a stand-in runner where the point is who starts first;
* end to end with the test sshd and real borg: a daemon that was not running over a slot pulls
  once at start (and not again at the next start), a client unreachable over its slot is pulled
  once when it answers again, ``catch_up = false`` waits for its next slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from borgtunnel.config import ConfigError, load_config
from borgtunnel.history import DB_FILENAME, History, RunResult
from borgtunnel.scheduling.catchup import (
    catch_up_start,
    first_slot,
    missed_slot,
    most_overdue_first,
)
from borgtunnel.scheduling.daemon import Daemon
from borgtunnel.systemd import Notifier
from tests.daemon_support import (
    FIRE_AT,
    archives,
    clock_offset,
    eventually,
    finished_runs,
    make_data,
    make_repo,
    offline_client,
    run_cli,
    server_env,
    serving,
    shifted_now,
    sshd_client,
    write_config,
)
from tests.sshd import SshdServer, known_hosts_line
from tests.test_daemon import GatedRunner, config_with, events

QUIET = Notifier("")


def _client(tmp_path: Path, **extra: Any) -> Any:
    config = config_with(tmp_path, {"c": offline_client(tmp_path / "r", **extra)})
    return config.clients["c"]


# --- pure rules ----------------------------------------------------------------------------


def test_most_overdue_first_puts_never_backed_up_first_then_the_oldest_archive():
    day = datetime(2026, 3, 1, tzinfo=UTC)
    last = {
        "new1": None,
        "week": day - timedelta(days=7),
        "yesterday": day - timedelta(days=1),
        "new2": None,
        "month": day - timedelta(days=30),
    }
    names = ["yesterday", "new1", "week", "month", "new2"]
    assert most_overdue_first(names, last) == ["new1", "new2", "month", "week", "yesterday"]
    # Equal ages keep the given (config) order; unknown names count as never backed up.
    assert most_overdue_first(["b", "a"], {"a": day, "b": day}) == ["b", "a"]
    assert most_overdue_first(["x", "a"], {"a": day}) == ["x", "a"]


def test_a_passed_slot_is_caught_up_once_whatever_the_number_missed(tmp_path):
    client = _client(tmp_path, schedule="0 2 * * *")
    last = datetime(2026, 3, 1, 2, 0, 5, tzinfo=UTC)
    # Not yet: the next slot (2 March 02:00) has not come.
    assert missed_slot(client, UTC, last, datetime(2026, 3, 2, 1, 59, tzinfo=UTC)) is None
    # Three slots passed: one answer, the first missed one.
    now = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)
    assert missed_slot(client, UTC, last, now) == datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
    # Nothing known about the client (never seen, never run): nothing to catch up.
    assert missed_slot(client, UTC, None, now) is None


def test_catch_up_false_and_no_schedule_never_catch_up(tmp_path):
    last = datetime(2026, 3, 1, tzinfo=UTC)
    now = last + timedelta(days=3)
    assert (
        missed_slot(_client(tmp_path, schedule="0 2 * * *", catch_up=False), UTC, last, now) is None
    )
    assert missed_slot(_client(tmp_path), UTC, last, now) is None


def test_a_catch_up_due_in_a_blackout_window_waits_for_its_end(tmp_path):
    client = _client(tmp_path, schedule="0 2 * * *", blackout=["daily 08:00-18:00"])
    inside = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)
    assert catch_up_start(client, UTC, inside) == datetime(2026, 3, 4, 18, 0, tzinfo=UTC)
    outside = datetime(2026, 3, 4, 19, 0, tzinfo=UTC)
    assert catch_up_start(client, UTC, outside) == outside


def test_first_slot_is_the_first_due_time_after_the_client_was_first_seen(tmp_path):
    seen = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    scheduled = _client(tmp_path, schedule="0 2 * * *")
    assert first_slot(scheduled, UTC, seen) == datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
    assert first_slot(_client(tmp_path), UTC, seen) == seen  # on demand: due when seen
    assert first_slot(scheduled, UTC, None) is None


@pytest.mark.parametrize("value", ['"yes"', "1", '"false"'])
def test_catch_up_takes_only_true_or_false(tmp_path, value):
    path = write_config(
        tmp_path / "bt.toml", tmp_path, clients={"c": offline_client(tmp_path / "r")}
    )
    path.write_text(path.read_text().replace("[clients.c]", f"[clients.c]\ncatch_up = {value}"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any(key == "clients.c.catch_up" for key, _ in caught.value.problems), caught.value


# --- the daemon in-process: order -----------------------------------------------------------


def _started_count(runner: GatedRunner, count: int) -> bool:
    return len(runner.started) >= count


async def test_catch_up_at_start_runs_the_most_overdue_first_within_max_parallel(tmp_path):
    names = ["fresh", "never", "old", "optout"]
    clients = {n: offline_client(tmp_path / n, schedule="0 2 * * *") for n in names}
    clients["optout"]["catch_up"] = False
    config = config_with(tmp_path, clients, daemon={"max_parallel": 1, "timezone": "UTC"})
    # The daemon starts at 09:00, seven hours after a slot nobody ran.
    now = FIRE_AT + timedelta(hours=7)
    with History.open(config.server.state_dir) as history:
        history.record_first_seen(["never"], FIRE_AT - timedelta(days=3))
        for name, age in (("fresh", timedelta(days=1)), ("old", timedelta(days=9))):
            run = history.start_run(name, "daemon", started=FIRE_AT - age)
            history.finish_run(run, RunResult.OK, archive="a", finished=FIRE_AT - age)
        optout = history.start_run("optout", "daemon", started=FIRE_AT - timedelta(days=9))
        history.finish_run(optout, RunResult.OK, archive="a", finished=FIRE_AT)
    runner = GatedRunner()
    daemon = Daemon(config, now=shifted_now(clock_offset(now, 0)), notifier=QUIET, runner=runner)
    with capture_logs() as logs:
        async with serving(daemon):
            for count, name in enumerate(["never", "old", "fresh"], start=1):
                await eventually(
                    partial(_started_count, runner, count), within=10, what=f"{name} to start"
                )
                assert runner.started[-1] == name
                runner.release(name)
            await eventually(lambda: len(runner.finished) == 3, within=10, what="three runs")
            await asyncio.sleep(0.5)
    assert runner.started == ["never", "old", "fresh"]  # optout waits for 02:00 tomorrow
    assert runner.peak == 1
    assert daemon.next_runs()["optout"] == FIRE_AT + timedelta(days=1)
    (ready,) = events(logs, "daemon_ready")
    assert ready["catching_up"] == 3
    assert ready["scheduled"] == 4
    assert {e["client"] for e in events(logs, "catch_up_due")} == {"never", "old", "fresh"}


# --- end to end: real sshd, real borg -------------------------------------------------------


@pytest.fixture
def server_borg_env(tmp_path, monkeypatch):
    for key, value in server_env(tmp_path).items():
        monkeypatch.setenv(key, value)


def _backdate(state_dir: Path, days: int) -> None:
    """Move every recorded run ``days`` back: as if no daemon had run since (three slots)."""
    conn = sqlite3.connect(state_dir / DB_FILENAME)
    try:
        with conn:
            for column in ("started", "finished"):
                rows = conn.execute(f"SELECT id, {column} FROM runs").fetchall()  # noqa: S608
                for run_id, text in rows:
                    moved = datetime.fromisoformat(text) - timedelta(days=days)
                    conn.execute(
                        f"UPDATE runs SET {column} = ? WHERE id = ?",  # noqa: S608
                        (moved.isoformat(timespec="microseconds"), run_id),
                    )
    finally:
        conn.close()


@pytest.mark.sshd
@pytest.mark.usefixtures("server_borg_env")
async def test_a_daemon_down_over_slots_pulls_once_at_start_and_not_again(sshd, tmp_path):
    repos = {name: make_repo(tmp_path, name) for name in ("web1", "lazy")}
    clients = {
        name: sshd_client(sshd, name, repos[name], make_data(tmp_path, name), schedule="0 2 * * *")
        for name in repos
    }
    clients["lazy"]["catch_up"] = False
    path = write_config(tmp_path / "bt.toml", tmp_path, sshd=sshd, clients=clients)
    config = load_config(path)
    state_dir = config.server.state_dir
    for name in clients:  # each has a verified archive...
        pulled = await run_cli("--config", str(path), "pull", name)
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    _backdate(state_dir, 3)  # ...from three days (three 02:00 slots) ago
    for attempt in range(2):  # the real clock from here on
        daemon = Daemon(config, notifier=QUIET)
        async with serving(daemon):
            if attempt == 0:
                await eventually(
                    lambda: len(finished_runs(state_dir, "web1")) == 2, within=60, what="catch-up"
                )
            await asyncio.sleep(3)  # room for a wrong second run to start
    web1 = finished_runs(state_dir, "web1")
    assert [r.result for r in web1] == [RunResult.OK, RunResult.OK], web1[-1].error
    assert [r.trigger for r in web1] == ["pull", "daemon"]
    assert archives(tmp_path, repos["web1"]) == [r.archive for r in web1]  # both read back
    assert len(finished_runs(state_dir, "lazy")) == 1  # catch_up = false: waits for its slot


class _LateListener:
    """A port that refuses connections until ``open()``, then forwards to the test sshd.

    The socket is bound from the start (so the port cannot be taken by anyone else) but only
    listens after ``open()``: before that the kernel answers every connect with a refusal.
    """

    def __init__(self, target: SshdServer) -> None:
        self._target = target
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, sock=self._sock)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._target.host, self._target.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        tasks = [
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ]
        self._pipes.update(tasks)
        await asyncio.gather(*tasks)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._sock.close()


@contextlib.asynccontextmanager
async def late_listener(target: SshdServer) -> AsyncIterator[_LateListener]:
    listener = _LateListener(target)
    try:
        yield listener
    finally:
        await listener.close()


@pytest.mark.sshd
@pytest.mark.usefixtures("server_borg_env")
async def test_a_client_unreachable_over_its_slot_is_pulled_once_when_it_answers(sshd, tmp_path):
    repo = make_repo(tmp_path, "web1")
    data = make_data(tmp_path, "web1")
    async with late_listener(sshd) as door:
        client = sshd_client(
            sshd, "web1", repo, data, schedule="0 2 * * *", retries=0, retry_wait=1
        )
        client["port"] = door.port
        path = write_config(tmp_path / "bt.toml", tmp_path, sshd=sshd, clients={"web1": client})
        known = tmp_path / "known_hosts_door"
        key = " ".join(sshd.known_hosts.read_text().split("\n")[0].split()[1:3])
        known.write_text(known_hosts_line("127.0.0.1", door.port, key))
        path.write_text(path.read_text() + f'\n[clients.web1.ssh]\nknown_hosts = "{known}"\n')
        config = load_config(path)
        state_dir = config.server.state_dir
        daemon = Daemon(config, now=shifted_now(clock_offset(FIRE_AT, 0.5)), notifier=QUIET)
        with capture_logs() as logs:
            async with serving(daemon):
                await eventually(
                    lambda: len(finished_runs(state_dir, "web1")) >= 2,
                    within=30,
                    what="the slot's attempt and a later knock",
                )
                await door.open()  # the client is back
                await eventually(
                    lambda: any(r.result is RunResult.OK for r in finished_runs(state_dir, "web1")),
                    within=60,
                    what="the pull once it answers",
                )
                await asyncio.sleep(5)  # room for a wrong extra run
                assert daemon.next_runs() == {"web1": FIRE_AT + timedelta(days=1)}
    results = [r.result for r in finished_runs(state_dir, "web1")]
    assert results[-1] is RunResult.OK
    assert results.count(RunResult.OK) == 1
    assert set(results[:-1]) == {RunResult.FAILED}
    (ok,) = [r for r in finished_runs(state_dir, "web1") if r.result is RunResult.OK]
    assert archives(tmp_path, repo) == [ok.archive]
    knocks = events(logs, "client_unreachable")
    assert [k["catch_up_in_seconds"] for k in knocks[:2]] == [1.0, 2.0]  # backoff doubles
