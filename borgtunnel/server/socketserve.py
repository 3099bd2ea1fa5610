"""``borgtunnel serve``: a restricted ``borg serve`` per connection on long-lived unix sockets.

This replaces the borg docs' socat recipe. The sockets come either from systemd socket
activation (each fd's ``FileDescriptorName=`` is a client name) or from ``--listen PATH
--client NAME``. Every connection runs ``borg serve --append-only --restrict-to-repository``
for that client's repository, with the connection as the child's stdin/stdout
(:class:`~borgtunnel.server.serve.BorgServeListener`, shared with the pull path). Connections are
served in parallel, up to ``--max-connections`` per socket; further ones wait in the backlog.

Idle exit: started by systemd (socket activation) it exits after ACTIVATED_IDLE_TIMEOUT without
a connection unless ``--idle-timeout`` says otherwise (0: never), since systemd starts it again
on the next connection; on its own ``--listen`` socket it serves until stopped unless given one.

Exit statuses: 0 after SIGTERM/SIGINT or the idle timeout; 2 for usage errors and a
``--listen`` socket we cannot take (something still listens there, or no permission); 78 for
configuration errors, including a passed socket whose name is not a configured client or that
is not a listening unix stream socket. All checks happen before anything is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

import structlog

from borgtunnel import logs, systemd
from borgtunnel.config import ClientConfig, Config
from borgtunnel.server.policy import serve_argv
from borgtunnel.server.serve import BorgServeListener, SocketInUseError, bind_unix_socket

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_CONFIG: Final = 78

# How often the status line and the idle clock are refreshed. BorgServeListener has no
# "connection accepted" hook, so activity is sampled; a connection that comes and goes between
# two samples still moves the connection counter and resets the idle clock.
MONITOR_INTERVAL: Final = 0.5

# Socket activation starts serve on demand, so it need not wait for long: a run's connections
# (borg create, then its own prune/check if any) come seconds apart, and a restart costs about
# half a second. Without a default an activated serve would stay until the next reboot.
ACTIVATED_IDLE_TIMEOUT: Final = 300.0

log = structlog.get_logger("borgtunnel.server.socketserve")


class ServeSetupError(Exception):
    """``serve`` cannot start; the message is for the administrator, ``exit_code`` for systemd."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(eq=False)
class Endpoint:
    """One listening socket and the client whose repository it serves."""

    client: ClientConfig
    sock: socket.socket
    where: str  # for logs: "fd 3 (/run/borgtunnel-serve/web1.sock)" or the --listen path
    # Set only for a socket file we created (--listen): (path, device, inode), so we remove
    # our own file at exit and never one that systemd (or a successor) owns.
    created: tuple[Path, int, int] | None = None


def run_serve(
    config: Config,
    *,
    listen: Path | None,
    client: str | None,
    idle_timeout: float | None,
    max_connections: int,
) -> int:
    """Serve until SIGTERM/SIGINT or until idle; the CLI's ``serve`` command."""
    try:
        _check_limits(idle_timeout=idle_timeout, max_connections=max_connections)
        endpoints = open_endpoints(config, listen=listen, client=client)
    except ServeSetupError as exc:
        logs.print_error(f"borgtunnel serve: {exc}")
        return exc.exit_code
    idle_timeout = effective_idle_timeout(idle_timeout, activated=endpoints[0].created is None)
    try:
        return asyncio.run(
            _serve(config, endpoints, idle_timeout=idle_timeout, max_connections=max_connections)
        )
    finally:
        for endpoint in endpoints:
            _release(endpoint)


def _check_limits(*, idle_timeout: float | None, max_connections: int) -> None:
    if max_connections < 1:
        raise ServeSetupError(
            f"--max-connections must be at least 1, got {max_connections}", EXIT_USAGE
        )
    if idle_timeout is not None and not 0 <= idle_timeout < float("inf"):
        raise ServeSetupError(
            f"--idle-timeout must be 0 (never) or a positive number of seconds, got {idle_timeout}",
            EXIT_USAGE,
        )


def effective_idle_timeout(given: float | None, *, activated: bool) -> float | None:
    """Seconds of idleness before exiting, None for never: ``--idle-timeout`` if given (0 is
    never), else ACTIVATED_IDLE_TIMEOUT under socket activation and never on a --listen socket
    (nothing would start it again)."""
    if given is None:
        return ACTIVATED_IDLE_TIMEOUT if activated else None
    return given or None


