"""The one place that executes the server's own borg on a repository it holds: init, the
verification of a pull, the key guard, list, prune, compact, check.

The passphrase goes through a pipe named by BORG_PASSPHRASE_FD: never an argv, never the
environment. borg's config and cache live under ``<state_dir>/borg`` so that the daemon (whose
unit has ProtectHome=yes) and a one-shot command share them, and tests stay inside their tmp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from borgtunnel import borg, borgexit
from borgtunnel.privatedir import ensure_private_dir

LineCallback = Callable[[borg.LogLine], None]

BORG_DIRNAME = "borg"
# SIGTERM -> SIGKILL when a caller is cancelled (server.serve_stop_timeout's default).
DEFAULT_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class LocalResult:
    """What one local borg run returned."""

    status: int | None
    stdout: str
    errors: tuple[str, ...]
    messages: tuple[str, ...]

    @property
    def outcome(self) -> borg.Outcome:
        # The server's own borg is never asked for modern codes: 0/1/2, anything else a failure.
        return borgexit.classify_exit(self.status, modern=False)

    def error_text(self) -> str:
        # Without --log-json borg's error is a plain line, which parse_log_line files as a
        # message rather than an error: fall back to the last thing it said.
        detail = (self.errors or self.messages or ("no error message",))[-1]
        return f"status {self.status}: {detail}"


def local_env(state_dir: Path, *, encrypted: bool, read_fd: int | None) -> dict[str, str]:
    env = {
        **os.environ,
        "BORG_BASE_DIR": str(state_dir / BORG_DIRNAME),
        "PYTHONUTF8": "1",
        "LANG": "C.UTF-8",
        "BORG_DISPLAY_PASSPHRASE": "no",
        # The server owns these repositories; no question can be answered by anyone.
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no",
        "BORG_HOSTNAME_IS_UNIQUE": "yes",
    }
    env.pop("BORG_PASSPHRASE", None)
    env.pop("BORG_PASSCOMMAND", None)
    if encrypted and read_fd is not None:
        env["BORG_PASSPHRASE_FD"] = str(read_fd)
    return env


async def run_local_borg(
    argv: Sequence[str],
    *,
    state_dir: Path,
    passphrase: bytes | None,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    on_line: LineCallback | None = None,
) -> LocalResult:
    """Run ``argv``; stderr (``--log-json`` lines) goes to ``on_line`` and is summarised.

    Cancelled: borg gets SIGTERM (it closes the repository and releases its lock), SIGKILL after
    ``stop_timeout``; then the cancellation propagates.
    """
    ensure_private_dir(state_dir / BORG_DIRNAME)  # under state_dir: refused, never chmodded
    read_end = -1
    pass_fds: tuple[int, ...] = ()
    if passphrase is not None:
        read_end, write_end = os.pipe()
        # A passphrase is far below the pipe buffer (64 KiB), so this write cannot block.
        with os.fdopen(write_end, "wb") as writer:
            writer.write(passphrase)
        pass_fds = (read_end,)
    env = local_env(
        state_dir, encrypted=passphrase is not None, read_fd=read_end if pass_fds else None
    )
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            pass_fds=pass_fds,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C on our terminal is ours to handle, not borg's
        )
    finally:
        if read_end >= 0:
            os.close(read_end)
    errors: list[str] = []
    messages: list[str] = []

    async def read_stderr() -> None:
        assert process.stderr is not None  # noqa: S101 - we asked for a pipe
        async for raw in process.stderr:
            parsed = borg.parse_log_line(raw.decode("utf-8", "replace"))
            if parsed is None:
                continue
            messages.append(parsed.message)
            if parsed.level == "error":
                errors.append(parsed.message)
            if on_line is not None:
                on_line(parsed)

    async def read_stdout() -> bytes:
        assert process.stdout is not None  # noqa: S101 - we asked for a pipe
        return await process.stdout.read()

    try:
        stdout, _ = await asyncio.gather(read_stdout(), read_stderr())
        status = await process.wait()
    except asyncio.CancelledError:
        await _stop(process, stop_timeout)
        raise
    return LocalResult(status, stdout.decode("utf-8", "replace"), tuple(errors), tuple(messages))


async def _stop(process: asyncio.subprocess.Process, stop_timeout: float) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(stop_timeout):
            await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
