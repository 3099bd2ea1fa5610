"""Which borg a client runs, learned from its own pulls and kept in ``state_dir``.

Every ``borg create`` we start gets ``--show-version``, so borg logs one line ``borgbackup version
X`` (as ``--log-json``, logger ``borg.output.show-version``) before it does anything else: no
extra exec per pull. A pull that saw the line stores the version in
``<state_dir>/client-borg/<client>``; the next pull reads it to decide whether to ask for
borg 1.4's specific exit codes (``BORG_EXIT_CODES=modern``). A failed pull whose remote command
ended without showing a version removes the entry, so after such a failure (borg replaced,
downgraded, broken) the next pull asks in the generic 0/1/2 meaning and learns again; a pull that
never reached the client (offline, link dropped) keeps it.

The file is a hint, never a trust anchor: a client that lies about its version only changes how
its own exit codes are explained, and an unknown code is always a failure (borgtunnel/borgexit.py).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Self

DIRNAME = "client-borg"

VERSION_LOGGER = "borg.output.show-version"
_VERSION_RE = re.compile(r"^borgbackup version (\d+)\.(\d+)\.(\d+)(\S*)$")

# borg 1.4.0 introduced BORG_EXIT_CODES=modern.
MODERN_EXIT_CODES_SINCE = (1, 4, 0)


@dataclass(frozen=True, order=True)
class BorgVersion:
    """A borg release: major.minor.patch plus a suffix such as ``b25`` or ``.dev3+g…``."""

    major: int
    minor: int
    patch: int
    suffix: str = ""

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}{self.suffix}"

    @classmethod
    def parse(cls, text: str) -> Self | None:
        """``1.4.5`` / ``2.0.0b25`` -> BorgVersion; anything else -> None."""
        match = _VERSION_RE.match(f"borgbackup version {text.strip()}")
        if match is None:
            return None
        major, minor, patch, suffix = match.groups()
        return cls(int(major), int(minor), int(patch), suffix)

    @property
    def modern_exit_codes(self) -> bool:
        return (self.major, self.minor, self.patch) >= MODERN_EXIT_CODES_SINCE


def major_mismatch(seen: BorgVersion, *, client: str, configured: int) -> str | None:
    """What to change when the client's borg is not of the configured ``borg_version`` (1 for
    1.x, 2 for 2): a pull builds its command line for that major. None when they match."""
    if (seen.major >= 2) == (configured == 2):
        return None
    return (
        f"the client runs borg {seen}, but clients.{client}.borg_version is {configured}: "
        f"set it to {min(seen.major, 2)}"
    )


def version_from_log(message: str, logger: str | None) -> BorgVersion | None:
    """The version in borg's ``--show-version`` log line, or None for any other line."""
    if logger != VERSION_LOGGER:
        return None
    match = _VERSION_RE.match(message.strip())
    if match is None:
        return None
    major, minor, patch, suffix = match.groups()
    return BorgVersion(int(major), int(minor), int(patch), suffix)


def _path(state_dir: Path, client: str) -> Path:
    return state_dir / DIRNAME / client


def known_version(state_dir: Path, client: str) -> BorgVersion | None:
    """What the last pull learned, or None (never pulled, forgotten after a failure, garbage)."""
    try:
        text = _path(state_dir, client).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    return BorgVersion.parse(text)


def remember(state_dir: Path, client: str, version: BorgVersion) -> None:
    """Store ``version`` for ``client`` (atomically: a crash leaves the old file or the new)."""
    directory = state_dir / DIRNAME
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = directory / client
    temporary = directory / f".{client}.{os.getpid()}.tmp"
    temporary.write_text(f"{version}\n", encoding="ascii")
    temporary.replace(target)


def forget(state_dir: Path, client: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _path(state_dir, client).unlink()


def update_after_pull(
    state_dir: Path, client: str, seen: BorgVersion | None, *, failed: bool
) -> None:
    """Keep what this pull saw; after a failure that showed no version, forget the old one."""
    if seen is not None:
        remember(state_dir, client, seen)
    elif failed:
        forget(state_dir, client)
