"""The private-directory rule for socket_dir, state_dir and locks, on real directories.

Every directory here is made by the test inside its own tmp_path; nothing else is chmodded.
tmp_path's own ancestors (/tmp is root-owned 1777) pass the rule: a sticky ancestor is allowed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from borgtunnel.history import DB_FILENAME, History
from borgtunnel.lock import acquire_client_lock
from borgtunnel.privatedir import UnsafeDirectoryError, check_private_dir, ensure_private_dir

OTHER_UID = 54321  # no account has it here
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def make_dir(path: Path, dir_mode: int) -> Path:
    path.mkdir()
    path.chmod(dir_mode)
    return path


def test_missing_dirs_are_created_0700(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    ensure_private_dir(target)
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", target)] == [0o700] * 3


@pytest.mark.parametrize("shared_mode", [0o775, 0o757, 0o777])
def test_group_or_world_writable_ancestor_is_refused(tmp_path: Path, shared_mode: int) -> None:
    shared = make_dir(tmp_path / "shared", shared_mode)
    mine = make_dir(shared / "mine", 0o700)
    with pytest.raises(UnsafeDirectoryError) as caught:
        ensure_private_dir(mine / "sockets")
    assert caught.value.culprit == shared
    assert "writable by group or others without the sticky bit" in str(caught.value)
    assert not (mine / "sockets").exists()  # nothing created
    assert (mode(shared), mode(mine)) == (shared_mode, 0o700)  # nothing chmodded
    with pytest.raises(UnsafeDirectoryError):
        check_private_dir(mine)


def test_refusal_happens_before_creating_missing_parents(tmp_path: Path) -> None:
    shared = make_dir(tmp_path / "shared", 0o777)
    with pytest.raises(UnsafeDirectoryError):
        ensure_private_dir(shared / "x" / "y")
    assert list(shared.iterdir()) == []


def test_sticky_ancestor_is_allowed_below_it_only_our_entries(tmp_path: Path) -> None:
    sticky = make_dir(tmp_path / "sticky", 0o1777)
    ensure_private_dir(sticky / "mine" / "sockets")
    assert mode(sticky) == 0o1777
    assert mode(sticky / "mine") == 0o700


def test_sticky_dir_itself_is_refused(tmp_path: Path) -> None:
    sticky = make_dir(tmp_path / "sticky", 0o1777)
    with pytest.raises(UnsafeDirectoryError, match="writable by group or others"):
        ensure_private_dir(sticky)
    assert mode(sticky) == 0o1777


@needs_root
def test_ancestor_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    foreign = make_dir(tmp_path / "foreign", 0o755)
    os.chown(foreign, OTHER_UID, OTHER_UID)
    mine = make_dir(foreign / "mine", 0o700)
    with pytest.raises(UnsafeDirectoryError, match=f"owned by uid {OTHER_UID}") as caught:
        ensure_private_dir(mine)
    assert caught.value.culprit == foreign


@needs_root
def test_entry_of_another_user_in_a_sticky_dir_is_refused(tmp_path: Path) -> None:
    # In a sticky dir its owner may rename the entry away and put another in its place.
    sticky = make_dir(tmp_path / "sticky", 0o1777)
    theirs = make_dir(sticky / "theirs", 0o755)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafeDirectoryError, match=f"owned by uid {OTHER_UID}"):
        ensure_private_dir(theirs / "sockets")
    assert not (theirs / "sockets").exists()


def test_symlinked_ancestor_is_checked_along_its_real_path(tmp_path: Path) -> None:
    safe = make_dir(tmp_path / "safe", 0o755)
    (tmp_path / "via-safe").symlink_to(safe)
    ensure_private_dir(tmp_path / "via-safe" / "sockets")
    assert mode(safe / "sockets") == 0o700

    shared = make_dir(tmp_path / "shared", 0o777)
    make_dir(shared / "mine", 0o700)
    (tmp_path / "via-shared").symlink_to(shared / "mine")
    with pytest.raises(UnsafeDirectoryError) as caught:
        ensure_private_dir(tmp_path / "via-shared" / "sockets")
    assert caught.value.culprit == shared
    assert not (shared / "mine" / "sockets").exists()


def test_history_refuses_a_shared_state_dir_and_leaves_it(tmp_path: Path) -> None:
    state = make_dir(tmp_path / "state", 0o777)
    with pytest.raises(UnsafeDirectoryError):
        History.open(state)
    assert mode(state) == 0o777
    assert list(state.iterdir()) == []


def test_history_refuses_a_planted_symlink_and_does_not_chmod_its_target(
    tmp_path: Path,
) -> None:
    state = make_dir(tmp_path / "state", 0o700)
    victim = tmp_path / "victim"
    victim.write_text("not a database\n")
    victim.chmod(0o644)
    (state / DB_FILENAME).symlink_to(victim)
    with pytest.raises(UnsafeDirectoryError, match="not a regular file"):
        History.open(state)
    assert mode(victim) == 0o644
    assert victim.read_text() == "not a database\n"


def test_lock_refuses_a_symlinked_locks_dir(tmp_path: Path) -> None:
    state = make_dir(tmp_path / "state", 0o700)
    elsewhere = make_dir(tmp_path / "elsewhere", 0o700)
    (state / "locks").symlink_to(elsewhere)
    with pytest.raises(UnsafeDirectoryError, match="is a symlink"):
        acquire_client_lock(state, "web1", wait=False)
    assert list(elsewhere.iterdir()) == []
