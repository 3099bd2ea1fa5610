"""Pull sockets left behind by a killed pull are swept: at the next pull and at daemon start.

Real sockets and a real SIGKILLed ``borgtunnel pull`` against the sshd fixture; the next pull is
verified by reading the archive back with the server's borg.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from borgtunnel.config import load_config
from borgtunnel.lock import acquire_client_lock
from borgtunnel.privatedir import ensure_private_dir
from borgtunnel.scheduling.daemon import Daemon
from borgtunnel.server.serve import pull_socket
from borgtunnel.systemd import Notifier
from tests import pullkit
from tests.sshd import SshdServer


def dead_socket(path: Path) -> Path:
    """A socket file nobody listens on: what a SIGKILLed pull leaves."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    return path


@pytest.fixture
def live_sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def names(directory: Path) -> set[str]:
    return {entry.name for entry in directory.iterdir()}


async def test_next_pull_sweeps_only_dead_sockets_of_its_client(
    tmp_path: Path, live_sockets: list[socket.socket]
) -> None:
    run = tmp_path / "run"
    ensure_private_dir(run)
    dead_socket(run / "web1.deadbeef.sock")
    dead_socket(run / "web2.deadbeef.sock")  # another client's: its own pull sweeps it
    dead_socket(run / "web1.deadbeef.sock.x")  # not a pull socket's name
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live_sockets.append(live)
    live.bind(str(run / "web1.cafebabe.sock"))  # a pull in progress: still listening
    live.listen()
    (run / "web1.01234567.sock").write_text("a file, not a socket\n")
    (run / "web1.0badf00d.sock").symlink_to(dead_socket(tmp_path / "elsewhere.sock"))

    async with pull_socket(run, "web1", ["true"], stop_timeout=5) as (path, _listener):
        assert path.is_socket()
        assert names(run) == {
            path.name,
            "web2.deadbeef.sock",
            "web1.deadbeef.sock.x",
            "web1.cafebabe.sock",
            "web1.01234567.sock",
            "web1.0badf00d.sock",
        }
    assert (tmp_path / "elsewhere.sock").is_socket()  # a symlink's target is never touched


def offline(tmp_path: Path, name: str) -> dict[str, object]:
    return {
        "host": "127.0.0.1",
        "port": 9,
        "repository": str(tmp_path / name),
        "paths": ["/nonexistent"],
        "encryption": "none",
        "schedule": "0 2 * * *",
    }


async def test_daemon_start_sweeps_dead_sockets_of_idle_configured_clients(
    tmp_path: Path,
) -> None:
    run, state = tmp_path / "run", tmp_path / "state"
    ensure_private_dir(run)
    dead_socket(run / "web1.0123abcd.sock")
    dead_socket(run / "busy.0123abcd.sock")  # its lock is held: a one-shot pull's, left alone
    dead_socket(run / "other.0123abcd.sock")  # not a configured client: not ours to judge
    config_path = pullkit.write_config(
        tmp_path / "bt.toml",
        server={"socket_dir": str(run), "state_dir": str(state)},
        ssh={},
        clients={"web1": offline(tmp_path, "web1"), "busy": offline(tmp_path, "busy")},
    )
    daemon = Daemon(load_config(config_path), notifier=Notifier(""))
    stop = asyncio.Event()
    with acquire_client_lock(state, "busy", wait=False):
        task = asyncio.create_task(daemon.serve(shutdown_trigger=stop.wait))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 15)
            # control.sock: the daemon's own control socket (docs/control.md).
            assert names(run) == {"busy.0123abcd.sock", "other.0123abcd.sock", "control.sock"}
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


FAKE_BORG = """#!/bin/sh
# Stands in for the client's borg: says it started, then hangs like a slow backup.
: > {started}
exec sleep 600
"""


@pytest.mark.sshd
def test_socket_of_a_sigkilled_pull_is_swept_by_the_next_pull(
    tmp_path: Path, sshd: SshdServer
) -> None:
    data = pullkit.make_client_data(tmp_path / "data")
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    started = tmp_path / "fake-started"
    fake = tmp_path / "fake-borg"
    fake.write_text(FAKE_BORG.format(started=started))
    fake.chmod(0o755)
    conf = pullkit.base_config(tmp_path, sshd)
    hanging = pullkit.write_config(
        tmp_path / "hang.toml",
        clients={"c1": pullkit.client_table(sshd, "c1", repo, [data], remote_borg=str(fake))},
        **conf,
    )
    normal = pullkit.write_config(
        tmp_path / "ok.toml", clients={"c1": pullkit.client_table(sshd, "c1", repo, [data])}, **conf
    )
    run = tmp_path / "run"

    killed = subprocess.Popen(
        [sys.executable, "-m", "borgtunnel", "--config", str(hanging), "pull", "c1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():  # forward up, borg "running": the socket is in use
            assert killed.poll() is None, "the hanging pull ended by itself"
            assert time.monotonic() < deadline, "the fake borg never started"
            time.sleep(0.1)
        left = [p for p in run.iterdir() if p.name.startswith("c1.")]
        assert len(left) == 1
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        if killed.poll() is None:
            killed.kill()
        killed.wait(timeout=30)
    assert left[0].is_socket()  # SIGKILL: nothing removed it

    result = pullkit.run_cli(normal, "pull", "c1")

    assert result.returncode == 0, result.stderr
    assert not left[0].exists()
    assert list(run.iterdir()) == []
    (archive,) = pullkit.archives(tmp_path, repo)
    pullkit.extract(tmp_path, repo, archive, tmp_path / "restored")
    pullkit.assert_same_tree(data, tmp_path / "restored")
