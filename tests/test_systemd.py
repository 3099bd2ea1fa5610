"""borgtunnel.systemd against real sockets and, where installed, systemd-socket-activate.

Descriptors 3, 4, … of the pytest process belong to pytest (capture files and the like), so every
test that needs real descriptors at 3.. runs in a child process that moves them there itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from borgtunnel import systemd
from borgtunnel.systemd import ListenFd, Notifier

REPO_ROOT = Path(__file__).resolve().parent.parent
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@pytest.fixture
def short_dir(tmp_path):
    """tmp_path, or a shorter directory when tmp_path would push a socket path past 108 bytes."""
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="bt-sd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def receiver(short_dir, monkeypatch):
    """A bound AF_UNIX datagram socket, named by $NOTIFY_SOCKET."""
    path = short_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock``."""
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


# --- notify ------------------------------------------------------------------------------------


def test_notify_sends_exactly_one_datagram(receiver):
    assert systemd.notify("READY=1", "STATUS=pulling web1") is True
    assert received(receiver) == [b"READY=1\nSTATUS=pulling web1"]


def test_notifier_convenience_messages(receiver):
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.ready("idle")
    assert notifier.status("pulling web1\nand db2")
    assert notifier.stopping()
    assert notifier.watchdog()
    assert notifier.extend_timeout(1.5)
    assert received(receiver) == [
        b"READY=1",
        b"READY=1\nSTATUS=idle",
        b"STATUS=pulling web1 and db2",
        b"STOPPING=1",
        b"WATCHDOG=1",
        b"EXTEND_TIMEOUT_USEC=1500000",
    ]


def test_reloading_carries_monotonic_usec(receiver):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier().reloading("reloading configuration")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [datagram] = received(receiver)
    lines = datagram.decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after
    assert lines[2:] == ["STATUS=reloading configuration"]


def test_abstract_namespace_socket(monkeypatch):
    name = f"borgtunnel-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1")
        assert sock.recv(65536) == b"READY=1"


def test_notifier_reads_the_environment_once(receiver, monkeypatch):
    notifier = Notifier()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notifier.watchdog()
    assert received(receiver) == [b"WATCHDOG=1"]


def test_unset_or_unusable_socket_returns_false(short_dir, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert Notifier().enabled is False
    assert Notifier().ready() is False
    for value in ["", "relative/notify.sock", "@", "vsock:2:1234"]:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
        assert Notifier().enabled is False, value
        assert systemd.notify("READY=1") is False, value
    not_a_socket = short_dir / "plain-file"
    not_a_socket.write_text("")
    for value in [
        str(short_dir / "missing.sock"),
        str(not_a_socket),
        "/" + "x" * 200,  # longer than sun_path
        "/tmp/with\0nul",
    ]:
        assert Notifier(value).enabled
        assert Notifier(value).ready() is False, value


def test_a_wedged_manager_costs_at_most_the_timeout(short_dir):
    """Nobody reads the socket: once its queue is full a send gives up after ``timeout``."""
    path = short_dir / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier(str(path), timeout=0.05)
        sent = 0
        while notifier.status("x" * 1000):
            sent += 1
            assert sent < 100_000, "the queue never filled up"
        assert sent > 0
        start = time.monotonic()
        assert notifier.watchdog() is False
        assert 0.04 < time.monotonic() - start < 5


@pytest.mark.parametrize("message", ["READY", "=1", "STATUS=a\nREADY=1"])
def test_malformed_message_is_a_programming_error(receiver, message):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        systemd.notify(message)
    assert received(receiver) == []


# --- watchdog ----------------------------------------------------------------------------------


def test_watchdog_interval_is_half_the_period():
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "300000000"}) == 150.0
    own = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(own) == 1.0


def test_watchdog_for_another_pid_is_not_ours():
    inherited = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getppid())}
    assert systemd.watchdog_interval(inherited) is None


def test_watchdog_interval_reads_os_environ(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "500000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 0.25
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "5s"},
        {"WATCHDOG_USEC": " 5"},
        {"WATCHDOG_USEC": "²"},
        {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "self"},
    ],
)
def test_watchdog_interval_rejects_malformed_values(env):
    with pytest.raises(ValueError, match="WATCHDOG_"):
        systemd.watchdog_interval(env)


async def test_watchdog_loop_pings_until_cancelled(receiver):
    task = asyncio.create_task(systemd.watchdog_loop(Notifier(), 0.01))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pings = received(receiver)
    assert len(pings) >= 3
    assert set(pings) == {b"WATCHDOG=1"}


async def test_watchdog_loop_rejects_a_useless_interval():
    with pytest.raises(ValueError, match="positive"):
        await systemd.watchdog_loop(Notifier(""), 0)


# --- socket activation: the parsing -----------------------------------------------------------

PID = 4242


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"LISTEN_FDS": "2"}, []),  # no LISTEN_PID: not for us
        ({"LISTEN_PID": str(PID + 1), "LISTEN_FDS": "2"}, []),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, []),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "2"},
            [ListenFd(3, "unknown"), ListenFd(4, "unknown")],
        ),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "web1:db2:web1"},
            [ListenFd(3, "web1"), ListenFd(4, "db2"), ListenFd(5, "web1")],
        ),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a.b_c-1"},
            [ListenFd(3, "a.b_c-1")],
        ),
    ],
)
def test_parse_listen_environment(env, expected):
    assert systemd.parse_listen_environment(env, PID) == expected


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"LISTEN_PID": "", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": "12x", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": str(PID)}, "LISTEN_FDS is not"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, "LISTEN_FDS"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "two"}, "LISTEN_FDS"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web1"}, "1 names"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, "2 names"),
    ],
)
def test_parse_listen_environment_rejects_malformed_values(env, match):
    with pytest.raises(ValueError, match=match):
        systemd.parse_listen_environment(env, PID)


