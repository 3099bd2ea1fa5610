"""The steps every remote run shares (a pull's ``borg create``, a restore's ``borg extract``).

Both follow the same protocol (borgtunnel/client/remote.py): wait for the client's ready line,
hold a reverse forward at the path it prepared, send ``go`` (and the passphrase), stream borg's
output until it ends, then clean up in a fixed order — stop the local ``borg serve`` children
first (that is what makes an abandoned remote borg exit: closing the SSH channel does not kill
it), then SIGTERM the remote borg by pid and remove the remote socket. pull.py and restore.py decide
what the result means; the mechanics live here once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import structlog

from borgtunnel import borg, borg2
from borgtunnel.client.remote import (
    RemoteSocket,
    cleanup_command,
    parse_ready_line,
    ready_path_matches,
)
from borgtunnel.config import ClientConfig, Config
from borgtunnel.server.localborg import run_local_borg
from borgtunnel.server.serve import BorgServeListener
from borgtunnel.ssh.tunnel import (
    SHORT_COMMAND_TIMEOUT,
    ForwardError,
    RemotePrepareError,
    RemoteRun,
    Target,
    Tunnel,
    TunnelError,
)

# After a finished borg, how long serve gets to exit on its own before it is terminated.
SERVE_EXIT_GRACE = 2.0
# Warnings and errors of a run kept for its summary (all are counted and logged).
KEEP_MESSAGES = 10
# Lines of login noise or refusal kept while waiting for the ready line.
MAX_PREPARE_LINES = 20
# Lines a run's handler failed on that are logged; the rest are only counted.
MAX_UNHANDLED_LOGGED = 10

_log = structlog.get_logger("borgtunnel.runs.remoterun")


async def release_client_locks(
    config: Config,
    client: ClientConfig,
    passphrase: bytes | None,
    log: Any,  # noqa: ANN401 - a structlog bound logger
) -> None:
    """After a run that did not end well: remove the lock a borg 2 client left.

    borg 2 keeps locks in the repository (``locks/``), owned by the client's host and pid, not by
    the server's ``borg serve`` as 1.x does (a stale 1.x lock is serve's own, removed by the next
    serve on this host). A client borg killed mid-run (or cut off by a dropped link) leaves its
    lock, and the server's own borg (list, prune, check) then times out on it until borg
    considers it stale. At this point it belongs to nobody: the run's serve children are stopped
    and its tunnel is closed, so no client borg can reach the repository, and the client lock
    we hold keeps every other borgtunnel run of this repository out.
    """
    if not client.borg2:
        return
    repository = client.repository
    try:
        held = any((repository / "locks").iterdir())
    except OSError:
        return
    if not held:
        return
    result = await run_local_borg(
        borg2.break_lock_argv(config.borg_for(client), repository),
        state_dir=config.server.state_dir,
        passphrase=passphrase,
    )
    if result.status == 0:
        log.warning("client_lock_removed", repository=str(repository))
    else:
        log.error("client_lock_not_removed", error=result.error_text())


class StalledError(Exception):
    """No output from the client's borg and no repository traffic for ``stall_timeout``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds

    def __str__(self) -> str:
        return (
            f"stalled: no output from the client's borg and no repository traffic for "
            f"{self.seconds:g} s (stall_timeout); the run was stopped and cleaned up"
        )


class TooManyConnectionsError(StalledError):
    """The client opened more connections to the repository socket than a run needs.

    A kind of StalledError so that every caller stopping and cleaning up a stalled run does
    the same for this one (a reconnect loop is a way to look busy without moving data).
    """

    def __init__(self, limit: int) -> None:
        super().__init__(0)
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"too many connections: the client opened more than {self.limit} connections to "
            "the repository socket in one run (borg opens one); the run was stopped and "
            "cleaned up"
        )


async def await_ready(rr: RemoteRun, target: Target, configured: str, log: Any) -> RemoteSocket:  # noqa: ANN401 - a structlog bound logger
    """The client prepared the socket directory: where the socket goes, and nc or socat."""
    said: list[str] = []
    async with asyncio.timeout(SHORT_COMMAND_TIMEOUT):
        while (line := await rr.next_line()) is not None:
            remote = parse_ready_line(line)
            if remote is None:
                said.append(line.rstrip("\n"))  # a refusal's reason, or login noise
                del said[:-MAX_PREPARE_LINES]
                continue
            log.info("remote_prepared", path=remote.path, tool=remote.tool)
            if not ready_path_matches(configured, remote.path):
                # The server removes and forwards at this path: it must be the configured one,
                # not whatever a login script on the client prints.
                raise ForwardError(
                    target,
                    f"the client reported socket path {remote.path!r}, which is not the "
                    f"configured remote_socket {configured!r}; refusing",
                )
            if remote.tool == "socat" and borg.SOCAT_UNSAFE.intersection(remote.path):
                raise ForwardError(
                    target,
                    f"remote socket path {remote.path!r} has characters socat reads as syntax; "
                    "install netcat-openbsd on the client or choose a plainer remote_socket",
                )
            return remote
        raise RemotePrepareError(target, await rr.status(), "\n".join(said))


