"""The daemon's control socket: ``borgtunnel pull``, ``cancel``, ``pause`` and ``resume`` while
the daemon runs (docs/control.md).

The socket is ``socket_dir/control.sock``, created 0600 in the private ``socket_dir`` by
``bind_unix_socket`` (the directory rule of borgtunnel/server/privatedir.py: a symlinked or
foreign directory is refused, nothing is chmodded, a live listener is never taken over). Only
peers whose SO_PEERCRED uid is root or the daemon's own uid are served; the file mode already
keeps everyone else out, the credential check is the second lock.

Every read is bounded: one request line of at most MAX_REQUEST_BYTES, within
FIRST_LINE_TIMEOUT seconds, at most MAX_CONNECTIONS connections at once. Progress events are
coalesced (the newest figures, at most every PROGRESS_INTERVAL seconds), so a caller that reads
slowly costs one pending event, not a growing buffer.

The daemon side is the ``Steerable`` protocol (borgtunnel/scheduling/daemon.py implements it);
this module knows nothing of the scheduler's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final, Literal, Protocol

import structlog
from pydantic import ValidationError

from borgtunnel.borg import Progress
from borgtunnel.pauses import Pause, PauseFileError
from borgtunnel.runs.pull import ProgressCallback, PullOutcome, State
from borgtunnel.scheduling.control_protocol import (
    MAX_REQUEST_BYTES,
    REQUEST,
    CancelRequest,
    Done,
    Error,
    Finished,
    PauseRequest,
    ProgressEvent,
    PullRequest,
    Queued,
    Request,
    ResumeRequest,
    Started,
    encode,
)
from borgtunnel.server.serve import bind_unix_socket
from borgtunnel.text import printable

log = structlog.get_logger("borgtunnel.scheduling.control")

MAX_CONNECTIONS: Final = 32
FIRST_LINE_TIMEOUT: Final = 10.0
PROGRESS_INTERVAL: Final = 0.25
_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Refused(Exception):  # noqa: N818 - reads as what the daemon did
    """The daemon does not take this request now (stopping, …); the message says why."""


@dataclass(eq=False)
class PullTicket:
    """One ``borgtunnel pull NAME`` queued in the daemon: started, then an outcome."""

    client: str
    wait: bool
    progress: ProgressCallback | None
    position: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: asyncio.Future[PullOutcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def resolve(self, outcome: PullOutcome) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)


class Steerable(Protocol):
    """What the control socket asks of the daemon."""

    def knows(self, client: str) -> bool: ...

    def submit_pull(
        self, client: str, *, wait: bool, progress: ProgressCallback | None
    ) -> PullTicket: ...

    async def cancel_pull(self, client: str) -> str | None: ...

    def pause(self, client: str, until: datetime | None) -> Pause: ...

    def resume(self, client: str) -> bool: ...


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(writer: asyncio.StreamWriter) -> Peer:
    sock = writer.get_extra_info("socket")
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return Peer(pid, uid, gid)


def peer_allowed(peer: Peer) -> bool:
    return peer.uid in {0, os.geteuid()}


class _BadRequestError(Exception):
    pass


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "request"
    return printable(f"{where}: {first['msg']}")[:300]


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        line = await reader.readline()
    except ValueError:  # asyncio's LimitOverrunError, re-raised by readline
        raise _BadRequestError(f"request longer than {MAX_REQUEST_BYTES} bytes") from None
    if not line:
        return None
    if not line.endswith(b"\n"):
        raise _BadRequestError("request must be one line ending in a newline")
    try:
        return REQUEST.validate_json(line)
    except ValidationError as exc:
        raise _BadRequestError(_describe(exc)) from None


class ControlServer:
    """``ControlServer.bind(daemon, path)``, then ``await server.serve()`` until cancelled;
    the socket file is removed at the end.

    Binding is separate and synchronous so that the daemon can do it before it reports ready:
    a ``borgtunnel pull`` right after READY=1 must find the socket (connections made before
    ``serve`` runs wait in the listen backlog), or it would pull in its own process.
    """

    def __init__(self, target: Steerable, path: Path, sock: socket.socket) -> None:
        self._target = target
        self._path = path
        self._sock = sock
        self._inode = path.lstat().st_ino
        self._handlers: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Future[str | None]] = set()

    @classmethod
    def bind(cls, target: Steerable, path: Path) -> ControlServer:
        """OSError (an unsafe directory: UnsafeDirectoryError; SocketInUseError from a live
        listener) when the socket cannot be ours."""
        return cls(target, path, bind_unix_socket(path))

    async def serve(self) -> None:
        try:
            server = await asyncio.start_unix_server(
                self._accept, sock=self._sock, limit=MAX_REQUEST_BYTES
            )
        except BaseException:
            self._sock.close()
            self._unlink()
            raise
        log.info("control_socket_listening", path=str(self._path))
        try:
            await asyncio.Future()  # until cancelled
        finally:
            server.close()
            for task in list(self._handlers):
                task.cancel()
            if self._handlers:
                await asyncio.wait(list(self._handlers))
            self._unlink()

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            if self._path.lstat().st_ino == self._inode:  # still ours
                self._path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - asyncio runs connection callbacks in tasks
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, OSError) as exc:
            log.debug("control_connection_lost", error=str(exc))
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) > MAX_CONNECTIONS:
            await _send(writer, Error(message="too many control connections; try again"))
            return
        peer = peer_of(writer)
        if not peer_allowed(peer):
            log.warning("control_peer_refused", uid=peer.uid, pid=peer.pid)
            await _send(writer, Error(message=f"permission denied for uid {peer.uid}"))
            return
        try:
            async with asyncio.timeout(FIRST_LINE_TIMEOUT):
                request = await _read_request(reader)
        except TimeoutError:
            await _send(writer, Error(message=f"no request within {FIRST_LINE_TIMEOUT:g} s"))
            return
        except _BadRequestError as exc:
            log.warning("control_bad_request", uid=peer.uid, pid=peer.pid, error=str(exc))
            await _send(writer, Error(message=f"bad request: {exc}"))
            return
        if request is None:
            return
        if not self._target.knows(request.client):
            await _send(writer, Error(message=f"unknown client '{printable(request.client)}'"))
            return
        log.info("control_request", op=request.op, client=request.client, uid=peer.uid)
        match request:
            case PullRequest():
                await self._pull(request, reader, writer)
            case CancelRequest():
                await _send(writer, await self._cancel(request.client))
            case PauseRequest():
                await _send(writer, self._pause(request))
            case ResumeRequest():
                await _send(writer, self._resume(request.client))

    async def _pull(
        self, request: PullRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        latest: list[Progress] = []
        changed = asyncio.Event()

        def on_progress(update: Progress | State) -> None:
            if isinstance(update, State):  # the caller's rows follow started/figures/finished
                return
            latest[:] = [update]
            changed.set()

        try:
            ticket = self._target.submit_pull(
                request.client,
                wait=request.wait,
                progress=on_progress if request.progress else None,
            )
        except Refused as exc:
            await _send(writer, Error(message=str(exc)))
            return
        await _send(writer, Queued(position=ticket.position))
        # The caller's only further word: a cancel line, or the connection closing (Ctrl-C
        # twice, a killed terminal). Either cancels this pull with its full cleanup.
        said = asyncio.ensure_future(reader.readline())
        started = asyncio.ensure_future(ticket.started.wait())
        try:
            await self._stream(
                ticket, writer=writer, said=said, started=started, changed=changed, latest=latest
            )
        finally:
            said.cancel()
            started.cancel()
            if not ticket.outcome.done():  # we were cancelled (daemon stopping): drop it too
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._target.cancel_pull(request.client))

    async def _stream(
        self,
        ticket: PullTicket,
        *,
        writer: asyncio.StreamWriter,
        said: asyncio.Future[bytes],
        started: asyncio.Future[Literal[True]],
        changed: asyncio.Event,
        latest: list[Progress],
    ) -> None:
        cancel_sent = announced = False
        while not ticket.outcome.done():
            progressed = asyncio.ensure_future(changed.wait())
            waiting: set[asyncio.Future[object]] = {ticket.outcome, progressed}  # type: ignore[arg-type]
            if not said.done():
                waiting.add(said)  # type: ignore[arg-type]
            if not announced:
                waiting.add(started)  # type: ignore[arg-type]
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                progressed.cancel()
            if started.done() and not announced:
                announced = True
                await _send(writer, Started())
            if said.done() and not cancel_sent and not ticket.outcome.done():
                cancel_sent = True
                gone = _caller_gone(said)
                log.info("pull_cancel_requested", client=ticket.client, caller_gone=gone)
                if gone:
                    await self._target.cancel_pull(ticket.client)
                    return
                # Not awaited here: the progress and the outcome keep coming meanwhile.
                canceller = asyncio.ensure_future(self._target.cancel_pull(ticket.client))
                self._background.add(canceller)
                canceller.add_done_callback(self._background.discard)
            if changed.is_set() and latest and not ticket.outcome.done():
                changed.clear()
                await _send(writer, ProgressEvent.of(latest[0]))
                await asyncio.sleep(PROGRESS_INTERVAL)
        outcome = ticket.outcome.result()
        await _send(
            writer,
            Finished(
                result=str(outcome.result), exit_code=outcome.exit_code, summary=outcome.summary()
            ),
        )

    async def _cancel(self, client: str) -> Done:
        what = await self._target.cancel_pull(client)
        if what is None:
            return Done(ok=False, message=f"{client}: no pull is running or queued")
        return Done(ok=True, message=f"{client}: {what} pull cancelled")

    def _pause(self, request: PauseRequest) -> Done | Error:
        try:
            pause = self._target.pause(request.client, request.until)
        except (PauseFileError, ValueError, OSError) as exc:
            return Error(message=printable(str(exc)))
        until = f"until {pause.until.isoformat()}" if pause.until else "until resumed"
        return Done(ok=True, message=f"{request.client}: paused {until}")

    def _resume(self, client: str) -> Done | Error:
        try:
            was = self._target.resume(client)
        except (PauseFileError, OSError) as exc:
            return Error(message=printable(str(exc)))
        return Done(ok=True, message=f"{client}: {'resumed' if was else 'was not paused'}")


def _caller_gone(said: asyncio.Future[bytes]) -> bool:
    """The caller closed the connection (or sent garbage); a cancel line is not "gone"."""
    if said.cancelled() or said.exception() is not None:
        return True
    return not said.result().strip()


async def _send(
    writer: asyncio.StreamWriter,
    message: Done | Error | Queued | Started | Finished | ProgressEvent,
) -> None:
    writer.write(encode(message))
    await writer.drain()


__all__ = [
    "ControlServer",
    "Peer",
    "PullTicket",
    "Refused",
    "Steerable",
    "peer_allowed",
    "peer_of",
]
