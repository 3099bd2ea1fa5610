"""The SSH side: the only module that talks to asyncssh.

One ``Tunnel`` is one verified SSH connection to a client. It can start a remote command whose
stdin it drives and whose stderr it reads line by line (the run script of
borgtunnel/client/remote.py), hold a reverse unix-socket forward open, and run short
housekeeping commands. Failures are raised as ``TunnelError`` subclasses that carry the data an
administrator needs (host, port, key fingerprint, remote stderr), never asyncssh types.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncssh

from borgtunnel import oserrors
from borgtunnel.client.remote import remove_command
from borgtunnel.config import SSHSettings

LineCallback = Callable[[str], None]

# The client's prepare step and a cleanup exec are a few shell builtins (plus waiting up to 10 s
# for an orphaned borg to stop); anything slower than this is a stuck link.
SHORT_COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class Target:
    """Where to connect and how."""

    host: str
    port: int
    user: str
    ssh: SSHSettings


class TunnelError(Exception):
    """Base class: something on the SSH side failed. ``str()`` is the administrator's message."""

    def __init__(self, target: Target, message: str) -> None:
        super().__init__(message)
        self.target = target
        self.message = message

    def __str__(self) -> str:
        return f"{self.target.user}@{self.target.host}:{self.target.port}: {self.message}"


class HostKeyError(TunnelError):
    """The host key is not in known_hosts (``unknown``) or differs from it (``changed``)."""

    def __init__(self, target: Target, kind: str, fingerprint: str | None) -> None:
        self.kind = kind
        self.fingerprint = fingerprint
        shown = fingerprint or "(not received)"
        if kind == "changed":
            text = (
                f"host key CHANGED: the server presented {shown}, which does not match "
                f"{target.ssh.known_hosts}; refusing to connect (possible man-in-the-middle)"
            )
        else:
            text = (
                f"host key unknown: the server presented {shown}, which is not in "
                f"{target.ssh.known_hosts}; verify it and add it there"
            )
        super().__init__(target, text)


class ConnectError(TunnelError):
    """The connection or authentication failed."""


class AuthenticationError(ConnectError):
    """The client's sshd refused the server's key: it is not (yet) in the login user's
    authorized_keys. A ConnectError still, for every caller that only asks "did it connect"."""


class LocalError(TunnelError):
    """Something on this server, not the link or the client, stopped the connection before any
    SSH traffic: a file it cannot read (its mode, ProtectHome=), a malformed key or known_hosts.
    Not a ConnectError: retrying it as if the client were offline cannot help."""


class ForwardError(TunnelError):
    """The client's sshd refused the reverse unix-socket forward."""


class OutputFloodError(TunnelError):
    """The client answered a short command with more output than such a command prints."""


class RemotePrepareError(TunnelError):
    """The client refused before borg started (symlink, wrong owner, no nc/socat, ...)."""

    def __init__(self, target: Target, code: int | None, stderr: str) -> None:
        self.code = code
        self.stderr = stderr
        super().__init__(target, stderr.strip() or f"prepare step failed with status {code}")


class _HostKeyRecorder(asyncssh.SSHClient):
    """Remembers the key the server offered when it is not trusted, for the error message."""

    def __init__(self) -> None:
        self.offered: asyncssh.SSHKey | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.offered = key
        return False  # only known_hosts decides


def _host_key_kind(target: Target, known: asyncssh.SSHKnownHosts) -> str:
    """``changed`` when known_hosts has some key for this host, ``unknown`` otherwise."""
    port = None if target.port == 22 else target.port
    trusted, ca_keys, *_ = known.match(target.host, "", port)
    return "changed" if trusted or ca_keys else "unknown"


class Traffic:
    """Bytes the client sent through the tunnel's reverse forwards: its borg's requests and
    data, the repository traffic of a run. Connecting and disconnecting send none; what the
    server's side answers is not counted (borg 1.x serve answers a bare connect and close with
    a line of its own)."""

    def __init__(self) -> None:
        self.bytes = 0


class _ClientSideForwarder(asyncssh.SSHForwarder):
    """asyncssh's forwarder for the SSH channel's side of a forwarded connection: counts what
    the client sends before passing it on to the local socket."""

    def __init__(self, traffic: Traffic, peer: asyncssh.SSHForwarder) -> None:
        super().__init__(peer)
        self._traffic = traffic

    def data_received(self, data: bytes, datatype: int | None = None) -> None:
        self._traffic.bytes += len(data)
        super().data_received(data, datatype)


