"""The borg executables of the end-to-end matrix: Debian's 1.2 and the PyPI builds in .borg/.

``scripts/setup`` builds each version of ``tests/borg-versions.txt`` into ``.borg/VERSION``, and
borg 2 (``tests/borg2-version.txt``) the same way. A
matrix leg whose borg is missing or reports another version FAILS (it never skips): CI must
prove every supported version, and a silently skipped leg would prove nothing.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_BORG = "/usr/bin/borg"
DEBIAN_VERSION = "1.2.4"
BUILT = tuple((ROOT / "tests" / "borg-versions.txt").read_text().split())
# borg 2 (a beta): its own leg, built by scripts/build-borg2 (with a static libcrypto >= 3.2).
BORG2 = (ROOT / "tests" / "borg2-version.txt").read_text().strip()


def executable(version: str) -> str:
    """Path of borg ``version``; fails the test (not skip) when it is not there or not it."""
    built = ROOT / ".borg" / version / "bin" / "borg"
    path = DEBIAN_BORG if version == DEBIAN_VERSION else str(built)
    try:
        said = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout.strip()
    except OSError as exc:
        pytest.fail(f"borg {version} is not installed at {path} ({exc}); run ./scripts/setup")
    if said != f"borg {version}":
        pytest.fail(f"{path} says {said!r}, the matrix needs borg {version}; run ./scripts/setup")
    return path


@dataclass(frozen=True)
class Leg:
    """One combination: the server's borg (serve, init, read-back) and the client's."""

    server: str
    client: str

    @property
    def id(self) -> str:
        return f"server{self.server}-client{self.client}"


_NEW = BUILT[0]
LEGS = (
    Leg(DEBIAN_VERSION, DEBIAN_VERSION),
    Leg(_NEW, _NEW),
    Leg(_NEW, DEBIAN_VERSION),
    Leg(DEBIAN_VERSION, _NEW),
)
