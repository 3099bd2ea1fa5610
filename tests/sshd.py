"""A real OpenSSH ``sshd`` for end-to-end tests, as a helper module and pytest plugin.

borgtunnel's core is an SSH client that asks a server for a reverse unix-socket forward and runs
``borg create`` there. Mocks cannot tell us how OpenSSH treats stale sockets, disabled forwarding
or dead connections, so the end-to-end tests talk to a throwaway ``sshd`` on 127.0.0.1.

Everything a server needs lives in its own work directory (config, keys, pid file, log, the
``BORG_BASE_DIR`` of remote borg runs): tests never touch ``~/.ssh`` or ``~/.cache``.

Overriding defaults with ``extra_config``: sshd keeps the *first* value it reads for most keywords
(and reads only the *first* ``SetEnv`` line). So for every keyword that ``extra_config`` sets
outside a ``Match`` block, the built-in default line is dropped, and all top-level ``SetEnv``
assignments (defaults and extra) are merged into a single ``SetEnv`` line in which the extra
value of a variable wins. Keywords that only appear inside a ``Match`` block keep their default
globally, which is what a ``Match`` block means. ``Port``, ``ListenAddress``, ``PidFile`` and
``HostKey`` cannot be overridden: the :class:`SshdServer` fields would lie (use ``host_key=``).

Privileges: the fixtures skip unless run as root. sshd itself starts fine unprivileged (no
privilege separation, ``/run/sshd`` not needed) and :func:`start_sshd` does not refuse it, but
logging in through an unprivileged sshd could not be verified here: with ``UsePAM no`` it refused
the only other account ("account is locked") that it accepts when run as root. As root, sshd
runs with privilege separation (``/run/sshd`` is created if missing) and tests log in as root.

Logging in as another user (:meth:`SshdServer.login_as`): sshd reads ``AuthorizedKeysFile``
with the *target user's* privileges, and the default one sits in the work directory under
pytest's root-only ``tmp_path``. Start the server with ``extra_config=[f"AuthorizedKeysFile
{path}"]`` for a ``path`` that user can read (in a directory the test made), write the key
there with :func:`write_authorized_keys`, and log in with ``server.login_as(name)``. Accounts
made by ``useradd`` are locked (``!`` password) and refused with ``UsePAM no``: give them
``-p '*'`` (no password login either way: ``PasswordAuthentication no``).

Teardown kills more than the listener. sshd forks one process per connection and that process
calls ``setsid()``, so it is in neither the listener's process group nor its lifetime; a remote
command whose channel was closed keeps running too. :func:`stop_sshd` therefore signals the
listener's process group, every descendant of the listener, and every process whose environment
carries this server's marker variable (set with ``SetEnv`` for all sessions). Killed orphans
are re-parented to PID 1; where PID 1 does not reap (this sandbox), they stay as zombies, which
count as gone.

Known traps: ``SetEnv PATH=...`` is applied, but a login shell's rc files may prepend to it (bash
reads ``~/.bashrc`` for commands run by sshd; here root's adds pyenv and cargo directories), so
call test programs by absolute path. The readiness probe leaves one "Connection closed by
127.0.0.1" line per start in the log. A failed bind attempt stays in the (appended) log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

HOST = "127.0.0.1"
MARKER_VAR = "BORGTUNNEL_TEST_SSHD"
"""Set to the work directory in every session, so stray remote commands can be found."""

PRIVSEP_DIR = Path("/run/sshd")
START_ATTEMPTS = 5
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

_FIXED_KEYWORDS = frozenset({"port", "listenaddress", "pidfile", "hostkey"})
_UNSAFE_PATH_CHARS = frozenset(" \t\n\"'\\#%")
_BIND_FAILED = "Address already in use"


class SshdError(RuntimeError):
    """sshd could not be configured, started or stopped; the message carries its log."""


class _BindFailedError(SshdError):
    """Another process took the port between picking and binding it; a retry will do."""


@dataclass(frozen=True)
class SshdServer:
    """A running sshd and everything a client needs to reach it and trust it."""

    host: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    host_key: Path
    host_key_fingerprint: str
    workdir: Path
    log_path: Path
    config_path: Path
    pid: int
    process: subprocess.Popen[bytes] = field(repr=False, compare=False)

    def log_text(self) -> str:
        """The sshd log so far, for assertions and failure messages."""
        return self.log_path.read_text(errors="replace")

    def asyncssh_options(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncssh.connect`` that trust only this server.

        ``config=None`` and ``agent_path=None`` keep the real user's ``~/.ssh/config`` and agent
        out of the test.
        """
        return {
            "host": self.host,
            "port": self.port,
            "username": self.user,
            "known_hosts": str(self.known_hosts),
            "client_keys": [str(self.client_key)],
            "config": None,
            "agent_path": None,
        }

    def ssh_options(self, known_hosts: Path | None = None) -> list[str]:
        """OpenSSH client options for this server's key and (by default) its known_hosts, with the
        compiled-in defaults otherwise (``-F none``): no user configuration, no agent, no prompt."""
        return [
            "-F",
            "none",
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=none",
            "-o",
            "StrictHostKeyChecking=yes",
        ]

    def login_as(self, user: str) -> SshdServer:
        """The same server, logged into as ``user`` (see the module docstring)."""
        return dataclasses.replace(self, user=user)

    def ssh_command(self, *remote: str) -> list[str]:
        """An OpenSSH ``ssh`` argv that reaches this server without any user configuration."""
        return [
            "ssh",
            *self.ssh_options(),
            "-p",
            str(self.port),
            f"{self.user}@{self.host}",
            *remote,
        ]


