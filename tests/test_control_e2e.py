"""Steering a running daemon end to end (docs/control.md): real sshd, real borg, the real
``borgtunnel`` command talking to the daemon's control socket.

* ``pull`` through an in-process daemon: the run is the daemon's (its pid in the history), the
  caller gets the exit code and the summary, the archive is verified and read back; a caller
  that asks for progress receives borg's figures as they come;
* ``cancel`` and a caller's Ctrl-C stop a running pull with the full cleanup: no borg left on
  either end, no socket, the repository lock free, the run recorded ``interrupted``;
* ``pause`` (through a daemon process, and without one) persists across a restart and keeps
  the scheduled pull from starting; ``status`` and the metrics textfile show it; ``resume``
  lets the next daemon pull on schedule.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from borgtunnel.config import load_config
from borgtunnel.history import RunResult
from borgtunnel.scheduling.control_client import connect
from borgtunnel.scheduling.control_protocol import (
    Finished,
    ProgressEvent,
    PullRequest,
    Queued,
    Started,
    control_socket_path,
)
from borgtunnel.scheduling.daemon import Daemon
from borgtunnel.systemd import Notifier
from tests import pullkit
from tests.daemon_support import (
    BORGTUNNEL,
    archives,
    borg_processes,
    daemon_process,
    eventually,
    finished_runs,
    has_event,
    make_data,
    make_repo,
    repo_lock_free,
    run_cli,
    runs,
    server_env,
    serving,
    slow_create_args,
    sshd_client,
    wait_until,
    write_config,
)
from tests.reporting_kit import setup_client
from tests.test_progress_pty import pull_on_a_pty

pytestmark = pytest.mark.sshd

QUIET = Notifier("")


@pytest.fixture
def server_borg_env(tmp_path, monkeypatch):
    """``borg serve`` children of an in-process daemon (and the CLI children) use this."""
    for key, value in server_env(tmp_path).items():
        monkeypatch.setenv(key, value)


def setup(
    tmp_path: Path, sshd: Any, *, slow: bool = False, **extra: Any
) -> tuple[Path, Path, Path]:
    """One client web1 (no schedule unless given); returns (config path, repo, data)."""
    repo = make_repo(tmp_path, "web1")
    data = make_data(tmp_path, "web1", random_bytes=3_000_000 if slow else 100_000)
    if slow:
        extra["create_args"] = slow_create_args(100)  # ~30 s of upload: time to cancel it
    client = sshd_client(sshd, "web1", repo, data, **extra)
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, sshd=sshd, clients={"web1": client})
    return path, repo, data


def pull_sockets(socket_dir: Path) -> list[str]:
    return sorted(p.name for p in socket_dir.iterdir() if p.name != "control.sock")


@pytest.mark.usefixtures("server_borg_env")
async def test_pull_goes_through_the_daemon_with_exit_code_summary_and_progress(sshd, tmp_path):
    # Throttled, so that borg reports figures while it uploads the second pull's 2 MB.
    # Two pulls may start within one second: archive names to the microsecond.
    archive = "web1-{now:%Y-%m-%dT%H:%M:%S.%f}"
    path, repo, data = setup(tmp_path, sshd, create_args=slow_create_args(500), archive=archive)
    config = load_config(path)
    state_dir = config.server.state_dir
    daemon = Daemon(config, config_path=path, notifier=QUIET)
    async with serving(daemon):
        assert control_socket_path(config.server.socket_dir).is_socket()
        pulled = await run_cli("--config", str(path), "pull", "web1", limit=120)
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        assert pulled.stdout.startswith("web1: ok archive=web1-"), pulled.stdout
        (run,) = runs(state_dir, "web1")
        # The daemon ran it (this process), as a manual pull.
        assert (run.pid, run.trigger, run.result) == (os.getpid(), "pull", RunResult.OK)

        # A caller asking for progress gets borg's figures, then the result.
        more = data / "more"
        more.mkdir()
        for index in range(200):  # many files: borg reports its figures as it goes
            (more / f"{index}.bin").write_bytes(os.urandom(10_000))
        received: list[Any] = []
        async with await connect(config.server.socket_dir) as connection:
            await connection.send(PullRequest(client="web1", progress=True))
            while (message := await connection.receive()) is not None:
                received.append(message)
                if isinstance(message, Finished):
                    break
    assert isinstance(received[0], Queued)
    assert isinstance(received[1], Started)
    progress = [m for m in received if isinstance(m, ProgressEvent)]
    assert progress, received
    assert max(m.original_size for m in progress) > 0
    finished = received[-1]
    assert isinstance(finished, Finished)
    assert (finished.result, finished.exit_code) == ("ok", 0), finished.summary
    first, second = runs(state_dir, "web1")
    assert second.result is RunResult.OK
    assert archives(tmp_path, repo) == [first.archive, second.archive]
    assert second.archive is not None
    pullkit.extract(tmp_path, repo, second.archive, tmp_path / "restored")
    pullkit.assert_same_tree(data, tmp_path / "restored")
    # The daemon removed its control socket when it stopped.
    assert list(config.server.socket_dir.iterdir()) == []


def assert_cleaned_up(tmp_path: Path, repo: Path, socket_dir: Path, remote_socket: Path) -> None:
    wait_until(lambda: not borg_processes(repo), within=20, what="borg serve and create to end")
    assert pull_sockets(socket_dir) == []
    assert not remote_socket.exists()
    assert repo_lock_free(tmp_path, repo)


@pytest.mark.usefixtures("server_borg_env")
async def test_cancel_stops_a_running_pull_with_the_full_cleanup(sshd, tmp_path):
    path, repo, _ = setup(tmp_path, sshd, slow=True)
    config = load_config(path)
    state_dir, socket_dir = config.server.state_dir, config.server.socket_dir
    remote_socket = Path(sshd_client(sshd, "web1", repo, repo)["remote_socket"])
    daemon = Daemon(config, config_path=path, notifier=QUIET)
    async with serving(daemon):
        nothing = await run_cli("--config", str(path), "cancel", "web1")
        assert nothing.returncode == 2, nothing.stdout + nothing.stderr
        assert "no pull is running or queued" in nothing.stderr
        caller = asyncio.create_task(run_cli("--config", str(path), "pull", "web1", limit=120))
        await eventually(lambda: len(borg_processes(repo)) >= 2, within=30, what="borg running")
        await eventually(remote_socket.exists, within=10, what="the remote socket")
        cancelled = await run_cli("--config", str(path), "cancel", "web1", limit=120)
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        assert cancelled.stdout.strip() == "web1: running pull cancelled"
        # cancel answers once the cleanup has run: nothing is left right now.
        assert pull_sockets(socket_dir) == []
        pulled = await caller
        assert pulled.returncode == 2, pulled.stdout + pulled.stderr
        assert pulled.stdout.startswith("web1: interrupted"), pulled.stdout
        assert "cancelled by `borgtunnel cancel`" in pulled.stdout
    assert_cleaned_up(tmp_path, repo, socket_dir, remote_socket)
    (run,) = finished_runs(state_dir, "web1")
    assert run.result is RunResult.INTERRUPTED
    assert archives(tmp_path, repo) == []
    # Without a daemon, cancel says so with its own exit code.
    alone = await run_cli("--config", str(path), "cancel", "web1")
    assert alone.returncode == 69, alone.stdout + alone.stderr
    assert "no daemon runs" in alone.stderr


@pytest.mark.usefixtures("server_borg_env")
async def test_ctrl_c_of_the_caller_cancels_its_pull_in_the_daemon(sshd, tmp_path):
    path, repo, _ = setup(tmp_path, sshd, slow=True)
    config = load_config(path)
    remote_socket = Path(sshd_client(sshd, "web1", repo, repo)["remote_socket"])
    daemon = Daemon(config, config_path=path, notifier=QUIET)
    async with serving(daemon):
        caller = await asyncio.create_subprocess_exec(
            *(BORGTUNNEL, "--config", str(path), "pull", "web1"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            await eventually(lambda: len(borg_processes(repo)) >= 2, within=30, what="borg")
            await eventually(remote_socket.exists, within=10, what="the remote socket")
            caller.send_signal(signal.SIGINT)
            async with asyncio.timeout(60):
                raw_out, raw_err = await caller.communicate()
        finally:
            if caller.returncode is None:
                caller.kill()
                await caller.wait()
        out, err = raw_out.decode(), raw_err.decode()
        assert caller.returncode == 2, out + err
        assert out.startswith("web1: interrupted"), out + err
        assert "cancelling the pulls in the daemon" in err
    assert_cleaned_up(tmp_path, repo, config.server.socket_dir, remote_socket)
    (run,) = finished_runs(config.server.state_dir, "web1")
    assert (run.trigger, run.result) == ("pull", RunResult.INTERRUPTED)


def cli(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BORGTUNNEL, "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def paused_sample(textfile: Path) -> str | None:
    for line in textfile.read_text().splitlines():
        if line.startswith('borgtunnel_client_paused{client="web1"}'):
            return line.split()[-1]
    return None


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_pause_persists_across_restarts_blocks_the_schedule_and_resume_lets_it_run(sshd, tmp_path):
    textfile = tmp_path / "metrics.prom"
    repo = make_repo(tmp_path, "web1")
    data = make_data(tmp_path, "web1")
    client = sshd_client(sshd, "web1", repo, data, schedule="0 2 * * *")
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, sshd=sshd, clients={"web1": client})
    with path.open("a") as stream:
        stream.write(f'\n[metrics]\ntextfile = "{textfile}"\n')
    state_dir = load_config(path).server.state_dir
    env = server_env(tmp_path)

    # A daemon takes the pause and skips the slot.
    first = tmp_path / "first.log"
    with daemon_process(path, first, fire_in=3.0, env=env) as proc:
        wait_until(lambda: has_event(first, "control_socket_listening"), within=15, what="socket")
        paused = cli(path, "pause", "web1")
        assert paused.returncode == 0, paused.stdout + paused.stderr
        assert paused.stdout.strip() == "web1: paused until resumed"
        wait_until(lambda: has_event(first, "run_skipped_paused"), within=15, what="the slot")
        wait_until(lambda: paused_sample(textfile) == "1.0", within=5, what="the gauge")
        status = cli(path, "status", "--json")
        (row,) = json.loads(status.stdout)
        assert (row["paused"], row["paused_until"], row["next_run"]) == (True, None, None)
        stop(proc)
    assert runs(state_dir, "web1") == []

    # The pause survives the restart: the next daemon skips the slot too, then resumes it.
    second = tmp_path / "second.log"
    with daemon_process(path, second, fire_in=2.0, env=env) as proc:
        wait_until(lambda: has_event(second, "run_skipped_paused"), within=15, what="the slot")
        assert paused_sample(textfile) == "1.0"
        resumed = cli(path, "resume", "web1")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert resumed.stdout.strip() == "web1: resumed"
        wait_until(lambda: paused_sample(textfile) == "0.0", within=5, what="the gauge")
        stop(proc)
    assert runs(state_dir, "web1") == []

    # Resumed: the next daemon pulls on schedule.
    third = tmp_path / "third.log"
    with daemon_process(path, third, fire_in=2.0, env=env) as proc:
        wait_until(lambda: finished_runs(state_dir, "web1"), within=60, what="the pull")
        stop(proc)
    (run,) = runs(state_dir, "web1")
    assert (run.trigger, run.result) == ("daemon", RunResult.OK)
    assert archives(tmp_path, repo) == [run.archive]

    # Without a daemon, pause and resume write the file and say so.
    offline = cli(path, "pause", "web1", "--until", "2h")
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert "no daemon runs: written to" in offline.stdout
    (row,) = json.loads(cli(path, "status", "--json").stdout)
    assert row["paused"] is True
    assert row["paused_until"] is not None
    back = cli(path, "resume", "web1")
    assert back.returncode == 0, back.stdout + back.stderr
    assert back.stdout.startswith("web1: resumed (no daemon runs")


@pytest.mark.usefixtures("server_borg_env")
async def test_a_pull_through_the_daemon_shows_live_progress_on_the_callers_terminal(
    sshd, tmp_path
):
    _, repo, path = setup_client(
        tmp_path,
        sshd,
        random_bytes=3_000_000,
        client={"create_args": ["--upload-ratelimit", "1000"]},  # ~3 s: several updates
    )
    config = load_config(path)
    async with serving(Daemon(config, config_path=path, notifier=QUIET)):
        code, screen = await asyncio.to_thread(
            pull_on_a_pty, path, "pull", "c1", log=tmp_path / "live.log"
        )
    assert code == 0, screen
    live = [line for line in screen.splitlines() if re.match(r"c1  backing up  \d+ files  ", line)]
    assert live, screen
    summaries = [line for line in screen.splitlines() if line.startswith("c1: ok archive=")]
    assert len(summaries) == 1, screen
    (run,) = runs(config.server.state_dir, "c1")
    assert (run.pid, run.trigger, run.result) == (os.getpid(), "pull", RunResult.OK)
    assert pullkit.archives(tmp_path, repo) == [run.archive]
