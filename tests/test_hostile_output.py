"""What a hostile client can send back, and what it cannot make the server do with it.

A forged ready line, floods of output, silence, terminal escape sequences: real sshd, real borg
on the server, hostile scripts as the client's borg (tests/hostile.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import hostile, pullkit
from tests.sshd import SshdFactory, SshdServer

pytestmark = pytest.mark.sshd

# Runs the real CLI and reports the process's own peak RSS (kB) on its last stderr line.
_RSS_PROBE = """
import resource, sys
from borgtunnel.cli import main
code = main(sys.argv[1:])
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _pull_measuring_rss(config: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    result = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, "--config", str(config), "pull", "c1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    found = re.search(r"^MAXRSS (\d+)$", result.stderr, re.MULTILINE)
    assert found, result.stderr[-2000:]
    return result, int(found.group(1))


def test_forged_ready_line_cannot_choose_the_path(
    tmp_path: Path, sshd_factory: SshdFactory
) -> None:
    """A login script that prints its own ready line naming another file: the server neither
    removes that file nor forwards there; the run fails naming both paths."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    forcer = tmp_path / "forced-command"
    forcer.write_text(
        "#!/bin/sh\n"
        f"echo 'borgtunnel-ready nc {victim}' >&2\n"
        'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n'
    )
    forcer.chmod(0o755)
    sshd = sshd_factory(extra_config=[f"ForceCommand {forcer}"])
    _, repo, config = hostile.setup(tmp_path, sshd)

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert f"reported socket path {str(victim)!r}" in result.stdout
    assert victim.read_text() == "precious"
    assert pullkit.archives(tmp_path, repo) == []


def test_output_floods_leave_server_memory_bounded(tmp_path: Path, sshd: SshdServer) -> None:
    """128 MiB on stdout without a newline and a 128 MiB stderr line: the server keeps a
    bounded amount of each (its peak RSS stays within a few tens of MB of a normal pull)."""
    _, repo, config = hostile.setup(tmp_path, sshd)
    normal, normal_rss = _pull_measuring_rss(config)
    assert normal.returncode == 0, normal.stderr[-2000:]
    flood = "head -c 134217728 /dev/zero | tr '\\0' x"
    body = f"{flood}\n{flood} >&2\nexit 0\n"
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(
        sshd,
        "c1",
        repo,
        [tmp_path / "client-data"],
        remote_borg=str(hostile.script(tmp_path, "flood", body)),
    )
    pullkit.write_config(config, clients={"c1": table}, **conf)

    flooded, flood_rss = _pull_measuring_rss(config)

    assert flooded.returncode == 2, flooded.stdout
    assert "more bytes of this line not kept" in flooded.stderr
    assert len(flooded.stderr) < 1_000_000  # logged, but not whole
    assert flood_rss - normal_rss < 48 * 1024, (normal_rss, flood_rss)


def test_a_silent_client_is_stopped_by_the_stall_timeout(tmp_path: Path, sshd: SshdServer) -> None:
    """No output and no repository traffic: failed "stalled" after stall_timeout, cleaned up."""
    marker = "borgtunnel-stall-marker"
    body = f"# {marker}\nwhile :; do sleep 1; done\n"
    silent = hostile.script(tmp_path, "silent", body)
    _, repo, config = hostile.setup(tmp_path, sshd, remote_borg=str(silent), stall_timeout=2)
    started = time.monotonic()

    result = pullkit.run_cli(config, "pull", "c1", timeout=120)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "stalled: no output from the client's borg" in result.stdout
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 20
    while pullkit.processes_mentioning(str(silent)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pullkit.processes_mentioning(str(silent)) == []
    assert pullkit.processes_mentioning(f"--restrict-to-repository {repo}") == []
    assert hostile.runs(tmp_path)[-1]["result"] == "failed"


def test_a_slow_but_talking_client_is_not_a_stall(tmp_path: Path, sshd: SshdServer) -> None:
    """borg's progress lines count as life: a run longer than stall_timeout that keeps
    reporting is not stopped."""
    body = (
        'for i in 1 2 3 4 5 6; do echo \'{"type": "archive_progress", "nfiles": 1}\' >&2;'
        " sleep 1; done\n"
        'exec borg "$@"\n'
    )
    slow = hostile.script(tmp_path, "slow", body)
    _, repo, config = hostile.setup(tmp_path, sshd, remote_borg=str(slow), stall_timeout=3)

    result = pullkit.run_cli(config, "pull", "c1", timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert len(pullkit.archives(tmp_path, repo)) == 1


def test_terminal_escapes_from_the_client_are_shown_escaped(
    tmp_path: Path, sshd: SshdServer
) -> None:
    """ESC, BEL and CR in what the client's borg prints never reach the terminal raw: neither
    in the summary line nor in console-format logs."""
    body = "printf 'evil \\033]0;pwned\\007 title\\rc2: ok forged line\\n' >&2\nexit 2\n"
    evil = hostile.script(tmp_path, "escapes", body)
    _, _, config = hostile.setup(tmp_path, sshd, remote_borg=str(evil))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "borgtunnel",
            "--log-format=console",
            f"--config={config}",
            "pull",
            "c1",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )

    assert result.returncode == 2
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream
        assert "\x07" not in stream
        assert "\r" not in stream
    assert "\\x1b]0;pwned\\x07 title\\rc2: ok forged line" in result.stdout
    assert "\\x1b]0;pwned" in result.stderr
    assert len(result.stdout.splitlines()) == 1
