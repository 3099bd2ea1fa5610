"""Tests for borgtunnel.lock: per-client run locks across processes."""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from borgtunnel.lock import ClientBusy, acquire_client_lock, client_lock, lock_path

if TYPE_CHECKING:
    from collections.abc import Callable

    Spawn = Callable[..., subprocess.Popen[str]]

# Takes the lock through the library (so it also writes its pid), says so, and sleeps.
_CHILD_HOLDER = """
import sys, time
from pathlib import Path
from borgtunnel.lock import acquire_client_lock
lock = acquire_client_lock(Path(sys.argv[1]), sys.argv[2], wait=False)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def _expect_line(child: subprocess.Popen[str], expected: str) -> None:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    assert line == expected, f"child said {line!r}, exit status {child.poll()}"


def _open_fds_to(path: Path) -> int:
    """How many descriptors of this process point at *path*."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if fd.readlink() == path:
                count += 1
        except FileNotFoundError:  # the descriptor the directory listing itself used
            continue
    return count


def _is_free(state_dir: Path, client: str) -> bool:
    try:
        acquire_client_lock(state_dir, client, wait=False).release()
    except ClientBusy:
        return False
    return True


# --- synchronous ----------------------------------------------------------------


def test_second_acquisition_in_same_process_is_busy(state_dir: Path) -> None:
    with acquire_client_lock(state_dir, "alpha", wait=False) as lock:
        assert lock.held
        with pytest.raises(ClientBusy) as busy:
            acquire_client_lock(state_dir, "alpha", wait=False)
        assert busy.value.client == "alpha"
        assert busy.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(busy.value)
    assert not lock.held
    assert _is_free(state_dir, "alpha")


def test_refused_attempt_leaks_no_descriptor(state_dir: Path) -> None:
    with acquire_client_lock(state_dir, "alpha", wait=False):
        path = lock_path(state_dir, "alpha")
        assert _open_fds_to(path) == 1
        with pytest.raises(ClientBusy):
            acquire_client_lock(state_dir, "alpha", wait=False)
        assert _open_fds_to(path) == 1
    assert _open_fds_to(path) == 0


def test_different_clients_do_not_conflict(state_dir: Path) -> None:
    with (
        acquire_client_lock(state_dir, "alpha", wait=False),
        acquire_client_lock(state_dir, "beta", wait=False) as beta,
    ):
        assert beta.held


def test_release_is_idempotent_and_erases_pid(state_dir: Path) -> None:
    lock = acquire_client_lock(state_dir, "alpha", wait=False)
    assert lock.path.read_text() == f"{os.getpid()}\n"
    lock.release()
    lock.release()
    assert lock.path.read_text() == ""
    assert lock.path.exists(), "the lock file must never be unlinked"
    with pytest.raises(ValueError, match="released"):
        lock.fileno()


def test_busy_without_pid_in_file(state_dir: Path) -> None:
    # A holder that has locked but not yet written its pid: refuse without a pid.
    path = lock_path(state_dir, "alpha")
    path.parent.mkdir(parents=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ClientBusy) as busy:
            acquire_client_lock(state_dir, "alpha", wait=False)
    assert busy.value.pid is None
    assert "another run" in str(busy.value)


