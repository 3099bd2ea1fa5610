"""The one place that runs the server's own borg on a repository it holds.

Used for ``init``, for verifying what a pull wrote and for guarding the repository key. The
passphrase goes through a pipe named by BORG_PASSPHRASE_FD, so it is in no argv and no
environment. borg's own state (cache, security dir, key files) lives under ``state_dir/borg``
rather than in the service user's home, which the systemd units hide (``ProtectHome=yes``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# borg's --json of one archive is a few kB; a repository listing of thousands of archives fits
# easily. Anything beyond is not something we asked for and is not kept.
MAX_OUTPUT = 16 * 1024 * 1024


@dataclass(frozen=True)
class LocalResult:
    status: int
    stdout: str
    stderr: str

    def error_text(self) -> str:
        """borg's last stderr lines: the reason to show when it failed."""
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return " / ".join(lines[-3:]) or f"exit status {self.status}"


def borg_base_dir(state_dir: Path) -> Path:
    return state_dir / "borg"


def local_env(state_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "BORG_BASE_DIR": str(borg_base_dir(state_dir)),
        "BORG_DISPLAY_PASSPHRASE": "no",
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        # The server names its repositories by the configured path; a moved repository is the
        # administrator's doing, not an attack through a client.
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        "PYTHONUTF8": "1",
        "LANG": "C.UTF-8",
    }
    # A passphrase must never come from our own environment by accident.
    for key in ("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_NEW_PASSPHRASE"):
        env.pop(key, None)
    env.update(extra or {})
    return env


async def run_local_borg(
    argv: Sequence[str],
    *,
    state_dir: Path,
    passphrase: bytes | None,
    env: Mapping[str, str] | None = None,
) -> LocalResult:
    """Run ``argv`` (a server-side borg command) to completion; stdout and stderr captured."""
    borg_base_dir(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    full_env = local_env(state_dir, env)
    pass_fds: tuple[int, ...] = ()
    read_end = -1
    if passphrase is not None:
        read_end, write_end = os.pipe()
        # A passphrase is far below the pipe buffer (64 KiB), so this write cannot block.
        with os.fdopen(write_end, "wb") as writer:
            writer.write(passphrase)
        full_env["BORG_PASSPHRASE_FD"] = str(read_end)
        pass_fds = (read_end,)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=full_env,
            pass_fds=pass_fds,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        if read_end >= 0:
            os.close(read_end)
    try:
        stdout, stderr = await process.communicate()
    except asyncio.CancelledError:
        # A cancelled caller must not leave a borg holding the repository lock.
        if process.returncode is None:
            process.terminate()
        await asyncio.shield(process.wait())
        raise
    status = process.returncode if process.returncode is not None else 2
    return LocalResult(
        status,
        stdout[:MAX_OUTPUT].decode("utf-8", "replace"),
        stderr[-MAX_OUTPUT:].decode("utf-8", "replace"),
    )
