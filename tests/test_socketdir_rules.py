"""One table of socket-directory cases (tests/socketdir_cases.py), two implementations.

The run script runs for real under /bin/sh (``true`` standing in for borg), the gatekeeper's
``prepare_socket_dir`` in-process; each must give the row's exit code and the same one-line
reason, and leave the row's directories as it expects (no chmod, nothing created under an
unsafe ancestor).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from borgtunnel import borg
from borgtunnel.client import gatekeeper as gk
from borgtunnel.client.remote import GO, REQUEST_DOCTOR, encoded_command, run_command
from borgtunnel.ssh.doctor import DOCTOR_SCRIPT
from tests.socketdir_cases import CASES, Case, mode


def run_script(configured: str, home: Path) -> tuple[int, str]:
    """The run script's exit code and its first line on stderr."""
    result = subprocess.run(
        [
            "/bin/sh",
            "-c",
            run_command(configured, borg.RSH_BY_TOOL["nc"], borg.RSH_BY_TOOL["socat"], ["true"]),
        ],
        input=GO,
        env={"HOME": str(home), "PATH": os.environ["PATH"]},
        cwd=home,
        capture_output=True,
        timeout=20,
        check=False,
    )
    lines = result.stderr.decode("utf-8", "surrogateescape").splitlines()
    return result.returncode, lines[0] if lines else ""


def run_gatekeeper(configured: str, home: Path) -> tuple[int, str]:
    """The gatekeeper's code (0: prepared) and its one-line reason."""
    try:
        gk.prepare_socket_dir(gk.expand_home(configured, str(home)))
    except gk.RefusedError as exc:
        return exc.code, exc.reason
    return 0, ""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    directory = tmp_path / "home"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    return directory


@pytest.mark.parametrize("implementation", ["script", "gatekeeper"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_socket_dir_rules(case: Case, implementation: str, home: Path) -> None:
    if case.needs_root and os.geteuid() != 0:
        pytest.skip("needs root to chown a directory to nobody")
    case.setup(home)
    run = run_script if implementation == "script" else run_gatekeeper

    code, line = run(case.socket, home)

    assert code == case.code, line
    if case.code == 0:
        if implementation == "script":
            assert line.startswith("borgtunnel-ready "), line
    else:
        assert line.startswith("borgtunnel: "), line
        assert case.message in line
    case.after(home)


@pytest.mark.parametrize("case", [c for c in CASES if c.code], ids=lambda case: case.name)
def test_both_say_the_same_line(case: Case, tmp_path: Path) -> None:
    """Word for word: the server shows this line as the failed pull's reason, whichever ran."""
    if case.needs_root and os.geteuid() != 0:
        pytest.skip("needs root to chown a directory to nobody")
    said = []
    for name, run in (("script", run_script), ("gatekeeper", run_gatekeeper)):
        home = tmp_path / name / "home"
        home.mkdir(parents=True, mode=0o755)
        case.setup(home)
        code, line = run(case.socket, home)
        said.append((code, line.replace(str(home), "HOME")))
    assert said[0] == said[1]


def _doctor_through_the_gatekeeper(home: Path, socket_dir: str) -> subprocess.CompletedProcess[str]:
    """The server's own doctor request, to the gatekeeper program as sshd would run it."""
    policy = home.parent / "gatekeeper.conf"
    policy.write_text(f"[gatekeeper]\npaths = /nonexistent\nsocket_dir = {socket_dir}\n")
    command = encoded_command(DOCTOR_SCRIPT, [f"{socket_dir}/c1.sock", "borg"], kind=REQUEST_DOCTOR)
    return subprocess.run(
        ["/usr/bin/python3", gk.__file__, "--policy", str(policy)],
        input="go\n",
        env={"HOME": str(home), "PATH": os.environ["PATH"], "SSH_ORIGINAL_COMMAND": command},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_doctor_request_with_the_home_as_socket_dir_leaves_the_home_alone(home: Path) -> None:
    """The old gatekeeper chmodded the home to 0700 for this request (issue 16, item 3)."""
    result = _doctor_through_the_gatekeeper(home, str(home))  # socket_dir = the home itself

    assert result.returncode == 0, result.stderr
    assert f"borgtunnel-doctor probe {home}/doctor-" in result.stderr
    assert mode(home) == 0o755


def test_a_doctor_request_below_a_shared_ancestor_is_refused_as_a_pull_would_be(
    home: Path,
) -> None:
    (home / "shared").mkdir(mode=0o777)
    (home / "shared").chmod(0o777)

    result = _doctor_through_the_gatekeeper(home, f"{home}/shared/mine")

    assert result.returncode == 0, result.stderr  # doctor reports, it does not fail
    assert "borgtunnel-doctor probe-failed borgtunnel: " in result.stderr
    assert "is writable by group or others and not sticky; refusing" in result.stderr
    assert not (home / "shared" / "mine").exists()
