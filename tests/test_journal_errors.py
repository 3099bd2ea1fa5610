"""Error lines reach journald at error priority, not only structlog's records.

Each case runs the real command line with stdout and stderr on one file, as systemd connects
a unit's output (StandardError=inherit), and ``$JOURNAL_STREAM`` naming that file: then
borgtunnel takes it for the journal's stream and must prefix every error line with ``<3>``.
Without that prefix journald files the line at the unit's default priority, info, and
``journalctl -p err -u borgtunnel`` shows only systemd's "Failed to start".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_support import offline_client, write_config


def _as_a_unit(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    """Exit status and the output lines of ``borgtunnel ARGS`` run the way systemd runs it."""
    journal = tmp_path / "journal-stream"
    with journal.open("wb") as stream:
        info = os.fstat(stream.fileno())
        result = subprocess.run(
            [sys.executable, "-m", "borgtunnel", *args],
            env={**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"},
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=stream,
            timeout=60,
            check=False,
        )
    return result.returncode, journal.read_text().splitlines()


def _config(tmp_path: Path) -> Path:
    client = offline_client(tmp_path / "repo")
    return write_config(tmp_path / "borgtunnel.toml", tmp_path, clients={"web1": client})


@pytest.mark.parametrize(
    "breakage",
    [
        ("port = 9", 'port = "nine"'),  # a wrong type: one error
        ("[daemon]", "[daemon]\nmax_parallel = 0\nunknown_key = 1"),  # several
        ("[daemon]", "[daemon"),  # not TOML at all
    ],
)
def test_a_config_error_at_start_up_is_an_error_line(
    tmp_path: Path, breakage: tuple[str, str]
) -> None:
    config = _config(tmp_path)
    text = config.read_text()
    assert breakage[0] in text
    config.write_text(text.replace(*breakage, 1))

    for command in ("daemon", "check-config"):
        status, lines = _as_a_unit(tmp_path, "--config", str(config), command)

        assert status == 78
        assert lines, "the error must be said"
        assert all(line.startswith("<3>") for line in lines), lines


def test_a_missing_config_file_is_an_error_line(tmp_path: Path) -> None:
    status, lines = _as_a_unit(tmp_path, "--config", str(tmp_path / "nonexistent.toml"), "daemon")

    assert status == 78
    assert lines
    assert all(line.startswith("<3>") for line in lines), lines


def test_an_unknown_client_and_a_usage_error_are_error_lines(tmp_path: Path) -> None:
    config = str(_config(tmp_path))

    status, lines = _as_a_unit(tmp_path, "--config", config, "pull", "nosuchclient")
    assert status == 78
    assert [line[:3] for line in lines] == ["<3>"], lines
    assert "nosuchclient" in lines[0]

    status, lines = _as_a_unit(tmp_path, "--config", config, "daemon", "--no-such-option")
    assert status == 2
    errors = [line for line in lines if "error:" in line]
    assert errors, lines
    assert all(line.startswith("<3>") for line in errors), lines


def test_a_failed_pull_summary_is_an_error_line(tmp_path: Path) -> None:
    """A pull@ unit's one summary line says why it failed: it must be at error priority too."""
    status, lines = _as_a_unit(tmp_path, "--config", str(_config(tmp_path)), "pull", "web1")

    assert status == 2
    summaries = [line for line in lines if "web1: failed" in line]
    assert len(summaries) == 1, lines
    assert summaries[0].startswith("<3>web1: failed"), lines