def test_modes_and_close_on_exec(state_dir: Path) -> None:
    with acquire_client_lock(state_dir, "alpha", wait=False) as lock:
        assert stat.S_IMODE(lock.path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o600
        assert lock.path == state_dir / "locks" / "alpha.lock"
        assert fcntl.fcntl(lock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_inheritable(lock.fileno())


@pytest.mark.parametrize("name", ["", "a/b", "../x", "/abs", ".", "..", ".hidden", "a\0b"])
def test_unsafe_client_names_are_refused(state_dir: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid client name"):
        acquire_client_lock(state_dir, name, wait=False)
    assert not (state_dir / "locks").exists()


def test_blocking_wait_acquires_after_release(state_dir: Path) -> None:
    first = acquire_client_lock(state_dir, "alpha", wait=False)
    timer = threading.Timer(0.2, first.release)
    start = time.monotonic()
    timer.start()
    try:
        with acquire_client_lock(state_dir, "alpha", wait=True) as second:
            assert second.held
            assert time.monotonic() - start >= 0.15
    finally:
        timer.cancel()
        first.release()


# --- across processes -------------------------------------------------------------


def test_lock_held_by_subprocess_is_busy_until_it_dies(state_dir: Path, spawn: Spawn) -> None:
    child = spawn(sys.executable, "-c", _CHILD_HOLDER, str(state_dir), "alpha")
    _expect_line(child, "locked")

    with pytest.raises(ClientBusy) as busy:
        acquire_client_lock(state_dir, "alpha", wait=False)
    assert busy.value.pid == child.pid

    child.kill()
    child.wait(timeout=10)
    # The kernel dropped the lock with the process: free at once, no stale lock.
    with acquire_client_lock(state_dir, "alpha", wait=False) as lock:
        assert lock.held


def test_lock_held_by_flock_command_is_busy(state_dir: Path, spawn: Spawn) -> None:
    path = lock_path(state_dir, "alpha")
    path.parent.mkdir(parents=True)
    # --no-fork: flock, sh and sleep are one process, so killing it leaves nothing behind.
    command = ("flock", "--exclusive", "--no-fork", str(path))
    child = spawn(*command, "sh", "-c", "echo locked; exec sleep 60")
    _expect_line(child, "locked")
    with pytest.raises(ClientBusy) as busy:
        acquire_client_lock(state_dir, "alpha", wait=False)
    assert busy.value.pid is None  # flock(1) does not write a pid
    child.kill()
    child.wait(timeout=10)
    assert _is_free(state_dir, "alpha")


def test_lock_is_not_inherited_by_children(state_dir: Path, spawn: Spawn) -> None:
    # A child started while we hold the lock must not keep it alive after we let go.
    # close_fds=False: only close-on-exec keeps the descriptor from the child.
    lock = acquire_client_lock(state_dir, "alpha", wait=False)
    try:
        child = spawn("sleep", "60", close_fds=False)
        assert child.poll() is None
    finally:
        lock.release()
    assert _is_free(state_dir, "alpha")


# --- asyncio ----------------------------------------------------------------------


async def test_async_no_wait_raises_busy(state_dir: Path) -> None:
    with acquire_client_lock(state_dir, "alpha", wait=False), pytest.raises(ClientBusy):
        async with client_lock(state_dir, "alpha", wait=False):
            pytest.fail("should not get the lock")


async def test_async_lock_released_on_exit_and_error(state_dir: Path) -> None:
    async with client_lock(state_dir, "alpha", wait=False) as lock:
        assert lock.held
    assert not lock.held
    with pytest.raises(RuntimeError, match="boom"):
        async with client_lock(state_dir, "alpha", wait=False) as lock:
            raise RuntimeError("boom")
    assert not lock.held
    assert _is_free(state_dir, "alpha")


async def test_async_wait_acquires_once_released(state_dir: Path) -> None:
    holder = acquire_client_lock(state_dir, "alpha", wait=False)
    events: list[str] = []

    async def release_later() -> None:
        await asyncio.sleep(0.2)
        events.append("released")
        holder.release()

    async def waiter() -> None:
        async with client_lock(state_dir, "alpha", wait=True, poll_interval=0.02) as lock:
            events.append("acquired")
            assert lock.held

    try:
        start = time.monotonic()
        async with asyncio.timeout(10):
            await asyncio.gather(release_later(), waiter())
        assert events == ["released", "acquired"]
        assert time.monotonic() - start >= 0.2
    finally:
        holder.release()
    assert _is_free(state_dir, "alpha")


async def test_async_wait_does_not_block_the_loop(state_dir: Path) -> None:
    holder = acquire_client_lock(state_dir, "alpha", wait=False)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3), client_lock(state_dir, "alpha", wait=True):
                pytest.fail("should not get the lock")
        assert ticks >= 10
    finally:
        tick_task.cancel()
        holder.release()


async def test_cancel_while_waiting_leaves_no_lock(state_dir: Path) -> None:
    holder = acquire_client_lock(state_dir, "alpha", wait=False)
    acquired = asyncio.Event()

    async def waiter() -> None:
        async with client_lock(state_dir, "alpha", wait=True, poll_interval=0.02):
            acquired.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(waiter())
    try:
        await asyncio.sleep(0.15)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        holder.release()
    assert not acquired.is_set()
    assert _open_fds_to(lock_path(state_dir, "alpha")) == 0
    assert _is_free(state_dir, "alpha")


async def test_cancel_while_holding_releases(state_dir: Path) -> None:
    acquired = asyncio.Event()

    async def holder() -> None:
        async with client_lock(state_dir, "alpha", wait=False):
            acquired.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(holder())
    await asyncio.wait_for(acquired.wait(), timeout=10)
    assert not _is_free(state_dir, "alpha")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _is_free(state_dir, "alpha")
