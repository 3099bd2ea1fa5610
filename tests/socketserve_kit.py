"""Helpers for ``borgtunnel serve`` tests: a real serve process, a real borg client, sd_notify.

The borg client reaches the socket exactly as on a pulled client: BORG_RSH is borgtunnel's own
``sh -c 'exec nc -N -U "$BORGTUNNEL_SOCKET"'`` and the repository URL is ``ssh://borgtunnel/PATH``;
no sshd is involved because the socket is local. Every process a serve starts carries a marker
variable, so teardown (and the tests) can find ``borg serve`` children that setsid away from us.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from borgtunnel import borg

BORGTUNNEL = Path(sys.executable).with_name("borgtunnel")
MARKER_VAR = "BORGTUNNEL_TEST_SERVE"
BORG_TIMEOUT = 60.0
# Never inherited from whatever runs the tests: each test decides what serve gets.
_SYSTEMD_VARIABLES = frozenset({"NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"})


def write_config(
    path: Path, repositories: Mapping[str, Path], *, stop_timeout: float = 5.0
) -> Path:
    """A config whose clients (unencrypted) are served from ``repositories``."""
    lines = [
        "[server]",
        f'socket_dir = "{path.parent / "run"}"',
        f'state_dir = "{path.parent / "state"}"',
        f"serve_stop_timeout = {stop_timeout}",
    ]
    for name, repository in repositories.items():
        lines += [
            "",
            f"[clients.{name}]",
            'host = "client.invalid"',
            f'repository = "{repository}"',
            'paths = ["/srv"]',
            'encryption = "none"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def init_repository(repository: Path, base_dir: Path) -> None:
    """``borg init`` locally, with its own BORG_BASE_DIR so clients see the repo as new."""
    env = {**os.environ, "BORG_BASE_DIR": str(base_dir)}
    subprocess.run(
        ["borg", "init", "--encryption=none", "--make-parent-dirs", str(repository)],
        env=env,
        check=True,
        capture_output=True,
        timeout=BORG_TIMEOUT,
    )


def client_env(socket_path: Path, base_dir: Path) -> dict[str, str]:
    """The environment borgtunnel gives a pulled client's borg, pointed at ``socket_path``."""
    env = dict(os.environ)
    env.update(borg.client_env(encrypted=False))
    # What the remote run script exports after choosing nc (borgtunnel/client/remote.py).
    env[borg.SOCKET_VAR] = str(socket_path)
    env["BORG_RSH"] = borg.RSH_BY_TOOL["nc"]
    env["BORG_BASE_DIR"] = str(base_dir)
    return env


def borg_client(
    args: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["borg", *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=BORG_TIMEOUT,
        check=False,
    )


def url(repository: Path, archive: str | None = None) -> str:
    base = borg.repository_url(repository)
    return f"{base}::{archive}" if archive else base


def make_tree(root: Path) -> Path:
    """A few files: text, incompressible bytes, an empty file, a nested directory."""
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "hello.txt").write_text("hello from the client\n")
    (root / "with space & 'quote'.txt").write_text("odd name\n")
    (root / "nested" / "deeper" / "random.bin").write_bytes(os.urandom(300_000))
    (root / "empty").write_bytes(b"")
    return root


def tree_contents(root: Path) -> dict[str, bytes | None]:
    """Relative path -> bytes (None for a directory): what must survive a round trip."""
    contents: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        contents[rel] = None if path.is_dir() else path.read_bytes()
    return contents


def file_digests(directory: Path) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return sock


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class NotifySocket:
    """A stand-in for systemd's ``$NOTIFY_SOCKET``: collects the datagrams sent to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self.messages: list[str] = []

    def _drain(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            self.messages.extend(data.decode().splitlines())

    def wait_for(self, message: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            self._drain()
            return message in self.messages

        wait_until(seen, timeout, f"{message!r} on NOTIFY_SOCKET (got {self.messages})")

    def all(self) -> list[str]:
        self._drain()
        return list(self.messages)

    def close(self) -> None:
        self._sock.close()


@dataclass
class ServeProcess:
    """A running ``borgtunnel serve`` (possibly still waiting in systemd-socket-activate)."""

    process: subprocess.Popen[bytes]
    stderr_path: Path
    marker: str
    argv: list[str] = field(default_factory=list)

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def events(self) -> list[dict[str, object]]:
        """borgtunnel's JSON log lines (other stderr lines are skipped)."""
        events = []
        for line in self.stderr().splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    events.append(item)
        return events

    def terminate(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)


def serve_environment(
    marker: str, *, borg_base_dir: Path, notify_socket: Path | None
) -> dict[str, str]:
    env = {MARKER_VAR: marker, "BORG_BASE_DIR": str(borg_base_dir), "LANG": "C.UTF-8"}
    if notify_socket is not None:
        env["NOTIFY_SOCKET"] = str(notify_socket)
    return env


def start_serve(
    *,
    config: Path,
    workdir: Path,
    serve_args: Iterable[str] = (),
    activate: Sequence[tuple[Path, str]] = (),
    notify_socket: Path | None = None,
) -> ServeProcess:
    """Start ``borgtunnel serve``; with ``activate`` [(path, fd name)] via systemd-socket-activate.

    systemd-socket-activate listens on each path and execs the command (same pid) on the first
    connection, with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES and only the variables given by -E.
    """
    marker = str(workdir)
    extra = serve_environment(
        marker, borg_base_dir=workdir / "serve-base", notify_socket=notify_socket
    )
    command = [str(BORGTUNNEL), "--config", str(config), "--log-format", "json", "serve"]
    command += list(serve_args)
    env = {key: value for key, value in os.environ.items() if key not in _SYSTEMD_VARIABLES}
    if activate:
        argv = ["systemd-socket-activate"]
        argv += [f"--listen={path}" for path, _ in activate]
        argv.append("--fdname=" + ":".join(name for _, name in activate))
        argv += [f"--setenv={key}={value}" for key, value in extra.items()]
        argv += command
    else:
        argv = command
        env.update(extra)
    stderr_path = workdir / f"serve-{time.monotonic_ns()}.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
        )
    return ServeProcess(process, stderr_path, marker, argv)


def wait_for_socket(path: Path, timeout: float = 10.0) -> None:
    wait_until(path.is_socket, timeout, f"{path} to appear")


def _process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def marked_processes(marker: str) -> dict[int, list[str]]:
    """Live (non-zombie) processes carrying ``MARKER_VAR=marker``: pid -> argv."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        state = _process_state(int(entry.name))
        if needle in environ and state not in (None, "Z", "X"):
            found[int(entry.name)] = [part.decode(errors="replace") for part in argv if part]
    return found


def borg_serve_children(marker: str) -> dict[int, list[str]]:
    return {pid: argv for pid, argv in marked_processes(marker).items() if "serve" in argv[1:3]}


def stop_serve(serve: ServeProcess, *, timeout: float = 10.0) -> None:
    """Teardown: SIGTERM, then SIGKILL the group, then SIGKILL any marked leftover."""
    if serve.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            serve.process.send_signal(signal.SIGTERM)
        try:
            serve.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(serve.process.pid, signal.SIGKILL)
            serve.process.wait(timeout=timeout)
    for pid in marked_processes(serve.marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def held_connection(path: Path) -> Iterator[socket.socket]:
    """A client that connects and says nothing: its ``borg serve`` waits for it."""
    sock = connect(path)
    try:
        yield sock
    finally:
        sock.close()