class SshdFactory(Protocol):
    """Type of the ``sshd_factory`` fixture: starts one more server per call."""

    def __call__(
        self, *, extra_config: Sequence[str] = (), host_key: Path | None = None
    ) -> SshdServer:
        """Start a server in a fresh directory under the test's ``tmp_path``."""


# --- tools -------------------------------------------------------------------------------


def find_sshd() -> Path | None:
    """Absolute path of sshd: it refuses to re-exec itself from a relative path."""
    found = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


def missing_tools() -> list[str]:
    """Names of the OpenSSH programs the fixture needs but cannot find."""
    missing = [] if find_sshd() else ["sshd"]
    if shutil.which("ssh-keygen") is None:
        missing.append("ssh-keygen")
    return missing


def _run(argv: Sequence[str]) -> str:
    """Run a short tool and return its stdout; its stderr goes into the error if it fails."""
    result = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        raise SshdError(
            f"{shlex.join(argv)} exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


# --- keys --------------------------------------------------------------------------------


def generate_key(path: Path, comment: str) -> Path:
    """Write a passphrase-less ed25519 key pair (``path`` is 0600, ``path.pub`` beside it)."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path


def public_key(private_key: Path) -> str:
    """The ``type base64`` public half, derived from the private key so no ``.pub`` is trusted."""
    algorithm, blob, *_comment = _run(["ssh-keygen", "-y", "-f", str(private_key)]).split()
    return f"{algorithm} {blob}"


def write_authorized_keys(server: SshdServer, path: Path) -> Path:
    """The server's client key as an authorized_keys file at ``path`` (0644: read by the login
    user, see the module docstring)."""
    path.write_text(public_key(server.client_key) + "\n")
    path.chmod(0o644)
    return path


def fingerprint(private_key: Path) -> str:
    """The ``SHA256:...`` fingerprint exactly as ``ssh-keygen -lf`` prints it."""
    return _run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(private_key)]).split()[1]


def known_hosts_line(host: str, port: int, key: str) -> str:
    """A known_hosts entry; a non-22 port must be spelled ``[host]:port`` for OpenSSH to match."""
    pattern = host if port == 22 else f"[{host}]:{port}"
    return f"{pattern} {key}\n"


# --- configuration -----------------------------------------------------------------------


_CONFIG_LINE = re.compile(r"\s*(?P<keyword>[^\s=#][^\s=]*)(?:\s*=\s*|\s+|$)(?P<args>.*)")


def _split_line(line: str) -> tuple[str, str] | None:
    """(lower-cased keyword, arguments) of ``Key value`` or ``Key=value``; None for comments."""
    match = _CONFIG_LINE.match(line)
    if match is None:
        return None
    return match["keyword"].lower(), match["args"]


def _keyword(line: str) -> str | None:
    """Lower-cased keyword of a config line (sshd's keywords are case-insensitive)."""
    split = _split_line(line)
    return split[0] if split else None


def _top_level_count(lines: Sequence[str]) -> int:
    """How many lines precede the first ``Match``: only those apply to every connection."""
    for index, line in enumerate(lines):
        if _keyword(line) == "match":
            return index
    return len(lines)


def _setenv_words(line: str) -> list[str]:
    """The ``NAME=VALUE`` words of a ``SetEnv`` line, unquoted the way sshd does."""
    split = _split_line(line)
    return shlex.split(split[1]) if split else []


def _quote_word(word: str) -> str:
    """Quote a config word for sshd's argument splitter if it needs it."""
    if word and not any(char.isspace() or char in "\"'\\#" for char in word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _merged_setenv(defaults: dict[str, str], extra_lines: Sequence[str]) -> str:
    """One ``SetEnv`` line: sshd ignores every ``SetEnv`` line after the first."""
    merged = dict(defaults)
    for line in extra_lines:
        for word in _setenv_words(line):
            name, _, value = word.partition("=")
            merged[name] = value
    return "SetEnv " + " ".join(_quote_word(f"{k}={v}") for k, v in merged.items())


def _config_path(path: Path) -> str:
    """A path for sshd_config; sshd would split or %-expand some characters, so refuse them."""
    text = str(path)
    if not path.is_absolute() or _UNSAFE_PATH_CHARS.intersection(text):
        raise SshdError(f"path unusable in sshd_config (absolute, no quotes/blanks/#/%): {text!r}")
    return text


def build_config(
    *, workdir: Path, port: int, host_key: Path, extra_config: Sequence[str] = ()
) -> str:
    """Render sshd_config text: test-friendly defaults, then ``extra_config`` overriding them.

    See the module docstring for the override rules.
    """
    count = _top_level_count(extra_config)
    top, matched = extra_config[:count], extra_config[count:]
    overridden = {kw for line in top if (kw := _keyword(line))}
    if fixed := overridden & _FIXED_KEYWORDS:
        raise ValueError(f"extra_config may not set {sorted(fixed)}: SshdServer would be wrong")
    defaults = [
        f"ListenAddress {HOST}",
        f"Port {port}",
        f"HostKey {_config_path(host_key)}",
        f"PidFile {_config_path(workdir / 'sshd.pid')}",
        f"AuthorizedKeysFile {_config_path(workdir / 'authorized_keys')}",
        "StrictModes no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "AllowStreamLocalForwarding yes",
        "StreamLocalBindUnlink no",
        "AllowTcpForwarding yes",
        "PrintMotd no",
        "Subsystem sftp internal-sftp",
    ]
    kept = [line for line in defaults if _keyword(line) not in overridden]
    setenv = _merged_setenv(
        {"BORG_BASE_DIR": _config_path(workdir / "borg-base"), MARKER_VAR: str(workdir)},
        [line for line in top if _keyword(line) == "setenv"],
    )
    rest = [line for line in top if _keyword(line) != "setenv"]
    return "\n".join([*kept, setenv, *rest, *matched]) + "\n"


# --- processes ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data.rsplit(")", 1)[1].split()


def _all_pids() -> list[int]:
    """Every pid currently listed in /proc."""
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def is_alive(pid: int) -> bool:
    """Whether the process runs; a zombie counts as gone (PID 1 may never reap it here)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in {"Z", "X"}


def _parent(pid: int) -> int | None:
    """Parent pid, or None if the process is gone."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def descendants(pid: int) -> set[int]:
    """All live processes below ``pid``, found by walking /proc's parent links."""
    children: dict[int, list[int]] = {}
    for candidate in _all_pids():
        parent = _parent(candidate)
        if parent is not None:
            children.setdefault(parent, []).append(candidate)
    found: set[int] = set()
    todo = list(children.get(pid, []))
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, []))
    return found


