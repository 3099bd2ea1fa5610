"""``borgtunnel serve`` end to end: real borg clients through real sockets, no mocks.

Socket activation is played by ``systemd-socket-activate``, which listens, then execs serve (same
pid) on the first connection with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES — the protocol systemd
speaks. The borg client uses borgtunnel's own BORG_RSH (``nc -N -U``) and ``ssh://borgtunnel/…``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from borgtunnel.config import UnknownClientError, load_config
from borgtunnel.server.socketserve import (
    ACTIVATED_IDLE_TIMEOUT,
    ServeSetupError,
    adopt_listen_fds,
    run_serve,
)
from borgtunnel.systemd import ListenFd
from tests.socketserve_kit import (
    BORG_TIMEOUT,
    NotifySocket,
    ServeProcess,
    borg_client,
    borg_serve_children,
    client_env,
    connect,
    file_digests,
    held_connection,
    init_repository,
    make_tree,
    start_serve,
    stop_serve,
    tree_contents,
    url,
    wait_for_socket,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("borg", "nc", "systemd-socket-activate")),
    reason="needs borg, nc (netcat-openbsd) and systemd-socket-activate",
)


@dataclass
class Harness:
    """Two clients with fresh repositories, a short socket directory, and serve processes."""

    tmp: Path
    socks: Path
    config: Path
    repos: dict[str, Path]
    started: list[ServeProcess] = field(default_factory=list)
    notify_sockets: list[NotifySocket] = field(default_factory=list)

    def serve(
        self,
        *,
        activate: Sequence[tuple[Path, str]] = (),
        args: Sequence[str] = (),
        notify: NotifySocket | None = None,
    ) -> ServeProcess:
        serve = start_serve(
            config=self.config,
            workdir=self.tmp,
            serve_args=args,
            activate=activate,
            notify_socket=notify.path if notify else None,
        )
        self.started.append(serve)
        return serve

    def notify_socket(self) -> NotifySocket:
        notify = NotifySocket(self.socks / f"notify{len(self.notify_sockets)}")
        self.notify_sockets.append(notify)
        return notify

    def env(self, socket_path: Path, who: str = "client") -> dict[str, str]:
        return client_env(socket_path, self.tmp / f"{who}-base")


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    # Unix socket paths are limited to 108 bytes: keep them out of pytest's long tmp_path.
    socks = Path(tempfile.mkdtemp(prefix="bts-", dir="/tmp"))
    repos = {name: tmp_path / "repos" / name for name in ("web1", "web2")}
    h = Harness(tmp_path, socks, write_config(tmp_path / "borgtunnel.toml", repos), repos)
    try:
        for repository in repos.values():
            init_repository(repository, tmp_path / "init-base")
        yield h
    finally:
        for serve in h.started:
            stop_serve(serve)
        for notify in h.notify_sockets:
            notify.close()
        shutil.rmtree(socks, ignore_errors=True)


def _started_events(serve: ServeProcess) -> list[dict[str, object]]:
    return [event for event in serve.events() if event.get("event") == "serve_started"]


def test_activated_serve_round_trips_an_archive(harness: Harness) -> None:
    source = make_tree(harness.tmp / "source")
    sock = harness.socks / "web1.sock"
    serve = harness.serve(activate=[(sock, "web1")])
    wait_for_socket(sock)
    env = harness.env(sock)
    repository = harness.repos["web1"]

    created = borg_client(["create", url(repository, "a1"), str(source)], env)
    assert created.returncode == 0, created.stderr
    restore = harness.tmp / "restore"
    restore.mkdir()
    extracted = borg_client(["extract", url(repository, "a1")], env, cwd=restore)
    assert extracted.returncode == 0, extracted.stderr

    assert tree_contents(restore / source.relative_to("/")) == tree_contents(source)
    assert serve.process.poll() is None, serve.stderr()  # one service, many connections
    started = _started_events(serve)
    assert len(started) == 2
    assert {event["client"] for event in started} == {"web1"}
    listening = [e for e in serve.events() if e.get("event") == "serve_listening"]
    assert listening == [listening[0]]
    assert listening[0]["socket"] == f"fd 3 ({sock})"


def test_another_repository_path_is_refused(harness: Harness) -> None:
    sock = harness.socks / "web1.sock"
    serve = harness.serve(activate=[(sock, "web1")])
    wait_for_socket(sock)
    env = harness.env(sock)
    elsewhere = harness.tmp / "elsewhere"
    inside = harness.repos["web1"] / "nested"
    other_client = harness.repos["web2"]
    other_before = file_digests(other_client)

    for target in (elsewhere, inside, other_client):
        refused = borg_client(["init", "--encryption=none", url(target)], env)
        assert refused.returncode == 2, refused.stderr
        assert f"Repository path not allowed: {target}" in refused.stderr
    assert not elsewhere.exists()
    assert not inside.exists()
    assert file_digests(other_client) == other_before
    assert serve.process.poll() is None, serve.stderr()


def test_delete_through_serve_leaves_the_data(harness: Harness) -> None:
    source = make_tree(harness.tmp / "source")
    sock = harness.socks / "web1.sock"
    harness.serve(activate=[(sock, "web1")])
    wait_for_socket(sock)
    env = harness.env(sock)
    repository = harness.repos["web1"]
    created = borg_client(["create", url(repository, "a1"), str(source)], env)
    assert created.returncode == 0, created.stderr
    before = file_digests(repository / "data")

    # From the client's side the delete and the compaction succeed...
    deleted = borg_client(["delete", url(repository, "a1")], env)
    assert deleted.returncode == 0, deleted.stderr
    compacted = borg_client(["compact", url(repository)], env)
    assert compacted.returncode == 0, compacted.stderr
    listed = borg_client(["list", "--short", url(repository)], env)
    assert listed.returncode == 0, listed.stderr
    assert "a1" not in listed.stdout.split()
    # ...but append-only kept every segment as it was (a plain serve's compact removes them).
    after = file_digests(repository / "data")
    assert {name: after.get(name) for name in before} == before
    assert len(after) > len(before)  # the delete was appended, not applied in place

    wipe_env = {**env, "BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "YES"}
    wiped = borg_client(["delete", url(repository)], wipe_env)
    assert wiped.returncode == 2
    assert "append-only" in wiped.stderr
    assert (repository / "config").is_file()


def test_two_connections_are_served_at_once(harness: Harness) -> None:
    sock1, sock2 = harness.socks / "web1.sock", harness.socks / "web2.sock"
    serve = harness.serve(activate=[(sock1, "web1"), (sock2, "web2")])
    wait_for_socket(sock1)
    wait_for_socket(sock2)
    repo1, repo2 = harness.repos["web1"], harness.repos["web2"]
    payload = os.urandom(200_000)

    # First connection: a borg create that reads the archive from stdin. It opens (and locks)
    # the repository, then waits for us: its serve stays busy while the second one runs.
    held = subprocess.Popen(
        ["borg", "create", url(repo1, "from-stdin"), "-"],
        env=harness.env(sock1, "held"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until((repo1 / "lock.exclusive").exists, 30, "the first borg to lock web1")
        source = make_tree(harness.tmp / "source")
        second = borg_client(["create", url(repo2, "a2"), str(source)], harness.env(sock2))
        assert second.returncode == 0, second.stderr
        assert held.poll() is None, "the first connection ended before the second was served"
        assert (repo1 / "lock.exclusive").exists()
        _, held_err = held.communicate(payload, timeout=BORG_TIMEOUT)
        assert held.returncode == 0, held_err
    finally:
        if held.poll() is None:
            held.kill()
            held.wait()

    read_back = subprocess.run(
        ["borg", "extract", "--stdout", url(repo1, "from-stdin")],
        env=harness.env(sock1, "held"),
        capture_output=True,
        timeout=BORG_TIMEOUT,
        check=False,
    )
    assert read_back.returncode == 0, read_back.stderr
    assert read_back.stdout == payload
    listed = borg_client(["list", "--short", url(repo2)], harness.env(sock2))
    assert listed.stdout.split() == ["a2"]
    clients = [str(event["client"]) for event in _started_events(serve)]
    assert sorted(clients) == ["web1", "web1", "web2", "web2"]


def test_connections_on_one_socket_run_in_parallel(harness: Harness) -> None:
    sock = harness.socks / "web1.sock"
    serve = harness.serve(activate=[(sock, "web1")])
    wait_for_socket(sock)
    with held_connection(sock):  # its borg serve waits for a client that says nothing
        wait_until(lambda: len(borg_serve_children(serve.marker)) == 1, 20, "first borg serve")
        first = set(borg_serve_children(serve.marker))
        # Served one after the other, this would hang until the borg timeout.
        listed = borg_client(["list", url(harness.repos["web1"])], harness.env(sock))
        assert listed.returncode == 0, listed.stderr
        # The list's own serve exits after its client's EOF, a moment after borg list returns.
        wait_until(lambda: set(borg_serve_children(serve.marker)) == first, 20, "second to end")
    assert len(_started_events(serve)) == 2


def test_unknown_fd_name_exits_78_before_serving(harness: Harness) -> None:
    sock1, sock2 = harness.socks / "web1.sock", harness.socks / "typo.sock"
    serve = harness.serve(activate=[(sock1, "web1"), (sock2, "wbe2")])
    wait_for_socket(sock1)
    with held_connection(sock1):  # wakes systemd-socket-activate, which execs serve
        assert serve.wait() == 78
    stderr = serve.stderr()
    assert "fd 4 is named 'wbe2'" in stderr
    assert "configured: web1, web2" in stderr
    assert _started_events(serve) == []


def test_idle_timeout_exits_0(harness: Harness) -> None:
    path = harness.socks / "listen" / "web1.sock"
    began = time.monotonic()
    serve = harness.serve(args=["--listen", str(path), "--client", "web1", "--idle-timeout", "1"])
    assert serve.wait(timeout=20) == 0, serve.stderr()
    assert 1.0 <= time.monotonic() - began < 10
    assert [e["event"] for e in serve.events()][-3:] == [
        "serve_idle",
        "serve_stopping",
        "serve_stopped",
    ]
    assert not path.exists()  # we created it, so we removed it


def _listening(serve: ServeProcess) -> dict[str, object]:
    wait_until(lambda: any(_is_listening(e) for e in serve.events()), 20, "serve_listening")
    return next(e for e in serve.events() if _is_listening(e))


def _is_listening(event: dict[str, object]) -> bool:
    return event.get("event") == "serve_listening"


def _activate(sock: Path) -> None:
    """Connect once (which starts serve) and hang up. The socket file appears at bind(), a
    moment before systemd-socket-activate listens: until then a connection is refused."""
    wait_for_socket(sock)
    deadline = time.monotonic() + 10
    while True:
        try:
            connect(sock).close()
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        else:
            return


def test_activated_serve_exits_when_idle_by_default(harness: Harness) -> None:
    """Started on demand by the socket, without --idle-timeout (as the shipped unit starts it):
    it must not stay forever. 300 s is too long to wait for here, so the effective timeout is
    read from its log, and the idle exit under activation is shown with a short one below."""
    sock = harness.socks / "web1.sock"
    serve = harness.serve(activate=[(sock, "web1")])
    _activate(sock)  # the first connection starts serve

    assert _listening(serve)["idle_timeout"] == ACTIVATED_IDLE_TIMEOUT
    assert 0 < ACTIVATED_IDLE_TIMEOUT <= 3600
    assert serve.process.poll() is None


@pytest.mark.parametrize(("given", "effective"), [("0", None), ("7.5", 7.5)])
def test_activated_serve_takes_an_explicit_idle_timeout(
    harness: Harness, given: str, effective: float | None
) -> None:
    sock = harness.socks / "web1.sock"
    serve = harness.serve(activate=[(sock, "web1")], args=["--idle-timeout", given])
    _activate(sock)

    assert _listening(serve)["idle_timeout"] == effective


def test_listen_serve_has_no_default_idle_timeout(harness: Harness) -> None:
    """On its own --listen socket nothing would start it again: it serves until stopped."""
    path = harness.socks / "listen" / "web1.sock"
    serve = harness.serve(args=["--listen", str(path), "--client", "web1"])

    assert _listening(serve)["idle_timeout"] is None


def test_activated_serve_exits_when_idle_and_leaves_the_socket(harness: Harness) -> None:
    sock = harness.socks / "web1.sock"
    serve = harness.serve(activate=[(sock, "web1")], args=["--idle-timeout", "1"])
    _activate(sock)

    assert serve.wait(timeout=20) == 0, serve.stderr()
    assert [e["event"] for e in serve.events()][-3:] == [
        "serve_idle",
        "serve_stopping",
        "serve_stopped",
    ]
    assert stat.S_ISSOCK(sock.lstat().st_mode)  # systemd's socket: not ours to remove


def test_idle_timeout_waits_for_the_active_connection(harness: Harness) -> None:
    path = harness.socks / "listen" / "web1.sock"
    notify = harness.notify_socket()
    serve = harness.serve(
        args=["--listen", str(path), "--client", "web1", "--idle-timeout", "1"], notify=notify
    )
    notify.wait_for("READY=1")
    with held_connection(path):
        wait_until(lambda: bool(borg_serve_children(serve.marker)), 20, "borg serve to start")
        time.sleep(2.0)
        assert serve.process.poll() is None, "exited while a connection was being served"
    closed = time.monotonic()
    assert serve.wait(timeout=20) == 0, serve.stderr()
    assert 0.9 <= time.monotonic() - closed < 10
    assert "STOPPING=1" in notify.all()


def test_listen_refuses_a_socket_that_something_listens_on(harness: Harness) -> None:
    directory = harness.socks / "live"
    directory.mkdir(mode=0o700)
    path = directory / "web1.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as owner:
        owner.bind(str(path))
        owner.listen(1)
        serve = harness.serve(args=["--listen", str(path), "--client", "web1"])
        assert serve.wait() == 2
        assert "another process is listening on this socket" in serve.stderr()
        # The path still leads to its owner.
        owner.settimeout(5)
        with connect(path):
            accepted, _ = owner.accept()
            accepted.close()
    assert _started_events(serve) == []


def test_listen_replaces_a_stale_socket_file(harness: Harness) -> None:
    directory = harness.socks / "stale"
    directory.mkdir(mode=0o755)
    path = directory / "web1.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # closed without unlinking: what a killed socat leaves behind
    notify = harness.notify_socket()
    serve = harness.serve(args=["--listen", str(path), "--client", "web1"], notify=notify)
    notify.wait_for("READY=1")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755  # safe as it is: left alone
    listed = borg_client(["list", url(harness.repos["web1"])], harness.env(path))
    assert listed.returncode == 0, listed.stderr
    serve.terminate()
    assert serve.wait() == 0, serve.stderr()
    assert not path.exists()


def test_sigterm_stops_every_borg_serve_and_notifies(harness: Harness) -> None:
    sock = harness.socks / "web1.sock"
    notify = harness.notify_socket()
    serve = harness.serve(activate=[(sock, "web1")], notify=notify)
    wait_for_socket(sock)
    with held_connection(sock) as client:
        notify.wait_for("READY=1")
        notify.wait_for("STATUS=serving web1 (1 active, 1 served)")
        assert len(borg_serve_children(serve.marker)) == 1

        serve.terminate(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0, serve.stderr()
        client.settimeout(10)
        assert client.recv(1) == b""  # its borg serve is gone, so the client sees EOF
    assert borg_serve_children(serve.marker) == {}
    messages = notify.all()
    assert messages.index("READY=1") < messages.index("STOPPING=1")
    assert sock.is_socket()  # systemd's socket file is not ours to remove


def test_max_connections_queues_the_rest(harness: Harness) -> None:
    path = harness.socks / "listen" / "web1.sock"
    notify = harness.notify_socket()
    serve = harness.serve(
        args=["--listen", str(path), "--client", "web1", "--max-connections", "1"], notify=notify
    )
    notify.wait_for("READY=1")
    with held_connection(path) as first, held_connection(path):
        wait_until(lambda: len(_started_events(serve)) == 1, 20, "the first borg serve")
        time.sleep(1.0)
        assert len(_started_events(serve)) == 1  # the second waits in the listen backlog
        assert len(borg_serve_children(serve.marker)) == 1
        first.close()
        wait_until(lambda: len(_started_events(serve)) == 2, 20, "the second borg serve")
    wait_until(lambda: not borg_serve_children(serve.marker), 20, "both connections to end")


@pytest.fixture
def no_socket_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class UsageCase:
    listen: bool
    client: str | None
    message: str
    max_connections: int = 8
    idle_timeout: float | None = None


@pytest.mark.usefixtures("no_socket_activation")
@pytest.mark.parametrize(
    "case",
    [
        UsageCase(listen=False, client=None, message="no socket to serve"),
        UsageCase(listen=True, client=None, message="--listen PATH and --client NAME must be"),
        UsageCase(listen=False, client="web1", message="--listen PATH and --client NAME must be"),
        UsageCase(True, "web1", "--max-connections must be at least 1", max_connections=0),
        UsageCase(True, "web1", "--idle-timeout must be 0 (never) or a", idle_timeout=-1.0),
        UsageCase(True, "web1", "--idle-timeout must be 0 (never) or a", idle_timeout=float("nan")),
    ],
    ids=lambda case: case.message,
)
def test_usage_errors_exit_2_without_creating_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: UsageCase
) -> None:
    config = load_config(write_config(tmp_path / "c.toml", {"web1": tmp_path / "repo"}))
    path = tmp_path / "s" / "web1.sock"
    code = run_serve(
        config,
        listen=path if case.listen else None,
        client=case.client,
        idle_timeout=case.idle_timeout,
        max_connections=case.max_connections,
    )
    assert code == 2
    assert case.message in capsys.readouterr().err
    assert not path.parent.exists()


@pytest.mark.usefixtures("no_socket_activation")
def test_unknown_listen_client_is_a_config_error_before_binding(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml", {"web1": tmp_path / "repo"}))
    path = tmp_path / "s" / "web2.sock"
    with pytest.raises(UnknownClientError):  # the CLI turns it into exit 78
        run_serve(config, listen=path, client="web2", idle_timeout=None, max_connections=8)
    assert not path.parent.exists()


def test_passed_fd_must_be_a_listening_unix_stream_socket(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml", {"web1": tmp_path / "repo"}))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        with pytest.raises(ServeSetupError, match="not a listening unix stream socket") as caught:
            adopt_listen_fds(config, [ListenFd(tcp.fileno(), "web1")])
        assert caught.value.exit_code == 78
        assert tcp.getsockname()[0] == "127.0.0.1"  # the descriptor was left open
    with (
        (tmp_path / "file").open("wb") as plain,
        pytest.raises(ServeSetupError, match="is not a socket"),
    ):
        adopt_listen_fds(config, [ListenFd(plain.fileno(), "web1")])


def test_passed_unix_socket_is_adopted_nonblocking(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml", {"web1": tmp_path / "repo"}))
    path = tmp_path / "web1.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as passed:
        passed.bind(str(path))
        passed.listen()
        fd = os.dup(passed.fileno())  # the endpoint owns (and closes) its descriptor
        (endpoint,) = adopt_listen_fds(config, [ListenFd(fd, "web1")])
        try:
            assert endpoint.client.name == "web1"
            assert endpoint.sock.fileno() == fd
            assert not endpoint.sock.getblocking()
            assert endpoint.where == f"fd {fd} ({path})"
            assert endpoint.created is None  # systemd's file: never removed by us
        finally:
            endpoint.sock.close()


def test_abstract_socket_from_systemd_exits_78(harness: Harness) -> None:
    # An abstract socket has no file and no mode: any local user could reach the repository.
    name = f"borgtunnel-test-{os.getpid()}-{time.monotonic_ns()}"
    serve = harness.serve(activate=[(Path(f"@{name}"), "web1")])
    deadline = time.monotonic() + 10
    while True:  # connecting wakes systemd-socket-activate, which execs serve
        try:
            waker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waker.connect("\0" + name)
            break
        except OSError:
            waker.close()
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.05)
    try:
        assert serve.wait() == 78
    finally:
        waker.close()
    stderr = serve.stderr()
    assert f"abstract-namespace unix socket (@{name})" in stderr
    assert "every local user could reach the repository" in stderr
    assert _started_events(serve) == []


def test_passed_abstract_socket_is_refused(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml", {"web1": tmp_path / "repo"}))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract:
        abstract.bind(f"\0borgtunnel-test-{os.getpid()}")
        abstract.listen()
        with pytest.raises(ServeSetupError, match="abstract-namespace") as caught:
            adopt_listen_fds(config, [ListenFd(abstract.fileno(), "web1")])
        assert caught.value.exit_code == 78
        assert abstract.fileno() >= 0  # left open for its owner
