"""End to end: `borgtunnel pull` against a real sshd and real borg, verified by reading back.

Each test builds a client data tree, runs the real CLI (or the pull API for cancellation), and
checks the archive with the server's own borg (list, extract, byte compare) plus the absence of
leftovers: sockets on both sides, `borg serve` children, repository locks.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from borgtunnel.config import load_config
from borgtunnel.runs.pull import pull
from tests import pullkit
from tests.sshd import (
    SshdFactory,
    SshdServer,
    generate_key,
    known_hosts_line,
    public_key,
    stop_sshd,
)

pytestmark = pytest.mark.sshd


def _setup(tmp_path: Path, sshd: SshdServer, **client: object) -> tuple[Path, Path, Path]:
    """Data tree, initialised repository and a config for one client named c1."""
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    conf = pullkit.base_config(tmp_path, sshd)
    paths = client.pop("paths", [data])
    table = pullkit.client_table(sshd, "c1", repo, paths, **client)  # type: ignore[arg-type]
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    return data, repo, config


def _assert_no_leftovers(tmp_path: Path, sshd: SshdServer, repo: Path) -> None:
    for directory in (tmp_path / "run", sshd.workdir / "rsock"):  # local and remote sockets
        assert not directory.exists() or list(directory.iterdir()) == []
    assert pullkit.processes_mentioning(f"--restrict-to-repository {repo}") == []
    assert not (repo / "lock.exclusive").exists()
    assert not (repo / "lock.roster").exists()


def test_pull_archives_nasty_names_exactly(tmp_path: Path, sshd: SshdServer) -> None:
    data, repo, config = _setup(tmp_path, sshd)

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()
    assert len(summary) == 1
    assert summary[0].startswith("c1: ok archive=")
    names = pullkit.archives(tmp_path, repo)
    assert len(names) == 1
    pullkit.extract(tmp_path, repo, names[0], tmp_path / "restored")
    pullkit.assert_same_tree(data, tmp_path / "restored")
    # Names like "$(touch PWNED)" were stored, not run: no such file appeared anywhere.
    for root in (tmp_path, sshd.workdir, Path.home()):
        assert [p for p in pullkit.files_named(root, "PWNED") if p.parent != data] == []
    _assert_no_leftovers(tmp_path, sshd, repo)
    # The final stats are reported in the log, with the client bound.
    finished = [json.loads(line) for line in result.stderr.splitlines() if "pull_finished" in line]
    assert finished[0]["client"] == "c1"
    assert finished[0]["nfiles"] == sum(1 for p in data.rglob("*") if p.is_file())
    assert finished[0]["original_size"] > 200_000


def test_shell_metacharacters_in_paths_and_archive_run_nothing(
    tmp_path: Path, sshd: SshdServer
) -> None:
    # Relative names: the remote shell's working directory is the login user's home.
    odd_dir = tmp_path / "odd $(touch PWNED-A) `touch PWNED-B` ; touch PWNED-C '\"x"
    odd_dir.mkdir()
    (odd_dir / "f").write_text("odd\n")
    archive = 'it\'s "$(touch PWNED-D)" `touch PWNED-E` ; touch PWNED-F & {now}'
    _, repo, config = _setup(tmp_path, sshd, paths=[str(odd_dir)], archive=archive)

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 0, result.stderr
    for root in (Path.home(), tmp_path, sshd.workdir):
        assert sorted(p.name for p in root.glob("PWNED*")) == []
    names = pullkit.archives(tmp_path, repo)
    assert len(names) == 1
    prefix = archive.replace("{now}", "")
    assert names[0].startswith(prefix), names[0]
    assert names[0] != archive  # borg expanded {now} itself, on the client
    pullkit.extract(tmp_path, repo, names[0], tmp_path / "restored")
    pullkit.assert_same_tree(odd_dir, tmp_path / "restored")


def test_second_pull_deduplicates(tmp_path: Path, sshd: SshdServer) -> None:
    _, repo, config = _setup(tmp_path, sshd, archive="{hostname}-{now:%Y-%m-%dT%H:%M:%S.%f}")

    first = pullkit.run_cli(config, "pull", "c1")
    second = pullkit.run_cli(config, "pull", "c1")

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr

    def dedup(result: object) -> int:
        stderr = result.stderr  # type: ignore[attr-defined]
        line = next(x for x in stderr.splitlines() if "pull_finished" in x)
        return int(json.loads(line)["deduplicated_size"])

    assert dedup(first) > 200_000  # the random file is new
    assert dedup(second) < 20_000  # only metadata is new
    assert len(pullkit.archives(tmp_path, repo)) == 2


@pytest.mark.parametrize("source", ["passphrase_file", "passphrase_command"])
def test_encrypted_repository_from_init(tmp_path: Path, sshd: SshdServer, source: str) -> None:
    secret = "correct horse $(touch PWNED) 'battery' staple"
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    spy = _argv_env_spy(tmp_path)
    repo = tmp_path / "repos" / "enc"
    data = pullkit.make_client_data(tmp_path / "client-data")
    passphrase = (
        {"passphrase_file": str(secret_file)}
        if source == "passphrase_file"
        else {"passphrase_command": f"cat {secret_file}"}
    )
    table = pullkit.client_table(
        sshd,
        "c1",
        repo,
        [data],
        encryption="repokey-blake2",
        remote_borg=str(spy),
        **passphrase,
    )
    config = pullkit.write_config(
        tmp_path / "bt.toml", clients={"c1": table}, **pullkit.base_config(tmp_path, sshd)
    )

    init = pullkit.run_cli(config, "init", "c1")
    assert init.returncode == 0, init.stderr
    result = pullkit.run_cli(config, "--log-level", "debug", "pull", "c1")

    assert result.returncode == 0, result.stderr
    # Readable with the passphrase, and only with it.
    names = pullkit.archives(tmp_path, repo, BORG_PASSPHRASE=secret)
    assert len(names) == 1
    pullkit.extract(tmp_path, repo, names[0], tmp_path / "restored", BORG_PASSPHRASE=secret)
    pullkit.assert_same_tree(data, tmp_path / "restored")
    with pytest.raises(AssertionError, match="passphrase"):
        pullkit.archives(tmp_path, repo, BORG_PASSPHRASE="wrong")
    # Never in a log line, never in the remote argv or environment.
    for output in (init.stdout, init.stderr, result.stdout, result.stderr):
        assert secret not in output
    seen = (tmp_path / "spy.out").read_text()
    assert "BORG_PASSPHRASE_FD=0" in seen
    assert secret not in seen
    assert "BORG_PASSPHRASE=" not in seen


def _argv_env_spy(tmp_path: Path) -> Path:
    """A remote_borg that records its argv and environment, then runs the real borg."""
    spy = tmp_path / "borg-spy"
    spy.write_text(
        f'#!/bin/sh\n{{ printf \'%s\\n\' "$@"; env; }} >> {tmp_path / "spy.out"}\nexec borg "$@"\n'
    )
    spy.chmod(0o755)
    return spy


def test_wrong_passphrase_fails_with_exit_2(tmp_path: Path, sshd: SshdServer) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("right")
    bad.write_text("wrong")
    for path in (good, bad):
        path.chmod(0o600)
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "enc"
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(
        sshd, "c1", repo, [data], encryption="repokey", passphrase_file=str(good)
    )
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    assert pullkit.run_cli(config, "init", "c1").returncode == 0
    table["passphrase_file"] = str(bad)
    pullkit.write_config(config, clients={"c1": table}, **conf)

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2
    assert "c1: failed" in result.stdout
    assert "passphrase" in result.stdout.lower()
    assert pullkit.archives(tmp_path, repo, BORG_PASSPHRASE="right") == []


def test_stale_remote_socket_is_replaced_and_removed(tmp_path: Path, sshd: SshdServer) -> None:
    _, repo, config = _setup(tmp_path, sshd)
    stale = sshd.workdir / "rsock" / "c1.sock"
    stale.parent.mkdir(mode=0o755)  # safe as it is: must be left alone
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(stale))
    leftover.close()  # a socket file nobody listens on, as sshd leaves behind
    assert stale.is_socket()

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 0, result.stderr
    assert len(pullkit.archives(tmp_path, repo)) == 1
    assert not stale.exists()
    assert stat.S_IMODE(stale.parent.stat().st_mode) == 0o755
    _assert_no_leftovers(tmp_path, sshd, repo)


def test_remote_socket_dir_symlink_is_refused(tmp_path: Path, sshd: SshdServer) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (sshd.workdir / "rsock").symlink_to(elsewhere)
    _, repo, config = _setup(tmp_path, sshd)

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2
    assert "symlink" in result.stdout
    assert pullkit.archives(tmp_path, repo) == []
    assert list(elsewhere.iterdir()) == []


def test_unknown_host_key_is_refused_before_any_data_moves(
    tmp_path: Path, sshd: SshdServer
) -> None:
    _, repo, config = _setup(tmp_path, sshd)
    sshd.known_hosts.write_text("")

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2
    assert "host key unknown" in result.stdout
    assert sshd.host_key_fingerprint in result.stdout
    assert "serve_started" not in result.stderr
    assert not (sshd.workdir / "rsock").exists()  # nothing ran on the client
    assert pullkit.archives(tmp_path, repo) == []


def test_changed_host_key_is_refused_before_any_data_moves(
    tmp_path: Path, sshd: SshdServer
) -> None:
    _, repo, config = _setup(tmp_path, sshd)
    other = generate_key(tmp_path / "other_host_key", "impostor")
    sshd.known_hosts.write_text(known_hosts_line(sshd.host, sshd.port, public_key(other)))

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2
    assert "host key CHANGED" in result.stdout
    assert sshd.host_key_fingerprint in result.stdout
    assert "serve_started" not in result.stderr
    assert not (sshd.workdir / "rsock").exists()
    assert pullkit.archives(tmp_path, repo) == []


def test_missing_known_hosts_file_is_named(tmp_path: Path, sshd: SshdServer) -> None:
    _, repo, config = _setup(tmp_path, sshd)
    sshd.known_hosts.unlink()

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2
    assert f"known_hosts {sshd.known_hosts}: No such file or directory" in result.stdout
    assert pullkit.archives(tmp_path, repo) == []


def test_bad_config_exits_78_naming_the_key(tmp_path: Path, sshd: SshdServer) -> None:
    _, _, config = _setup(tmp_path, sshd)
    config.write_text(config.read_text().replace(f"port = {sshd.port}", 'port = "twenty-two"'))

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 78
    assert "clients.c1.port: Input should be a valid integer" in result.stderr
    assert str(config) in result.stderr
    assert not (tmp_path / "run").exists()  # started nothing


def _path_without(tmp_path: Path, *missing: str) -> Path:
    """A bin dir with everything from /usr/bin and /bin except the named tools."""
    bindir = tmp_path / "limited-bin"
    bindir.mkdir()
    for source in (Path("/usr/bin"), Path("/bin")):
        for tool in source.iterdir():
            target = bindir / tool.name
            if tool.name in missing or target.exists() or target.is_symlink():
                continue
            target.symlink_to(tool)
    return bindir


def test_socat_is_used_when_nc_is_missing(tmp_path: Path, sshd_factory: SshdFactory) -> None:
    bindir = _path_without(tmp_path, "nc", "nc.openbsd", "netcat")
    server = sshd_factory(extra_config=[f"SetEnv PATH={bindir}"])
    data, repo, config = _setup(tmp_path, server)

    result = pullkit.run_cli(config, "--log-level", "debug", "pull", "c1")

    assert result.returncode == 0, result.stderr
    prepared = [json.loads(x) for x in result.stderr.splitlines() if "remote_prepared" in x]
    assert prepared[0]["tool"] == "socat"
    names = pullkit.archives(tmp_path, repo)
    pullkit.extract(tmp_path, repo, names[0], tmp_path / "restored")
    pullkit.assert_same_tree(data, tmp_path / "restored")


def test_clear_error_when_neither_nc_nor_socat(tmp_path: Path, sshd_factory: SshdFactory) -> None:
    bindir = _path_without(tmp_path, "nc", "nc.openbsd", "netcat", "socat")
    server = sshd_factory(extra_config=[f"SetEnv PATH={bindir}"])
    _, repo, config = _setup(tmp_path, server)

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2
    assert "neither nc (netcat-openbsd" in result.stdout
    assert "socat" in result.stdout
    assert pullkit.archives(tmp_path, repo) == []


def test_missing_repository_fails_without_creating_one(tmp_path: Path, sshd: SshdServer) -> None:
    _, repo, config = _setup(tmp_path, sshd)
    missing = repo.parent / "never-initialised"
    config.write_text(config.read_text().replace(str(repo), str(missing)))

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2
    assert "c1: failed" in result.stdout
    assert not missing.exists()


async def test_cancelled_pull_leaves_nothing_behind(tmp_path: Path, sshd: SshdServer) -> None:
    """Cancel while borg create is blocked (reading a FIFO with --read-special)."""
    data = tmp_path / "client-data"
    data.mkdir()
    (data / "a").write_text("a\n")
    fifo = data / "blocking-fifo"
    os.mkfifo(fifo)
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    table = pullkit.client_table(sshd, "c1", repo, [data], create_args=["--read-special"])
    config_path = pullkit.write_config(
        tmp_path / "bt.toml", clients={"c1": table}, **pullkit.base_config(tmp_path, sshd)
    )
    config = load_config(config_path)
    serve = f"--restrict-to-repository {repo}"
    create = f"--read-special -- ssh://borgtunnel{repo}"

    task = asyncio.create_task(pull(config, config.client("c1")))
    reached = False
    for _ in range(200):  # until borg create is running and serve is connected
        await asyncio.sleep(0.05)
        if pullkit.processes_mentioning(serve) and pullkit.processes_mentioning(create):
            reached = True
            break
    await asyncio.sleep(0.3)  # let borg open the FIFO and block on it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reached, "the pull never reached borg create"

    for _ in range(50):  # the remote borg create gets SIGTERM; allow it a moment to exit
        if not pullkit.processes_mentioning(create):
            break
        await asyncio.sleep(0.1)
    assert pullkit.processes_mentioning(create) == []
    _assert_no_leftovers(tmp_path, sshd, repo)
    assert pullkit.archives(tmp_path, repo) == []  # and the repository is usable (not locked)


def test_borg_warning_exits_1_and_keeps_the_archive(tmp_path: Path, sshd: SshdServer) -> None:
    data = tmp_path / "client-data"  # made by _setup
    _, repo, config = _setup(tmp_path, sshd, paths=[str(data), str(tmp_path / "vanished")])

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("c1: warning archive=")
    assert "vanished" in result.stdout  # the last borg warning is shown
    # borg's own --log-json line from the client, re-logged here with the client bound.
    relogged = [json.loads(x) for x in result.stderr.splitlines() if "vanished" in x]
    assert any(
        r.get("source") == "borg create" and r["client"] == "c1" and r["level"] == "warning"
        for r in relogged
    ), result.stderr
    names = pullkit.archives(tmp_path, repo)
    pullkit.extract(tmp_path, repo, names[0], tmp_path / "restored")
    pullkit.assert_same_tree(data, tmp_path / "restored")


def test_several_clients_one_line_each_worst_exit_code(tmp_path: Path, sshd: SshdServer) -> None:
    data = pullkit.make_client_data(tmp_path / "client-data")
    good, missing = tmp_path / "repos" / "good", tmp_path / "repos" / "missing"
    pullkit.init_repo(tmp_path, good)
    clients = {
        "good": pullkit.client_table(sshd, "good", good, [data]),
        "bad": pullkit.client_table(sshd, "bad", missing, [data]),
    }
    config = pullkit.write_config(
        tmp_path / "bt.toml", clients=clients, **pullkit.base_config(tmp_path, sshd)
    )

    result = pullkit.run_cli(config, "pull", "good", "bad")

    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["good", "bad"]
    assert lines[0].startswith("good: ok ")
    assert lines[1].startswith("bad: failed ")
    assert len(pullkit.archives(tmp_path, good)) == 1


async def test_connection_lost_mid_run_is_marked_for_a_retry(
    tmp_path: Path, sshd: SshdServer
) -> None:
    """sshd dies while borg create runs: the outcome says the link was lost (daemon retries)."""
    data = tmp_path / "client-data"
    data.mkdir()
    os.mkfifo(data / "blocking-fifo")
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    table = pullkit.client_table(sshd, "c1", repo, [data], create_args=["--read-special"])
    config = load_config(
        pullkit.write_config(
            tmp_path / "bt.toml", clients={"c1": table}, **pullkit.base_config(tmp_path, sshd)
        )
    )
    task = asyncio.create_task(pull(config, config.client("c1")))
    try:
        for _ in range(200):
            await asyncio.sleep(0.05)
            if pullkit.processes_mentioning(f"--read-special -- ssh://borgtunnel{repo}"):
                break
        stop_sshd(sshd)  # the listener, the session and its commands: the link is gone
        async with asyncio.timeout(30):
            outcome = await task
    finally:
        task.cancel()

    assert outcome.result == "failed"
    assert outcome.link_lost
    assert outcome.state == "running"
    _assert_no_leftovers_local(tmp_path, repo)


def _assert_no_leftovers_local(tmp_path: Path, repo: Path) -> None:
    run_dir = tmp_path / "run"
    assert not run_dir.exists() or list(run_dir.iterdir()) == []
    assert pullkit.processes_mentioning(f"--restrict-to-repository {repo}") == []
    assert not (repo / "lock.exclusive").exists()
