"""Private directories on the server: ``socket_dir``, ``state_dir`` and what lives in them.

Whoever can replace a directory on the way to our socket could put their own socket there and
receive a client's repository traffic; whoever can replace ``state_dir`` could rewrite the
history or hold our locks. The rule is OpenSSH's StrictModes rule, applied without following
symlinks (``lstat``), with one deliberate difference for sticky ancestors:

- the directory itself is a real directory (not a symlink), owned by us, and not writable by
  group or others — sticky or not (in a shared ``/tmp`` anyone could take our socket's name);
- every component above it, up to ``/``, is owned by root or by us, and one that is writable by
  group or others must be sticky (``/tmp``): the kernel then lets nobody but root, the
  directory's owner and the entry's owner rename or remove an entry, and every entry on our
  path is owned by root or us. OpenSSH refuses such ancestors outright; we accept them because
  the sticky rule gives the same guarantee and ``/tmp/...`` paths are common for tests and
  throwaway setups. A non-sticky group/world-writable ancestor is refused;
- a symlink on the way (``/var/run -> /run``) must itself be owned by root or us, and the
  directory it leads to is checked by the same rule along its real path.

Nothing is ever chmodded: a missing directory (and each missing parent) is created 0700, an
existing one that breaks the rule is refused with the reason, untouched.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


class UnsafeDirectoryError(PermissionError):
    """``path`` (or the component ``culprit`` on the way to it) breaks the private-dir rule."""

    def __init__(self, path: Path, culprit: Path, reason: str) -> None:
        super().__init__(str(path))
        self.path = path
        self.culprit = culprit
        self.reason = reason

    def __str__(self) -> str:
        where = "" if self.culprit == self.path else f" (on the way: {self.culprit})"
        return f"{self.path}: {self.reason}{where}; refusing to use it (nothing was changed)"


def _trusted_owner(uid: int) -> bool:
    return uid in {0, os.geteuid()}


def _check_ancestors(path: Path, target: Path) -> None:
    """Every component above ``path`` (absolute) up to ``/``; ``target`` names the error."""
    for component in path.parents:
        info = component.lstat()
        mode = info.st_mode
        if not _trusted_owner(info.st_uid):
            raise UnsafeDirectoryError(
                target, component, f"is owned by uid {info.st_uid}, neither root nor us"
            )
        if stat.S_ISLNK(mode):
            _check_real_path(component, target)
        elif not stat.S_ISDIR(mode):
            raise UnsafeDirectoryError(target, component, "is not a directory")
        elif mode & 0o022 and not mode & stat.S_ISVTX:
            raise UnsafeDirectoryError(
                target,
                component,
                f"is writable by group or others without the sticky bit "
                f"(mode {stat.S_IMODE(mode):04o})",
            )


def _check_real_path(link: Path, target: Path) -> None:
    real = Path(os.path.realpath(link))
    _check_ancestors(real / "x", target)  # real itself and everything above it


def check_private_dir(path: Path) -> None:
    """Raise UnsafeDirectoryError unless the existing ``path`` follows the rule above.

    FileNotFoundError when it (or a parent) does not exist.
    """
    path = path.absolute()  # not resolve(): symlinks on the way are checked, not followed
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeDirectoryError(path, path, "is a symlink")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectoryError(path, path, "is not a directory")
    if info.st_uid != os.geteuid():
        raise UnsafeDirectoryError(path, path, f"is owned by uid {info.st_uid}, not by us")
    if info.st_mode & 0o022:
        raise UnsafeDirectoryError(
            path,
            path,
            f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
            "use a private directory (0700 or 0755)",
        )
    _check_ancestors(path, path)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` and missing parents 0700, or check the existing one; never chmod.

    The existing part of the chain is checked before anything is created, so a refusal
    changes nothing; the whole chain is checked again afterwards.
    """
    path = path.absolute()  # not resolve(): symlinks on the way are checked, not followed
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if existing != path:
        _check_ancestors(existing / "x", path)  # existing itself (as an ancestor) and above
        old_umask = os.umask(0o077)  # parents made by mkdir(parents=True) get 0700 too
        try:
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700, parents=True)
        finally:
            os.umask(old_umask)
    check_private_dir(path)


def check_private_file(path: Path) -> os.stat_result:
    """A regular file (lstat: a symlink is refused) owned by us in a checked directory."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeDirectoryError(path, path, "is not a regular file (a symlink?)")
    if info.st_uid != os.geteuid():
        raise UnsafeDirectoryError(path, path, f"is owned by uid {info.st_uid}, not by us")
    return info
