"""Throwaway filesystems for the snapshot tests: Btrfs and LVM on loop devices, root only.

Each context manager removes everything it made (mounts, volume group, loop device) even when
the test fails, and works only inside the directory it is given.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

IMAGE_BYTES = 256 * 1024 * 1024  # mkfs.btrfs wants at least ~114 MiB; the file is sparse


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _kernel_has(fs: str) -> bool:
    with contextlib.suppress(OSError):
        lines = Path("/proc/filesystems").read_text().splitlines()
        return any(line.split()[-1] == fs for line in lines if line.split())
    return False


def btrfs_missing() -> str | None:
    """Why a Btrfs test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts, btrfs snapshots)"
    for tool in ("losetup", "mkfs.btrfs", "btrfs", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (btrfs-progs, util-linux)"
    if not _kernel_has("btrfs"):
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            subprocess.run(["modprobe", "btrfs"], capture_output=True, check=True)
        if not _kernel_has("btrfs"):
            return "the kernel has no btrfs"
    return None


def lvm_missing() -> str | None:
    """Why an LVM test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, device-mapper, mounts)"
    for tool in ("losetup", "pvcreate", "vgcreate", "lvcreate", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (lvm2, e2fsprogs)"
    if not Path("/dev/mapper/control").exists():
        return "no device-mapper here (/dev/mapper/control is missing): LVM snapshots cannot run"
    return None


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    with image.open("wb") as handle:
        handle.truncate(IMAGE_BYTES)
    device = _run("losetup", "--find", "--show", str(image)).strip()
    try:
        yield device
    finally:
        _run("losetup", "--detach", device)


@contextlib.contextmanager
def mounted(device: str, target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    _run("mount", device, str(target))
    try:
        yield target
    finally:
        for _ in range(50):  # a just-ended run's mount namespace may still pin it for a moment
            umount = subprocess.run(["umount", str(target)], capture_output=True, check=False)
            if umount.returncode == 0:
                break
            time.sleep(0.1)
        else:
            _run("umount", "--lazy", str(target))


@contextlib.contextmanager
def btrfs(workdir: Path) -> Iterator[Path]:
    """A fresh Btrfs mounted at WORKDIR/fs (its top-level subvolume)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with loop_device(workdir / "btrfs.img") as device:
        _run("mkfs.btrfs", "-q", device)
        with mounted(device, workdir / "fs") as mount:
            yield mount


def subvolumes(mount: Path) -> list[str]:
    """Every subvolume of the filesystem at MOUNT, as paths below its top."""
    out = _run("btrfs", "subvolume", "list", str(mount))
    return sorted(line.partition(" path ")[2] for line in out.splitlines() if " path " in line)


def create_subvolume(path: Path) -> Path:
    _run("btrfs", "-q", "subvolume", "create", str(path))
    return path


def snapshot_subvolume(source: Path, target: Path) -> Path:
    _run("btrfs", "-q", "subvolume", "snapshot", "-r", str(source), str(target))
    return target


@contextlib.contextmanager
def lvm(workdir: Path, vg: str) -> Iterator[tuple[str, str]]:
    """A volume group VG on a loop device holding one 100 MiB ext4 volume "data": (vg, lv path).

    Removed afterwards with every volume in it, even after a failure.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with loop_device(workdir / "pv.img") as device:
        _run("pvcreate", "-q", device)
        try:
            _run("vgcreate", "-q", vg, device)
            try:
                _run("lvcreate", "-q", "-L", "100M", "-n", "data", vg)
                _run("mkfs.ext4", "-q", f"/dev/{vg}/data")
                yield vg, f"/dev/{vg}/data"
            finally:
                subprocess.run(["vgremove", "-q", "-f", vg], capture_output=True, check=False)
        finally:
            subprocess.run(["pvremove", "-q", "-f", device], capture_output=True, check=False)
