"""A real systemd as PID 1: ``systemd-nspawn`` boots this machine's own root, made writable by an
overlay whose upper layer is a tmpfs, so every write inside is lost at the end.

Recipe (/work/shared/NOTES.md, "A real systemd here"): nspawn refuses ``-D /`` and
``--volatile=overlay`` on ``/``, so the overlay is mounted by hand; the host may have no systemd
or D-Bus, so ``--register=no --keep-unit``, and the container is entered with ``nsenter`` into
the namespaces of its PID 1 rather than with ``machinectl``/``systemctl -M``. Services that
would start by themselves in a copy of this machine (its sshd, databases, apt and other timers)
are masked on the kernel-style command line; there is no network inside but loopback.

Cleanup does not depend on Python reaching a ``finally``: both mounts are made in a private
mount namespace that only nspawn lives in (``unshare -m``), so they vanish with it, and nspawn
gets SIGTERM (which powers the container off) if the test process dies (``setpriv
--pdeathsig``). :meth:`Container.shut_down` powers off, waits, kills what is left and removes
nspawn's own state for this machine under ``/run/systemd/nspawn`` (it stays where ``/run`` is
not a tmpfs).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NSPAWN_STATE = Path("/run/systemd/nspawn")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Units of this machine that would start by themselves in the container and have nothing to do
# with the test (or would fight it for the loopback port 22). Masking a unit that does not
# exist is harmless. Every timer the image enables is masked too (see _enabled_timers).
MASKED = (
    "ssh.service",
    "ssh.socket",
    "postgresql.service",
    "mariadb.service",
    "mysql.service",
    "cron.service",
    "e2scrub_reap.service",
    "systemd-timesyncd.service",
    "console-getty.service",
)
BOOT_TIMEOUT = 60.0
POWEROFF_TIMEOUT = 30.0


class NspawnUnusableError(Exception):
    """nspawn could not boot a container on this machine; the reason says why."""


def missing_tools() -> list[str]:
    tools = ("systemd-nspawn", "nsenter", "unshare", "setpriv", "mount")
    return [t for t in tools if shutil.which(t, path=CONTAINER_PATH) is None]


def _enabled_timers() -> list[str]:
    wants = Path("/etc/systemd/system/timers.target.wants")
    return sorted(p.name for p in wants.glob("*.timer")) if wants.is_dir() else []


@dataclass
class Container:
    """A booted container: ``run`` executes a shell script inside, as root."""

    machine: str
    nspawn: subprocess.Popen[bytes]
    log: Path
    pid1: int = 0
    base_env: dict[str, str] = field(default_factory=dict)

    def run(
        self,
        script: str,
        *,
        check: bool = True,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` (dedented) with bash -euo pipefail in every namespace of the container."""
        environment = {
            "PATH": CONTAINER_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            **self.base_env,
            **(env or {}),
        }
        argv = [
            "nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-C",
            "--",
            "env", "-i", *(f"{k}={v}" for k, v in environment.items()),
            "bash", "-euo", "pipefail", "-c", f"cd {shlex.quote(cwd)}\n{textwrap.dedent(script)}",
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(
                f"in the container, exit {done.returncode}:\n{script}\n"
                f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
            )
        return done

    def shut_down(self) -> None:
        """Power off, wait for nspawn, kill what is left, remove nspawn's state for it."""
        if self.nspawn.poll() is None and self.pid1:
            with contextlib.suppress(subprocess.SubprocessError, AssertionError):
                self.run("systemctl --no-block poweroff", timeout=10)
        try:
            self.nspawn.wait(timeout=POWEROFF_TIMEOUT)
        except subprocess.TimeoutExpired:
            # SIGKILL of PID 1 ends the whole pid namespace; then nspawn exits on its own.
            if self.pid1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGKILL)
            try:
                self.nspawn.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=10)
        remove_nspawn_state(self.machine)


