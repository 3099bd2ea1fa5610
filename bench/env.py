"""The bench's world: one temp directory, one sshd, and every process we start, cleaned up always.

Everything lives under ``/tmp/borgtunnel-bench-*``: the sshd (tests/sshd.py, throwaway keys,
``BORG_BASE_DIR`` of the "client" side set by sshd's ``SetEnv``), the datasets, the repositories,
the server-side sockets and borgtunnel's state. ``Workspace.close`` stops our own processes by
their process group (each is started in its own session), stops sshd with everything its
sessions started, and removes the directory, also after an exception or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.sshd import SshdServer, known_hosts_line, public_key, start_sshd, stop_sshd

REPO_ROOT = Path(__file__).resolve().parent.parent
BORG = shutil.which("borg") or "/usr/bin/borg"
# borg 2, built by scripts/setup (tests/borg2-version.txt), for the opt-in pull2/local2 methods.
BORG2 = str(
    REPO_ROOT
    / ".borg"
    / (REPO_ROOT / "tests" / "borg2-version.txt").read_text().strip()
    / "bin"
    / "borg"
)
BORGTUNNEL = str(Path(sys.executable).parent / "borgtunnel")

# 16 clients connect at once in the concurrency test; sshd's default MaxStartups (10:30:100)
# would randomly drop connections beyond 10 unauthenticated ones. A real fleet has one sshd per
# client, so raising it here models that rather than helping us.
SSHD_EXTRA = ("MaxStartups 100", "MaxSessions 64")


class BenchError(RuntimeError):
    """A step of the bench failed; the message carries the command and its output."""


@dataclass(frozen=True)
class Completed:
    seconds: float
    stdout: str
    stderr: str


class Workspace:
    """Owner of the temp dir, the sshd and every child process of the bench."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="borgtunnel-bench-", dir="/tmp"))
        self._procs: list[subprocess.Popen[bytes]] = []
        self.sshd: SshdServer | None = None
        self.local_base = self.mkdir("local-base")  # BORG_BASE_DIR of server-side borg
        self.known_hosts = self.root / "known_hosts"

    def mkdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    # --- sshd -------------------------------------------------------------------------

    def start_sshd(self) -> SshdServer:
        self.sshd = start_sshd(self.root / "sshd", extra_config=SSHD_EXTRA)
        self.known_hosts.write_text(self.sshd.known_hosts.read_text())
        return self.sshd

    def trust_port(self, port: int) -> None:
        """Trust the sshd's host key on another port too (the delay proxy's)."""
        assert self.sshd is not None
        line = known_hosts_line(self.sshd.host, port, public_key(self.sshd.host_key))
        with self.known_hosts.open("a") as out:
            out.write(line)

    def ssh_argv(self, port: int, *options: str) -> list[str]:
        """OpenSSH client argv with the compiled-in defaults (-F none): what a user would get."""
        assert self.sshd is not None
        return [
            "ssh",
            *self.sshd.ssh_options(known_hosts=self.known_hosts),
            "-o",
            "ExitOnForwardFailure=yes",
            "-p",
            str(port),
            *options,
            f"{self.sshd.user}@{self.sshd.host}",
        ]

    # --- processes --------------------------------------------------------------------

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            **os.environ,
            "BORG_BASE_DIR": str(self.local_base),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "LANG": "C.UTF-8",
        }
        env.update(extra or {})
        return env

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[bytes] | None = subprocess.PIPE,
        stderr: int | IO[bytes] | None = subprocess.PIPE,
        stdin: int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """A tracked background process in its own session (so its group can be killed)."""
        process = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else self.env(),
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self._procs.append(process)
        return process

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 900,
        check: bool = True,
    ) -> Completed:
        """Run to completion and time it (wall clock, from spawn to exit)."""
        started = time.perf_counter()
        process = self.spawn(argv, env=env)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(process)
            raise BenchError(f"timed out after {timeout}s: {shlex.join(argv)}") from None
        seconds = time.perf_counter() - started
        self._procs.remove(process)
        result = Completed(seconds, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and process.returncode != 0:
            raise BenchError(
                f"exit {process.returncode}: {shlex.join(argv)}\n"
                f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
            )
        return result

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL after ``timeout``; reap."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        else:
            # The leader is gone; stragglers of its group (e.g. socat's forks) may remain.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        if process in self._procs:
            self._procs.remove(process)

    def close(self) -> None:
        for process in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                self.stop(process)
        if self.sshd is not None:
            try:
                stop_sshd(self.sshd)
            finally:
                self.sshd = None
                shutil.rmtree(self.root, ignore_errors=True)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    """A Workspace that is closed however the bench ends (SIGTERM and SIGHUP included)."""
    previous = {
        sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    ws = Workspace()
    try:
        yield ws
    finally:
        # A second Ctrl-C during cleanup must not leave sshd running.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            ws.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def wait_for_path(path: Path, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Until ``path`` exists (a listener is up); fail early if its process died."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise BenchError(f"{process.args!r} exited with {process.returncode}: {err}")
        if time.monotonic() > deadline:
            raise BenchError(f"{path} did not appear within {timeout}s")
        time.sleep(0.005)