def marked_processes(workdir: Path) -> set[int]:
    """Processes started by a session of the server in ``workdir`` (by the marker variable)."""
    needle = f"\0{MARKER_VAR}={workdir}\0".encode()
    found: set[int] = set()
    for pid in _all_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if needle in b"\0" + environ + b"\0":
            found.add(pid)
    return found


def _ancestors_and_self() -> set[int]:
    """This process and its ancestors: never signalled, whatever /proc says."""
    found: set[int] = set()
    pid: int | None = os.getpid()
    while pid and pid not in found:
        found.add(pid)
        pid = _parent(pid)
    return found


def _signal_all(pids: set[int], signum: signal.Signals) -> None:
    """Send a signal, ignoring processes that already went away."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait_gone(process: subprocess.Popen[bytes], pids: set[int], timeout: float) -> set[int]:
    """Reap the listener and wait for ``pids`` to end; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        process.poll()
        alive = {pid for pid in pids if pid != process.pid and is_alive(pid)}
        if process.returncode is None:
            alive.add(process.pid)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


# --- start and stop ----------------------------------------------------------------------


def _pick_port() -> int:
    """A port that was free a moment ago; sshd may still lose it to someone else (retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _ensure_privsep_dir() -> None:
    """sshd (as root) refuses to start without its empty chroot directory."""
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        PRIVSEP_DIR.chmod(0o755)


def _log_tail(log_path: Path, offset: int = 0, lines: int = 40) -> str:
    """The last lines sshd logged since ``offset``, indented for an error message."""
    try:
        with log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return "    (no log)"
    tail = text.splitlines()[-lines:] or ["(empty)"]
    return "\n".join(f"    {line}" for line in tail)


def _banner_ready(port: int) -> bool:
    """Whether sshd accepts on ``port`` and sends its SSH banner (proves it is sshd serving)."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as conn:
            return conn.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


