"""The socket-directory rules as ONE table of cases, for both implementations.

The run script (borgtunnel/client/remote.py, "Directories") and the gatekeeper
(borgtunnel/client/gatekeeper.py ``prepare_socket_dir``) must agree on every row: same exit
code, same message, same directories afterwards (never a chmod; nothing created under an unsafe
ancestor). tests/test_socketdir_rules.py runs each row against both.

Each row builds its situation inside a fresh ``home`` (the client's $HOME; pytest's tmp dirs
above it are root's and 0700, so they pass the ancestor rule) and checks what is left after.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from borgtunnel.client.remote import RunExit


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _nothing(_home: Path) -> None:
    pass


def _nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


@dataclass(frozen=True)
class Case:
    name: str
    socket: str  # as configured: "~/…" is below the home
    code: int  # 0: prepared (the script then says borgtunnel-ready); else RunExit
    message: str  # part of the one-line reason (both implementations say the same line)
    setup: Callable[[Path], None] = _nothing
    after: Callable[[Path], None] = _nothing  # asserts what is left
    needs_root: bool = False  # chown to another user


def _mkdir(path: Path, dir_mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(dir_mode)
    return path


def _modes(expected: dict[str, int]) -> Callable[[Path], None]:
    def check(home: Path) -> None:
        found = {name: mode(home / name) if name else mode(home) for name in expected}
        assert found == expected

    return check


def _absent(*names: str) -> Callable[[Path], None]:
    def check(home: Path) -> None:
        assert [name for name in names if os.path.lexists(home / name)] == []

    return check


def _stale_socket(home: Path) -> None:
    _mkdir(home / "s", 0o700)
    with socket.socket(socket.AF_UNIX) as leftover:
        leftover.bind(str(home / "s" / "c1.sock"))


def _symlinked_socket(home: Path) -> None:
    _stale_socket(home)
    (home / "s" / "c1.sock").rename(home / "s" / "real.sock")
    (home / "s" / "c1.sock").symlink_to(home / "s" / "real.sock")


def _file_at_socket(home: Path) -> None:
    _mkdir(home / "s", 0o700)
    (home / "s" / "c1.sock").write_text("keep")


def _symlink_at_socket(home: Path) -> None:
    _mkdir(home / "s", 0o700)
    (home / "target").write_text("keep")
    (home / "s" / "c1.sock").symlink_to(home / "target")


def _symlinked_dir(home: Path) -> None:
    _mkdir(home / "real", 0o700)
    (home / "s").symlink_to(home / "real")


def _foreign_dir(home: Path) -> None:
    os.chown(_mkdir(home / "s", 0o700), _nobody(), -1)


def _foreign_ancestor(home: Path) -> None:
    os.chown(_mkdir(home / "theirs", 0o755), _nobody(), -1)
    _mkdir(home / "theirs" / "mine", 0o700)


def _shared_ancestor(home: Path) -> None:
    _mkdir(home / "shared", 0o777)
    _mkdir(home / "shared" / "mine", 0o700)


def _shared_ancestor_existing(home: Path) -> None:
    _shared_ancestor(home)
    _mkdir(home / "shared" / "mine" / "s", 0o700)


def _symlink_to_shared(home: Path) -> None:
    _shared_ancestor(home)
    (home / "link").symlink_to(home / "shared" / "mine")


def _file_as_dir(home: Path) -> None:
    (home / "s").write_text("a file")


def _file_as_ancestor(home: Path) -> None:
    (home / "f").write_text("a file")


def _socket_gone(home: Path) -> None:
    assert not os.path.lexists(home / "s" / "c1.sock")


def _link_gone_target_kept(home: Path) -> None:
    _socket_gone(home)
    assert (home / "s" / "real.sock").is_socket()


def _link_and_target_kept(home: Path) -> None:
    assert (home / "s" / "c1.sock").is_symlink()
    assert (home / "target").read_text() == "keep"


def _dir(name: str, dir_mode: int) -> Callable[[Path], None]:
    def setup(home: Path) -> None:
        _mkdir(home / name, dir_mode)

    return setup


def _kept(name: str) -> Callable[[Path], None]:
    def check(home: Path) -> None:
        assert (home / name).read_text() == "keep"

    return check


def _both(*checks: Callable[[Path], None]) -> Callable[[Path], None]:
    def check(home: Path) -> None:
        for each in checks:
            each(home)

    return check


CASES = (
    Case(
        "missing dir and parents are created 0700",
        "~/.cache/borgtunnel/c1.sock",
        0,
        "",
        after=_modes({".cache": 0o700, ".cache/borgtunnel": 0o700}),
    ),
    Case(
        "an existing 0755 dir of ours is left as it is",
        "~/s/c1.sock",
        0,
        "",
        setup=_dir("s", 0o755),
        after=_modes({"s": 0o755}),
    ),
    Case(
        "the home itself as socket dir keeps its mode",
        "~/c1.sock",
        0,
        "",
        setup=lambda home: home.chmod(0o751),
        after=_modes({"": 0o751}),
    ),
    Case(
        "a stale socket is removed",
        "~/s/c1.sock",
        0,
        "",
        setup=_stale_socket,
        after=_socket_gone,
    ),
    Case(
        "a symlink to a socket is removed, not its target",
        "~/s/c1.sock",
        0,
        "",
        setup=_symlinked_socket,
        after=_link_gone_target_kept,
    ),
    Case(
        "a sticky shared ancestor with our entry below is fine",
        "~/tmp/mine/c1.sock",
        0,
        "",
        setup=_dir("tmp", 0o1777),
        after=_modes({"tmp": 0o1777, "tmp/mine": 0o700}),
    ),
    Case(
        "a regular file at the socket path is kept",
        "~/s/c1.sock",
        RunExit.NOT_A_SOCKET,
        "exists and is not a socket; refusing to remove it",
        setup=_file_at_socket,
        after=_kept("s/c1.sock"),
    ),
    Case(
        "a symlink at the socket path is kept",
        "~/s/c1.sock",
        RunExit.NOT_A_SOCKET,
        "exists and is not a socket; refusing to remove it",
        setup=_symlink_at_socket,
        after=_link_and_target_kept,
    ),
    Case(
        "a symlinked socket dir",
        "~/s/c1.sock",
        RunExit.SYMLINK,
        "is a symlink; refusing",
        setup=_symlinked_dir,
        after=_modes({"real": 0o700}),
    ),
    Case(
        "a socket dir owned by someone else",
        "~/s/c1.sock",
        RunExit.NOT_OWNER,
        "is not owned by root; refusing",
        setup=_foreign_dir,
        needs_root=True,
    ),
    Case(
        "a shared sticky socket dir is not tightened",
        "~/s/c1.sock",
        RunExit.SHARED_DIR,
        "is writable by group or others (a shared directory)",
        setup=_dir("s", 0o1777),
        after=_modes({"s": 0o1777}),
    ),
    Case(
        "a group-writable socket dir is not tightened",
        "~/s/c1.sock",
        RunExit.SHARED_DIR,
        "is writable by group or others (a shared directory)",
        setup=_dir("s", 0o775),
        after=_modes({"s": 0o775}),
    ),
    Case(
        "a socket dir that is a file",
        "~/s/c1.sock",
        RunExit.MKDIR_FAILED,
        "is not a directory",
        setup=_file_as_dir,
    ),
    Case(
        "a world-writable non-sticky ancestor: nothing created",
        "~/shared/mine/s/c1.sock",
        RunExit.UNSAFE_ANCESTOR,
        "/shared (on the way to",
        setup=_shared_ancestor,
        after=_both(_absent("shared/mine/s"), _modes({"shared": 0o777, "shared/mine": 0o700})),
    ),
    Case(
        "a world-writable non-sticky ancestor of an existing dir",
        "~/shared/mine/s/c1.sock",
        RunExit.UNSAFE_ANCESTOR,
        "is writable by group or others and not sticky; refusing",
        setup=_shared_ancestor_existing,
        after=_modes({"shared": 0o777, "shared/mine/s": 0o700}),
    ),
    Case(
        "a symlinked ancestor leading to a shared dir: nothing created",
        "~/link/s/c1.sock",
        RunExit.UNSAFE_ANCESTOR,
        "is writable by group or others and not sticky; refusing",
        setup=_symlink_to_shared,
        after=_absent("shared/mine/s"),
    ),
    Case(
        "an ancestor owned by someone else",
        "~/theirs/mine/c1.sock",
        RunExit.UNSAFE_ANCESTOR,
        "neither root nor root; refusing",
        setup=_foreign_ancestor,
        needs_root=True,
    ),
    Case(
        "an ancestor that is a file",
        "~/f/s/c1.sock",
        RunExit.UNSAFE_ANCESTOR,
        "/f (on the way to",
        setup=_file_as_ancestor,
    ),
    Case(
        "a socket path over 100 bytes",
        "~/" + "x" * 100 + ".sock",
        RunExit.TOO_LONG,
        "is longer than 100 bytes (unix socket limit)",
    ),
)
