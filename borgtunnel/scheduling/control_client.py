"""The caller's end of the daemon's control socket (docs/control.md).

``connect`` tells "no daemon runs" (no socket, or nobody listening: ``NoDaemonError``) apart
from "a daemon runs but cannot be used" (``ControlError``: permission denied, an unsafe
directory, a peer that is neither root, us, nor the directory's owner). Before trusting what
the socket says, the directory holding it must be a real directory (not a symlink) that only
its owner can write, owned by root, us, or the listening peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from pathlib import Path

from pydantic import BaseModel, ValidationError

from borgtunnel.scheduling.control import peer_of
from borgtunnel.scheduling.control_protocol import (
    MAX_RESPONSE_BYTES,
    RESPONSE,
    Response,
    control_socket_path,
    encode,
)


class NoDaemonError(Exception):
    """Nothing listens on the control socket: no daemon runs (for this socket_dir)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no daemon runs (nothing listens on {path})")
        self.path = path


class ControlError(Exception):
    """The control socket exists but cannot be used, or the daemon answered nonsense."""


def _check_directory(directory: Path) -> int:
    """The owner uid of ``directory``; ControlError if it is not a private directory."""
    try:
        info = directory.lstat()
    except FileNotFoundError:
        raise NoDaemonError(control_socket_path(directory)) from None
    except OSError as exc:
        raise ControlError(f"{directory}: cannot check it: {exc.strerror or exc}") from exc
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ControlError(f"{directory}: is not a real directory (a symlink?); not trusting it")
    if info.st_mode & 0o022:
        raise ControlError(
            f"{directory}: writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); not trusting a socket in it"
        )
    return info.st_uid


class ControlConnection:
    """One request and its answers; use ``async with await connect(socket_dir) as conn``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def __aenter__(self) -> ControlConnection:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def send(self, request: BaseModel) -> None:
        self._writer.write(encode(request))
        await self._writer.drain()

    async def receive(self) -> Response | None:
        """The daemon's next message; None when it closed the connection."""
        try:
            line = await self._reader.readline()
        except ValueError:
            raise ControlError(
                f"the daemon sent a line longer than {MAX_RESPONSE_BYTES} bytes"
            ) from None
        if not line:
            return None
        try:
            return RESPONSE.validate_json(line)
        except ValidationError as exc:
            raise ControlError(
                f"the daemon sent something unreadable: {exc.errors()[0]['msg']}"
            ) from None

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def connect(socket_dir: Path) -> ControlConnection:
    path = control_socket_path(socket_dir)
    owner = _check_directory(socket_dir)
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_RESPONSE_BYTES)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NoDaemonError(path) from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ControlError(
                f"{path}: permission denied: the daemon's control socket is for root and the "
                "daemon's user"
            ) from exc
        raise ControlError(f"{path}: cannot connect: {exc.strerror or exc}") from exc
    peer = peer_of(writer)
    trusted = {0, os.geteuid(), owner}
    if peer.uid not in trusted or owner not in {0, os.geteuid(), peer.uid}:
        writer.close()
        raise ControlError(
            f"{path}: the listener runs as uid {peer.uid} in a directory owned by uid {owner}; "
            "not trusting it"
        )
    return ControlConnection(reader, writer)
