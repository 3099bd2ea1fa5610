"""Local errors name the path, the operation and that it happened on this server.

Each error comes from a real system call (no hand-made OSError), so the operation is found
from the traceback the way it is in production.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest

from borgtunnel import oserrors


def _raised(call: Callable[[], object]) -> OSError:
    with pytest.raises(OSError, match=r"No such file or directory|Is a directory") as caught:
        call()
    return caught.value


def test_stat_open_run_and_create_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    cases: dict[str, Callable[[], object]] = {
        "stat it": lambda: missing.is_dir() or missing.stat(),
        "open it": missing.read_bytes,
        "run it": lambda: subprocess.run([str(missing)], check=False),
        "create it": (missing / "sub").mkdir,
    }
    for operation, call in cases.items():
        text = oserrors.describe(_raised(call))
        assert text.startswith(str(missing)), text
        assert f"No such file or directory (this server could not {operation})" in text


def test_a_key_file_asyncssh_cannot_read_names_the_setting(tmp_path: Path) -> None:
    directory = tmp_path / "id_ed25519"
    directory.mkdir()

    text = oserrors.describe(_raised(lambda: asyncssh.read_private_key(directory)), "identity")

    assert text == f"identity {directory}: Is a directory (this server could not open it)"


def test_an_error_without_a_path_keeps_its_own_text() -> None:
    exc = ConnectionRefusedError(111, "Connection refused")

    assert not oserrors.is_local_file_error(exc)
    assert oserrors.describe(exc) == str(exc)