def remove_nspawn_state(machine: str) -> None:
    """nspawn's files for ``machine`` (and its image lock files, which are per boot)."""
    for leftover in (NSPAWN_STATE / "propagate" / machine, NSPAWN_STATE / "unix-export" / machine):
        shutil.rmtree(leftover, ignore_errors=True)
    for directory in (
        NSPAWN_STATE / "propagate",
        NSPAWN_STATE / "unix-export",
        NSPAWN_STATE / "locks",
        NSPAWN_STATE,
    ):
        # Only if empty: a container booted by someone else keeps its state.
        with contextlib.suppress(OSError):
            directory.rmdir()


# (host path, path inside, read-only)
Bind = tuple[Path, str, bool]


def _boot_argv(machine: str, scratch: Path, binds: Sequence[Bind]) -> list[str]:
    root = scratch / "root"
    layers = scratch / "layers"
    mount_script = (
        f"mount -t tmpfs -o mode=0755 bt-layers {shlex.quote(str(layers))} && "
        f"mkdir {shlex.quote(str(layers / 'upper'))} {shlex.quote(str(layers / 'work'))} && "
        f"mount -t overlay bt-root -o lowerdir=/,upperdir={layers / 'upper'},"
        f'workdir={layers / "work"} {shlex.quote(str(root))} && exec "$@"'
    )
    masks = [f"systemd.mask={unit}" for unit in (*MASKED, *_enabled_timers())]
    nspawn = [
        "systemd-nspawn", "-D", str(root), f"--machine={machine}",
        "--register=no", "--keep-unit", "-b", "--private-network", "--console=passive",
        *(f"--bind{'-ro' if ro else ''}={host}:{inside}" for host, inside, ro in binds),
        "systemd.unit=multi-user.target", *masks,
    ]  # fmt: skip
    return [
        "setpriv", "--pdeathsig", "TERM", "--",
        "unshare", "-m", "--propagation", "private", "--",
        "sh", "-c", mount_script, "sh", *nspawn,
    ]  # fmt: skip


def _container_pid1(nspawn_pid: int) -> int:
    """The child of nspawn that is PID 1 of its own pid namespace (nspawn's short-lived setup
    child is not)."""
    children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children")
    with contextlib.suppress(OSError, ValueError):
        for word in children.read_text().split():
            status = Path(f"/proc/{word}/status").read_text()
            nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
            if nspid.split()[1:] == [word, "1"]:
                return int(word)
    return 0


@contextlib.contextmanager
def booted(machine: str, scratch: Path, *, binds: Sequence[Bind] = ()) -> Iterator[Container]:
    """Boot a container of this machine's root; always shut it down and clean up."""
    (scratch / "root").mkdir(parents=True)
    (scratch / "layers").mkdir()
    log = scratch / "nspawn.log"
    with log.open("wb") as sink:
        nspawn = subprocess.Popen(
            _boot_argv(machine, scratch, binds), stdout=sink, stderr=subprocess.STDOUT
        )
    container = Container(machine=machine, nspawn=nspawn, log=log)
    try:
        _wait_booted(container)
        yield container
    finally:
        container.shut_down()


def _wait_booted(container: Container) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if container.nspawn.poll() is not None:
            tail = container.log.read_text(errors="replace").strip().splitlines()[-5:]
            raise NspawnUnusableError(
                f"systemd-nspawn exited with {container.nspawn.returncode}: " + " | ".join(tail)
            )
        if not container.pid1:
            container.pid1 = _container_pid1(container.nspawn.pid)
        state = ""
        if container.pid1:
            done = container.run(
                "systemctl is-system-running --wait", check=False, timeout=BOOT_TIMEOUT
            )
            # Before its bus is up, systemctl answers "offline" or nothing: ask again.
            state = (done.stdout + done.stderr).strip()
            if done.stdout.strip() in {"running", "degraded"}:
                return
        time.sleep(0.2)
    raise AssertionError(f"container did not finish booting in {BOOT_TIMEOUT:.0f} s: {state}")
