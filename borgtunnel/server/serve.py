"""Local unix sockets whose connections are each served by their own ``borg serve``.

The accepted socket becomes the child's stdin and stdout, so repository bytes flow between the
kernel socket and borg directly; Python only accepts, spawns, logs stderr and reaps. This module
is shared by the pull path (one fresh socket per pull) and by ``borgtunnel serve`` (sockets
passed in by systemd or created with ``--listen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import signal
import socket
import stat
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from borgtunnel.privatedir import check_private_dir, ensure_private_dir
from borgtunnel.server.rpcfilter import REFUSED_PREFIX

__all__ = [
    "BorgServeListener",
    "SocketInUseError",
    "bind_unix_socket",
    "ensure_private_dir",
    "pull_socket",
    "sweep_stale_sockets",
]

log = structlog.get_logger("borgtunnel.server.serve")


class SocketInUseError(Exception):
    """Something still listens on a socket path we were asked to create."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: another process is listening on this socket; not taking it over"


def _listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


def bind_unix_socket(path: Path, *, backlog: int = 16) -> socket.socket:
    """A listening socket at ``path``, mode 0600, in a private directory.

    A leftover file from a dead process is removed; a live listener is never taken over.
    """
    ensure_private_dir(path.parent)
    if path.is_socket() and _listening(path):
        raise SocketInUseError(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # umask rather than chmod-after-bind: no window in which the socket is world-connectable.
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_TRANSIENT_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR})


@dataclass(eq=False)  # identity semantics: kept in a set
class _Child:
    process: asyncio.subprocess.Process
    stderr_task: asyncio.Task[None]
    number: int


@dataclass
class ServeStats:
    """Counters the caller can report: how many connections, how many children failed."""

    connections: int = 0
    # Connections closed unserved because the listener's connection_limit was reached.
    refused: int = 0
    failures: int = 0
    last_error: str | None = None
    # The last line a child wrote on stderr (cut at 500 characters): usually the reason.
    last_stderr: str | None = None
    exit_codes: list[int] = field(default_factory=list)
    # Requests a restore's read-only filter refused (server/rpcfilter.py says so on stderr).
    refused_requests: list[str] = field(default_factory=list)


