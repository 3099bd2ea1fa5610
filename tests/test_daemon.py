"""The daemon: scheduling, the parallel limit, retries, timeouts, stop, reload, sd_notify, locks.

Three kinds of tests:

* in-process with a stand-in runner (``runner=``) where the point is the daemon's own logic
  (who starts when, what a stop cancels); the runner is the only replaced part;
* in-process with the real runner and no SSH where the failure itself is real (a refused
  connection, a lock held by another holder);
* end to end with the test sshd, real borg and, for signals, a real daemon process.

The daemon's clock is shifted to just before a cron time (``tests/daemon_support.py``), so the
real schedule code decides when runs start, at real speed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from borgtunnel.config import ClientConfig, Config, load_config
from borgtunnel.history import History, RunResult
from borgtunnel.lock import acquire_client_lock
from borgtunnel.runs.pull import PullOutcome, State
from borgtunnel.scheduling.daemon import Daemon
from borgtunnel.systemd import Notifier
from tests.daemon_support import (
    FIRE_AT,
    archives,
    borg_processes,
    clock_offset,
    daemon_process,
    eventually,
    finished_runs,
    has_event,
    log_events,
    make_data,
    make_repo,
    notify_listener,
    offline_client,
    repo_lock_free,
    run_cli,
    runs,
    server_env,
    serving,
    shifted_now,
    slow_create_args,
    sshd_client,
    wait_until,
    write_config,
)

NEXT_DAY = FIRE_AT + timedelta(days=1)
QUIET = Notifier("")  # no systemd in in-process tests unless a test listens


def config_with(tmp_path: Path, clients: dict[str, dict[str, Any]], **tables: Any) -> Config:
    return load_config(
        write_config(tmp_path / "borgtunnel.toml", tmp_path, clients=clients, **tables)
    )


def daemon_firing_in(config: Config, seconds: float, **kwargs: Any) -> Daemon:
    """A daemon whose clock reaches FIRE_AT (02:00 UTC) ``seconds`` from now."""
    kwargs.setdefault("notifier", QUIET)
    return Daemon(config, now=shifted_now(clock_offset(FIRE_AT, seconds)), **kwargs)


class GatedRunner:
    """Stand-in runner: records starts, holds each run until released, counts parallelism."""

    def __init__(self, outcome: RunResult = RunResult.OK, state: State = State.DONE) -> None:
        self.outcome, self.state = outcome, state
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.active = self.peak = 0

    def release(self, *names: str) -> None:
        for name in names:
            self.gates[name].set()

    async def __call__(self, config: Config, client: ClientConfig, history: History) -> PullOutcome:
        self.started.append(client.name)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.gates[client.name].wait()
        except asyncio.CancelledError:
            self.cancelled.append(client.name)
            raise
        finally:
            self.active -= 1
        self.finished.append(client.name)
        return PullOutcome(client=client.name, result=self.outcome, state=self.state)


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


# --- scheduling and the parallel limit ---------------------------------------------------


async def test_due_clients_start_first_come_first_served_within_max_parallel(tmp_path):
    names = ["zeta", "alpha", "mid", "beta"]  # config order, deliberately not alphabetical
    clients = {n: offline_client(tmp_path / n, schedule="0 2 * * *") for n in names}
    config = config_with(tmp_path, clients, daemon={"max_parallel": 2})
    runner = GatedRunner()
    daemon = daemon_firing_in(config, 0.5, runner=runner)
    async with serving(daemon):
        assert daemon.next_runs() == dict.fromkeys(names, FIRE_AT)
        await eventually(lambda: len(runner.started) == 2, within=5, what="two runs")
        await asyncio.sleep(0.2)
        assert runner.started == ["zeta", "alpha"]  # the limit holds the other two back
        runner.release("alpha")
        await eventually(lambda: len(runner.started) == 3, within=5, what="third run")
        runner.release("zeta")
        await eventually(lambda: len(runner.started) == 4, within=5, what="fourth run")
        assert runner.started == ["zeta", "alpha", "mid", "beta"]
        runner.release("mid", "beta")
        await eventually(lambda: len(runner.finished) == 4, within=5, what="all runs")
        assert runner.peak == 2
        assert daemon.next_runs() == dict.fromkeys(names, NEXT_DAY)


async def test_a_client_still_running_at_its_next_slot_skips_that_slot(tmp_path):
    clients = {n: offline_client(tmp_path / n, schedule="* * * * *") for n in ("slow", "quick")}
    config = config_with(tmp_path, clients)
    runner = GatedRunner()
    clock = shifted_now(clock_offset(FIRE_AT, 0.5))
    daemon = Daemon(config, now=clock, notifier=QUIET, runner=runner)
    with capture_logs() as logs:
        async with serving(daemon):
            await eventually(lambda: len(runner.started) == 2, within=5, what="both runs")
            clock.jump(60)  # 02:01 comes while "slow" still runs
            runner.release("quick")  # its end wakes the daemon, which sees 02:01
            await eventually(lambda: len(runner.started) == 3, within=5, what="quick again")
            runner.release("slow")
            await eventually(lambda: len(runner.finished) == 3, within=5, what="the runs")
    assert runner.started == ["slow", "quick", "quick"]
    (skipped,) = events(logs, "run_skipped_still_running")
    assert (skipped["client"], skipped["log_level"]) == ("slow", "warning")


async def test_a_run_due_in_a_blackout_window_starts_when_the_window_ends(tmp_path):
    client = offline_client(tmp_path / "r", schedule="30 1 * * *", blackout=["daily 01:00-02:00"])
    config = config_with(tmp_path, {"db1": client})
    runner = GatedRunner()
    runner.release("db1")
    # 01:29:59.5: the cron time is 0.5 s away but inside the window.
    clock = shifted_now(clock_offset(FIRE_AT - timedelta(minutes=30), 0.5))
    # max_sleep: how long the daemon trusts the wall clock between looks (here: a jump follows).
    daemon = Daemon(config, now=clock, notifier=QUIET, runner=runner, max_sleep=0.1)
    async with serving(daemon):
        assert daemon.next_runs() == {"db1": FIRE_AT}
        await asyncio.sleep(0.7)
        assert runner.started == []  # 01:30 has passed: deferred
        clock.jump(30 * 60 - 1.0)  # a clock step to about 01:59:59.2
        await eventually(lambda: runner.finished, within=5, what="the run at 02:00")
        assert clock() - FIRE_AT < timedelta(seconds=1)
        assert daemon.next_runs() == {"db1": NEXT_DAY}


async def test_shutdown_trigger_stops_serve(tmp_path):
    config = config_with(tmp_path, {"web1": offline_client(tmp_path / "r", schedule="0 2 * * *")})
    daemon = Daemon(config, notifier=QUIET)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.serve(shutdown_trigger=stop.wait))
    await asyncio.wait_for(daemon.ready.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 10)


# --- retries, busy, failures -------------------------------------------------------------


async def test_offline_client_is_retried_with_backoff_then_waits_for_its_next_run(tmp_path):
    """Real pulls against a port nobody listens on: a connection failure in state CONNECTING.
    With ``catch_up = false`` the client then waits for its next slot (no probing)."""
    client = offline_client(
        tmp_path / "repo", schedule="0 2 * * *", retries=2, retry_wait=0.2, catch_up=False
    )
    config = config_with(tmp_path, {"web1": client})
    daemon = daemon_firing_in(config, 0.5)
    state_dir = config.server.state_dir
    with capture_logs() as logs:
        async with serving(daemon):
            await eventually(
                lambda: events(logs, "client_unreachable"), within=20, what="the last attempt"
            )
            assert daemon.next_runs() == {"web1": NEXT_DAY}  # no retry pending
    attempts = finished_runs(state_dir, "web1")
    assert [run.result for run in attempts] == [RunResult.FAILED] * 3
    assert all("127.0.0.1" in (run.error or "") for run in attempts)
    gaps = [(b.started - a.started).total_seconds() for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.2
    assert gaps[1] >= 0.4  # doubled
    retries = events(logs, "retry_scheduled")
    assert [r["in_seconds"] for r in retries] == [0.2, 0.4]
    assert {r["log_level"] for r in retries + events(logs, "client_unreachable")} == {"warning"}


async def test_a_borg_failure_is_not_retried(tmp_path):
    client = offline_client(tmp_path / "r", schedule="0 2 * * *", retries=3, retry_wait=0.05)
    config = config_with(tmp_path, {"web1": client})
    runner = GatedRunner(outcome=RunResult.FAILED, state=State.RUNNING)
    runner.release("web1")
    daemon = daemon_firing_in(config, 0.5, runner=runner)
    async with serving(daemon):
        await eventually(lambda: runner.finished, within=5, what="the run")
        await asyncio.sleep(0.5)  # ten retry_waits: a retry would have started
        assert runner.started == ["web1"]
        assert daemon.next_runs() == {"web1": NEXT_DAY}


async def test_a_local_file_error_is_named_and_not_retried_like_an_offline_client(tmp_path):
    """A real pull whose identity file is missing on this server: no retry every retry_wait as
    for a lost link, an error-level log, and a message with the path and what was done."""
    client = offline_client(tmp_path / "r", schedule="0 2 * * *", retries=3, retry_wait=0.05)
    config = config_with(tmp_path, {"web1": client})
    identity = tmp_path / "id_ed25519"
    identity.unlink()
    daemon = daemon_firing_in(config, 0.5)
    with capture_logs() as logs:
        async with serving(daemon):
            await eventually(lambda: events(logs, "run_finished"), within=10, what="the run")
            await asyncio.sleep(0.5)  # ten retry_waits: a retry would have started
            assert daemon.next_runs() == {"web1": NEXT_DAY}
    [run] = finished_runs(config.server.state_dir, "web1")
    expected = f"identity {identity}: No such file or directory (this server could not open it)"
    assert expected in (run.error or "")
    assert events(logs, "retry_scheduled") == []
    assert events(logs, "client_unreachable") == []
    assert [e["log_level"] for e in events(logs, "pull_failed")] == ["error"]


async def test_a_busy_client_skips_the_slot_and_keeps_its_schedule(tmp_path):
    """Another holder (as a one-shot ``borgtunnel pull`` would) has the client's real lock."""
    config = config_with(tmp_path, {"web1": offline_client(tmp_path / "r", schedule="0 2 * * *")})
    daemon = daemon_firing_in(config, 0.5)
    lock = acquire_client_lock(config.server.state_dir, "web1", wait=False)
    try:
        with capture_logs() as logs:
            async with serving(daemon):
                await eventually(
                    lambda: events(logs, "run_skipped_busy"), within=5, what="the busy skip"
                )
                assert daemon.next_runs() == {"web1": NEXT_DAY}
    finally:
        lock.release()
    skipped = events(logs, "run_skipped_busy")[0]
    assert skipped["log_level"] == "warning"
    assert "busy" in skipped["error"]
    assert runs(config.server.state_dir, "web1") == []  # a refused run is not a run