def open_endpoints(config: Config, *, listen: Path | None, client: str | None) -> list[Endpoint]:
    """The sockets to serve: systemd's if it passed any, else the ``--listen`` one.

    Raises ServeSetupError; an unknown ``--client`` raises UnknownClientError (exit 78 in the
    CLI) before any socket is created.
    """
    try:
        passed = systemd.listen_fds()
    except ValueError as exc:
        raise ServeSetupError(f"socket activation: {exc}", EXIT_CONFIG) from None
    if passed:
        if listen is not None or client is not None:
            raise ServeSetupError(
                "--listen/--client cannot be combined with sockets passed by systemd "
                "(LISTEN_FDS); remove them from ExecStart=",
                EXIT_USAGE,
            )
        return adopt_listen_fds(config, passed)
    if listen is None and client is None:
        raise ServeSetupError(
            "no socket to serve: start it from a systemd socket unit (borgtunnel-serve@NAME"
            ".socket) or give --listen PATH --client NAME",
            EXIT_USAGE,
        )
    if listen is None or client is None:
        raise ServeSetupError("--listen PATH and --client NAME must be given together", EXIT_USAGE)
    return [_listen_on(listen, config.client(client))]


def adopt_listen_fds(config: Config, passed: Sequence[systemd.ListenFd]) -> list[Endpoint]:
    """Wrap systemd's descriptors; every name must be a configured client, checked up front."""
    unknown = [item for item in passed if item.name not in config.clients]
    if unknown:
        configured = ", ".join(sorted(config.clients)) or "none"
        names = ", ".join(f"fd {item.fd} is named {item.name!r}" for item in unknown)
        raise ServeSetupError(
            f"{names}, but the configuration has no such client (configured: {configured}); "
            "the socket unit's FileDescriptorName= must be a client name",
            EXIT_CONFIG,
        )
    endpoints: list[Endpoint] = []
    try:
        for item in passed:
            sock = _wrap_listening_fd(item)
            endpoints.append(Endpoint(config.clients[item.name], sock, _describe_fd(item, sock)))
    except BaseException:
        for endpoint in endpoints:
            endpoint.sock.close()
        raise
    return endpoints


def _wrap_listening_fd(item: systemd.ListenFd) -> socket.socket:
    """A socket object for a passed fd, refusing anything but a listening unix stream socket.

    A TCP ListenStream= would hand an append-only but unauthenticated repository to the network.
    """
    try:
        sock = socket.socket(fileno=item.fd)
    except OSError as exc:
        raise ServeSetupError(
            f"fd {item.fd} ({item.name}) is not a socket: {exc.strerror}", EXIT_CONFIG
        ) from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()  # not ours to close: leave the descriptor as systemd passed it
        raise ServeSetupError(
            f"fd {item.fd} ({item.name}) is not a listening unix stream socket; "
            "use ListenStream=/path/NAME.sock with Accept=no in the socket unit",
            EXIT_CONFIG,
        )
    address = sock.getsockname()
    if not isinstance(address, str) or not address.startswith("/"):
        # An abstract (or unnamed) socket has no file and so no permissions: any local user
        # could connect and reach the repository. Only a path in a private directory is safe.
        sock.detach()
        kind = "an abstract-namespace" if isinstance(address, bytes) and address else "an unnamed"
        raise ServeSetupError(
            f"fd {item.fd} ({item.name}) is {kind} unix socket ({_address_text(address)}): it has "
            "no file permissions, so every local user could reach the repository; use "
            "ListenStream=/path/NAME.sock (a filesystem path) in the socket unit",
            EXIT_CONFIG,
        )
    sock.setblocking(False)
    return sock


def _address_text(address: object) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode("utf-8", "replace") if address else "no address"
    return str(address) or "no address"


def _describe_fd(item: systemd.ListenFd, sock: socket.socket) -> str:
    address = sock.getsockname()
    if isinstance(address, bytes):  # abstract namespace
        address = "@" + address[1:].decode("utf-8", "replace")
    return f"fd {item.fd} ({address})" if address else f"fd {item.fd}"


def _listen_on(path: Path, client: ClientConfig) -> Endpoint:
    try:
        sock = bind_unix_socket(path)
    except SocketInUseError as exc:
        raise ServeSetupError(str(exc), EXIT_USAGE) from None
    except OSError as exc:  # PermissionError from the directory checks, a path too long, ...
        raise ServeSetupError(f"cannot listen on {path}: {exc}", EXIT_USAGE) from None
    info = path.stat()
    return Endpoint(client, sock, str(path), created=(path, info.st_dev, info.st_ino))


def _release(endpoint: Endpoint) -> None:
    endpoint.sock.close()
    if endpoint.created is None:
        return
    path, device, inode = endpoint.created
    with contextlib.suppress(FileNotFoundError):
        info = path.stat()
        if (info.st_dev, info.st_ino) == (device, inode):
            path.unlink()


