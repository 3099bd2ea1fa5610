"""The restore command's pure parts: borg extract argv and the client-side target script (run
here with the real /bin/sh on temporary directories)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from borgtunnel.client import gatekeeper
from borgtunnel.config import parse_config
from borgtunnel.runs.restore import (
    REFUSED_NOT_EMPTY,
    REFUSED_PREFIX,
    REFUSED_UNUSABLE,
    TARGET_SCRIPT,
    extract_argv,
    restore_command,
)


def test_extract_argv_makes_paths_literal_prefixes_after_the_end_of_options():
    argv = extract_argv(
        remote_borg="sudo -n borg",
        repository=Path("/srv/borg/web1"),
        archive="-odd archive",
        paths=["/etc/re:x", "home/u"],
        dry_run=True,
    )
    assert argv == [
        "sudo",
        "-n",
        "borg",
        "extract",
        "--log-json",
        "--list",
        "--dry-run",
        "--",
        "ssh://borgtunnel/srv/borg/web1::-odd archive",
        "pp:etc/re:x",
        "pp:home/u",
    ]


def test_restore_command_quotes_every_word():
    config = parse_config(
        {
            "clients": {
                "web1": {
                    "host": "h",
                    "repository": "/srv/borg/web1",
                    "paths": ["/etc"],
                    "encryption": "none",
                }
            }
        }
    )
    command = restore_command(
        config.clients["web1"], "a'b", ["/x $(id)"], "/t; rm -rf /", mode="extract"
    )
    # Read back the way a client's gatekeeper does: decode the envelope, split ARGS like sh.
    kind, words = gatekeeper.decode_command(command)
    assert kind == "borgtunnel-restore"
    assert "/t; rm -rf /" in words
    assert "pp:x $(id)" in words
    assert words[words.index("borgtunnel-restore") + 2] == "extract"


def target(tmp_path: Path, path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    marker = tmp_path / "ran"
    return subprocess.run(
        [
            "sh",
            "-c",
            TARGET_SCRIPT,
            "borgtunnel-restore",
            str(path),
            mode,
            "sh",
            "-c",
            f'pwd > "{marker}"',
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_a_missing_target_is_created_private_and_becomes_the_working_directory(tmp_path):
    path = tmp_path / "a" / "b"
    result = target(tmp_path, path, "extract")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert (tmp_path / "ran").read_text().strip() == str(path)


@pytest.mark.parametrize(("mode", "code"), [("extract", REFUSED_NOT_EMPTY), ("force", 0)])
def test_a_non_empty_target_needs_force(tmp_path, mode, code):
    path = tmp_path / "t"
    path.mkdir()
    (path / ".hidden").write_text("x")
    result = target(tmp_path, path, mode)
    assert result.returncode == code
    if code:
        assert result.stderr.startswith(REFUSED_PREFIX)
        assert not (tmp_path / "ran").exists()


def test_a_symlink_or_a_file_is_never_a_target(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    plain = tmp_path / "file"
    plain.write_text("x")
    for path in (link, plain):
        result = target(tmp_path, path, "force")
        assert result.returncode == REFUSED_UNUSABLE, path
        assert REFUSED_PREFIX in result.stderr


def test_a_dry_run_creates_nothing(tmp_path):
    path = tmp_path / "never"
    result = target(tmp_path, path, "dry-run")
    assert result.returncode == 0
    assert not path.exists()
