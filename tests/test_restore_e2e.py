"""End to end: `borgtunnel restore` puts a pulled tree back on the client, exactly.

The tree has the names that break naive quoting, symlinks (relative, absolute, dangling), hard
links, a FIFO, unusual modes (setuid, sticky, 0000) and owners without a name (root only: the
test sshd logs in as root). It is pulled for real, restored for real through the tunnel, and
compared entry by entry: type, mode, owner, size, bytes, link target, hard-link groups, mtime.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from borgtunnel.history import History
from tests import pullkit
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

UID, GID = 12345, 54321  # no such user or group: borg must restore the numbers


def make_hostile_tree(root: Path) -> Path:
    pullkit.make_client_data(root, random_bytes=100_000)
    (root / "symlink-relative").symlink_to("plain.txt")
    (root / "symlink-absolute").symlink_to("/etc/hostname")
    (root / "symlink-dangling -> x").symlink_to("does/not/exist")
    (root / "hard-1").write_bytes(os.urandom(5000))
    os.link(root / "hard-1", root / "dir with space" / "hard 2")
    os.mkfifo(root / "fifo")
    setuid = root / "setuid-file"
    setuid.write_text("#!/bin/sh\n")
    setuid.chmod(0o4755)
    (root / "sticky").mkdir()
    (root / "sticky").chmod(0o1777)
    locked = root / "mode-0000"
    locked.write_text("secret\n")
    locked.chmod(0)
    owned = root / "owned-by-nobody-known"
    owned.write_text("owner\n")
    os.chown(owned, UID, GID)
    os.chown(root / "symlink-relative", UID, GID, follow_symlinks=False)
    (root / "private-dir").mkdir(mode=0o700)
    os.chown(root / "private-dir", UID, GID)
    os.utime(root / "plain.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Relative path -> everything that must come back; hard links share a group number."""
    inodes: dict[int, int] = {}
    found: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = stat.S_IFMT(info.st_mode)
        content: object = None
        if stat.S_ISREG(kind):
            content = path.read_bytes()
        elif stat.S_ISLNK(kind):
            content = str(path.readlink())
        group = inodes.setdefault(info.st_ino, len(inodes)) if info.st_nlink > 1 else None
        mtime = info.st_mtime_ns if stat.S_ISREG(kind) else None
        found[str(path.relative_to(root))] = (
            kind,
            stat.S_IMODE(info.st_mode),
            info.st_uid,
            info.st_gid,
            content,
            group if stat.S_ISREG(kind) else None,
            mtime,
        )
    return found


def _setup(tmp_path: Path, sshd: SshdServer) -> tuple[Path, Path, str]:
    if os.geteuid() != 0:
        pytest.skip("owners can only be restored as root")
    data = make_hostile_tree(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(sshd, "c1", repo, [data])
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    pulled = pullkit.run_cli(config, "pull", "c1")
    assert pulled.returncode == 0, pulled.stderr
    (archive,) = pullkit.archives(tmp_path, repo)
    return data, config, archive


def test_restore_puts_a_hostile_tree_back_exactly(tmp_path: Path, sshd: SshdServer) -> None:
    data, config, archive = _setup(tmp_path, sshd)
    expected = snapshot(data)
    assert len(expected) > 25
    target = tmp_path / "restore target 'x' $(touch PWNED)" / "deeper"

    result = pullkit.run_cli(config, "restore", "c1", archive, "--target", str(target))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"c1: ok restored archive={archive}" in result.stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o700  # created private
    restored = target / str(data).lstrip("/")
    assert snapshot(restored) == expected
    assert [p for p in pullkit.files_named(tmp_path, "PWNED") if p.parent != data] == []
    assert list((sshd.workdir / "rsock").iterdir()) == []  # the remote socket is gone
    assert list((tmp_path / "run").iterdir()) == []  # and the local one
    with History.open(tmp_path / "state") as history:
        run = history.last_run("c1")
        assert run is not None
        assert (run.kind, run.trigger, run.archive, str(run.result)) == (
            "restore",
            "restore",
            archive,
            "ok",
        )
        assert run.stats.nfiles == len(expected) + 1  # and the backed-up directory itself


def test_restore_of_some_paths_refuses_a_non_empty_target_unless_forced(
    tmp_path: Path, sshd: SshdServer
) -> None:
    data, config, archive = _setup(tmp_path, sshd)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep-me").write_text("mine\n")
    only = str(data / "dir with space" / "$(id)")

    refused = pullkit.run_cli(config, "restore", "c1", archive, only, "--target", str(target))

    assert refused.returncode == 2, refused.stdout
    assert "is not empty; use --force" in refused.stdout
    assert sorted(p.name for p in target.iterdir()) == ["keep-me"]

    dry = pullkit.run_cli(config, "restore", "c1", archive, "--dry-run", "--target", str(target))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would restore" in dry.stdout
    assert sorted(p.name for p in target.iterdir()) == ["keep-me"]

    forced = pullkit.run_cli(
        config, "restore", "c1", archive, only, "--force", "--target", str(target)
    )
    assert forced.returncode == 0, forced.stdout + forced.stderr
    restored = target / only.lstrip("/")
    assert snapshot(restored) == snapshot(data / "dir with space" / "$(id)")
    assert snapshot(restored)  # not vacuous: the leaf file is in it
    assert not (target / str(data).lstrip("/") / "plain.txt").exists()  # only that path
    assert (target / "keep-me").read_text() == "mine\n"

    missing = pullkit.run_cli(
        config, "restore", "c1", "no-such-archive", "--target", "/nonexistent-x"
    )
    assert missing.returncode == 2
    assert "borg extract failed" in missing.stdout
    runs = json.loads(pullkit.run_cli(config, "history", "c1", "--json").stdout)
    assert [(r["kind"], r["result"]) for r in runs[:4]] == [
        ("restore", "failed"),
        ("restore", "ok"),
        ("restore", "ok"),
        ("restore", "failed"),
    ]