async def test_a_crashing_client_does_not_stop_the_daemon_or_the_others(tmp_path):
    clients = {n: offline_client(tmp_path / n, schedule="0 2 * * *") for n in ("bad", "good")}
    config = config_with(tmp_path, clients)
    done: list[str] = []

    async def runner(config: Config, client: ClientConfig, history: History) -> PullOutcome:
        if client.name == "bad":
            raise RuntimeError("a bug")
        done.append(client.name)
        return PullOutcome(client=client.name, result=RunResult.OK, state=State.DONE)

    daemon = daemon_firing_in(config, 0.5, runner=runner)
    with capture_logs() as logs:
        async with serving(daemon) as task:
            await eventually(lambda: events(logs, "run_crashed") and done, within=5, what="runs")
            await asyncio.sleep(0.1)
            assert not task.done()
            assert daemon.next_runs() == {"bad": NEXT_DAY, "good": NEXT_DAY}
    assert events(logs, "run_crashed")[0]["client"] == "bad"


# --- stop --------------------------------------------------------------------------------


async def test_stop_lets_running_pulls_finish_within_stop_timeout(tmp_path):
    clients = {n: offline_client(tmp_path / n, schedule="0 2 * * *") for n in ("a", "b")}
    config = config_with(tmp_path, clients, daemon={"max_parallel": 1, "stop_timeout": 10})
    runner = GatedRunner()
    daemon = daemon_firing_in(config, 0.5, runner=runner)
    task = asyncio.create_task(daemon.serve())
    await eventually(lambda: runner.started, within=5, what="the first run")
    daemon.request_stop()
    await asyncio.sleep(0.2)
    assert not task.done()  # waiting for "a"
    runner.release("a")
    await asyncio.wait_for(task, 5)
    assert runner.finished == ["a"]
    assert runner.started == ["a"]  # "b" was queued: dropped, not started
    assert runner.cancelled == []