class BorgServeListener:
    """Accepts on one listening socket and runs ``argv`` (a ``borg serve``) per connection."""

    def __init__(
        self,
        sock: socket.socket,
        argv: Sequence[str],
        *,
        client: str,
        stop_timeout: float,
        max_connections: int = 8,
        connection_limit: int | None = None,
    ) -> None:
        self._sock = sock
        self._argv = list(argv)
        self._client = client
        self._stop_timeout = stop_timeout
        self._slots = asyncio.Semaphore(max_connections)
        # Connections served over the listener's whole life (None: no limit). Past it each new
        # connection is closed unserved and ``limit_reached`` is set.
        self.connection_limit = connection_limit
        self.limit_reached = asyncio.Event()
        self._children: set[_Child] = set()
        # Each running child's read+written bytes at the last repository_activity() sample.
        self._io_sampled: dict[_Child, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._accept_task: asyncio.Task[None] | None = None
        self.stats = ServeStats()
        self.log = log.bind(client=client)

    @property
    def active(self) -> int:
        return len(self._children)

    def repository_activity(self) -> bool:
        """Did a ``borg serve`` child read or write since the last call? Repository traffic
        never passes through Python; ``/proc/PID/io`` makes it visible for stall detection.

        Only a child already seen at the previous call counts: a new child's first bytes are
        its own start (Python loading borg), and a connection opened and closed between two
        calls moved no repository data. So connecting, disconnecting and reconnecting is never
        activity, whatever its pace; a child that keeps moving bytes is.
        """
        moved = False
        sampled: dict[_Child, int] = {}
        for child in self._children:
            io = _io_bytes(child.process.pid)
            if io is None:
                continue
            sampled[child] = io
            before = self._io_sampled.get(child)
            if before is not None and io > before:
                moved = True
        self._io_sampled = sampled
        return moved

    def start(self) -> None:
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"accept {self._client}")

    async def wait_idle(self) -> None:
        """Until no child is running."""
        await self._idle.wait()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                # A long-running service must survive accept() failures. A peer that went away
                # (ECONNABORTED, EPROTO) costs nothing; out of descriptors or memory (EMFILE,
                # ENFILE, ENOBUFS, ENOMEM) gets a pause, as asyncio's own server does.
                self._slots.release()
                if exc.errno in _RESOURCE_ERRORS:
                    self.log.error("serve_accept_failed", error=str(exc))
                    await asyncio.sleep(1.0)
                elif exc.errno not in _TRANSIENT_ERRORS:
                    raise
                continue
            except BaseException:
                self._slots.release()
                raise
            if (
                self.connection_limit is not None
                and self.stats.connections >= self.connection_limit
            ):
                self._refuse(conn)
                continue
            try:
                await self._spawn(conn)
            except OSError as exc:
                self._slots.release()
                self.stats.failures += 1
                self.stats.last_error = f"cannot start {self._argv[0]}: {exc}"
                self.log.error("serve_spawn_failed", error=str(exc), argv=self._argv)
            finally:
                # The child holds its own copy of the descriptor; ours must go, or the client
                # would never see EOF when the child exits.
                conn.close()

    def _refuse(self, conn: socket.socket) -> None:
        """Close a connection over the limit unserved: no ``borg serve`` is started for it."""
        conn.close()
        self._slots.release()
        self.stats.refused += 1
        if not self.limit_reached.is_set():
            self.limit_reached.set()
            self.stats.last_error = (
                f"more than {self.connection_limit} connections to the repository socket; "
                "further ones are closed unserved"
            )
            self.log.error("serve_connection_limit", limit=self.connection_limit)

    async def _spawn(self, conn: socket.socket) -> None:
        # O_NONBLOCK lives on the shared open file description: borg must get a blocking socket.
        conn.setblocking(True)
        self.stats.connections += 1
        number = self.stats.connections
        process = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=conn.fileno(),
            stdout=conn.fileno(),
            stderr=asyncio.subprocess.PIPE,
            # Own session: a Ctrl-C on our terminal must not reach borg before we decide to stop.
            start_new_session=True,
        )
        self.log.info("serve_started", pid=process.pid, connection=number)
        child = _Child(process, asyncio.create_task(self._relay_stderr(process, number)), number)
        self._children.add(child)
        self._idle.clear()
        asyncio.create_task(self._reap(child), name=f"reap {process.pid}")  # noqa: RUF006

    async def _relay_stderr(self, process: asyncio.subprocess.Process, number: int) -> None:
        assert process.stderr is not None  # noqa: S101 - we asked for a pipe
        async for chunk in _lines(process.stderr):
            line = chunk.decode("utf-8", "replace").rstrip()
            if line.startswith(REFUSED_PREFIX):
                reason = line[len(REFUSED_PREFIX) :]
                self.stats.refused_requests.append(reason)
                self.log.error("serve_request_refused", connection=number, reason=reason)
            elif line:
                self.stats.last_stderr = line[:500]
                self.log.warning("serve_stderr", pid=process.pid, connection=number, line=line)

    async def _reap(self, child: _Child) -> None:
        try:
            code = await child.process.wait()
            await child.stderr_task
        finally:
            self._children.discard(child)
            self._slots.release()
            if not self._children:
                self._idle.set()
        self.stats.exit_codes.append(code)
        if code != 0:
            self.stats.failures += 1
            reason = f": {self.stats.last_stderr}" if self.stats.last_stderr else ""
            self.stats.last_error = f"borg serve exited with status {code}{reason}"
        report = self.log.info if code == 0 else self.log.warning
        report("serve_exited", pid=child.process.pid, connection=child.number, status=code)

    async def stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        self._sock.close()

    async def terminate_children(self) -> None:
        """SIGTERM every child, SIGKILL what is left after the grace period.

        On SIGTERM borg serve closes the repository and releases its lock; a child that does not
        finish in time is killed, and its stale lock is cleared by the next serve.
        """
        children = list(self._children)
        if not children:
            return
        for child in children:
            _signal(child.process, signal.SIGTERM)
        # "Gone" is the exit *and* the closed stderr pipe: a wrapper shell may be dead while the
        # borg below it (same process group) still holds the socket and the repository lock.
        waits = {c: asyncio.ensure_future(_gone(c)) for c in children}
        await asyncio.wait(waits.values(), timeout=self._stop_timeout)
        for child, wait in waits.items():
            if not wait.done():
                self.log.warning("serve_killed", pid=child.process.pid)
                _signal(child.process, signal.SIGKILL)
        await asyncio.wait(waits.values())
        await self._idle.wait()

    async def aclose(self) -> None:
        """Stop accepting, then stop the children. Safe to call twice, and when cancelled."""
        await self.stop_accepting()
        await self.terminate_children()


