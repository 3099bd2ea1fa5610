"""The daemon's control socket without SSH: permissions, who may connect, hostile requests,
and the queue (``max_parallel``, cancel of a queued and of a running pull) with stand-in runs.

The stand-ins replace only the pull itself (``runner=``/``requested_runner=``); the socket,
the protocol, the daemon's queue and its cancellation path are the real ones. The real pull
through the socket is in tests/test_control_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from borgtunnel.config import ClientConfig, Config, load_config
from borgtunnel.history import History, RunResult
from borgtunnel.pauses import load_pauses
from borgtunnel.runs.pull import ProgressCallback, PullOutcome
from borgtunnel.scheduling.control_client import ControlError, NoDaemonError, connect
from borgtunnel.scheduling.control_protocol import (
    MAX_REQUEST_BYTES,
    CancelRequest,
    Done,
    Error,
    Finished,
    PauseRequest,
    PullRequest,
    Queued,
    Started,
    control_socket_path,
)
from borgtunnel.scheduling.daemon import Daemon
from borgtunnel.systemd import Notifier
from tests.daemon_support import eventually, offline_client, serving, write_config

QUIET = Notifier("")


class Gate:
    """Stand-in requested runner: each pull waits for its release; cancellations recorded."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def __call__(
        self,
        _config: Config,
        client: ClientConfig,
        _history: History,
        _wait: bool,
        _progress: ProgressCallback | None,
    ) -> PullOutcome:
        self.started.append(client.name)
        try:
            await self.gates[client.name].wait()
        except asyncio.CancelledError:
            self.cancelled.append(client.name)
            raise
        return PullOutcome(client=client.name, result=RunResult.OK)


def make_config(tmp_path: Path, **daemon: Any) -> tuple[Path, Config]:
    clients = {name: offline_client(tmp_path / name) for name in ("web1", "db1")}
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, clients=clients, daemon=daemon)
    return path, load_config(path)


async def raw_exchange(path: Path, payload: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(payload)
        writer.write_eof()  # all we say: an unterminated line ends here
        await writer.drain()
        return [line async for line in reader]
    finally:
        writer.close()
        await writer.wait_closed()


async def ask(config: Config, request: Any) -> Any:
    async with await connect(config.server.socket_dir) as connection:
        await connection.send(request)
        return await connection.receive()


async def test_socket_is_0600_in_the_private_dir_and_removed_at_stop(tmp_path):
    _, config = make_config(tmp_path)
    path = control_socket_path(config.server.socket_dir)
    async with serving(Daemon(config, notifier=QUIET)):
        info = path.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.geteuid()
        assert stat.S_IMODE(config.server.socket_dir.stat().st_mode) == 0o700
    assert not path.exists()
    with pytest.raises(NoDaemonError):
        await connect(config.server.socket_dir)


async def test_garbage_oversized_and_unknown_requests_get_an_error_and_the_daemon_goes_on(
    tmp_path,
):
    _, config = make_config(tmp_path)
    path = control_socket_path(config.server.socket_dir)
    async with serving(Daemon(config, notifier=QUIET)):
        with capture_logs() as logs:
            (garbage,) = await raw_exchange(path, b"\xff\xfe not json\n")
            (huge,) = await raw_exchange(path, b"{" + b"x" * (4 * MAX_REQUEST_BYTES) + b"\n")
            (unterminated,) = await raw_exchange(path, b'{"op": "resume", "client": "web1"}')
            (extra,) = await raw_exchange(path, b'{"op": "resume", "client": "web1", "x": 1}\n')
            (unknown,) = await raw_exchange(path, b'{"op": "resume", "client": "mail\\u001b"}\n')
            (bad_op,) = await raw_exchange(path, b'{"op": "rm", "client": "web1"}\n')
        assert b"bad request" in garbage
        assert f"longer than {MAX_REQUEST_BYTES} bytes".encode() in huge
        assert b"one line ending in a newline" in unterminated
        assert b"bad request: resume.x" in extra
        # Escaped for a terminal, not a raw ESC.
        assert json.loads(unknown)["message"] == "unknown client 'mail\\x1b'"
        assert b"bad request" in bad_op
        assert sum(e["event"] == "control_bad_request" for e in logs) == 5
        # Still serving, and nothing was changed by any of it.
        answer = await ask(config, PauseRequest(client="web1"))
        assert answer == Done(ok=True, message="web1: paused until resumed")
    assert set(load_pauses(config.server.state_dir)) == {"web1"}


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory other uids can traverse (pytest's tmp_path lives under a 0700 one)."""
    made = Path(tempfile.mkdtemp(prefix="bt-control-"))
    made.chmod(0o711)
    try:
        yield made
    finally:
        shutil.rmtree(made)


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid needs root")
async def test_a_peer_that_is_neither_root_nor_the_daemon_user_is_refused(tmp_path, reachable_dir):
    clients = {"web1": offline_client(tmp_path / "web1")}
    server = {"socket_dir": reachable_dir / "sock"}
    config = load_config(
        write_config(tmp_path / "borgtunnel.toml", tmp_path, clients=clients, server=server)
    )
    path = control_socket_path(config.server.socket_dir)
    python = shutil.which("python3", path="/usr/bin")
    assert python is not None
    # A refused peer is told at once, before it says anything (a served one would get
    # "no request within …" instead).
    client = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); "
        "s.connect(sys.argv[1]); "
        "print(s.makefile().readline(), end='')"
    )
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", client]
    async with serving(Daemon(config, notifier=QUIET)):
        # The file mode alone keeps another uid out…
        kept_out = await asyncio.to_thread(
            subprocess.run, [*argv, str(path)], capture_output=True, text=True, timeout=30
        )
        assert kept_out.returncode != 0
        assert "PermissionError" in kept_out.stderr
        # …and with the mode opened up, SO_PEERCRED still refuses it.
        config.server.socket_dir.chmod(0o711)
        path.chmod(0o666)
        with capture_logs() as logs:
            refused = await asyncio.to_thread(
                subprocess.run, [*argv, str(path)], capture_output=True, text=True, timeout=30
            )
        assert refused.returncode == 0, refused.stderr
        assert '"permission denied for uid 65534"' in refused.stdout
        assert any(e["event"] == "control_peer_refused" and e["uid"] == 65534 for e in logs)
    assert load_pauses(config.server.state_dir) == {}