async def test_stop_cancels_pulls_after_stop_timeout(tmp_path):
    client = offline_client(tmp_path / "r", schedule="0 2 * * *")
    config = config_with(tmp_path, {"web1": client}, daemon={"stop_timeout": 0.3})
    runner = GatedRunner()
    daemon = daemon_firing_in(config, 0.5, runner=runner)
    task = asyncio.create_task(daemon.serve())
    await eventually(lambda: runner.started, within=5, what="the run")
    started = time.monotonic()
    daemon.request_stop()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started >= 0.3
    assert runner.cancelled == ["web1"]


async def test_a_second_stop_request_cancels_at_once(tmp_path):
    client = offline_client(tmp_path / "r", schedule="0 2 * * *")
    config = config_with(tmp_path, {"web1": client}, daemon={"stop_timeout": 600})
    runner = GatedRunner()
    daemon = daemon_firing_in(config, 0.5, runner=runner)
    task = asyncio.create_task(daemon.serve())
    await eventually(lambda: runner.started, within=5, what="the run")
    daemon.request_stop()
    await asyncio.sleep(0.2)
    assert not task.done()
    daemon.request_stop()
    await asyncio.wait_for(task, 2)
    assert runner.cancelled == ["web1"]


# --- reload ------------------------------------------------------------------------------