class Tunnel:
    """A verified SSH connection to one client."""

    def __init__(self, target: Target, conn: asyncssh.SSHClientConnection) -> None:
        self.target = target
        self._conn = conn
        self.traffic = Traffic()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, target: Target) -> AsyncIterator[Tunnel]:
        conn = await _open(target)
        try:
            yield cls(target, conn)
        finally:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), timeout=5)

    async def _exec(self, command: str) -> tuple[int | None, str]:
        """Run a short command; return (status, its output as text).

        Not ``conn.run``, which keeps all a command prints: the output is read in chunks and a
        client answering with more than MAX_SHORT_OUTPUT bytes is cut off there (OutputFloodError).
        """
        try:
            async with asyncio.timeout(SHORT_COMMAND_TIMEOUT):
                process = await self._conn.create_process(command, encoding=None)
                try:
                    process.stdin.write_eof()
                    output = await _read_bounded(process, MAX_SHORT_OUTPUT)
                    await process.wait_closed()
                finally:
                    process.close()
        except TimeoutError:
            raise ConnectError(
                self.target, f"no answer within {SHORT_COMMAND_TIMEOUT:.0f}s"
            ) from None
        except _TooMuchOutputError:
            raise OutputFloodError(
                self.target,
                f"the client answered a housekeeping command with more than {MAX_SHORT_OUTPUT} "
                "bytes of output; stopped reading it",
            ) from None
        except (OSError, asyncssh.Error) as exc:
            raise ConnectError(self.target, f"connection lost: {exc}") from None
        return process.exit_status, output.decode("utf-8", "replace")

    async def remove_socket(self, path: str) -> None:
        await self.exec_quiet(remove_command(path))

    async def exec_quiet(self, command: str) -> None:
        """Run a short housekeeping command that prints nothing on success."""
        code, output = await self._exec(command)
        if code != 0:
            raise RemotePrepareError(self.target, code, output)

    @contextlib.asynccontextmanager
    async def forward(self, remote_path: str, local_path: Path) -> AsyncIterator[None]:
        """Reverse-forward ``remote_path`` on the client to ``local_path`` here.

        Uses create_unix_server directly (not forward_remote_path) to pass our channel window:
        the window, not the cipher, limits throughput on high-latency links.
        """
        local = str(local_path)
        traffic = self.traffic

        async def connect_local() -> _ClientSideForwarder:
            # conn.forward_unix_connection, counting what the client sends.
            try:
                _, peer = await asyncio.get_running_loop().create_unix_connection(
                    asyncssh.SSHForwarder, local
                )
            except OSError as exc:
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
            return _ClientSideForwarder(traffic, peer)

        def session_factory() -> Awaitable[asyncssh.SSHUNIXSession[bytes]]:
            return cast(Awaitable[asyncssh.SSHUNIXSession[bytes]], connect_local())

        conn = self._conn

        try:
            listener = await conn.create_unix_server(
                session_factory, remote_path, window=self.target.ssh.window
            )
        except asyncssh.ChannelListenError as exc:
            raise ForwardError(
                self.target,
                f"the client's sshd refused to listen on {remote_path} ({exc}); check "
                "AllowStreamLocalForwarding in its sshd_config and that the key's "
                "authorized_keys options allow port-forwarding ('restrict' alone forbids it)",
            ) from None
        except (OSError, asyncssh.Error) as exc:
            raise ConnectError(self.target, f"connection lost: {exc}") from None
        try:
            yield
        finally:
            listener.close()

    async def probe_forwarding(self, remote_path: str) -> ForwardProbe:
        """For doctor: try the reverse forward a pull needs at ``remote_path``, and, while it is
        held, a *local* unix-socket connection to that same path — which a pull never needs and
        which would let whoever holds this key connect to any socket on the client (e.g.
        /run/docker.sock). Nothing is served; the caller removes the socket file."""
        try:
            async with self.forward(remote_path, Path("/nonexistent/borgtunnel-doctor")):
                try:
                    async with asyncio.timeout(SHORT_COMMAND_TIMEOUT):
                        writer = (await self._conn.open_unix_connection(remote_path))[1]
                except (asyncssh.ChannelOpenError, TimeoutError):
                    return ForwardProbe(remote_refused=None, local_allowed=False)
                writer.close()
                return ForwardProbe(remote_refused=None, local_allowed=True)
        except ForwardError as exc:
            return ForwardProbe(remote_refused=exc.message, local_allowed=None)

    @contextlib.asynccontextmanager
    async def start(self, command: str) -> AsyncIterator[RemoteRun]:
        """Start ``command``; the caller drives its stdin and reads its stderr line by line.

        Not ``async with create_process``: its __aexit__ can hang while a remote child lives on.
        """
        try:
            process = await self._conn.create_process(command, encoding=None)
        except (OSError, asyncssh.Error) as exc:
            raise ConnectError(self.target, f"cannot start the remote command: {exc}") from None
        run = RemoteRun(self.target, process, self.traffic)
        try:
            yield run
        finally:
            run.stop_reading()
            process.close()


