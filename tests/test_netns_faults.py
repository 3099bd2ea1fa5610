"""Link faults between server and client, in network namespaces: the core promise holds.

The promise: when the link to a client dies, a pull fails within the configured keepalive
time, says so, and leaves nothing behind on the server (no ``borg serve``, no socket, no
repository lock), so the next pull simply works. Each test builds a ``server`` and a ``client``
namespace joined by a veth pair (tests/netns.py), runs a real sshd in the client namespace and
the real ``borgtunnel`` (or daemon) in the server namespace, pulls the cable with nftables drop
rules (silent: no RST, no ICMP) or takes the interface down, and checks the outcome with the
server's own borg (list, extract, with-lock) and /proc.

What cannot be promised, and is documented here rather than hidden: while the link is down the
server cannot reach the client, so a remote ``borg create`` that is blocked (here: reading a
FIFO) keeps running on the client until something wakes it; the client's sshd does not notice
the dead connection either (no ``ClientAliveInterval`` by default). What that session leaves
behind on the client is the next pull's business: the remote socket file (still listened on),
which it replaces, and the orphaned ``borg create`` holding the client's borg cache lock, which
it stops first (its pid is in the pid file next to the socket).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from borgtunnel.history import RunResult
from tests import netns, pullkit
from tests.daemon_support import FIRE_AT, runs
from tests.netns import Link
from tests.sshd import SshdServer, stop_sshd

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

REPO_ROOT = Path(__file__).resolve().parent.parent
KEEPALIVE = {"keepalive_interval": 1, "keepalive_count_max": 3}  # dead link noticed after ~4 s
CONNECT_TIMEOUT = 3
# Link cut -> CLI exit: keepalive (interval x (count_max + 1) = 4 s) plus cleanup and the
# connection close (Tunnel.connect waits up to 5 s for it). Measured here: 3.7-3.9 s.
DETECTION_LIMIT = 12.0
# Start of a pull against an unreachable client -> CLI exit: connect_timeout plus interpreter
# start-up and cleanup on a loaded 2-core machine.
OFFLINE_MARGIN = 5.0


@pytest.fixture(scope="session")
def netns_ready() -> None:
    """Skip where namespaces cannot work; otherwise clear leftovers of crashed earlier runs."""
    reason = netns.unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    netns.sweep_stale()


@pytest.fixture
def link(netns_ready: None) -> Iterator[Link]:
    created = netns.create_link()
    try:
        yield created
    finally:
        netns.destroy_link(created)


@pytest.fixture
def client_sshd(link: Link, tmp_path: Path) -> Iterator[SshdServer]:
    server = netns.start_client_sshd(link, tmp_path / "client-sshd")
    try:
        yield server
    finally:
        stop_sshd(server)


# --- helpers -----------------------------------------------------------------------------


def _write_config(
    tmp_path: Path,
    sshd: SshdServer,
    repo: Path,
    data: Path,
    *,
    daemon: dict[str, Any] | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    **client: Any,
) -> Path:
    conf = pullkit.base_config(tmp_path, sshd)
    conf["ssh"].update(KEEPALIVE, connect_timeout=connect_timeout)
    table = pullkit.client_table(sshd, "c1", repo, [data], **client)
    return pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, daemon=daemon, **conf)


def _cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "borgtunnel", "--config", str(config), *args]


def _pull_in_server_ns(
    tmp_path: Path, link: Link, config: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    """One ``borgtunnel pull c1`` in the server namespace; (result, seconds it took)."""
    started = time.monotonic()
    result = subprocess.run(
        link.server(_cli(config, "pull", "c1")),
        env=pullkit.borg_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, time.monotonic() - started


def _history(config: Path) -> list[dict[str, Any]]:
    """``borgtunnel history c1 --json``, oldest first (reads a file: no network needed)."""
    result = subprocess.run(
        _cli(config, "history", "c1", "--json"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows[::-1]


def _serve_processes(repo: Path) -> list[tuple[int, str]]:
    return pullkit.processes_mentioning(f"--restrict-to-repository {repo}")


def _assert_server_clean(tmp_path: Path, repo: Path) -> None:
    """No serve, no local socket, no repository lock: borg itself can lock the repository."""
    assert _serve_processes(repo) == []
    socket_dir = tmp_path / "run"
    assert not socket_dir.exists() or list(socket_dir.iterdir()) == []
    assert not (repo / "lock.exclusive").exists()
    assert not (repo / "lock.roster").exists()
    pullkit.borg(tmp_path, "with-lock", "--lock-wait", "1", str(repo), "true")


def _assert_restores(tmp_path: Path, repo: Path, archive: str, data: Path) -> None:
    restored = tmp_path / f"restored-{archive}"
    pullkit.extract(tmp_path, repo, archive, restored)
    pullkit.assert_same_tree(data, restored)


# --- tests -------------------------------------------------------------------------------


class _CutPull:
    """A pull whose link was cut while borg create was blocked reading a FIFO on the client."""

    def __init__(self, tmp_path: Path, link: Link, sshd: SshdServer) -> None:
        self.data = tmp_path / "client-data"
        self.data.mkdir()
        (self.data / "a").write_text("a\n")
        self.fifo = self.data / "blocking-fifo"
        os.mkfifo(self.fifo)  # with --read-special, borg create blocks opening it
        self.repo = tmp_path / "repos" / "c1"
        pullkit.init_repo(tmp_path, self.repo)
        self.config = _write_config(
            tmp_path, sshd, self.repo, self.data, create_args=["--read-special"]
        )
        self.create = f"--read-special -- ssh://borgtunnel{self.repo}"  # the remote borg create
        self.remote_socket = sshd.workdir / "rsock" / "c1.sock"
        self.returncode, self.detection, self.stdout, self.stderr = self._run(tmp_path, link)

    def _run(self, tmp_path: Path, link: Link) -> tuple[int, float, str, str]:
        output = tmp_path / "pull"
        argv = link.server(_cli(self.config, "pull", "c1"))
        with netns.spawned(argv, output, env=pullkit.borg_env(tmp_path)) as cli:
            netns.wait_for(
                lambda: _serve_processes(self.repo) and self.remote_create_alive(),
                within=30,
                what="borg serve and the remote borg create",
            )
            time.sleep(0.5)  # let borg create reach the FIFO and block on it
            assert cli.poll() is None, "the pull ended before the link was cut"
            link.cut()
            cut_at = time.monotonic()
            returncode = cli.wait(timeout=30)
            detection = time.monotonic() - cut_at
        stdout = output.with_suffix(".out").read_text()
        stderr = output.with_suffix(".err").read_text()
        return returncode, detection, stdout, stderr

    def remote_create_alive(self) -> bool:
        return bool(pullkit.processes_mentioning(self.create))

    @contextlib.contextmanager
    def fifo_unblocked_at_exit(self) -> Iterator[None]:
        """Open the FIFO for writing once at the end: wakes a borg create blocked on it."""
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading any more
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_dropped_link_mid_pull_fails_fast_and_leaves_the_server_clean(
    tmp_path: Path, link: Link, client_sshd: SshdServer
) -> None:
    cut = _CutPull(tmp_path, link, client_sshd)
    with cut.fifo_unblocked_at_exit():
        assert cut.returncode == 2, cut.stdout + cut.stderr
        assert cut.detection < DETECTION_LIMIT, f"took {cut.detection:.1f}s: {cut.stdout}"
        assert cut.stdout.startswith("c1: failed in state running"), cut.stdout
        assert f"@{link.client_addr}:22: connection lost" in cut.stdout
        assert "not responding to keepalive" in cut.stdout, cut.stdout
        _assert_server_clean(tmp_path, cut.repo)
        assert pullkit.archives(tmp_path, cut.repo) == []
        (failed,) = _history(cut.config)
        assert failed["result"] == str(RunResult.FAILED)
        assert "not responding to keepalive" in failed["error"]

        # Nothing reaches the client over a dead link: its borg create and the sshd session
        # live on, and the forwarded socket file is still there (and still listened on).
        assert cut.remote_create_alive()
        assert cut.remote_socket.is_socket()
        link.restore()
        assert cut.remote_create_alive()  # blocked on the FIFO, a link coming back is no news

    # Woken up, the orphan sends on its dead connection; the server answers with a reset, the
    # client's sshd session ends, borg create loses its repository and exits, and its wrapper
    # removes the socket. It added nothing to the repository.
    netns.wait_for(lambda: not cut.remote_create_alive(), within=15, what="the orphan to exit")
    netns.wait_for(lambda: not cut.remote_socket.exists(), within=5, what="the remote socket")
    _assert_server_clean(tmp_path, cut.repo)
    assert pullkit.archives(tmp_path, cut.repo) == []

    # The next pull (plain data, same client and repository) works and reads back exactly.
    fresh = pullkit.make_client_data(tmp_path / "client-data-2")
    config = _write_config(tmp_path, client_sshd, cut.repo, fresh)
    result, _ = _pull_in_server_ns(tmp_path, link, config)
    assert result.returncode == 0, result.stdout + result.stderr
    (archive,) = pullkit.archives(tmp_path, cut.repo)
    _assert_restores(tmp_path, cut.repo, archive, fresh)
    assert [row["result"] for row in _history(config)] == ["failed", "ok"]
    _assert_server_clean(tmp_path, cut.repo)


def test_next_pull_after_a_dropped_link_stops_the_orphaned_borg_create(
    tmp_path: Path, link: Link, client_sshd: SshdServer
) -> None:
    cut = _CutPull(tmp_path, link, client_sshd)
    with cut.fifo_unblocked_at_exit():
        assert cut.returncode == 2, cut.stdout + cut.stderr
        link.restore()
        assert cut.remote_create_alive()
        assert cut.remote_socket.is_socket()  # left by the dead session, still listened on

        fresh = pullkit.make_client_data(tmp_path / "client-data-2")
        config = _write_config(tmp_path, client_sshd, cut.repo, fresh)
        result, _ = _pull_in_server_ns(tmp_path, link, config)

        assert result.returncode == 0, result.stdout
        assert not cut.remote_create_alive()
        (archive,) = pullkit.archives(tmp_path, cut.repo)
        _assert_restores(tmp_path, cut.repo, archive, fresh)
        _assert_server_clean(tmp_path, cut.repo)


# (fault, connect_timeout, what the failure says). Silence runs into connect_timeout. Without
# carrier the kernel gives up first, after three ARP probes (~3 s): connect_timeout is made
# longer there so the two cannot race.
UNREACHABLE = {
    "dropped": (CONNECT_TIMEOUT, (f"no answer within {CONNECT_TIMEOUT}s",)),
    "down": (CONNECT_TIMEOUT + 3, ("No route to host", "Connect call failed")),
}


def _unreachable_pull(
    tmp_path: Path, link: Link, sshd: SshdServer, fault: str
) -> tuple[subprocess.CompletedProcess[str], float, Path, Path, Path]:
    """A pull while the link is cut or down; (result, seconds, config, repository, data)."""
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    connect_timeout, _ = UNREACHABLE[fault]
    config = _write_config(tmp_path, sshd, repo, data, connect_timeout=connect_timeout)
    if fault == "dropped":
        link.cut()
    else:
        link.set_down()
    result, took = _pull_in_server_ns(tmp_path, link, config)
    return result, took, config, repo, data


@pytest.mark.parametrize("fault", sorted(UNREACHABLE))
def test_unreachable_client_fails_within_connect_timeout(
    tmp_path: Path, link: Link, client_sshd: SshdServer, fault: str
) -> None:
    connect_timeout, says = UNREACHABLE[fault]
    result, took, config, repo, data = _unreachable_pull(tmp_path, link, client_sshd, fault)

    assert result.returncode == 2, result.stdout + result.stderr
    assert took < connect_timeout + OFFLINE_MARGIN, f"took {took:.1f}s"
    assert result.stdout.startswith("c1: failed in state connecting"), result.stdout
    assert f"@{link.client_addr}:22: " in result.stdout
    assert any(text in result.stdout for text in says), result.stdout
    _assert_server_clean(tmp_path, repo)
    assert not (client_sshd.workdir / "rsock").exists()  # nothing ran on the client
    (failed,) = _history(config)
    assert failed["result"] == "failed"

    # The same configuration works once the link is back: the failure was the link.
    if fault == "dropped":
        link.restore()
    else:
        link.set_up()
    result, _ = _pull_in_server_ns(tmp_path, link, config)
    assert result.returncode == 0, result.stdout + result.stderr
    (archive,) = pullkit.archives(tmp_path, repo)
    _assert_restores(tmp_path, repo, archive, data)
    _assert_server_clean(tmp_path, repo)


def test_unreachable_client_message_names_the_reason(
    tmp_path: Path, link: Link, client_sshd: SshdServer
) -> None:
    result, _, _, _, _ = _unreachable_pull(tmp_path, link, client_sshd, "down")
    assert result.returncode == 2
    assert "No route to host" in result.stdout, result.stdout


def test_daemon_retries_until_the_link_comes_back(
    tmp_path: Path, link: Link, client_sshd: SshdServer
) -> None:
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    config = _write_config(
        tmp_path,
        client_sshd,
        repo,
        data,
        daemon={"timezone": "UTC"},  # FIRE_AT is 02:00 UTC
        schedule=f"{FIRE_AT.minute} {FIRE_AT.hour} * * *",
        retries=3,
        retry_wait=1,
    )
    state_dir = tmp_path / "state"
    link.cut()

    with netns.spawned(
        link.server([sys.executable, "-m", "tests.daemon_run", str(config), "1.0"]),
        tmp_path / "daemon",
        env=pullkit.borg_env(tmp_path),
        cwd=REPO_ROOT,
    ) as daemon:
        # Attempts at about 1, 5 and 10 s (connect_timeout 3, waits 1 and 2 s): restore the
        # link after the second failure, before the third attempt.
        netns.wait_for(
            lambda: len(_finished(state_dir)) >= 2, within=30, what="two failed attempts"
        )
        link.restore()
        netns.wait_for(lambda: len(_finished(state_dir)) >= 3, within=30, what="a third attempt")
        daemon.terminate()
        assert daemon.wait(timeout=30) == 0, (tmp_path / "daemon.err").read_text()

    attempts = _finished(state_dir)
    assert [run.result for run in attempts] == [RunResult.FAILED, RunResult.FAILED, RunResult.OK]
    for run in attempts[:2]:
        assert f"no answer within {CONNECT_TIMEOUT}s" in (run.error or "")
    assert attempts[2].trigger == "daemon"
    assert pullkit.archives(tmp_path, repo) == [attempts[2].archive]
    _assert_restores(tmp_path, repo, str(attempts[2].archive), data)
    _assert_server_clean(tmp_path, repo)


def _finished(state_dir: Path) -> list[Any]:
    if not state_dir.exists():
        return []
    return [run for run in runs(state_dir, "c1") if run.result is not RunResult.RUNNING]