@contextlib.asynccontextmanager
async def forward_retrying(
    tunnel: Tunnel,
    remote: str,
    local: Path,
    log: Any,  # noqa: ANN401 - a structlog bound logger
) -> AsyncIterator[None]:
    """The forward; if the path was taken meanwhile (sshd never unlinks), remove it and retry."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(tunnel.forward(remote, local))
        except ForwardError:
            log.warning("remote_socket_busy_retrying", path=remote)
            await tunnel.remove_socket(remote)
            await stack.enter_async_context(tunnel.forward(remote, local))
        yield


class LineGuard:
    """Calls a run's line handler; a line it fails on is logged (the first few) and skipped.

    What a client prints is anything, and a handler bug it finds must cost that line, not the
    run: an exception here would skip the cleanup's checks (the key guard) with it.
    """

    def __init__(self, on_line: Callable[[str], None], log: Any) -> None:  # noqa: ANN401 - a structlog bound logger
        self._on_line = on_line
        self._log = log
        self.failures = 0

    def __call__(self, line: str) -> None:
        try:
            self._on_line(line)
        except Exception as exc:  # noqa: BLE001 - whatever a client's text trips over
            self.failures += 1
            if self.failures <= MAX_UNHANDLED_LOGGED:
                with contextlib.suppress(Exception):
                    self._log.warning(
                        "remote_line_not_handled",
                        error=f"{type(exc).__name__}: {exc}"[:500],
                        line=line[:200],
                        failures=self.failures,
                    )


async def finish_watched(
    rr: RemoteRun,
    on_line: Callable[[str], None],
    listener: BorgServeListener,
    *,
    stall_timeout: float,
    log: Any = None,  # noqa: ANN401 - a structlog bound logger
) -> tuple[int | None, str]:
    """Stream borg's output to the end: (exit status, stdout). Raises StalledError when the
    run went silent for ``stall_timeout``; the caller's cleanup then stops it. A line
    ``on_line`` fails on is logged to ``log`` and skipped (LineGuard)."""
    guard = LineGuard(on_line, log if log is not None else _log)
    finish = asyncio.ensure_future(rr.finish(on_stderr=guard))
    watchdog = asyncio.ensure_future(_watch_stall(stall_timeout, rr, listener))
    too_many = asyncio.ensure_future(listener.limit_reached.wait())
    tasks = (finish, watchdog, too_many)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if listener.limit_reached.is_set():  # even if borg ended meanwhile: the client was hostile
        raise TooManyConnectionsError(listener.connection_limit or 0)
    if finish.cancelled():  # the watchdog fired first
        raise StalledError(stall_timeout)
    return finish.result()


async def _watch_stall(limit: float, rr: RemoteRun, listener: BorgServeListener) -> None:
    """Return once neither the client's borg said anything nor any repository byte moved for
    ``limit`` seconds.

    Repository bytes are what the client sent through the forwards (rr.traffic) and, once its
    borg has sent anything at all, what the borg serve children read and wrote (a serve may
    work on disk a while without a byte on the socket: a commit, an index rebuild). Opening
    and closing a connection sends no byte, and a child's start (Python loading borg) only
    counts after that: a reconnect loop is not activity.
    """
    loop = asyncio.get_running_loop()
    listener.repository_activity()  # the first sample
    traffic = rr.traffic
    seen, io_changed = traffic.bytes, loop.time()
    while True:
        await asyncio.sleep(min(limit / 4, 15.0))
        now = loop.time()
        serve_io = listener.repository_activity()
        if traffic.bytes != seen or (serve_io and traffic.bytes > 0):
            seen, io_changed = traffic.bytes, now
        if now - max(io_changed, rr.last_activity) >= limit:
            return


async def stop_serve(listener: BorgServeListener, *, remote_finished: bool) -> None:
    if remote_finished:
        # borg has closed its end: serve is committing and exits by itself.
        # SIGTERM only what is still there after a moment.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SERVE_EXIT_GRACE):
                await listener.wait_idle()
    await listener.terminate_children()


async def abandon_remote(tunnel: Tunnel, pid: int | None, path: str, log: Any) -> None:  # noqa: ANN401 - a structlog bound logger
    """The run was abandoned (cancelled, link lost, forward refused): leave nothing behind.

    Stopping serve usually ends the remote borg already (broken RPC pipe); one blocked elsewhere
    (a FIFO, a hung NFS mount) would linger, so it also gets a SIGTERM by pid, and the socket
    file (never unlinked by sshd) is removed. Best effort: over a dead link the next run's
    prepare step removes the socket.
    """
    try:
        await tunnel.exec_quiet(cleanup_command(pid, path))
    except TunnelError as exc:
        log.warning("remote_cleanup_failed", pid=pid, path=path, error=str(exc))
    else:
        log.info("remote_cleaned_up", pid=pid, path=path)