def _wait_ready(process: subprocess.Popen[bytes], port: int, log_path: Path, offset: int) -> None:
    """Poll until the port serves SSH; raise with the log if sshd exits or the deadline passes."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = _log_tail(log_path, offset)
            error = _BindFailedError if _BIND_FAILED in tail else SshdError
            raise error(f"sshd exited with {process.returncode} before listening:\n{tail}")
        if _banner_ready(port):
            return
        time.sleep(0.02)
    raise SshdError(
        f"sshd did not serve {HOST}:{port} within {READY_TIMEOUT}s:\n{_log_tail(log_path, offset)}"
    )


def _spawn(sshd: Path, config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start sshd in the foreground, logging to ``log_path``, as leader of a new process group."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [str(sshd), "-D", "-e", "-f", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def _key_in(workdir: Path, name: str) -> Path:
    """A key in ``workdir``, generated unless a previous start left one there (restart)."""
    path = workdir / name
    return path if path.exists() else generate_key(path, f"borgtunnel-test-{name}")


def _prepare_workdir(workdir: Path, host_key: Path | None) -> tuple[Path, Path]:
    """Create keys and authorized_keys; return (host key, client key)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "borg-base").mkdir(mode=0o700, exist_ok=True)
    if host_key is None:
        host_key = _key_in(workdir, "ssh_host_ed25519_key")
    client_key = _key_in(workdir, "id_ed25519")
    (workdir / "authorized_keys").write_text(public_key(client_key) + "\n")
    return host_key.resolve(), client_key


