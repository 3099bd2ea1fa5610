"""Passphrase sources: a private file or a command. Errors must never contain the passphrase."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from borgtunnel import passphrase
from borgtunnel.config import ClientConfig, parse_config
from borgtunnel.passphrase import PassphraseError, read_passphrase

SECRET = "correct horse battery staple"


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers where PID 1 does not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def client(**keys: Any) -> ClientConfig:
    table = {"host": "h", "repository": "/srv/r", "paths": ["/etc"], **keys}
    return parse_config({"clients": {"web1": table}}).client("web1")


def secret_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "web1.passphrase"
    path.write_bytes(content)
    path.chmod(mode)
    return path


async def test_unencrypted_needs_no_passphrase() -> None:
    assert await read_passphrase(client(encryption="none")) is None


# --- passphrase_file ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"s3cret\n", b"s3cret"),
        (b"s3cret", b"s3cret"),
        (b"s3cret\r\n", b"s3cret"),
        (b"s3cret\n\n", b"s3cret\n"),  # only one trailing newline is not part of it
        (b" spaced \n", b" spaced "),
        ("pässwört\n".encode(), "pässwört".encode()),
    ],
)
async def test_file_strips_one_trailing_newline(
    tmp_path: Path, content: bytes, expected: bytes
) -> None:
    path = secret_file(tmp_path, content)
    assert await read_passphrase(client(passphrase_file=str(path))) == expected


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
async def test_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = secret_file(tmp_path, SECRET.encode() + b"\n", mode)
    with pytest.raises(PassphraseError) as caught:
        await read_passphrase(client(passphrase_file=str(path)))
    message = str(caught.value)
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert "chmod 0600" in message
    assert SECRET not in message


OTHER_UID = 54321  # no such account here: a uid nobody on this machine logs in as


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a file to another uid")
@pytest.mark.parametrize("mode", [0o600, 0o400])
async def test_file_owned_by_another_user_is_refused(tmp_path: Path, mode: int) -> None:
    # Whoever owns the file can rewrite it (or chmod it open) whenever they like.
    path = secret_file(tmp_path, SECRET.encode() + b"\n", mode)
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(PassphraseError) as caught:
        await read_passphrase(client(passphrase_file=str(path)))
    message = str(caught.value)
    assert str(path) in message
    assert f"owned by uid {OTHER_UID}" in message
    assert f"mode {mode:04o}" in message
    assert SECRET not in message


async def test_owner_only_modes_are_fine(tmp_path: Path) -> None:
    path = secret_file(tmp_path, b"x\n", 0o400)
    assert await read_passphrase(client(passphrase_file=str(path))) == b"x"


async def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.passphrase"
    with pytest.raises(PassphraseError, match="No such file") as caught:
        await read_passphrase(client(passphrase_file=str(path)))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"\n"])
async def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = secret_file(tmp_path, content)
    with pytest.raises(PassphraseError, match="is empty"):
        await read_passphrase(client(passphrase_file=str(path)))


# --- passphrase_command -------------------------------------------------------------------------


async def test_command_output_is_the_passphrase() -> None:
    value = await read_passphrase(client(passphrase_command=f"printf '%s\\n' '{SECRET}'"))
    assert value == SECRET.encode()


async def test_command_knows_the_client_and_gets_no_stdin() -> None:
    # `cat` would hang on an inherited terminal; stdin must be /dev/null.
    value = await read_passphrase(client(passphrase_command='cat; echo "for-$BORGTUNNEL_CLIENT"'))
    assert value == b"for-web1"


async def test_command_failure_reports_status_and_stderr_not_stdout() -> None:
    command = f"printf '%s' '{SECRET}'; echo 'vault sealed' >&2; exit 3"
    with pytest.raises(PassphraseError) as caught:
        await read_passphrase(client(passphrase_command=command))
    message = str(caught.value)
    assert "status 3" in message
    assert "vault sealed" in message
    assert SECRET not in message


async def test_command_printing_nothing() -> None:
    with pytest.raises(PassphraseError, match="printed nothing"):
        await read_passphrase(client(passphrase_command="echo"))


async def test_command_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passphrase, "COMMAND_TIMEOUT", 0.2)
    started = time.monotonic()
    with pytest.raises(PassphraseError, match="did not finish"):
        await read_passphrase(client(passphrase_command="exec sleep 5"))
    assert time.monotonic() - started < 2


async def test_command_timeout_kills_the_whole_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(passphrase, "COMMAND_TIMEOUT", 0.2)
    pid_file = tmp_path / "child.pid"
    command = f"sleep 2 & echo $! > {pid_file}; wait"
    started = time.monotonic()
    try:
        with pytest.raises(PassphraseError, match="did not finish"):
            await read_passphrase(client(passphrase_command=command))
        assert time.monotonic() - started < 1.5
        assert not running(int(pid_file.read_text()))
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
