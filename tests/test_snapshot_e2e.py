"""Filesystem snapshots around a real pull (docs/snapshots.md): Btrfs on a loop device, LVM where
device-mapper exists, through the real sshd fixture and real borg; the archive is read back with
the server's borg.

Root only; each test skips with the reason when the kernel or the tools lack what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from borgtunnel.config import load_config
from borgtunnel.runs.pull import pull
from tests import borgs, pullkit, snapfs
from tests.conftest import Spawn
from tests.sshd import SshdServer
from tests.test_borg2 import Borg2

pytestmark = pytest.mark.sshd

# Rewrites BIG (8-byte generation + random bytes) and then SMALL ("GEN SHA256-of-BIG"), each by
# write-then-rename, for ever. At every instant BIG's generation is SMALL's or one more; a copy
# that reads the two at different moments (a live backup) breaks that, a snapshot cannot.
WRITER = r"""
import hashlib, os, sys
d = sys.argv[1]
gen = 0
while True:
    gen += 1
    big = gen.to_bytes(8, "big") + os.urandom(4 * 1024 * 1024)
    with open(os.path.join(d, "big.tmp"), "wb") as f:
        f.write(big)
    os.rename(os.path.join(d, "big.tmp"), os.path.join(d, "big"))
    with open(os.path.join(d, "small.tmp"), "w") as f:
        f.write(f"{gen} {hashlib.sha256(big).hexdigest()}\n")
    os.rename(os.path.join(d, "small.tmp"), os.path.join(d, "small"))
"""


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[Path]:
    reason = snapfs.btrfs_missing()
    if reason is not None:
        pytest.skip(reason)
    with snapfs.btrfs(tmp_path / "btrfs") as mount:
        yield mount


def _config(tmp_path: Path, sshd: SshdServer, paths: list[Path], **client: object) -> Path:
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    table = pullkit.client_table(sshd, "c1", repo, paths, **client)
    return pullkit.write_config(
        tmp_path / "bt.toml", clients={"c1": table}, **pullkit.base_config(tmp_path, sshd)
    )


def _consistent(big: bytes, small: str) -> int:
    """The invariant; returns BIG's generation."""
    gen_small, digest = small.split()
    gen_big = int.from_bytes(big[:8], "big")
    if gen_big == int(gen_small):
        assert hashlib.sha256(big).hexdigest() == digest, "big and small disagree: a torn copy"
    else:
        assert gen_big == int(gen_small) + 1, f"torn copy: big {gen_big}, small {gen_small}"
    return gen_big


def _gen(data: Path) -> int:
    for _ in range(100):  # the writer may be between its two renames' writes
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((data / "small").read_text().split()[0])
        time.sleep(0.01)
    raise AssertionError("the writer never wrote small")


def _no_leftovers(mount: Path, sshd: SshdServer, *kept: str) -> None:
    assert snapfs.subvolumes(mount) == sorted(kept)
    stage = sshd.workdir / "rsock"
    assert not stage.exists() or list(stage.iterdir()) == []


def test_btrfs_snapshot_gives_a_consistent_archive_under_the_original_paths(
    tmp_path: Path, sshd: SshdServer, btrfs: Path, spawn: Spawn
) -> None:
    data = snapfs.create_subvolume(btrfs / "data")
    pullkit.make_client_data(data / "tree")
    writer = spawn(sys.executable, "-c", WRITER, str(data))
    before = _gen(data)
    config = _config(tmp_path, sshd, [data], snapshot="btrfs")

    result = pullkit.run_cli(config, "pull", "c1")

    after = _gen(data)
    writer.kill()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("c1: ok archive="), result.stdout
    repo = tmp_path / "repos" / "c1"
    (name,) = pullkit.archives(tmp_path, repo)
    pullkit.extract(tmp_path, repo, name, tmp_path / "restored")
    restored = tmp_path / "restored" / str(data).lstrip("/")  # the original path, untranslated
    gen = _consistent((restored / "big").read_bytes(), (restored / "small").read_text())
    assert before <= gen <= after
    # A snapshot is what a power cut would leave: the writer's temporary files may be there.
    names = {p.name for p in restored.iterdir()} - {"big.tmp", "small.tmp"}
    assert names == {"big", "small", "tree"}
    pullkit.assert_same_tree(data / "tree", tmp_path / "restored")
    _no_leftovers(btrfs, sshd, "data")


