"""Worst days, with a real sshd and real borg: each ends with "nothing lost".

Nothing lost = the archives made before the bad moment are still there and restore byte for
byte, ``borg check`` is clean, no ``borg serve``/``borg create`` of the repository is left, the
repository lock is free (borg itself takes it at once), and the next pull succeeds and is read
back. The link faults (cable cut, unreachable client, retries) are in test_netns_faults.py; the
daemon's SIGTERM in test_daemon.py; the gatekeeper's refusals in test_gatekeeper_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from borgtunnel.config import parse_config
from borgtunnel.history import RunResult
from borgtunnel.runs.pull import pull
from borgtunnel.text import option_like
from tests import pullkit
from tests.daemon_support import (
    BORGTUNNEL,
    borg_processes,
    daemon_process,
    finished_runs,
    has_event,
    runs,
    server_env,
    wait_until,
)
from tests.sshd import SshdFactory, SshdServer, start_sshd, stop_sshd

pytestmark = pytest.mark.sshd


def _pull(config: Path) -> subprocess.CompletedProcess[str]:
    return pullkit.run_cli(config, "pull", "c1", timeout=180)


Tree = dict[str, bytes | None]


def assert_restores(tmp_path: Path, repo: Path, archive: str, data: Path, expected: Tree) -> None:
    restored = tmp_path / f"restored-{len(list(tmp_path.glob('restored-*')))}"
    pullkit.extract(tmp_path, repo, archive, restored)
    assert pullkit.tree(restored / str(data).lstrip("/")) == expected


def assert_nothing_lost(
    tmp_path: Path, repo: Path, config: Path, earlier: dict[str, Tree], data: Path
) -> None:
    """See the module docstring. ``earlier``: archive name -> the tree of ``data`` it holds."""
    assert borg_processes(repo) == set()
    pullkit.borg(tmp_path, "with-lock", "--lock-wait", "1", str(repo), "true")
    pullkit.borg(tmp_path, "check", str(repo))
    names = pullkit.archives(tmp_path, repo)
    for name, tree in earlier.items():
        assert name in names
        assert_restores(tmp_path, repo, name, data, tree)
    result = _pull(config)
    assert result.returncode == 0, result.stdout + result.stderr
    (new,) = set(pullkit.archives(tmp_path, repo)) - set(names)
    assert_restores(tmp_path, repo, new, data, pullkit.tree(data))
    assert borg_processes(repo) == set()


def _one_client(
    tmp_path: Path, sshd: SshdServer, repo: Path, data: Path, **extra: Any
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(
        sshd, "c1", repo, [data], archive="c1-{now:%Y-%m-%dT%H:%M:%S.%f}", **extra
    )
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    return config, table, conf


def _first_archive(tmp_path: Path, repo: Path, config: Path) -> str:
    result = _pull(config)
    assert result.returncode == 0, result.stdout + result.stderr
    (name,) = pullkit.archives(tmp_path, repo)
    return name


# --- repository filesystem full --------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs inside the test's directory, unmounted afterwards even on failure."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "small-fs"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def test_repository_filesystem_full(tmp_path: Path, sshd: SshdServer, small_fs: Path) -> None:
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = small_fs / "c1"
    pullkit.init_repo(tmp_path, repo)
    config, _, _ = _one_client(tmp_path, sshd, repo, data)
    first = _first_archive(tmp_path, repo, config)
    kept = pullkit.tree(data)  # what the first archive holds, before the data grows
    big = data / "too-big.bin"
    big.write_bytes(os.urandom(40_000_000))  # incompressible, more than the filesystem holds

    full = _pull(config)

    assert full.returncode == 2, full.stdout + full.stderr
    assert "c1: failed" in full.stdout
    assert "No space left on device" in full.stdout, full.stdout
    assert borg_processes(repo) == set()
    big.unlink()  # space freed: the next pull has to fit again
    assert_nothing_lost(tmp_path, repo, config, {first: kept}, data)


# --- the client's sshd killed mid-backup (a reboot) -----------------------------------------


def test_clients_sshd_killed_mid_backup(tmp_path: Path, sshd: SshdServer) -> None:
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    config, table, conf = _one_client(tmp_path, sshd, repo, data)
    first = _first_archive(tmp_path, repo, config)
    kept = pullkit.tree(data)
    (data / "slow.bin").write_bytes(os.urandom(3_000_000))
    table["create_args"] = ["--upload-ratelimit", "200"]
    pullkit.write_config(config, clients={"c1": table}, **conf)

    with subprocess.Popen(
        [BORGTUNNEL, "--config", str(config), "pull", "c1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as pulling:
        try:
            create = f"ssh://borgtunnel{repo}::"
            wait_until(lambda: pullkit.processes_mentioning(create), within=60, what="borg create")
            time.sleep(1.0)
            stop_sshd(sshd)  # the listener, every session, the remote borg create: a reboot
            out, _ = pulling.communicate(timeout=90)
        finally:
            if pulling.poll() is None:
                pulling.kill()
    assert pulling.returncode == 2
    assert "c1: failed" in out

    # The machine comes back: same host key and directory, sshd on a new port.
    back = start_sshd(sshd.workdir)
    try:
        table.update(port=back.port, create_args=[])
        conf["ssh"] = {**conf["ssh"], "known_hosts": str(back.known_hosts)}
        pullkit.write_config(config, clients={"c1": table}, **conf)
        assert_nothing_lost(tmp_path, repo, config, {first: kept}, data)
    finally:
        stop_sshd(back)


# --- the daemon SIGKILLed mid-pull and restarted ---------------------------------------------


def test_daemon_sigkilled_mid_pull_then_restarted(tmp_path: Path, sshd: SshdServer) -> None:
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    config, table, conf = _one_client(tmp_path, sshd, repo, data)
    first = _first_archive(tmp_path, repo, config)
    kept = pullkit.tree(data)
    (data / "slow.bin").write_bytes(os.urandom(3_000_000))
    table.update(schedule="0 2 * * *", create_args=["--upload-ratelimit", "200"])
    conf["daemon"] = {"timezone": "UTC"}
    pullkit.write_config(config, clients={"c1": table}, **conf)
    state_dir = tmp_path / "state"
    socket_dir = tmp_path / "run"

    with daemon_process(config, tmp_path / "d1.log", fire_in=1.0, env=server_env(tmp_path)) as d:
        wait_until(lambda: len(borg_processes(repo)) >= 2, within=60, what="serve + create")
        time.sleep(0.5)
        d.send_signal(signal.SIGKILL)
        d.wait(timeout=30)
    assert [r.result for r in runs(state_dir, "c1")][-1] is RunResult.RUNNING  # the dead one
    assert list(socket_dir.glob("c1.*.sock")) != []  # left behind by the killed daemon
    wait_until(lambda: not borg_processes(repo), within=60, what="serve and create to end")

    table["create_args"] = []
    pullkit.write_config(config, clients={"c1": table}, **conf)
    log = tmp_path / "d2.log"
    with daemon_process(config, log, fire_in=2.0, env=server_env(tmp_path)) as d:
        wait_until(
            lambda: len(finished_runs(state_dir, "c1")) >= 3, within=90, what="the next pull"
        )
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=60)
    results = [r.result for r in runs(state_dir, "c1")]
    assert results == [RunResult.OK, RunResult.INTERRUPTED, RunResult.OK], results
    assert has_event(log, "interrupted_runs_recovered")
    assert has_event(log, "stale_sockets_removed")
    assert list(socket_dir.iterdir()) == []
    newest = runs(state_dir, "c1")[-1].archive
    assert newest is not None
    assert_restores(tmp_path, repo, newest, data, pullkit.tree(data))
    assert_nothing_lost(tmp_path, repo, config, {first: kept}, data)


# --- property: hostile values reach the remote borg exactly, and nothing runs ----------------

NASTY = st.sampled_from(
    [
        "$(touch PWNED)",
        "`touch PWNED`",
        "; touch PWNED",
        "&& touch PWNED",
        "| touch PWNED",
        "'",
        '"',
        "\\",
        "\n",
        "\t",
        " ",
        "-",
        "--",
        "-e",
        "*",
        "?",
        "~",
        "#",
        "!",
        "{now}",
        "%",
        "ü",
        "ファイル",
        "\u202e",
        "$HOME",
        "${IFS}",
    ]
)
PIECE = st.one_of(NASTY, st.text(st.characters(exclude_characters="\0/"), max_size=4))
VALUE = st.lists(PIECE, min_size=1, max_size=4).map("".join)
NAME = VALUE.filter(lambda v: v.strip() != "" and v not in {".", ".."})


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    """A fake remote borg: records its argv and BORGTUNNEL_SOCKET, NUL-separated, and exits 0."""
    script = tmp_path / "fake-borg"
    script.write_text(
        "#!/bin/sh\n"
        f'{{ printf "%s\\0" "$BORGTUNNEL_SOCKET" "$@"; printf "\\0\\0"; }} >> {tmp_path}/argv\n'
    )
    script.chmod(0o755)
    return script


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    paths=st.lists(NAME, min_size=1, max_size=3),
    exclude=st.lists(VALUE, max_size=2),
    # Names starting with "-" or whitespace are refused at load (test_archive_names.py).
    archive=NAME.filter(lambda v: option_like(v) is None),
    socket_name=NAME.filter(lambda v: "\n" not in v),
)
def test_hostile_values_reach_the_remote_borg_exactly_and_run_nothing(
    tmp_path: Path,
    sshd: SshdServer,
    recorder: Path,
    *,
    paths: list[str],
    exclude: list[str],
    archive: str,
    socket_name: str,
) -> None:
    root = tmp_path / "values"
    absolute = [f"{root}/{p}" for p in paths]
    remote_socket = f"{sshd.workdir}/s/{socket_name}.sock"
    assume(len(remote_socket.encode()) <= 100)
    record = tmp_path / "argv"
    record.unlink(missing_ok=True)
    repo = tmp_path / "repo"
    client = {
        **pullkit.client_table(sshd, "c1", repo, absolute, archive=archive, exclude=exclude),
        "remote_borg": str(recorder),
        "remote_socket": remote_socket,
    }
    raw = pullkit.base_config(tmp_path, sshd)
    config = parse_config({**raw, "clients": {"c1": client}})

    outcome = asyncio.run(pull(config, config.client("c1")))

    assert outcome.borg_status == 0, outcome.error
    calls = record.read_bytes().split(b"\0\0\0")
    assert calls[-1] == b""
    assert len(calls) == 2, calls  # the fake borg ran exactly once
    socket_seen, *argv = [w.decode("utf-8", "surrogateescape") for w in calls[0].split(b"\0")]
    assert socket_seen == remote_socket
    assert argv == [
        "create",
        "--log-json",
        "--progress",
        "--json",
        "--show-version",
        *(f"--exclude={pattern}" for pattern in exclude),
        "--",
        f"ssh://borgtunnel{repo}::{archive}",
        *absolute,
    ]
    for where in (tmp_path, sshd.workdir, Path.home()):
        assert list(where.rglob("PWNED*")) == []
    assert not Path(remote_socket).exists()


# --- 16 clients at once through the daemon ---------------------------------------------------

PARALLEL = 16


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_sixteen_clients_pulled_concurrently_by_the_daemon(
    tmp_path: Path, sshd_factory: SshdFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sshd = sshd_factory(extra_config=["MaxStartups 64", "MaxSessions 64"])
    conf = pullkit.base_config(tmp_path, sshd)
    conf["daemon"] = {"timezone": "UTC", "max_parallel": PARALLEL}
    clients: dict[str, dict[str, Any]] = {}
    trees: dict[str, Path] = {}
    repos: dict[str, Path] = {}
    for number in range(PARALLEL):
        name = f"c{number:02d}"
        trees[name] = pullkit.make_client_data(tmp_path / "data" / name, random_bytes=300_000)
        repos[name] = tmp_path / "repos" / name
        pullkit.init_repo(tmp_path, repos[name])
        clients[name] = pullkit.client_table(
            sshd, name, repos[name], [trees[name]], schedule="0 2 * * *", archive=f"{name}-{{now}}"
        )
    config = pullkit.write_config(tmp_path / "bt.toml", clients=clients, **conf)
    state_dir = tmp_path / "state"
    peak = 0
    started = time.monotonic()
    with daemon_process(config, tmp_path / "d.log", fire_in=2.0, env=server_env(tmp_path)) as d:

        def all_done() -> bool:
            nonlocal peak
            with contextlib.suppress(OSError):
                peak = max(peak, _peak_rss_kib(d.pid))
            return all(finished_runs(state_dir, name) for name in clients)

        wait_until(all_done, within=240, what=f"{PARALLEL} pulls", interval=0.2)
        took = time.monotonic() - started
        peak = max(peak, _peak_rss_kib(d.pid))
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=60)
    for name in clients:
        (run,) = runs(state_dir, name)
        assert run.result is RunResult.OK, (name, run.error)
        assert pullkit.archives(tmp_path, repos[name]) == [run.archive]
        restored = tmp_path / "restored" / name
        assert run.archive is not None
        pullkit.extract(tmp_path, repos[name], run.archive, restored)
        pullkit.assert_same_tree(trees[name], restored)
        assert borg_processes(repos[name]) == set()
    records = [r for name in clients for r in runs(state_dir, name)]
    starts = sorted(r.started for r in records)
    most_at_once = max(
        sum(1 for o in records if o.started <= r.started and (o.finished or r.started) > r.started)
        for r in records
    )
    with capsys.disabled():
        print(
            f"\n{PARALLEL} concurrent pulls: {took:.1f}s from daemon start, starts spread "
            f"{(starts[-1] - starts[0]).total_seconds():.1f}s, {most_at_once} running at "
            f"once, daemon peak RSS (VmHWM) {peak / 1024:.1f} MiB"
        )
    assert peak > 0
    assert most_at_once >= PARALLEL // 2  # they really overlapped
