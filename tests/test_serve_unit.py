"""Local serve sockets with real unix sockets and real child processes.

The "borg serve" here is a small Python script: the socket plumbing is under test, not borg. It
reports its pid and whether its stdin is blocking on the first stdout line, writes one line to
stderr, then echoes stdin to stdout until EOF. ``ignore-term`` makes it ignore SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from borgtunnel.server.serve import (
    BorgServeListener,
    SocketInUseError,
    bind_unix_socket,
    pull_socket,
)

FAKE_SERVE = """\
import os, signal, sys
mode = sys.argv[1] if len(sys.argv) > 1 else "echo"
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "long-stderr":
    sys.stderr.write("x" * 200_000 + "\\n")
sys.stderr.write(f"fake serve {os.getpid()} says hello\\n")
sys.stderr.flush()
os.write(1, f"pid={os.getpid()} blocking={os.get_blocking(0)}\\n".encode())
while data := os.read(0, 65536):
    os.write(1, data)
"""

# A wrapper that does not `exec`: SIGTERM ends the shell, the "borg" below it lives on.
WRAPPER = '"$@"; exit $?'

LINE_TIMEOUT = 5.0


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers where PID 1 does not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@dataclass
class Conn:
    """One client connection to a listener, after the fake serve said hello."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int
    blocking: bool

    async def echo(self, data: bytes) -> bytes:
        self.writer.write(data)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(len(data)), LINE_TIMEOUT)

    async def finish(self) -> bytes:
        """Send EOF, then read whatever is left until the other side closes."""
        self.writer.write_eof()
        return await asyncio.wait_for(self.reader.read(), LINE_TIMEOUT)