def test_path_not_on_btrfs_fails_the_run_unless_fallback(
    tmp_path: Path, sshd: SshdServer, btrfs: Path
) -> None:
    snapshotted = snapfs.create_subvolume(btrfs / "data")
    (snapshotted / "f").write_text("on btrfs\n")
    live = tmp_path / "live-data"
    live.mkdir()
    (live / "g").write_text("not on btrfs\n")
    config = _config(tmp_path, sshd, [snapshotted, live], snapshot="btrfs")

    failed = pullkit.run_cli(config, "pull", "c1")

    assert failed.returncode == 2, failed.stderr
    assert f"cannot snapshot {live}: it is on" in failed.stdout, failed.stdout
    assert "snapshot_fallback" in failed.stdout
    assert pullkit.archives(tmp_path, tmp_path / "repos" / "c1") == []
    _no_leftovers(btrfs, sshd, "data")  # the snapshot of data was taken, then removed

    on = 'snapshot = "btrfs"'
    config.write_text(config.read_text().replace(on, f"{on}\nsnapshot_fallback = true"))
    warned = pullkit.run_cli(config, "pull", "c1")

    assert warned.returncode == 1, warned.stderr
    assert warned.stdout.startswith("c1: warning archive="), warned.stdout
    assert "backing up the live files" in warned.stdout + warned.stderr
    (name,) = pullkit.archives(tmp_path, tmp_path / "repos" / "c1")
    pullkit.extract(tmp_path, tmp_path / "repos" / "c1", name, tmp_path / "restored")
    pullkit.assert_same_tree(snapshotted, tmp_path / "restored")
    pullkit.assert_same_tree(live, tmp_path / "restored")
    _no_leftovers(btrfs, sshd, "data")


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_stale_snapshots_are_swept_only_for_dead_runs_of_this_client(
    tmp_path: Path, sshd: SshdServer, btrfs: Path, spawn: Spawn
) -> None:
    data = snapfs.create_subvolume(btrfs / "data")
    (data / "f").write_text("x\n")
    dead = _dead_pid()
    holder = spawn("sh", "-c", "sleep 60", "borgtunnel-run-holder")  # a live "run"
    stale = snapfs.snapshot_subvolume(data, data / f".borgtunnel-snap-c1-{dead}")
    live = snapfs.snapshot_subvolume(data, data / f".borgtunnel-snap-c1-{holder.pid}")
    other = snapfs.snapshot_subvolume(data, data / f".borgtunnel-snap-c1-x-{dead}")
    config = _config(tmp_path, sshd, [data / "f"], snapshot="btrfs")

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    assert not stale.exists()
    assert live.exists()  # a live run's
    assert other.exists()  # client "c1-x"'s
    assert "left by an earlier run" in result.stderr


