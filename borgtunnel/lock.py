"""Per-client run locks that hold across processes.

The daemon and a one-shot ``borgtunnel pull`` may both decide to back up the
same client; two borg runs against one repository would at best wait on borg's
own repository lock and at worst leave the operator guessing which run did
what.  Each run therefore takes an exclusive ``flock(2)`` on
``<state_dir>/locks/<client>.lock`` first.

Why ``flock`` and not ``fcntl``/``lockf`` record locks:

* the kernel drops a ``flock`` when the last descriptor of its open file
  description is closed, which includes the process dying, so a crash never
  leaves a stale lock behind and nothing has to be cleaned up;
* ``flock`` locks belong to the *open file description*, so two acquisitions in
  the same process (each ``open()`` of the file is a new description) conflict
  exactly like two processes do.  POSIX record locks are per process and would
  silently let the second acquisition succeed.

The lock file is opened close-on-exec, so ``borg``/``ssh`` children never
inherit the descriptor (an inherited descriptor would keep the lock held for as
long as the child lives).  The file is never unlinked: deleting a lock file
while another process has it open lets two processes lock two different inodes
under the same name.

The holder writes its pid into the file after locking so that a refused caller
can say who is busy with the client; the pid is informational only, the lock
itself is the ``flock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from typing import TYPE_CHECKING, Self

from borgtunnel.privatedir import ensure_private_dir

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path
    from types import TracebackType

__all__ = ["ClientBusy", "ClientLock", "acquire_client_lock", "client_lock", "lock_path"]

LOCKS_DIRNAME = "locks"
DEFAULT_POLL_INTERVAL = 0.1
_PID_READ_LIMIT = 64


class ClientBusy(Exception):  # noqa: N818 - "busy" reads better than "BusyError" at call sites
    """Another run (in this or another process) holds the client's lock."""

    def __init__(self, client: str, pid: int | None) -> None:
        self.client = client
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "another run"
        super().__init__(f"client {client!r} is already being backed up by {holder}")


class ClientLock:
    """An acquired client lock; release it exactly once (or use it as a context manager)."""

    def __init__(self, client: str, path: Path, fd: int) -> None:
        self.client = client
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def fileno(self) -> int:
        """The locked descriptor (for diagnostics and tests)."""
        if self._fd is None:
            raise ValueError(f"lock for client {self.client!r} has been released")
        return self._fd

    def release(self) -> None:
        """Drop the lock; calling it again is a no-op.

        The pid is erased first, while still holding the lock, so that a later
        refusal never reports a holder that has already gone.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<ClientLock {self.client!r} {state} {self.path}>"


def lock_path(state_dir: Path, client: str) -> Path:
    """Where the lock for *client* lives; refuses names that could escape ``locks/``.

    Client names are validated by the configuration already; this is the last
    line of defence before a name becomes part of a path.
    """
    if not client or "/" in client or "\0" in client or client.startswith("."):
        raise ValueError(f"invalid client name for a lock file: {client!r}")
    return state_dir / LOCKS_DIRNAME / f"{client}.lock"


def _open_lock_file(path: Path) -> int:
    """Open (creating if needed) the lock file: 0600 in a 0700 directory, close-on-exec."""
    ensure_private_dir(path.parent)  # state_dir/locks: refused (never chmodded) if shared
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(path, flags, 0o600)


def _read_holder_pid(fd: int) -> int | None:
    """The pid the holder wrote, or None if it has not written it (yet) or it is garbage."""
    try:
        raw = os.pread(fd, _PID_READ_LIMIT, 0)
        return int(raw.decode("ascii").strip())
    except (OSError, ValueError):
        return None


def _write_own_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)


def acquire_client_lock(state_dir: Path, client: str, *, wait: bool) -> ClientLock:
    """Take the run lock for *client*.

    With ``wait=False`` this never blocks and raises :class:`ClientBusy` when the
    lock is held elsewhere.  With ``wait=True`` it blocks the calling thread
    until the lock is free, so do not use that from the event loop; use
    :func:`client_lock` there.
    """
    path = lock_path(state_dir, client)
    fd = _open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClientBusy(client, _read_holder_pid(fd)) from None
        _write_own_pid(fd)
    except BaseException:
        os.close(fd)
        raise
    return ClientLock(client, path, fd)


@contextlib.asynccontextmanager
async def client_lock(
    state_dir: Path,
    client: str,
    *,
    wait: bool,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> AsyncIterator[ClientLock]:
    """Hold the run lock for *client* for the duration of an ``async with`` block.

    Waiting polls with a non-blocking ``flock`` every *poll_interval* seconds
    instead of running a blocking ``flock`` in a thread: a thread stuck in
    ``flock`` cannot be cancelled and would grab the lock after its awaiting
    task was cancelled.  Between polls no descriptor is open, so cancelling a
    waiting task leaves nothing behind.  Use ``asyncio.timeout`` around the
    ``async with`` to bound the wait.
    """
    lock = await _acquire_async(state_dir, client, wait=wait, poll_interval=poll_interval)
    try:
        yield lock
    finally:
        lock.release()


async def _acquire_async(
    state_dir: Path, client: str, *, wait: bool, poll_interval: float
) -> ClientLock:
    while True:
        try:
            return acquire_client_lock(state_dir, client, wait=False)
        except ClientBusy:
            if not wait:
                raise
        await asyncio.sleep(poll_interval)