def _run_until_ready(sshd: Path, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """Start sshd with the config in ``workdir`` and wait for it; never leave it half-started."""
    log_path = workdir / "sshd.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    process = _spawn(sshd, workdir / "sshd_config", log_path)
    try:
        _wait_ready(process, port, log_path, offset)
    except BaseException:
        _terminate(process, workdir)
        raise
    return process


def _launch(
    sshd: Path, workdir: Path, keys: tuple[Path, Path], extra_config: Sequence[str]
) -> SshdServer:
    """One start attempt on a freshly picked port: config, ``sshd -t``, start, known_hosts."""
    host_key, client_key = keys
    host_public_key, host_fingerprint = public_key(host_key), fingerprint(host_key)
    port = _pick_port()
    config_path = workdir / "sshd_config"
    config_path.write_text(
        build_config(workdir=workdir, port=port, host_key=host_key, extra_config=extra_config)
    )
    _run([str(sshd), "-t", "-f", str(config_path)])
    process = _run_until_ready(sshd, workdir, port)
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(known_hosts_line(HOST, port, host_public_key))
    return SshdServer(
        host=HOST,
        port=port,
        user=pwd.getpwuid(os.geteuid()).pw_name,
        client_key=client_key,
        known_hosts=known_hosts,
        host_key=host_key,
        host_key_fingerprint=host_fingerprint,
        workdir=workdir,
        log_path=workdir / "sshd.log",
        config_path=config_path,
        pid=process.pid,
        process=process,
    )


def start_sshd(
    workdir: Path, *, extra_config: Sequence[str] = (), host_key: Path | None = None
) -> SshdServer:
    """Start an sshd on a free 127.0.0.1 port with keys and config inside ``workdir``.

    ``host_key`` reuses an existing private host key (mode 0600) instead of generating one,
    e.g. to give two servers the same identity. Keys already in ``workdir`` are reused, so
    calling this again on a stopped server's ``workdir`` restarts it with the same identity
    (on a new port). ``extra_config`` lines override the defaults
    (see the module docstring). Raises :class:`SshdError` with sshd's own words on failure.
    A port lost to another process between picking and binding is retried with a new one.
    """
    sshd = find_sshd()
    if sshd is None:
        raise SshdError("sshd not found on PATH or in /usr/sbin")
    workdir = workdir.resolve()
    _ensure_privsep_dir()
    keys = _prepare_workdir(workdir, host_key)
    for _attempt in range(START_ATTEMPTS - 1):
        with contextlib.suppress(_BindFailedError):
            return _launch(sshd, workdir, keys, extra_config)
    return _launch(sshd, workdir, keys, extra_config)


def _victims(process: subprocess.Popen[bytes], workdir: Path, protected: set[int]) -> set[int]:
    """The listener (if running), its descendants and the sessions' marked processes."""
    found = descendants(process.pid) | marked_processes(workdir)
    if process.poll() is None:
        found.add(process.pid)
    return found - protected


def _terminate(process: subprocess.Popen[bytes], workdir: Path) -> None:
    """SIGTERM everything belonging to this sshd, then SIGKILL what is left after a grace time.

    Repeated a few times because a dying session may have forked just before the snapshot.
    """
    protected = _ancestors_and_self()
    for _round in range(3):
        victims = _victims(process, workdir, protected)
        if not victims:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        _signal_all(victims, signal.SIGTERM)
        survivors = _wait_gone(process, victims, STOP_TIMEOUT)
        if survivors:
            _signal_all(survivors, signal.SIGKILL)
            survivors = _wait_gone(process, survivors, STOP_TIMEOUT)
        if survivors:
            raise SshdError(f"sshd processes survived SIGKILL: {sorted(survivors)}")
    leftover = _victims(process, workdir, protected)
    if leftover:
        raise SshdError(f"sshd processes keep appearing: {sorted(leftover)}")


def stop_sshd(server: SshdServer) -> None:
    """Stop the listener, its connections and their remote commands; idempotent.

    Files stay in ``server.workdir`` (pytest removes old tmp dirs); nothing else is touched.
    """
    _terminate(server.process, server.workdir)


def install_authorized_key(server: SshdServer, line: str) -> None:
    """Replace the client key's authorized_keys entry with ``line`` — e.g. one with options and
    a forced command (sshd then puts the requested command in ``SSH_ORIGINAL_COMMAND``), as
    `borgtunnel authorized-key` prints it. sshd reads the file at each login."""
    if public_key(server.client_key) not in line or "\n" in line.rstrip("\n"):
        raise SshdError(f"not one authorized_keys line for this server's client key: {line!r}")
    (server.workdir / "authorized_keys").write_text(line.rstrip("\n") + "\n")


# --- pytest fixtures ---------------------------------------------------------------------


def skip_unless_usable() -> None:
    """Skip (not fail) where the fixture cannot work: no OpenSSH, or not root (see above)."""
    if missing := missing_tools():
        pytest.skip(f"sshd fixture needs OpenSSH: {', '.join(missing)} not installed")
    if os.geteuid() != 0:
        pytest.skip(
            "sshd fixture needs root: logins through an unprivileged sshd with UsePAM no "
            "are not verified (see tests/sshd.py)"
        )


@pytest.fixture
def sshd_factory(tmp_path: Path) -> Iterator[SshdFactory]:
    """Start any number of servers (``factory(extra_config=..., host_key=...)``).

    Each gets its own directory under ``tmp_path``; all are stopped at teardown, also when the
    test failed.
    """
    skip_unless_usable()
    servers: list[SshdServer] = []
    numbers = itertools.count()

    def start(*, extra_config: Sequence[str] = (), host_key: Path | None = None) -> SshdServer:
        number = next(numbers)  # a fresh directory even after a failed start
        name = "sshd" if number == 0 else f"sshd-{number}"
        server = start_sshd(tmp_path / name, extra_config=extra_config, host_key=host_key)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        _stop_all(servers)


def _stop_all(servers: list[SshdServer]) -> None:
    """Stop every server even if stopping one fails; report the first failure afterwards."""
    errors: list[SshdError] = []
    for server in reversed(servers):
        try:
            stop_sshd(server)
        except SshdError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def sshd(sshd_factory: SshdFactory) -> SshdServer:
    """One running server with the default configuration, stopped at teardown."""
    return sshd_factory()