class _Signals:
    """The first SIGTERM/SIGINT received; later ones change nothing (the grace period runs)."""

    def __init__(self) -> None:
        self.received = asyncio.Event()
        self.name = ""

    def handle(self, name: str) -> None:
        if not self.received.is_set():
            self.name = name
            self.received.set()

    async def wait(self) -> None:
        await self.received.wait()


async def _serve(
    config: Config,
    endpoints: Sequence[Endpoint],
    *,
    idle_timeout: float | None,
    max_connections: int,
) -> int:
    loop = asyncio.get_running_loop()
    notifier = systemd.Notifier()
    signals = _Signals()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.handle, signal.Signals(signum).name)
    listeners = [
        BorgServeListener(
            endpoint.sock,
            serve_argv(config, endpoint.client),
            client=endpoint.client.name,
            stop_timeout=config.server.serve_stop_timeout,
            max_connections=max_connections,
        )
        for endpoint in endpoints
    ]
    clients = ", ".join(dict.fromkeys(endpoint.client.name for endpoint in endpoints))
    watchdog = _start_watchdog(notifier)
    try:
        for endpoint, listener in zip(endpoints, listeners, strict=True):
            listener.start()
            log.info(
                "serve_listening",
                client=endpoint.client.name,
                socket=endpoint.where,
                repository=str(endpoint.client.repository),
                idle_timeout=idle_timeout,
            )
        notifier.ready(_status(clients, listeners))
        reason = await _monitor(clients, listeners, signals, idle_timeout, notifier)
        notifier.stopping(f"stopping ({reason}); {_counts(listeners)}")
        log.info("serve_stopping", reason=reason, active=_active(listeners))
        await asyncio.gather(*(listener.stop_accepting() for listener in listeners))
        if not signals.received.is_set():
            await _finish_raced_connections(listeners, signals)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        # Also on an unexpected error: no borg serve may outlive us holding a repository lock.
        await asyncio.gather(*(listener.aclose() for listener in listeners))
    log.info("serve_stopped", reason=reason, served=_served(listeners))
    return EXIT_OK


async def _monitor(
    clients: str,
    listeners: Sequence[BorgServeListener],
    signals: _Signals,
    idle_timeout: float | None,
    notifier: systemd.Notifier,
) -> str:
    """Keep STATUS= current until a signal or ``idle_timeout`` of idleness; say which.

    Idle means no child running and no new connection since the clock was last reset.
    """
    loop = asyncio.get_running_loop()
    idle_since = loop.time()
    seen = _served(listeners)
    status = _status(clients, listeners)
    while not signals.received.is_set():
        wait = MONITOR_INTERVAL
        if idle_timeout is not None:
            wait = min(wait, max(0.0, idle_since + idle_timeout - loop.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signals.received.wait(), wait)
        if _active(listeners) or _served(listeners) != seen:
            idle_since = loop.time()
            seen = _served(listeners)
        elif idle_timeout is not None and loop.time() - idle_since >= idle_timeout:
            log.info("serve_idle", seconds=idle_timeout, served=seen)
            return "idle"
        current = _status(clients, listeners)
        if current != status:
            notifier.status(current)
            status = current
    return signals.name


async def _finish_raced_connections(
    listeners: Sequence[BorgServeListener], signals: _Signals
) -> None:
    """Going idle: a connection accepted just before we stopped accepting is served to its end.

    Only a signal cuts that short. Under socket activation, connections still queued in the
    listening socket are not lost: systemd keeps its copy of the socket and starts us again.
    """
    if not _active(listeners):
        return
    log.info("serve_finishing", active=_active(listeners))
    finished = asyncio.ensure_future(_all_idle(listeners))
    signalled = asyncio.ensure_future(signals.wait())
    try:
        await asyncio.wait({finished, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        finished.cancel()


async def _all_idle(listeners: Sequence[BorgServeListener]) -> None:
    await asyncio.gather(*(listener.wait_idle() for listener in listeners))


def _start_watchdog(notifier: systemd.Notifier) -> asyncio.Task[NoReturn] | None:
    try:
        interval = systemd.watchdog_interval()
    except ValueError as exc:
        log.warning("watchdog_ignored", error=str(exc))
        return None
    if interval is None:
        return None
    return asyncio.create_task(systemd.watchdog_loop(notifier, interval), name="watchdog")


def _active(listeners: Sequence[BorgServeListener]) -> int:
    return sum(listener.active for listener in listeners)


def _served(listeners: Sequence[BorgServeListener]) -> int:
    return sum(listener.stats.connections for listener in listeners)


def _counts(listeners: Sequence[BorgServeListener]) -> str:
    return f"{_active(listeners)} active, {_served(listeners)} served"


def _status(clients: str, listeners: Sequence[BorgServeListener]) -> str:
    return f"serving {clients} ({_counts(listeners)})"
