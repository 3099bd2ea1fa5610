"""Getting a repository passphrase from where the administrator keeps it.

The passphrase is returned as bytes and only ever written to a pipe (the SSH channel's stdin, or
a local pipe for ``borg init``): never argv, never an environment variable, never a log field.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import stat

from borgtunnel.config import ClientConfig

COMMAND_TIMEOUT = 60.0


class PassphraseError(Exception):
    """The passphrase could not be obtained. The message never contains the passphrase."""


def _strip_newline(value: bytes) -> bytes:
    # Files written by editors and commands printing with echo end in a newline that is not part
    # of the passphrase (borg's BORG_PASSCOMMAND strips it the same way).
    return value.removesuffix(b"\n").removesuffix(b"\r")


async def read_passphrase(client: ClientConfig) -> bytes | None:
    """None when the repository is unencrypted; otherwise the passphrase bytes."""
    if client.passphrase_file is not None:
        return _from_file(client)
    if client.passphrase_command is not None:
        return await _from_command(client.passphrase_command, client.name)
    return None


def _from_file(client: ClientConfig) -> bytes:
    path = client.passphrase_file
    assert path is not None  # noqa: S101 - checked by the caller
    try:
        # fstat of the descriptor we read: the checked file is the file read (no swap between).
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            value = handle.read()
    except OSError as exc:
        raise PassphraseError(f"passphrase_file {path}: {exc.strerror or exc}") from None
    _check_private(path, info)
    value = _strip_newline(value)
    if not value:
        raise PassphraseError(f"passphrase_file {path} is empty")
    return value


def _check_private(path: object, info: os.stat_result) -> None:
    """Only the running user (or root) may own it, and nobody else may read or write it.

    A file another user owns can be rewritten by them at any time (a passphrase of their choice
    would encrypt the next repository we create), or chmodded open after we checked.
    """
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in {os.geteuid(), 0}:
        raise PassphraseError(
            f"passphrase_file {path} is owned by {_user_name(info.st_uid)}, not by "
            f"{_user_name(os.geteuid())} (or root) (mode {mode:04o}); "
            f"chown {_user_name(os.geteuid())} it"
        )
    if mode & 0o077:
        raise PassphraseError(
            f"passphrase_file {path} is accessible by group or others "
            f"(owner {_user_name(info.st_uid)}, mode {mode:04o}); chmod 0600 it"
        )


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


async def _from_command(command: str, client: str) -> bytes:
    process = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "BORGTUNNEL_CLIENT": client},
        # Its own process group: on timeout the whole command (gpg, curl, sleep …) must go, or
        # its children would hold our pipes open and the timeout would not end the wait.
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise PassphraseError(
            f"passphrase_command did not finish in {COMMAND_TIMEOUT:.0f}s"
        ) from None
    if process.returncode != 0:
        detail = stderr.decode("utf-8", "replace").strip()[-500:]
        raise PassphraseError(
            f"passphrase_command failed with status {process.returncode}: {detail}"
        )
    value = _strip_newline(stdout)
    if not value:
        raise PassphraseError("passphrase_command printed nothing")
    return value
