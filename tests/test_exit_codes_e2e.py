"""Exit statuses that are not borg's, and borg 1.4's specific ones, through real sshd and borg.

Regression for issue 8 item 1: a missing client borg (the shell's 127) used to be read as a borg
1.4 "modern" warning, reported `warning`, exit 1, and counted as a success in the history.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from borgtunnel import clientborg
from borgtunnel.history import History
from tests import borgs, pullkit
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd


def _config(tmp_path: Path, sshd: SshdServer, repo: Path, **client: object) -> Path:
    data = pullkit.make_client_data(tmp_path / "client-data", random_bytes=1000)
    table = pullkit.client_table(sshd, "c1", repo, [data], **client)
    return pullkit.write_config(
        tmp_path / "bt.toml", clients={"c1": table}, **pullkit.base_config(tmp_path, sshd)
    )


def _last_result(tmp_path: Path) -> tuple[str, str | None]:
    with History.open(tmp_path / "state") as history:
        last = history.last_run("c1")
    assert last is not None
    return str(last.result), last.error


def test_missing_client_borg_is_a_failure_naming_remote_borg(
    tmp_path: Path, sshd: SshdServer
) -> None:
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    config = _config(tmp_path, sshd, repo, remote_borg="/nonexistent/borg")
    # Even when an earlier pull saw a 1.4 there (modern codes asked for), 127 is the shell's.
    clientborg.remember(tmp_path / "state", "c1", clientborg.BorgVersion(1, 4, 5))

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stderr
    assert result.stdout.startswith("c1: failed"), result.stdout
    assert "remote_borg '/nonexistent/borg' not found on the client (status 127)" in result.stdout
    outcome, error = _last_result(tmp_path)
    assert outcome == "failed"
    assert error is not None
    assert "/nonexistent/borg" in error
    # The failure showed no borg version: forget the old one and learn again next time.
    assert clientborg.known_version(tmp_path / "state", "c1") is None
    assert pullkit.archives(tmp_path, repo) == []


def test_not_executable_client_borg_is_a_failure(tmp_path: Path, sshd: SshdServer) -> None:
    not_executable = tmp_path / "borg-no-x"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    config = _config(tmp_path, sshd, repo, remote_borg=str(not_executable))

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stderr
    assert f"remote_borg '{not_executable}' is not executable" in result.stdout
    assert _last_result(tmp_path)[0] == "failed"


@pytest.mark.parametrize("code", [101, 42])
def test_a_status_we_did_not_ask_for_is_a_failure(
    tmp_path: Path, sshd: SshdServer, code: int
) -> None:
    """A "borg" that exits 101 (a modern warning) without being asked for modern codes."""
    fake = tmp_path / "fake-borg"
    fake.write_text(f"#!/bin/sh\nexit {code}\n")
    fake.chmod(0o755)
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    config = _config(tmp_path, sshd, repo, remote_borg=str(fake))

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stderr
    assert f"remote_borg '{fake}' exited with status {code}, which borg never returns" in (
        result.stdout
    )
    assert _last_result(tmp_path)[0] == "failed"


def test_wrong_passphrase_with_borg_14_says_so(tmp_path: Path, sshd: SshdServer) -> None:
    borg14 = borgs.executable(borgs.BUILT[0])
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("right")
    bad.write_text("wrong")
    for path in (good, bad):
        path.chmod(0o600)
    repo = tmp_path / "repos" / "enc"
    config = _config(
        tmp_path, sshd, repo, encryption="repokey", passphrase_file=str(good), remote_borg=borg14
    )
    assert pullkit.run_cli(config, "init", "c1").returncode == 0
    first = pullkit.run_cli(config, "pull", "c1")  # learns that the client runs 1.4
    assert first.returncode == 0, first.stderr
    config.write_text(config.read_text().replace(str(good), str(bad)))

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stderr
    failed = [json.loads(x) for x in result.stderr.splitlines() if '"pull_failed"' in x]
    assert failed[0]["borg_status"] == 52  # PassphraseWrong: asked for, and read as such
    assert failed[0]["modern_exit_codes"] is True
    assert "wrong passphrase: the client's passphrase_file" in result.stdout
    assert "status 52" in result.stdout


def test_an_unreachable_client_keeps_what_was_learned(tmp_path: Path, sshd: SshdServer) -> None:
    """Only a run whose remote command ended can tell which borg the client runs."""
    with socket.socket() as probe:  # a port nobody listens on (bound, then closed)
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    config = _config(tmp_path, sshd, repo, port=closed_port)
    clientborg.remember(tmp_path / "state", "c1", clientborg.BorgVersion(1, 4, 5))

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stderr
    assert _last_result(tmp_path)[0] == "failed"
    assert clientborg.known_version(tmp_path / "state", "c1") == clientborg.BorgVersion(1, 4, 5)
