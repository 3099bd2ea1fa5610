"""Helpers for the daemon and status tests: configs, repositories, clocks, process checks.

The daemon's clock is shifted, not faked: ``shifted_now(offset)`` runs at real speed from a
chosen moment, so a test can start the daemon a second before a cron time and the real
scheduler, the real sleep and real pulls do the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from borgtunnel.history import History, RunRecord, RunResult
from borgtunnel.scheduling.daemon import Daemon
from tests.sshd import SshdServer, generate_key, is_alive

REPO_ROOT = Path(__file__).resolve().parent.parent
BORGTUNNEL = str(Path(sys.executable).parent / "borgtunnel")

# A Monday; the daemon's clock is moved to just before 02:00 UTC on this day.
FIRE_AT = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


# --- clocks ------------------------------------------------------------------------------


def clock_offset(fire_at: datetime, in_seconds: float) -> float:
    """Seconds to add to real time so that ``fire_at`` comes ``in_seconds`` from now."""
    return (fire_at - datetime.now(UTC)).total_seconds() - in_seconds


class ShiftedClock:
    """Real time plus ``offset`` seconds; ``jump`` moves it like an NTP step would."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self.offset, UTC)

    def jump(self, seconds: float) -> None:
        self.offset += seconds


def shifted_now(offset: float) -> ShiftedClock:
    return ShiftedClock(offset)


# --- configuration -----------------------------------------------------------------------


def _toml(value: object) -> str:
    # JSON strings, numbers, booleans and arrays are valid TOML values.
    return json.dumps(value.as_posix() if isinstance(value, Path) else value)


def render_config(tables: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in keys.items())
        lines.append("")
    return "\n".join(lines)


def write_config(
    path: Path,
    root: Path,
    *,
    clients: Mapping[str, Mapping[str, Any]],
    sshd: SshdServer | None = None,
    daemon: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
) -> Path:
    """A config whose server state lives under ``root``; the daemon zone is UTC by default."""
    tables: dict[str, Mapping[str, Any]] = {
        "server": {
            "socket_dir": root / "sock",
            "state_dir": root / "state",
            "serve_stop_timeout": 5,
            **(server or {}),
        },
        "daemon": {"timezone": "UTC", **(daemon or {})},
    }
    if sshd is not None:
        tables["ssh"] = {
            "identity": sshd.client_key,
            "known_hosts": sshd.known_hosts,
            "connect_timeout": 10,
        }
    else:
        # Real (empty) trust files, so that a pull gets as far as the network: a missing file
        # is a local error, which is not retried like an offline client.
        tables["ssh"] = {"identity": root / "id_ed25519", "known_hosts": root / "known_hosts"}
        if not (root / "id_ed25519").exists():
            generate_key(root / "id_ed25519", "borgtunnel-test")
            (root / "known_hosts").write_text("")
    for name, keys in clients.items():
        tables[f"clients.{name}"] = keys
    path.write_text(render_config(tables))
    return path


def offline_client(repo: Path, **extra: Any) -> dict[str, Any]:
    """A client nobody listens for (port 9 on localhost refuses at once)."""
    return {
        "host": "127.0.0.1",
        "port": 9,
        "repository": repo,
        "paths": ["/nonexistent"],
        "encryption": "none",
        **extra,
    }


def sshd_client(
    sshd: SshdServer, name: str, repo: Path, data: Path, **extra: Any
) -> dict[str, Any]:
    """A client reached through the test sshd (on this machine), backing up ``data``."""
    return {
        "host": sshd.host,
        "port": sshd.port,
        "user": sshd.user,
        "repository": repo,
        "paths": [str(data)],
        "encryption": "none",
        "archive": f"{name}-{{now}}",
        "remote_socket": str(sshd.workdir / "remote" / f"{name}.sock"),
        **extra,
    }


def slow_create_args(kib_per_second: int) -> list[str]:
    """borg throttles its uploads: a pull that stays in borg create for a while, actively."""
    return ["--upload-ratelimit", str(kib_per_second)]


# --- repositories and data ---------------------------------------------------------------


def server_env(root: Path) -> dict[str, str]:
    """Environment for borg on the server side, kept out of the real home directory."""
    return {
        **os.environ,
        "BORG_BASE_DIR": str(root / "borg-server"),
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    }


def make_repo(root: Path, name: str) -> Path:
    repo = root / "repos" / name
    repo.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["borg", "init", "-e", "none", str(repo)],
        env=server_env(root),
        check=True,
        capture_output=True,
        timeout=60,
    )
    return repo