async def test_reload_recomputes_changed_schedules_and_keeps_pending_times(tmp_path):
    path = tmp_path / "borgtunnel.toml"

    def write(clients: dict[str, dict[str, Any]], max_parallel: int) -> None:
        write_config(path, tmp_path, clients=clients, daemon={"max_parallel": max_parallel})

    keep = offline_client(tmp_path / "k", schedule="0 2 * * *", jitter=600)
    write(
        {
            "keep": keep,
            "change": offline_client(tmp_path / "c", schedule="0 3 * * *"),
            "gone": offline_client(tmp_path / "g", schedule="0 4 * * *"),
        },
        max_parallel=4,
    )
    draws = itertools.chain([0.5], itertools.repeat(0.0))  # a redraw would move "keep"
    daemon = Daemon(
        load_config(path),
        config_path=path,
        now=shifted_now(clock_offset(FIRE_AT, 1800)),
        notifier=QUIET,
        rand=lambda: next(draws),
    )
    async with serving(daemon):
        assert daemon.next_runs() == {
            "keep": FIRE_AT + timedelta(minutes=5),
            "change": FIRE_AT + timedelta(hours=1),
            "gone": FIRE_AT + timedelta(hours=2),
        }
        write(
            {
                "keep": keep,
                "change": offline_client(tmp_path / "c", schedule="30 3 * * *"),
                "new": offline_client(tmp_path / "n", schedule="0 5 * * *"),
            },
            max_parallel=2,
        )
        daemon.request_reload()
        await eventually(lambda: "new" in daemon.next_runs(), within=5, what="the reload")
        assert daemon.next_runs() == {
            "keep": FIRE_AT + timedelta(minutes=5),
            "change": FIRE_AT + timedelta(hours=1, minutes=30),
            "new": FIRE_AT + timedelta(hours=3),
        }
        assert daemon.config.daemon.max_parallel == 2


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("retries = 2", 'retries = "many"'), "clients.web1.retries"),
        (("[server]", "[server]\nsurprise = 1"), "server.surprise"),
        ("state_dir", "server.state_dir"),
    ],
)
async def test_reload_with_an_invalid_config_keeps_the_old_one(tmp_path, change, key):
    path = tmp_path / "borgtunnel.toml"
    client = offline_client(tmp_path / "r", schedule="0 2 * * *", retries=2)
    config = load_config(write_config(path, tmp_path, clients={"web1": client}))
    notify_path = tmp_path / "notify.sock"
    with notify_listener(notify_path) as notify, capture_logs() as logs:
        daemon = Daemon(config, config_path=path, notifier=Notifier(str(notify_path)))
        async with serving(daemon):
            before = daemon.next_runs()
            if change == "state_dir":
                server = {"state_dir": tmp_path / "elsewhere"}
                write_config(path, tmp_path, clients={"web1": client}, server=server)
            else:
                old, new = change
                path.write_text(path.read_text().replace(old, new, 1))
            daemon.request_reload()
            await eventually(
                lambda: events(logs, "config_reload_failed"), within=5, what="the reload"
            )
            assert daemon.config is config
            assert daemon.next_runs() == before
        reloading = notify.wait_for(lambda m: "RELOADING=1" in m, within=2, what="RELOADING=1")
        notify.wait_for(lambda m: "READY=1" in m, within=2, what="READY=1", since=reloading + 1)
    failed = events(logs, "config_reload_failed")[0]
    assert failed["log_level"] == "error"
    assert any(problem.startswith(f"{key}: ") for problem in failed["problems"]), failed