def set_listen_env(monkeypatch, pid: str, count: str, names: str | None = None):
    monkeypatch.setenv("LISTEN_PID", pid)
    monkeypatch.setenv("LISTEN_FDS", count)
    if names is not None:
        monkeypatch.setenv("LISTEN_FDNAMES", names)


def test_listen_fds_for_another_process_is_empty_and_unsets_env(monkeypatch):
    set_listen_env(monkeypatch, str(os.getppid()), "2", "web1:db2")
    assert systemd.listen_fds() == []
    assert not set(LISTEN_VARIABLES) & set(os.environ)


def test_listen_fds_zero_and_none(monkeypatch):
    for name in LISTEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert systemd.listen_fds() == []
    set_listen_env(monkeypatch, str(os.getpid()), "0")
    assert systemd.listen_fds() == []
    assert not set(LISTEN_VARIABLES) & set(os.environ)


def test_listen_fds_malformed_raises_and_still_unsets_env(monkeypatch):
    set_listen_env(monkeypatch, str(os.getpid()), "1", "web1:db2")
    with pytest.raises(ValueError, match="LISTEN_FDNAMES"):
        systemd.listen_fds()
    assert not set(LISTEN_VARIABLES) & set(os.environ)


# --- socket activation: real descriptors, in a child process ----------------------------------

# Moves the descriptors named in argv[1] to 3, 4, … (as systemd would), sets the environment from
# argv[2] (with LISTEN_PID=its own pid), calls listen_fds() and reports what it saw as JSON.
CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    passed = [int(fd) for fd in sys.argv[1].split(",") if fd]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in passed]
    for fd in passed:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)  # inheritable, like systemd leaves them
        os.close(fd)
    os.environ.update(json.loads(sys.argv[2]), LISTEN_PID=str(os.getpid()))
    from borgtunnel.systemd import listen_fds
    report = {}
    try:
        fds = listen_fds()
    except ValueError as exc:
        report["error"] = str(exc)
        fds = []
    report["fds"] = [[item.fd, item.name] for item in fds]
    report["cloexec"] = [
        bool(fcntl.fcntl(item.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for item in fds
    ]
    report["env_left"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
    for item in fds:
        with socket.socket(fileno=os.dup(item.fd)) as sock:
            sock.sendall(f"hello from {item.fd} {item.name}".encode())
    print(json.dumps(report))
    """
)


def run_child(fds: list[int], env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(map(str, fds)), json.dumps(env)],
        pass_fds=fds,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_listen_fds_with_real_descriptors():
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        report = run_child(
            [pairs[0][1].fileno(), pairs[1][1].fileno()],
            {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web1:db2"},
        )
        assert report == {
            "fds": [[3, "web1"], [4, "db2"]],
            "cloexec": [True, True],
            "env_left": [],
        }
        for ours, _ in pairs:
            ours.settimeout(10)
        assert pairs[0][0].recv(100) == b"hello from 3 web1"
        assert pairs[1][0].recv(100) == b"hello from 4 db2"
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


def test_listen_fds_default_names():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        report = run_child([theirs.fileno()], {"LISTEN_FDS": "1"})
        assert report["fds"] == [[3, "unknown"]]


def test_listen_fds_promised_but_not_open():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        report = run_child([theirs.fileno()], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web1:db2"})
        assert report["fds"] == []
        assert "descriptor 4 is not usable" in str(report["error"])
        assert report["env_left"] == []


ACTIVATED_CHILD = textwrap.dedent(
    """
    import json, os, socket
    from borgtunnel.systemd import listen_fds
    fds = listen_fds()
    left = sorted(k for k in os.environ if k.startswith("LISTEN_"))
    print(json.dumps({"names": [f.name for f in fds], "fds": [f.fd for f in fds], "left": left}),
          flush=True)
    with socket.socket(fileno=os.dup(fds[0].fd)) as listener:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"served by " + fds[0].name.encode())
    """
)


def test_real_socket_activation_protocol(short_dir):
    """systemd-socket-activate speaks the real protocol (it runs without systemd as PID 1)."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed (Debian: package systemd)")
    first, second = short_dir / "web1.sock", short_dir / "db2.sock"
    command = [tool, "-l", str(first), "-l", str(second), "--fdname=web1:db2"]
    command += ["-E", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-c", ACTIVATED_CHILD]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (first.is_socket() and second.is_socket()):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        # It launches the program on the first connection and hands it the listening sockets.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(str(first))
            reply = b""
            while chunk := conn.recv(100):
                reply += chunk
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert json.loads(stdout) == {"names": ["web1", "db2"], "fds": [3, 4], "left": []}
    assert reply == b"served by web1"


# --- journald stream detection -------------------------------------------------------------------


def test_journal_stream_matches(tmp_path, monkeypatch):
    with (tmp_path / "stream").open("w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert systemd.journal_stream_matches(stream.fileno()) is True
        assert systemd.journal_stream_matches(-1) is False  # EBADF is not an error for callers
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
        assert systemd.journal_stream_matches(stream.fileno()) is False
        for value in ["", "garbage", f"{info.st_dev}", f"{info.st_dev}:x", ":"]:
            monkeypatch.setenv("JOURNAL_STREAM", value)
            assert systemd.journal_stream_matches(stream.fileno()) is False
        monkeypatch.delenv("JOURNAL_STREAM")
        assert systemd.journal_stream_matches(stream.fileno()) is False


def test_journal_stream_defaults_to_stderr(monkeypatch):
    info = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    assert systemd.journal_stream_matches() is True
