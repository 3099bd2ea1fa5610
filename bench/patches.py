"""Proposed changes to borgtunnel, applied by monkeypatching so they can be measured before
anyone edits borgtunnel/*. Each function patches one thing; bench/prototype.py picks them from
its command line. None of this is used by borgtunnel itself.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import asyncssh
from asyncssh.forward import SSHForwarder


def max_pktsize(size: int) -> None:
    """``Tunnel.forward`` passing ``max_pktsize=size`` to ``create_unix_server`` (asyncssh's
    default is 32 KiB: one decrypt call and one write per 32 KiB)."""
    original = asyncssh.SSHClientConnection.create_unix_server

    async def create_unix_server(
        self: asyncssh.SSHClientConnection, *args: Any, **kwargs: Any
    ) -> asyncssh.SSHListener:
        kwargs.setdefault("max_pktsize", size)
        return await original(self, *args, **kwargs)

    asyncssh.SSHClientConnection.create_unix_server = create_unix_server  # type: ignore[method-assign,assignment]


def sndbuf(size: int) -> None:
    """The forward's local connection (asyncssh -> our socket -> ``borg serve``) with
    ``SO_SNDBUF=size``: ``borg serve`` reads whatever is queued (up to 10 MiB per read), so a
    bigger buffer means fewer, larger reads and fewer wakeups on both sides. The real change:
    ``Tunnel.forward``'s session factory opens the socket itself and hands it to
    ``loop.create_unix_connection(SSHForwarder, sock=...)``, as asyncssh's own
    ``forward_unix_connection`` does with a path.
    """

    async def forward_unix_connection(
        self: asyncssh.SSHClientConnection, dest_path: str
    ) -> SSHForwarder:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            sock.setblocking(False)
            await loop.sock_connect(sock, dest_path)
        except OSError as exc:
            sock.close()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
        _, peer = await loop.create_unix_connection(SSHForwarder, sock=sock)
        return SSHForwarder(peer)

    asyncssh.SSHClientConnection.forward_unix_connection = forward_unix_connection  # type: ignore[method-assign,assignment]


def pidfd_child_watcher() -> None:
    """asyncio's default child watcher on Python 3.11 (ThreadedChildWatcher) starts one thread
    per child process to wait for it: one per ``borg serve``. Each thread gets its own glibc
    malloc arena. ``PidfdChildWatcher`` (Linux >= 5.3) waits on a pidfd in the event loop
    instead, with no thread. The real change: install it once in ``cli._run`` / the daemon
    before any subprocess starts (Python 3.12 picks a pidfd watcher by default)."""
    policy = asyncio.get_event_loop_policy()
    original = policy.new_event_loop

    def new_event_loop() -> asyncio.AbstractEventLoop:
        loop = original()
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(loop)
        policy.set_child_watcher(watcher)
        return loop

    policy.new_event_loop = new_event_loop  # type: ignore[method-assign]


def apply(options: list[str]) -> None:
    """``max-pktsize=N``, ``sndbuf=N``, ``pidfd``.

    (``fold-execs``, measured here first, is now how borgtunnel works: one remote command.)
    """
    for option in options:
        name, _, value = option.partition("=")
        if name == "pidfd":
            pidfd_child_watcher()
        elif name == "max-pktsize":
            max_pktsize(int(value))
        elif name == "sndbuf":
            sndbuf(int(value))
        else:
            raise SystemExit(f"unknown prototype option {option!r}")