# --- end to end: real sshd, real borg ----------------------------------------------------


@pytest.fixture
def server_borg_env(tmp_path, monkeypatch):
    """``borg serve`` children of an in-process daemon inherit this environment."""
    for key, value in server_env(tmp_path).items():
        monkeypatch.setenv(key, value)


@pytest.mark.sshd
@pytest.mark.usefixtures("server_borg_env")
async def test_daemon_pulls_two_scheduled_clients_and_status_shows_them(sshd, tmp_path):
    names = ("web1", "db1")
    repos = {name: make_repo(tmp_path, name) for name in names}
    data = {name: make_data(tmp_path, name) for name in names}
    clients = {
        "web1": sshd_client(sshd, "web1", repos["web1"], data["web1"], schedule="0 2 * * *"),
        "db1": sshd_client(sshd, "db1", repos["db1"], data["db1"], schedule="0 2 * * *", jitter=1),
    }
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, sshd=sshd, clients=clients)
    config = load_config(path)
    daemon = daemon_firing_in(config, 1.0)
    state_dir = config.server.state_dir
    async with serving(daemon):
        planned = daemon.next_runs()
        assert planned["web1"] == FIRE_AT
        db1 = planned["db1"]
        assert db1 is not None
        assert FIRE_AT <= db1 < FIRE_AT + timedelta(seconds=1)
        await eventually(
            lambda: all(finished_runs(state_dir, name) for name in names),
            within=60,
            what="both pulls",
        )
    for name in names:
        (run,) = runs(state_dir, name)
        assert run.result is RunResult.OK, run.error
        assert run.trigger == "daemon"
        assert archives(tmp_path, repos[name]) == [run.archive]
    status = await run_cli("--config", str(path), "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = {row["client"]: row for row in json.loads(status.stdout)}
    assert set(rows) == set(names)
    for row in rows.values():
        assert set(row) == {
            "client",
            "last_success",
            "last_result",
            "next_run",
            "running",
            "last_success_age_seconds",
            "last_check",
            "last_check_result",
            "last_maintain_result",
            "stale",
            "paused",
            "paused_until",
            "last_error",
            "failed_sources",
        }
        assert row["last_result"] == "ok"
        assert (row["last_error"], row["failed_sources"]) == (None, [])
        assert row["running"] is False
        assert 0 <= row["last_success_age_seconds"] < 120
        assert datetime.fromisoformat(row["next_run"]).timetz() == clock_time(2, 0, tzinfo=UTC)
    history = await run_cli("--config", str(path), "history", "web1", "--json")
    assert history.returncode == 0, history.stderr
    assert [r["result"] for r in json.loads(history.stdout)] == ["ok"]


@pytest.mark.sshd
@pytest.mark.usefixtures("server_borg_env")
async def test_one_shot_pull_is_busy_while_the_daemon_pulls_and_waits_with_wait(sshd, tmp_path):
    repo = make_repo(tmp_path, "web1")
    data = make_data(tmp_path, "web1", random_bytes=1_500_000)
    client = sshd_client(
        sshd, "web1", repo, data, schedule="0 2 * * *", create_args=slow_create_args(300)
    )
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, sshd=sshd, clients={"web1": client})
    config = load_config(path)
    state_dir = config.server.state_dir
    daemon = daemon_firing_in(config, 0.5)
    async with serving(daemon):
        await eventually(lambda: runs(state_dir, "web1"), within=15, what="the daemon's run")
        busy = await run_cli("--config", str(path), "pull", "web1")
        assert busy.returncode == 2, busy.stdout + busy.stderr
        assert "busy" in busy.stdout
        status = await run_cli("--config", str(path), "status", "--json")
        assert json.loads(status.stdout)[0]["running"] is True
        waited = await run_cli("--config", str(path), "pull", "--wait", "web1", limit=100)
        assert waited.returncode == 0, waited.stdout + waited.stderr
    daemon_run, pull_run = runs(state_dir, "web1")  # the refused pull left no row
    assert (daemon_run.trigger, daemon_run.result) == ("daemon", RunResult.OK)
    assert (pull_run.trigger, pull_run.result) == ("pull", RunResult.OK)
    assert daemon_run.finished is not None
    assert pull_run.started >= daemon_run.finished
    assert len(archives(tmp_path, repo)) == 2