async def test_a_symlinked_socket_dir_is_refused_by_the_daemon_and_by_the_caller(tmp_path):
    real = tmp_path / "real-sock"
    real.mkdir(mode=0o700)
    clients = {"web1": offline_client(tmp_path / "web1")}
    linked = tmp_path / "sock"
    linked.symlink_to(real)
    config = load_config(
        write_config(
            tmp_path / "borgtunnel.toml",
            tmp_path,
            clients=clients,
            server={"socket_dir": linked},
        )
    )
    with capture_logs() as logs:
        async with serving(Daemon(config, notifier=QUIET)):
            await eventually(
                lambda: any(e["event"] == "control_socket_failed" for e in logs),
                within=10,
                what="the refusal",
            )
    failed = next(e for e in logs if e["event"] == "control_socket_failed")
    assert "is a symlink" in failed["error"]
    assert list(real.iterdir()) == []
    with pytest.raises(ControlError, match="not a real directory"):
        await connect(linked)


async def test_requested_pulls_share_max_parallel_and_cancel_a_queued_and_a_running_one(
    tmp_path,
):
    _, config = make_config(tmp_path, max_parallel=1)
    gate = Gate()
    daemon = Daemon(config, notifier=QUIET, requested_runner=gate)
    async with serving(daemon):
        first = await connect(config.server.socket_dir)
        second = await connect(config.server.socket_dir)
        try:
            await first.send(PullRequest(client="web1"))
            assert await first.receive() == Queued(position=1)
            assert await first.receive() == Started()
            await second.send(PullRequest(client="db1"))
            assert await second.receive() == Queued(position=1)
            await asyncio.sleep(0.2)
            assert gate.started == ["web1"]  # max_parallel = 1: db1 waits

            # The same client again: busy, as a one-shot pull would be.
            again = await ask(config, PullRequest(client="web1"))
            assert isinstance(again, Queued)

            queued = await ask(config, CancelRequest(client="db1"))
            assert queued == Done(ok=True, message="db1: queued pull cancelled")
            db1 = await second.receive()
            assert isinstance(db1, Finished)
            assert (db1.result, db1.exit_code) == ("interrupted", 2)
            assert "before it started" in db1.summary

            running = await ask(config, CancelRequest(client="web1"))
            assert running == Done(ok=True, message="web1: running pull cancelled")
            assert gate.cancelled == ["web1"]
            web1 = await first.receive()
            assert isinstance(web1, Finished)
            assert (web1.result, web1.exit_code) == ("interrupted", 2)
            assert "its cleanup ran" in web1.summary
        finally:
            await first.aclose()
            await second.aclose()
        # The daemon goes on: a new pull runs and finishes.
        async with await connect(config.server.socket_dir) as third:
            await third.send(PullRequest(client="db1"))
            assert isinstance(await third.receive(), Queued)
            assert isinstance(await third.receive(), Started)
            gate.gates["db1"].set()
            done = await third.receive()
            assert isinstance(done, Finished)
            assert done.exit_code == 0
        nothing = await ask(config, CancelRequest(client="web1"))
        assert nothing == Done(ok=False, message="web1: no pull is running or queued")


async def test_a_caller_that_goes_away_cancels_its_pull(tmp_path):
    _, config = make_config(tmp_path)
    gate = Gate()
    async with serving(Daemon(config, notifier=QUIET, requested_runner=gate)):
        connection = await connect(config.server.socket_dir)
        await connection.send(PullRequest(client="web1"))
        assert isinstance(await connection.receive(), Queued)
        assert isinstance(await connection.receive(), Started)
        await connection.aclose()
        await eventually(lambda: gate.cancelled == ["web1"], within=10, what="the cancellation")


async def test_busy_answer_for_a_second_pull_of_the_same_client(tmp_path):
    _, config = make_config(tmp_path)
    gate = Gate()
    daemon = Daemon(config, notifier=QUIET, requested_runner=gate)
    async with serving(daemon), await connect(config.server.socket_dir) as first:
        await first.send(PullRequest(client="web1"))
        assert isinstance(await first.receive(), Queued)
        async with await connect(config.server.socket_dir) as second:
            await second.send(PullRequest(client="web1", wait=True))
            assert isinstance(await second.receive(), Queued)
            busy = await second.receive()
        assert isinstance(busy, Finished)
        assert busy.exit_code == 2
        assert "busy: another `borgtunnel pull` of this client" in busy.summary
        gate.gates["web1"].set()
        assert isinstance(await first.receive(), Started)
        done = await first.receive()
        assert isinstance(done, Finished)
        assert done.exit_code == 0


def test_no_socket_dir_means_no_daemon(tmp_path):
    with pytest.raises(NoDaemonError):
        asyncio.run(connect(tmp_path / "missing"))


def test_a_world_writable_socket_dir_is_not_trusted(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(control_socket_path(shared)))
        listener.listen()
        with pytest.raises(ControlError, match="writable by group or others"):
            asyncio.run(connect(shared))


__all__ = ["Error"]
