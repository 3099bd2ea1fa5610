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
from borgtunnel.client.remote import GO, run_command
from tests.socketdir_cases import CASES, Case


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