def _io_bytes(pid: int) -> int | None:
    """rchar + wchar of ``pid`` (``/proc/PID/io``), or None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("rchar", "wchar"):
            with contextlib.suppress(ValueError):
                total += int(value)
    return total


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Lines of ``stream``; a line longer than the reader's limit comes out in pieces.

    (``async for`` on a StreamReader raises on an over-long line and drops the rest.)
    """
    while True:
        try:
            yield await stream.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            yield await stream.readexactly(exc.consumed)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                yield exc.partial
            return


async def _gone(child: _Child) -> None:
    await child.process.wait()
    await asyncio.shield(child.stderr_task)  # EOF: no process of the group holds it any more


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    """Signal the child's whole process group (it leads its own session).

    A ``[server] borg`` that is a wrapper script without ``exec`` would otherwise lose only the
    shell, while the real borg keeps the socket and the repository lock. The group is signalled
    even after its leader exited: the number stays reserved while any member lives.
    """
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
    except OSError as exc:  # pragma: no cover - only ESRCH is expected
        if exc.errno != errno.ESRCH:
            raise


async def run_to_completion(cleanup: Coroutine[object, object, None]) -> None:
    """Await a cleanup even if we are cancelled meanwhile, then re-raise the cancellation.

    A cancelled pull must still stop its children and remove its sockets before it returns; a
    second cancellation while waiting is the caller forcing the issue, and is honoured.
    """
    task = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            await task
        raise


_TOKEN_HEX_CHARS = 8  # secrets.token_hex(4) in pull_socket

# Connections one pull or restore may open to its socket. borg 1.2.4, 1.4.5 and 2.0.0b25 open
# one per create or extract (measured); the margin is for wrappers running more borg commands
# and for later borg versions. A client that reconnects in a loop starts a borg serve per
# connection: the run is failed at this count.
RUN_CONNECTION_LIMIT = 16


def pull_socket_name(client: str) -> str:
    return f"{client}.{secrets.token_hex(_TOKEN_HEX_CHARS // 2)}.sock"


def sweep_stale_sockets(socket_dir: Path, clients: Iterable[str]) -> list[Path]:
    """Remove the pull sockets of ``clients`` in ``socket_dir`` that nobody listens on.

    A pull killed with SIGKILL leaves its ``NAME.xxxxxxxx.sock``; the next pull picks a new name,
    so without a sweep they pile up. Only sockets (lstat, no symlink followed) named exactly like
    a pull socket of one of ``clients`` are candidates, and one that still accepts a connection
    belongs to a live pull and stays. Returns what was removed. A missing directory has nothing
    to sweep; one that fails the private-directory rule raises PermissionError (never touched).
    Call it only while holding these clients' run locks (borgtunnel/lock.py): a probe that
    reached a live pull's listener would start a ``borg serve`` there, and a pull that is
    between bind and listen would lose its socket.
    """
    patterns = [
        re.compile(re.escape(client) + rf"\.[0-9a-f]{{{_TOKEN_HEX_CHARS}}}\.sock")
        for client in clients
    ]
    try:
        check_private_dir(socket_dir)
        entries = list(os.scandir(socket_dir))
    except FileNotFoundError:
        return []
    removed: list[Path] = []
    for entry in entries:
        if not any(pattern.fullmatch(entry.name) for pattern in patterns):
            continue
        path = Path(entry.path)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode) or _listening(path):
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
        log.info("stale_socket_removed", path=str(path))
    return removed


@contextlib.asynccontextmanager
async def pull_socket(
    socket_dir: Path,
    client: str,
    argv: Sequence[str],
    *,
    stop_timeout: float,
) -> AsyncIterator[tuple[Path, BorgServeListener]]:
    """A fresh socket for one pull; on exit the children are stopped and the file removed."""
    # Before binding: the sweep's probe must never reach our own listener (it would start a
    # borg serve). The caller holds the client lock, so any other socket of ours is dead.
    sweep_stale_sockets(socket_dir, [client])
    path = socket_dir / pull_socket_name(client)
    sock = bind_unix_socket(path)
    listener = BorgServeListener(
        sock,
        argv,
        client=client,
        stop_timeout=stop_timeout,
        connection_limit=RUN_CONNECTION_LIMIT,
    )
    listener.start()
    try:
        yield path, listener
    finally:
        try:
            await run_to_completion(listener.aclose())
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