@pytest.mark.sshd
@pytest.mark.usefixtures("server_borg_env")
async def test_a_run_over_its_timeout_is_cancelled_cleaned_up_and_recorded_failed(sshd, tmp_path):
    repo = make_repo(tmp_path, "web1")
    data = make_data(tmp_path, "web1", random_bytes=3_000_000)
    client = sshd_client(
        sshd,
        "web1",
        repo,
        data,
        schedule="0 2 * * *",
        create_args=slow_create_args(100),  # ~30 s of upload
        timeout=2,
        retries=2,
        retry_wait=0.1,
    )
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, sshd=sshd, clients={"web1": client})
    config = load_config(path)
    state_dir = config.server.state_dir
    daemon = daemon_firing_in(config, 0.5)
    async with serving(daemon):
        await eventually(lambda: finished_runs(state_dir, "web1"), within=30, what="the timeout")
        await asyncio.sleep(0.5)  # five retry_waits: a retry would have started
    (run,) = runs(state_dir, "web1")
    assert run.result is RunResult.FAILED
    assert "timeout" in (run.error or "")
    assert list(config.server.socket_dir.iterdir()) == []
    await eventually(lambda: not borg_processes(repo), within=15, what="borg to exit")
    assert repo_lock_free(tmp_path, repo)