@dataclass
class Kit:
    tmp_path: Path
    fake: Path
    conns: list[Conn]
    pids: set[int]
    listeners: list[BorgServeListener]
    writers: list[asyncio.StreamWriter]

    def argv(self, fake_mode: str = "echo") -> list[str]:
        return [sys.executable, str(self.fake), fake_mode]

    def listen(
        self, argv: list[str] | None = None, **kwargs: Any
    ) -> tuple[Path, BorgServeListener]:
        path = self.tmp_path / "sockets" / f"l{len(self.listeners)}.sock"
        kwargs.setdefault("client", "web1")
        kwargs.setdefault("stop_timeout", 2.0)
        listener = BorgServeListener(bind_unix_socket(path), argv or self.argv(), **kwargs)
        self.listeners.append(listener)
        listener.start()
        return path, listener

    async def open(self, path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        self.writers.append(writer)
        return reader, writer

    async def connect(self, path: Path) -> Conn:
        reader, writer = await self.open(path)
        hello = await asyncio.wait_for(reader.readline(), LINE_TIMEOUT)
        fields = dict(item.split("=") for item in hello.decode().split())
        conn = Conn(reader, writer, int(fields["pid"]), fields["blocking"] == "True")
        self.pids.add(conn.pid)
        self.conns.append(conn)
        return conn


@pytest.fixture
async def kit(tmp_path: Path) -> AsyncIterator[Kit]:
    """Listeners, connections and every child pid seen are cleaned up whatever the test did."""
    fake = tmp_path / "fake_serve.py"
    fake.write_text(FAKE_SERVE)
    k = Kit(tmp_path, fake, [], set(), [], [])
    try:
        yield k
    finally:
        for pid in k.pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        for writer in k.writers:
            writer.close()
        for listener in k.listeners:
            async with asyncio.timeout(10):
                await listener.aclose()
        for writer in k.writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# --- bind_unix_socket ---------------------------------------------------------------------------


@pytest.fixture
def closing() -> Iterator[Callable[[socket.socket], socket.socket]]:
    opened: list[socket.socket] = []

    def track(sock: socket.socket) -> socket.socket:
        opened.append(sock)
        return sock

    yield track
    for sock in opened:
        sock.close()


def test_bind_makes_private_dir_and_socket(tmp_path: Path, closing: Any) -> None:
    path = tmp_path / "run" / "borgtunnel" / "web1.sock"
    closing(bind_unix_socket(path))
    assert path.is_socket()
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700


def test_bind_leaves_an_own_0755_dir_as_it_is(tmp_path: Path, closing: Any) -> None:
    # Readable by others is safe (the socket itself is 0600); its mode is not ours to change.
    directory = tmp_path / "sockets"
    directory.mkdir()
    directory.chmod(0o755)
    closing(bind_unix_socket(directory / "s.sock"))
    assert mode(directory) == 0o755


@pytest.mark.parametrize("dir_mode", [0o775, 0o757, 0o1777])
def test_bind_refuses_a_shared_dir_and_changes_nothing(tmp_path: Path, dir_mode: int) -> None:
    directory = tmp_path / "sockets"
    directory.mkdir()
    directory.chmod(dir_mode)
    with pytest.raises(PermissionError, match="writable by group or others"):
        bind_unix_socket(directory / "s.sock")
    assert mode(directory) == dir_mode
    assert list(directory.iterdir()) == []


def test_bind_refuses_a_live_listener(tmp_path: Path, closing: Any) -> None:
    path = tmp_path / "sockets" / "s.sock"
    first = closing(bind_unix_socket(path))
    with pytest.raises(SocketInUseError) as caught:
        bind_unix_socket(path)
    assert caught.value.path == path
    assert str(path) in str(caught.value)
    # The live one was not touched: it still accepts.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(path))
        first.setblocking(True)
        accepted, _ = first.accept()
        accepted.close()


def test_bind_replaces_a_stale_socket(tmp_path: Path, closing: Any) -> None:
    path = tmp_path / "sockets" / "s.sock"
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert path.is_socket()
    closing(bind_unix_socket(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(path))


def test_bind_refuses_a_symlinked_dir(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "sockets").symlink_to(real)
    with pytest.raises(PermissionError, match="is a symlink"):
        bind_unix_socket(tmp_path / "sockets" / "s.sock")
    assert list(real.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a directory to nobody")
def test_bind_refuses_a_foreign_dir(tmp_path: Path) -> None:
    directory = tmp_path / "sockets"
    directory.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(PermissionError, match="owned by uid"):
        bind_unix_socket(directory / "s.sock")
    assert list(directory.iterdir()) == []


# --- BorgServeListener ----------------------------------------------------------------------------


async def test_connection_is_served_by_a_child_with_a_blocking_socket(kit: Kit) -> None:
    with capture_logs() as logs:
        path, listener = kit.listen()
        conn = await kit.connect(path)
        assert conn.blocking is True
        assert conn.pid != os.getpid()
        assert listener.active == 1
        payload = os.urandom(300_000)  # more than one socket buffer in each direction
        assert await conn.echo(payload) == payload
        assert await conn.finish() == b""  # the child exited and our copy of the fd is closed
        async with asyncio.timeout(LINE_TIMEOUT):
            await listener.wait_idle()
    assert listener.active == 0
    assert listener.stats.connections == 1
    assert listener.stats.exit_codes == [0]
    assert listener.stats.failures == 0
    assert not running(conn.pid)
    stderr_lines = [e for e in logs if e["event"] == "serve_stderr"]
    assert [e["line"] for e in stderr_lines] == [f"fake serve {conn.pid} says hello"]
    assert stderr_lines[0]["client"] == "web1"
    assert any(e["event"] == "serve_exited" and e["status"] == 0 for e in logs)


async def test_parallel_connections_each_get_their_own_child(kit: Kit) -> None:
    path, listener = kit.listen()
    conns = await asyncio.gather(*(kit.connect(path) for _ in range(4)))
    assert len({c.pid for c in conns}) == 4
    assert listener.active == 4
    replies = await asyncio.gather(*(c.echo(f"client {i}\n".encode()) for i, c in enumerate(conns)))
    assert replies == [f"client {i}\n".encode() for i in range(4)]
    await asyncio.gather(*(c.finish() for c in conns))
    async with asyncio.timeout(LINE_TIMEOUT):
        await listener.wait_idle()
    assert listener.stats.connections == 4
    assert listener.stats.exit_codes == [0, 0, 0, 0]


async def test_max_connections_queues_the_rest(kit: Kit) -> None:
    path, listener = kit.listen(max_connections=1)
    first = await kit.connect(path)
    reader, _ = await kit.open(path)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readline(), 0.3)
    assert listener.active == 1
    await first.finish()
    hello = await asyncio.wait_for(reader.readline(), LINE_TIMEOUT)
    assert hello.startswith(b"pid=")
    kit.pids.add(int(hello.split()[0].split(b"=")[1]))


async def test_connections_past_the_limit_are_closed_unserved(kit: Kit) -> None:
    path, listener = kit.listen(connection_limit=2)
    for _ in range(2):
        await (await kit.connect(path)).finish()
    for refused in (1, 2):
        reader, _ = await kit.open(path)
        assert await asyncio.wait_for(reader.read(), LINE_TIMEOUT) == b""  # no hello: no child
        assert listener.stats.refused == refused
    assert listener.limit_reached.is_set()
    assert listener.stats.connections == 2
    assert listener.stats.last_error is not None
    assert "more than 2 connections" in listener.stats.last_error


async def test_repository_activity_is_bytes_moved_not_connections(kit: Kit) -> None:
    """A child counts from its second sample on: its start and a connection opened and closed
    between two samples are no activity; echoing data through a child already seen is."""
    path, listener = kit.listen()
    assert listener.repository_activity() is False
    await (await kit.connect(path)).finish()
    async with asyncio.timeout(LINE_TIMEOUT):
        await listener.wait_idle()
    assert listener.repository_activity() is False
    conn = await kit.connect(path)
    assert listener.repository_activity() is False  # first seen: its start is not traffic
    assert listener.repository_activity() is False  # nothing moved since
    await conn.echo(os.urandom(100_000))
    assert listener.repository_activity() is True
    await conn.finish()


async def test_spawn_failure_is_counted_and_the_client_sees_eof(kit: Kit) -> None:
    path, listener = kit.listen([str(kit.tmp_path / "no-such-borg"), "serve"])
    for attempt in (1, 2):  # the listener survives a failed spawn
        reader, _ = await kit.open(path)
        assert await asyncio.wait_for(reader.read(), LINE_TIMEOUT) == b""
        assert listener.stats.failures == attempt
    assert listener.stats.last_error is not None
    assert listener.stats.last_error.startswith("cannot start")
    assert listener.active == 0


async def test_aclose_terminates_then_kills(kit: Kit) -> None:
    path, listener = kit.listen(stop_timeout=0.5)
    polite = await kit.connect(path)
    path2, listener2 = kit.listen(kit.argv("ignore-term"), stop_timeout=0.5)
    stubborn = await kit.connect(path2)

    started = time.monotonic()
    await asyncio.gather(listener.aclose(), listener2.aclose())
    took = time.monotonic() - started

    assert 0.4 < took < 3, took  # waited the grace period for the stubborn one, not much more
    assert listener.stats.exit_codes == [-signal.SIGTERM]
    assert listener2.stats.exit_codes == [-signal.SIGKILL]
    assert not running(polite.pid)
    assert not running(stubborn.pid)
    assert listener.active == listener2.active == 0
    # The clients see the end of the stream, and nobody accepts on the path any more.
    assert await asyncio.wait_for(polite.reader.read(), LINE_TIMEOUT) == b""
    assert await asyncio.wait_for(stubborn.reader.read(), LINE_TIMEOUT) == b""
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_unix_connection(str(path))


async def test_aclose_without_children_is_quick_and_repeatable(kit: Kit) -> None:
    _, listener = kit.listen()
    started = time.monotonic()
    await listener.aclose()
    await listener.aclose()
    assert time.monotonic() - started < 0.5


async def test_a_very_long_stderr_line_does_not_break_bookkeeping(kit: Kit) -> None:
    with capture_logs() as logs:
        path, listener = kit.listen(kit.argv("long-stderr"))
        conn = await kit.connect(path)
        assert await conn.echo(b"ping") == b"ping"
        await conn.finish()
        async with asyncio.timeout(LINE_TIMEOUT):
            await listener.wait_idle()
    assert listener.stats.exit_codes == [0]
    # The over-long line is logged in pieces (none lost); the next line arrives intact.
    pieces = [e["line"] for e in logs if set(e.get("line", "")) == {"x"}]
    assert sum(len(p) for p in pieces) == 200_000
    assert any(e.get("line") == f"fake serve {conn.pid} says hello" for e in logs)


async def _assert_gone(pid: int) -> None:
    """aclose() returns once the pipes are closed; a dying process closes its files a moment
    before it becomes a zombie, so allow that moment (it is signalled already)."""
    for _ in range(20):
        if not running(pid):
            return
        await asyncio.sleep(0.05)
    assert not running(pid)


async def _kill_leftover(pid: int, listener: BorgServeListener) -> None:
    """Unblock the listener's pipe waits so the fixture can finish cleanly, even on failure."""
    if running(pid):
        os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(LINE_TIMEOUT):
        await listener.wait_idle()


async def test_aclose_stops_a_wrapped_serve_and_its_children(kit: Kit) -> None:
    argv = ["/bin/sh", "-c", WRAPPER, "borg-wrapper", *kit.argv()]
    path, listener = kit.listen(argv, stop_timeout=0.3)
    conn = await kit.connect(path)  # conn.pid is the Python below the shell
    try:
        async with asyncio.timeout(1.5):  # stop_timeout plus a generous margin
            await listener.aclose()
        await _assert_gone(conn.pid)
    finally:
        await _kill_leftover(conn.pid, listener)


async def test_aclose_kills_a_wrapped_serve_that_ignores_sigterm(kit: Kit) -> None:
    """The wrapper shell dies on SIGTERM; the borg below ignores it and must get SIGKILL."""
    argv = ["/bin/sh", "-c", WRAPPER, "borg-wrapper", *kit.argv("ignore-term")]
    path, listener = kit.listen(argv, stop_timeout=0.3)
    conn = await kit.connect(path)
    try:
        async with asyncio.timeout(3):
            await listener.aclose()
        await _assert_gone(conn.pid)
    finally:
        await _kill_leftover(conn.pid, listener)


# --- pull_socket ----------------------------------------------------------------------------------


async def test_pull_socket_is_fresh_private_and_removed(kit: Kit) -> None:
    socket_dir = kit.tmp_path / "run"
    async with (
        pull_socket(socket_dir, "web1", kit.argv(), stop_timeout=1) as (path, listener),
        pull_socket(socket_dir, "web1", kit.argv(), stop_timeout=1) as (other, _),
    ):
        assert path != other
        assert path.parent == socket_dir
        assert path.name.startswith("web1.")
        assert mode(path) == 0o600
        assert mode(socket_dir) == 0o700
        conn = await kit.connect(path)
        assert await conn.echo(b"hi") == b"hi"
    assert not path.exists()
    assert not other.exists()
    assert not running(conn.pid)
    assert listener.active == 0


async def test_pull_socket_cleans_up_when_the_body_raises(kit: Kit) -> None:
    socket_dir = kit.tmp_path / "run"
    seen: dict[str, Any] = {}

    async def failing_pull() -> None:
        argv = kit.argv("ignore-term")  # needs the SIGKILL path, too
        async with pull_socket(socket_dir, "web1", argv, stop_timeout=0.3) as (path, _):
            seen["path"] = path
            seen["conn"] = await kit.connect(path)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await failing_pull()
    assert not seen["path"].exists()
    assert not running(seen["conn"].pid)
    assert list(socket_dir.iterdir()) == []


async def test_pull_socket_cleans_up_when_cancelled(kit: Kit) -> None:
    socket_dir = kit.tmp_path / "run"
    seen: dict[str, Any] = {}
    ready = asyncio.Event()

    async def body() -> None:
        async with pull_socket(socket_dir, "web1", kit.argv(), stop_timeout=1) as (path, _):
            seen["path"] = path
            seen["conn"] = await kit.connect(path)
            ready.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(body())
    async with asyncio.timeout(LINE_TIMEOUT):
        await ready.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not seen["path"].exists()
    assert not running(seen["conn"].pid)


@pytest.fixture(autouse=True)
def _plain_structlog() -> Iterator[None]:
    """capture_logs needs the default pipeline; another test may have configured structlog."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


EMFILE_SCRIPT = """
import asyncio, resource, socket, sys
from pathlib import Path
from borgtunnel import logs
from borgtunnel.server.serve import BorgServeListener, bind_unix_socket
logs.configure("json", stream=sys.stderr)

async def main(path: Path) -> None:
    listener = BorgServeListener(bind_unix_socket(path), ["cat"], client="c", stop_timeout=2)
    listener.start()
    loop = asyncio.get_running_loop()
    # Hold descriptors until accept() itself fails with EMFILE.
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    held = []
    try:
        while True:
            held.append(socket.socket(socket.AF_UNIX))
    except OSError:
        pass
    held.pop().close()  # room for the client socket, none for accept()
    client = socket.socket(socket.AF_UNIX)
    client.setblocking(False)
    await loop.sock_connect(client, str(path))
    await asyncio.sleep(0.5)  # accept() fails meanwhile
    for sock in held:
        sock.close()  # descriptors free again
    await loop.sock_sendall(client, b"still served\\n")
    client.shutdown(socket.SHUT_WR)
    reply = await asyncio.wait_for(loop.sock_recv(client, 100), timeout=10)
    print(reply.decode().strip())
    client.close()
    await listener.aclose()

asyncio.run(main(Path(sys.argv[1])))
"""


def test_accept_survives_running_out_of_descriptors(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", EMFILE_SCRIPT, str(tmp_path / "run" / "s.sock")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "still served"
    assert "serve_accept_failed" in result.stderr
    assert "Too many open files" in result.stderr