def make_data(root: Path, name: str, *, random_bytes: int = 0) -> Path:
    data = root / "data" / name
    data.mkdir(parents=True)
    (data / "notes.txt").write_text(f"data of {name}\n")
    if random_bytes:
        (data / "blob.bin").write_bytes(os.urandom(random_bytes))
    return data


def archives(root: Path, repo: Path) -> list[str]:
    result = subprocess.run(
        ["borg", "list", "--short", str(repo)],
        env=server_env(root),
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout.split()


def repo_lock_free(root: Path, repo: Path) -> bool:
    """borg itself can take the repository lock at once (nobody holds it, no stale lock)."""
    result = subprocess.run(
        ["borg", "with-lock", "--lock-wait", "1", str(repo), "true"],
        env=server_env(root),
        capture_output=True,
        check=False,
        timeout=60,
    )
    return result.returncode == 0


def borg_processes(repo: Path) -> set[int]:
    """Live processes with ``borg`` and the repository path on their command line: the server's
    ``borg serve`` and the client's ``borg create`` (its URL names the path)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "borg" in cmdline and str(repo) in cmdline and is_alive(int(entry.name)):
            found.add(int(entry.name))
    return found


# --- waiting -----------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], object], *, within: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(interval)


async def eventually(
    predicate: Callable[[], object], *, within: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


async def run_cli(*args: str, limit: float = 60) -> subprocess.CompletedProcess[str]:
    """The real ``borgtunnel`` command in a child process, without blocking the event loop."""
    return await asyncio.to_thread(
        subprocess.run,
        [BORGTUNNEL, *args],
        capture_output=True,
        text=True,
        timeout=limit,
        check=False,
    )


# --- systemd notifications ---------------------------------------------------------------


class NotifyListener:
    """An ``AF_UNIX`` datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)

    def _receive(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        self.messages.append(data.decode())

    def wait_for(
        self, predicate: Callable[[str], bool], *, within: float, what: str, since: int = 0
    ) -> int:
        """Index of the first datagram from ``since`` on (received or arriving) that satisfies
        ``predicate``."""
        deadline = time.monotonic() + within
        seen = since
        while True:
            for index in range(seen, len(self.messages)):
                if predicate(self.messages[index]):
                    return index
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} notification; got {self.messages!r}")
            self._receive(min(left, 0.2))

    def lines(self) -> list[str]:
        return [line for message in self.messages for line in message.splitlines()]


@contextmanager
def notify_listener(path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(path)
    try:
        yield listener
    finally:
        listener.close()


# --- daemon in this process -------------------------------------------------------------


@asynccontextmanager
async def serving(daemon: Daemon) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``daemon.serve()`` as a task until the block ends, then stop it and wait for it.

    If the block fails, the stop is forced (second request) so a hanging run cannot hide the
    failure behind the stop timeout.
    """
    task = asyncio.create_task(daemon.serve())
    ready = asyncio.create_task(daemon.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task in done:
        await task  # raises what stopped it
    if not done:
        task.cancel()
        raise AssertionError("the daemon did not become ready within 15 s")
    try:
        yield task
    except BaseException:
        daemon.request_stop()
        daemon.request_stop()
        raise
    finally:
        daemon.request_stop()
        async with asyncio.timeout(60):
            await task


def runs(state_dir: Path, client: str) -> list[RunRecord]:
    """The client's recorded runs, oldest first.

    Through History.open, like status/history: it creates or migrates the schema under the
    write lock, so reading while a daemon is still creating the database waits instead of
    finding no table (a raw sqlite3.connect here once did).
    """
    with History.open(state_dir) as history:
        return history.last_runs(client, 1000)[::-1]


def finished_runs(state_dir: Path, client: str) -> list[RunRecord]:
    return [run for run in runs(state_dir, client) if run.result is not RunResult.RUNNING]


# --- daemon subprocess -------------------------------------------------------------------


@contextmanager
def daemon_process(
    config: Path,
    log_path: Path,
    *,
    fire_in: float | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``borgtunnel --config CONFIG daemon``; with ``fire_in``, ``tests.daemon_run`` (the same
    ``run_daemon``, signal handlers included) whose clock reaches FIRE_AT that many seconds
    after it started. Killed at exit if still running."""
    if fire_in is None:
        argv = [BORGTUNNEL, "--config", str(config), "--log-format", "json", "daemon"]
    else:
        argv = [sys.executable, "-m", "tests.daemon_run", str(config), str(fire_in)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def log_events(log_path: Path) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (other lines skipped)."""
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def has_event(log_path: Path, name: str) -> bool:
    return any(event.get("event") == name for event in log_events(log_path))