@dataclass(frozen=True)
class ForwardProbe:
    """``remote_refused``: None if the reverse forward worked, else sshd's refusal.
    ``local_allowed``: whether a local (-L style) unix connection was allowed; None untested."""

    remote_refused: str | None
    local_allowed: bool | None


# Caps on what a client may make the server hold: borg's --json is a few kB, a log line rarely
# more than a path. A client flooding either costs it its own output, not the server's memory.
MAX_STDOUT = 1024 * 1024
MAX_LINE = 8 * 1024
_CHUNK = 64 * 1024
# A housekeeping command (cleanup, remove) prints nothing on success and a line or two when it
# fails, plus whatever login noise a shell adds: more than this is not an answer.
MAX_SHORT_OUTPUT = 64 * 1024


class _TooMuchOutputError(Exception):
    pass


async def _read_bounded(process: asyncssh.SSHClientProcess[bytes], limit: int) -> bytes:
    """stdout and stderr of ``process`` until both end, together at most ``limit`` bytes.

    Both are read at once: an SSH channel has one window for both, so a stream left unread
    would stall the other. asyncssh holds at most a window's worth unread (it pauses the channel
    beyond that), so memory stays near ``limit`` plus one window, whatever the client sends.
    """
    kept = bytearray()

    async def drain(stream: asyncssh.SSHReader[bytes]) -> None:
        while chunk := await stream.read(_CHUNK):
            if len(kept) + len(chunk) > limit:
                raise _TooMuchOutputError
            kept.extend(chunk)

    readers = [
        asyncio.ensure_future(drain(process.stdout)),
        asyncio.ensure_future(drain(process.stderr)),
    ]
    try:
        await asyncio.gather(*readers)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return bytes(kept)