@pytest.mark.sshd
def test_sigterm_during_a_pull_cleans_up_and_records_interrupted(sshd, tmp_path):
    repo = make_repo(tmp_path, "web1")
    data = make_data(tmp_path, "web1", random_bytes=3_000_000)
    client = sshd_client(
        sshd, "web1", repo, data, schedule="0 2 * * *", create_args=slow_create_args(100)
    )
    path = write_config(
        tmp_path / "borgtunnel.toml",
        tmp_path,
        sshd=sshd,
        clients={"web1": client},
        daemon={"stop_timeout": 0},
    )
    config = load_config(path)
    remote_socket = Path(client["remote_socket"])
    log = tmp_path / "daemon.log"
    with daemon_process(path, log, fire_in=1.0, env=server_env(tmp_path)) as proc:
        # borg serve on this side and borg create on the client both run: mid-pull.
        wait_until(lambda: len(borg_processes(repo)) >= 2, within=30, what="borg serve + create")
        wait_until(remote_socket.exists, within=10, what="the remote socket")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    assert list(config.server.socket_dir.iterdir()) == []
    assert not remote_socket.exists()
    wait_until(lambda: not borg_processes(repo), within=15, what="borg serve and create to end")
    assert repo_lock_free(tmp_path, repo)
    (run,) = runs(config.server.state_dir, "web1")
    assert run.result is RunResult.INTERRUPTED
    assert has_event(log, "cancelling_running_pulls")
    assert has_event(log, "daemon_stopped")


@pytest.mark.sshd
def test_sighup_with_a_broken_config_keeps_the_old_one(sshd, tmp_path):
    repo = make_repo(tmp_path, "web1")
    data = make_data(tmp_path, "web1")
    client = sshd_client(sshd, "web1", repo, data, schedule="0 2 * * *", retries=2)
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, sshd=sshd, clients={"web1": client})
    state_dir = load_config(path).server.state_dir
    log = tmp_path / "daemon.log"
    notify_path = tmp_path / "notify.sock"
    env = {**server_env(tmp_path), "NOTIFY_SOCKET": str(notify_path)}
    with (
        notify_listener(notify_path) as notify,
        daemon_process(path, log, fire_in=3.0, env=env) as proc,
    ):
        notify.wait_for(lambda m: "READY=1" in m.splitlines(), within=15, what="READY=1")
        path.write_text(path.read_text().replace("retries = 2", 'retries = "many"'))
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(lambda m: "RELOADING=1" in m, within=10, what="RELOADING=1")
        notify.wait_for(lambda m: "READY=1" in m, within=10, what="READY=1", since=reloading + 1)
        wait_until(lambda: has_event(log, "config_reload_failed"), within=5, what="the error")
        # The old schedule still fires, with the old config.
        wait_until(lambda: finished_runs(state_dir, "web1"), within=30, what="the pull")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        notify.wait_for(lambda m: "STOPPING=1" in m, within=5, what="STOPPING=1")
    (run,) = runs(state_dir, "web1")
    assert run.result is RunResult.OK, run.error
    failed = next(e for e in log_events(log) if e["event"] == "config_reload_failed")
    assert any(p.startswith("clients.web1.retries: ") for p in failed["problems"]), failed
    started = next(e for e in log_events(log) if e["event"] == "run_starting")
    assert failed["timestamp"] < started["timestamp"]


def test_sd_notify_ready_status_watchdog_reload_and_stopping(tmp_path):
    """The real ``borgtunnel daemon`` command; no SSH needed, nothing runs before 02:00."""
    client = offline_client(tmp_path / "r", schedule="0 2 * * *")
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, clients={"web1": client})
    notify_path = tmp_path / "notify.sock"
    env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "100000"}
    with (
        notify_listener(notify_path) as notify,
        daemon_process(path, tmp_path / "daemon.log", env=env) as proc,
    ):
        ready = notify.wait_for(lambda m: "READY=1" in m.splitlines(), within=15, what="READY=1")
        assert re.search(
            r"^STATUS=0 running, next: web1 at (\d{4}-\d\d-\d\d )?02:00$",
            notify.messages[ready],
            re.MULTILINE,
        ), notify.messages[ready]
        ping = ready
        for _ in range(3):  # WATCHDOG_USEC=100000: a ping every 50 ms
            ping = notify.wait_for(
                lambda m: m == "WATCHDOG=1", within=2, what="WATCHDOG=1", since=ping + 1
            )
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(lambda m: "RELOADING=1" in m, within=10, what="RELOADING=1")
        notify.wait_for(lambda m: "READY=1" in m, within=10, what="READY=1", since=reloading + 1)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for(lambda m: m.startswith("STOPPING=1"), within=10, what="STOPPING=1")
        assert proc.wait(timeout=30) == 0
