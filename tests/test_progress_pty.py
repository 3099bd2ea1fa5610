"""Live progress of ``borgtunnel pull`` under a real pseudo-terminal: borg's archive_progress
lines become a live line (files, bytes, rate, path), then the summary line; ``--no-progress``
(or no terminal) leaves only the summary. borg always runs with ``--progress`` (the stall
detection needs its lines), so only the display differs."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import pullkit
from tests.reporting_kit import setup_client
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def pull_on_a_pty(
    config: Path, *extra: str, log: Path, stderr_too: bool = False
) -> tuple[int, str]:
    """Run ``pull c1`` with stdout on a pty; stderr (JSON logs at debug) into ``log``, or with
    ``stderr_too`` on the same pty (console logs at info), as in an administrator's shell."""
    primary, secondary = os.openpty()
    logging = ["--log-format", "json", "--log-level", "debug"] if not stderr_too else []
    with log.open("wb") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "borgtunnel",
                "--config",
                str(config),
                *logging,
                "pull",
                "c1",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            stderr=secondary if stderr_too else err,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "160"},
        )
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        code = process.wait(timeout=30)
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    return code, ANSI.sub("\n", output.decode("utf-8", "replace"))


def remote_argv(log: Path) -> list[str]:
    for line in log.read_text().splitlines():
        if '"remote_command"' in line:
            return list(json.loads(line)["argv"])
    raise AssertionError("no remote_command line in the log")


def test_progress_lines_appear_on_a_terminal_and_only_there(tmp_path: Path, sshd: SshdServer):
    _, repo, config = setup_client(
        tmp_path,
        sshd,
        random_bytes=3_000_000,
        # ~3 s in borg create (upload capped at 1000 KiB/s): several progress updates.
        client={"create_args": ["--upload-ratelimit", "1000"]},
    )
    code, screen = pull_on_a_pty(config, log=tmp_path / "live.log")
    assert code == 0, (tmp_path / "live.log").read_text()[-3000:]
    live = [line for line in screen.splitlines() if re.match(r"c1: \d+ files, ", line)]
    assert live, screen
    assert re.search(r"c1: \d+ files, [\d.]+ [kMG]?B, [\d.]+ [kMG]?B/s", live[-1]), live
    summaries = [line for line in screen.splitlines() if line.startswith("c1: ok archive=")]
    assert len(summaries) == 1, screen
    assert "--progress" in remote_argv(tmp_path / "live.log")

    code, screen = pull_on_a_pty(config, "--no-progress", log=tmp_path / "quiet.log")
    assert code == 0
    assert [line for line in screen.splitlines() if line.strip()] == [
        line for line in screen.splitlines() if line.startswith("c1: ok archive=")
    ]
    assert "--progress" in remote_argv(tmp_path / "quiet.log")  # for the stall detection

    piped = pullkit.run_cli(config, "pull", "c1")  # not a terminal: summary only
    assert piped.returncode == 0, piped.stderr
    assert len(piped.stdout.splitlines()) == 1

    # Logs on the same terminal go through the live display (above it), not across it.
    code, screen = pull_on_a_pty(config, log=tmp_path / "unused.log", stderr_too=True)
    assert code == 0, screen
    lines = screen.splitlines()
    assert any("pull_finished" in line for line in lines), screen
    assert any(re.match(r"c1: \d+ files, ", line) for line in lines), screen
    assert len([line for line in lines if line.startswith("c1: ok archive=")]) == 1, screen
    assert len(pullkit.archives(tmp_path, repo)) == 4