class _CappedLines:
    """Splits a byte stream into lines; a line over MAX_LINE is cut and marked, the rest of it
    dropped until its newline, so no single line can grow without bound."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._dropped = 0  # bytes dropped of the current over-long line

    def feed(self, data: bytes) -> list[str]:
        lines: list[str] = []
        while data:
            cut = data.find(b"\n")
            piece, data = (data, b"") if cut < 0 else (data[:cut], data[cut + 1 :])
            room = max(MAX_LINE - len(self._buffer), 0)
            self._buffer += piece[:room]
            self._dropped += max(len(piece) - room, 0)
            if cut >= 0:
                lines.append(self._take())
        return lines

    def flush(self) -> list[str]:
        return [self._take()] if self._buffer or self._dropped else []

    def _take(self) -> str:
        text = bytes(self._buffer).decode("utf-8", "replace")
        if self._dropped:
            text += f" …[{self._dropped} more bytes of this line not kept]"
        self._buffer.clear()
        self._dropped = 0
        return text + "\n"


class RemoteRun:
    """A started remote command: stdin under our control, stderr as lines, stdout collected.

    Both are read in bounded chunks: stdout keeps its first MAX_STDOUT bytes, stderr lines are
    cut at MAX_LINE. ``last_activity`` (monotonic) is when the client last sent anything.
    """

    def __init__(
        self,
        target: Target,
        process: asyncssh.SSHClientProcess[bytes],
        traffic: Traffic | None = None,
    ) -> None:
        self._target = target
        self._process = process
        # The repository bytes of this run: what the client sent through its tunnel's forwards.
        self.traffic = traffic if traffic is not None else Traffic()
        self._lines = _CappedLines()
        self._pending: list[str] = []
        self._eof = False
        self.last_activity = asyncio.get_running_loop().time()
        self.stdout_dropped = 0
        self._stdout = asyncio.ensure_future(self._read_stdout())

    async def _read_stdout(self) -> bytes:
        kept = bytearray()
        while chunk := await self._process.stdout.read(_CHUNK):
            self._touch()
            room = MAX_STDOUT - len(kept)
            kept += chunk[: max(room, 0)]
            self.stdout_dropped += max(len(chunk) - max(room, 0), 0)
        return bytes(kept)

    def _touch(self) -> None:
        self.last_activity = asyncio.get_running_loop().time()

    async def next_line(self) -> str | None:
        """The next stderr line, or None at EOF (the command ended or the link dropped)."""
        while not self._pending:
            if self._eof:
                return None
            try:
                chunk = await self._process.stderr.read(_CHUNK)
            except (OSError, asyncssh.Error) as exc:
                raise ConnectError(self._target, f"connection lost during the run: {exc}") from None
            if chunk:
                self._touch()
                self._pending = self._lines.feed(chunk)
            else:
                self._eof = True
                self._pending = self._lines.flush()
        return self._pending.pop(0)

    def send_and_close(self, data: bytes) -> None:
        """Write ``data`` then EOF: borg reads BORG_PASSPHRASE_FD=0 until EOF."""
        if data:
            self._process.stdin.write(data)
        self._process.stdin.write_eof()

    async def finish(self, on_stderr: LineCallback) -> tuple[int | None, str]:
        """Stream the remaining stderr; return (exit status or None when killed/lost, stdout)."""
        while (line := await self.next_line()) is not None:
            on_stderr(line)
        try:
            stdout = (await self._stdout).decode("utf-8", "replace")
            await self._process.wait_closed()
        except (OSError, asyncssh.Error) as exc:
            raise ConnectError(self._target, f"connection lost during the run: {exc}") from None
        return self._process.exit_status, stdout

    async def status(self) -> int | None:
        """Wait for the end (after EOF on stderr) and return the exit status."""
        with contextlib.suppress(OSError, asyncssh.Error):
            await self._process.wait_closed()
        return self._process.exit_status

    def stop_reading(self) -> None:
        self._stdout.cancel()


def _load_trust(target: Target) -> tuple[asyncssh.SSHKnownHosts, list[asyncssh.SSHKey]]:
    """Read known_hosts and the identity up front, so a missing file is named in the error."""
    ssh = target.ssh
    try:
        known_hosts = asyncssh.read_known_hosts(str(ssh.known_hosts))
    except FileNotFoundError as exc:
        raise LocalError(
            target,
            f"{oserrors.describe(exc, 'known_hosts')}; enrol the client's host key there "
            "(see docs/clients.md: Preparing a client)",
        ) from None
    except OSError as exc:
        raise LocalError(target, oserrors.describe(exc, "known_hosts")) from None
    except ValueError as exc:
        raise LocalError(target, f"known_hosts {ssh.known_hosts}: {exc}") from None
    keys: list[asyncssh.SSHKey] = []
    if ssh.identity is not None:
        try:
            keys = [asyncssh.read_private_key(str(ssh.identity))]
        except OSError as exc:
            raise LocalError(target, oserrors.describe(exc, "identity")) from None
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise LocalError(target, f"identity {ssh.identity}: {exc}") from None
    return known_hosts, keys


# Nothing borgtunnel does may read the service user's home: under ProtectHome=yes without
# capabilities even a stat of /root fails (PermissionError), and a daemon must use only what its
# settings name. So every asyncssh default that looks under ~/.ssh is turned off explicitly: no
# ~/.ssh/config; no default keys (client_keys None, not []: [] loads ~/.ssh/id_*); no X.509 CA
# bundle ~/.ssh/ca-bundle.crt or cert directory ~/.ssh/crt (stat'ed while the options are
# prepared, even for a server without X.509 host keys).
_NO_HOME_DEFAULTS: dict[str, Any] = {
    "config": None,
    "x509_trusted_certs": None,
    "x509_trusted_cert_paths": [],
}


async def _open(target: Target) -> asyncssh.SSHClientConnection:
    ssh = target.ssh
    known_hosts, keys = _load_trust(target)
    recorder = _HostKeyRecorder()
    try:
        conn, _ = await asyncssh.create_connection(
            lambda: recorder,
            target.host,
            target.port,
            username=target.user,
            # known_hosts and the identity were read above, from the paths the settings name.
            known_hosts=known_hosts,
            client_keys=keys or None,
            agent_path=() if ssh.agent else None,
            **_NO_HOME_DEFAULTS,
            # Public-key authentication only: no password or keyboard prompts, no host-based
            # (local host keys) or GSSAPI (Kerberos credential caches) attempts.
            password=None,
            password_auth=False,
            kbdint_auth=False,
            host_based_auth=False,
            gss_auth=False,
            gss_kex=False,
            keepalive_interval=ssh.keepalive_interval,
            keepalive_count_max=ssh.keepalive_count_max,
            connect_timeout=ssh.connect_timeout,
            encryption_algs=list(ssh.ciphers),
        )
    except asyncssh.HostKeyNotVerifiable:
        fingerprint = recorder.offered.get_fingerprint("sha256") if recorder.offered else None
        raise HostKeyError(target, _host_key_kind(target, known_hosts), fingerprint) from None
    except asyncssh.PermissionDenied as exc:
        raise AuthenticationError(target, f"authentication failed: {exc.reason}") from None
    except asyncssh.Error as exc:
        raise ConnectError(target, f"SSH failed: {exc}") from None
    except TimeoutError:
        raise ConnectError(target, f"no answer within {ssh.connect_timeout:.0f}s") from None
    except OSError as exc:
        raise _connect_os_error(target, exc) from None
    return conn


def _connect_os_error(target: Target, exc: OSError) -> TunnelError:
    """A file on this server (e.g. one asyncssh looked for) or the network (refused,
    unreachable, name not resolved: the only kind worth retrying)."""
    if oserrors.is_local_file_error(exc):
        return LocalError(target, f"{oserrors.describe(exc)}, while preparing the SSH connection")
    # asyncio puts its own words ("Connect call failed …") in strerror; the errno says why.
    return ConnectError(target, os.strerror(exc.errno) if exc.errno else str(exc))


# --- host keys (borgtunnel trust) ----------------------------------------------------------


@dataclass(frozen=True)
class HostKey:
    """A host key as an administrator compares it: type, SHA256 fingerprint, public line."""

    algorithm: str
    fingerprint: str
    public: str  # "TYPE BASE64", as known_hosts holds it


def _host_key(key: asyncssh.SSHKey) -> HostKey:
    algorithm, blob, *_ = key.export_public_key("openssh").decode("ascii").split()
    return HostKey(algorithm, key.get_fingerprint("sha256"), f"{algorithm} {blob}")


def _host_key_fetch_options() -> asyncssh.SSHClientConnectionOptions:
    """Options for only fetching a host key: get_server_host_key turns off known_hosts and
    X.509 itself, but would still load the default keys from ~/.ssh and the agent's path.
    (``config=None`` goes in the call too: its default ``()`` there would override this.)"""
    return asyncssh.SSHClientConnectionOptions(
        client_keys=None, agent_path=None, **_NO_HOME_DEFAULTS
    )


async def fetch_host_key(target: Target) -> HostKey:
    """The key the client's sshd presents, without authenticating or trusting it."""
    try:
        async with asyncio.timeout(target.ssh.connect_timeout):
            key = await asyncssh.get_server_host_key(
                target.host, target.port, config=None, options=_host_key_fetch_options()
            )
    except TimeoutError:
        raise ConnectError(target, f"no answer within {target.ssh.connect_timeout:.0f}s") from None
    except asyncssh.Error as exc:
        raise ConnectError(target, f"SSH failed: {exc}") from None
    except OSError as exc:
        raise _connect_os_error(target, exc) from None
    if key is None:
        raise ConnectError(target, "the server presented no host key")
    return _host_key(key)


def trusted_host_keys(target: Target) -> list[HostKey]:
    """The keys ``known_hosts`` already trusts for this host and port (none if it is missing)."""
    path = target.ssh.known_hosts
    if not path.exists():
        return []
    try:
        known = asyncssh.read_known_hosts(str(path))
    except OSError as exc:
        raise LocalError(target, oserrors.describe(exc, "known_hosts")) from None
    except ValueError as exc:
        raise LocalError(target, f"known_hosts {path}: {exc}") from None
    port = None if target.port == 22 else target.port
    trusted, *_ = known.match(target.host, "", port)
    return [_host_key(key) for key in trusted]