async def test_killed_run_leaves_a_snapshot_the_next_run_removes(
    tmp_path: Path, sshd: SshdServer, btrfs: Path
) -> None:
    """SIGKILL the client's run script while borg reads a FIFO (from the snapshot: no writer,
    so it blocks): no trap runs, the snapshot stays; the next pull sweeps it."""
    data = snapfs.create_subvolume(btrfs / "data")
    (data / "a").write_text("a\n")
    os.mkfifo(data / "fifo")
    config_path = _config(tmp_path, sshd, [data], snapshot="btrfs", create_args=["--read-special"])
    config = load_config(config_path)
    pid_file = sshd.workdir / "rsock" / "c1.sock.pid"

    task = asyncio.create_task(pull(config, config.client("c1")))
    script_pid = None
    for _ in range(200):  # until borg runs: the pid file then holds "SHELLPID BORGPID"
        await asyncio.sleep(0.05)
        with contextlib.suppress(FileNotFoundError, ValueError):
            words = pid_file.read_text().split()
            if len(words) == 2:
                script_pid = int(words[0])
                break
    assert script_pid is not None, "the pull never reached borg create"
    (snapshot,) = [p for p in data.iterdir() if p.name.startswith(".borgtunnel-snap-c1-")]
    os.kill(script_pid, signal.SIGKILL)
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert snapshot.exists()  # nothing removed it: the script was killed

    (data / "fifo").unlink()
    result = await asyncio.to_thread(pullkit.run_cli, config_path, "pull", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    assert not snapshot.exists()
    _no_leftovers(btrfs, sshd, "data")


async def test_cancelled_pull_removes_its_snapshot(
    tmp_path: Path, sshd: SshdServer, btrfs: Path
) -> None:
    data = snapfs.create_subvolume(btrfs / "data")
    os.mkfifo(data / "fifo")
    config = load_config(
        _config(tmp_path, sshd, [data], snapshot="btrfs", create_args=["--read-special"])
    )
    create = "--read-special -- ssh://borgtunnel"

    task = asyncio.create_task(pull(config, config.client("c1")))
    for _ in range(200):
        await asyncio.sleep(0.05)
        if pullkit.processes_mentioning(create) and snapfs.subvolumes(btrfs) != ["data"]:
            break
    await asyncio.sleep(0.3)
    assert len(snapfs.subvolumes(btrfs)) == 2, "the pull never took its snapshot"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    for _ in range(150):  # the script removes the snapshot once borg has gone (it waits <= 10 s)
        if snapfs.subvolumes(btrfs) == ["data"]:
            break
        await asyncio.sleep(0.1)
    _no_leftovers(btrfs, sshd, "data")


def test_lvm_snapshot_gives_the_archive_under_the_original_paths(
    tmp_path: Path, sshd: SshdServer
) -> None:
    reason = snapfs.lvm_missing()
    if reason is not None:
        pytest.skip(reason)
    vg = f"bttest{os.getpid()}"
    with (
        snapfs.lvm(tmp_path / "lvm", vg) as (_, device),
        snapfs.mounted(device, tmp_path / "lvm" / "mnt") as mount,
    ):
        data = mount / "data"
        pullkit.make_client_data(data)
        config = _config(tmp_path, sshd, [data], snapshot="lvm", lvm_snapshot_size="20M")

        result = pullkit.run_cli(config, "pull", "c1")

        assert result.returncode == 0, result.stdout + result.stderr
        repo = tmp_path / "repos" / "c1"
        (name,) = pullkit.archives(tmp_path, repo)
        pullkit.extract(tmp_path, repo, name, tmp_path / "restored")
        pullkit.assert_same_tree(data, tmp_path / "restored")
        lvs = snapfs._run("lvs", "--noheadings", "-o", "lv_name", vg).split()
        assert lvs == ["data"]  # the snapshot was removed


@pytest.mark.parametrize("version", [borgs.BUILT[0], borgs.BORG2])
def test_btrfs_snapshot_with_borg_14_and_2_on_both_ends(
    tmp_path: Path, sshd: SshdServer, btrfs: Path, version: str
) -> None:
    """The namespace and its bind mounts are invisible to borg: the same for every version."""
    data = pullkit.make_client_data(snapfs.create_subvolume(btrfs / "data") / "tree")
    if version == borgs.BORG2:
        b2 = Borg2(tmp_path, sshd)
        b2.data = data
        b2.write(paths=[data], snapshot="btrfs")
        init = b2.cli("init", "c1")
        assert init.returncode == 0, init.stderr
        result = b2.cli("pull", "c1")
        assert result.returncode == 0, result.stdout + result.stderr
        (archive,) = b2.archives()
        b2.assert_restores(archive["id"], "restored")  # under the original paths
    else:
        exe = borgs.executable(version)
        repo = tmp_path / "repos" / "c1"
        pullkit.init_repo(tmp_path, repo, exe=exe)
        conf = pullkit.base_config(tmp_path, sshd)
        conf["server"]["borg"] = exe
        table = pullkit.client_table(sshd, "c1", repo, [data], remote_borg=exe, snapshot="btrfs")
        config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
        result = pullkit.run_cli(config, "pull", "c1")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f'"client_borg": "{version}"' in result.stderr
        (name,) = pullkit.archives(tmp_path, repo, exe=exe)
        pullkit.extract(tmp_path, repo, name, tmp_path / "restored", exe=exe)
        pullkit.assert_same_tree(data, tmp_path / "restored")
    _no_leftovers(btrfs, sshd, "data")
