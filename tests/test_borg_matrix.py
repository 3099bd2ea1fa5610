"""End to end on every supported borg: Debian's 1.2.4 and PyPI's 1.4.5, same and mixed versions.

The server's borg (``server.borg``: serve, init and this test's read-back) and the client's
(``remote_borg``) are chosen per leg (tests/borgs.py). A representative set runs on each leg — a
full pull read back and compared, a warning pull, a failure — rather than the whole suite, to
keep it within budget. The client's borg runs behind a spy that records the environment it got,
so the tests see whether specific exit codes were asked for (only of a 1.4 known from an earlier
pull) and that no passphrase reached it by environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from borgtunnel import clientborg
from borgtunnel.history import History
from tests import borgs, pullkit
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

SECRET = "matrix $(touch PWNED) 'pass' phrase"


@pytest.fixture(params=borgs.LEGS, ids=lambda leg: leg.id)
def leg(request: pytest.FixtureRequest) -> borgs.Leg:
    return request.param  # type: ignore[no-any-return]


class Matrix:
    """One client c1 on the test sshd, with the leg's borgs and a spy in front of the client's."""

    def __init__(self, tmp_path: Path, sshd: SshdServer, leg: borgs.Leg) -> None:
        self.tmp = tmp_path
        self.sshd = sshd
        self.leg = leg
        self.server_borg = borgs.executable(leg.server)
        self.client_borg = borgs.executable(leg.client)
        self.state = tmp_path / "state"
        self.spy_log = tmp_path / "spy.env"
        self.spy = tmp_path / "client-borg-spy"
        self.spy.write_text(
            f'#!/bin/sh\nenv > {self.spy_log}\nexec {self.client_borg} "$@"\n', encoding="utf-8"
        )
        self.spy.chmod(0o755)
        self.data = pullkit.make_client_data(tmp_path / "client-data")
        self.repo = tmp_path / "repos" / "c1"
        self.config = tmp_path / "bt.toml"

    @property
    def modern_client(self) -> bool:
        version = clientborg.BorgVersion.parse(self.leg.client)
        assert version is not None
        return version.modern_exit_codes

    def write(self, **client: Any) -> None:
        conf = pullkit.base_config(self.tmp, self.sshd)
        conf["server"]["borg"] = self.server_borg
        paths = client.pop("paths", [self.data])
        table = pullkit.client_table(
            self.sshd, "c1", self.repo, paths, remote_borg=str(self.spy), **client
        )
        pullkit.write_config(self.config, clients={"c1": table}, **conf)

    def env_seen(self) -> dict[str, str]:
        lines = self.spy_log.read_text(encoding="utf-8", errors="replace").splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def learned(self) -> str | None:
        version = clientborg.known_version(self.state, "c1")
        return None if version is None else str(version)

    def seed_learned(self) -> None:
        """As if an earlier pull had seen the client's borg (tested by the full-pull test)."""
        version = clientborg.BorgVersion.parse(self.leg.client)
        assert version is not None
        clientborg.remember(self.state, "c1", version)

    def init_plain(self) -> None:
        pullkit.init_repo(self.tmp, self.repo, exe=self.server_borg)

    def archives(self, **env: str) -> list[str]:
        return pullkit.archives(self.tmp, self.repo, exe=self.server_borg, **env)

    def assert_restores(self, archive: str, dest: str, **env: str) -> None:
        target = self.tmp / dest
        pullkit.extract(self.tmp, self.repo, archive, target, exe=self.server_borg, **env)
        pullkit.assert_same_tree(self.data, target)


def _events(stderr: str, event: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if f'"{event}"' in line]


def test_full_pull_reads_back_and_learns_the_client_borg(
    tmp_path: Path, sshd: SshdServer, leg: borgs.Leg
) -> None:
    m = Matrix(tmp_path, sshd, leg)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    m.write(encryption="repokey-blake2", passphrase_file=str(secret_file))
    init = pullkit.run_cli(m.config, "init", "c1")  # with the server's borg of this leg
    assert init.returncode == 0, init.stderr
    assert m.learned() is None

    first = pullkit.run_cli(m.config, "pull", "c1")

    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("c1: ok archive="), first.stdout
    assert m.learned() == leg.client  # from borg's --show-version line, no extra exec
    assert "BORG_EXIT_CODES" not in m.env_seen()  # unknown borg: the generic 0/1/2
    names = m.archives(BORG_PASSPHRASE=SECRET)
    assert len(names) == 1
    m.assert_restores(names[0], "restored", BORG_PASSPHRASE=SECRET)
    # Through the tunnel too: the client's borg extract gets what it asks of the restore's
    # read-only request filter (server/rpcfilter.py), whichever borg runs on either side.
    target = tmp_path / "through-the-tunnel"
    restored = pullkit.run_cli(m.config, "restore", "c1", names[0], "--target", str(target))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    pullkit.assert_same_tree(m.data, target)

    second = pullkit.run_cli(m.config, "pull", "c1")  # unchanged data

    assert second.returncode == 0, second.stderr
    seen = m.env_seen()
    assert (seen.get("BORG_EXIT_CODES") == "modern") is m.modern_client
    assert seen["BORG_PASSPHRASE_FD"] == "0"
    assert len(m.archives(BORG_PASSPHRASE=SECRET)) == 2
    finished = _events(second.stderr, "pull_finished")
    assert finished[0]["client_borg"] == leg.client
    assert finished[0]["modern_exit_codes"] is m.modern_client
    for text in (init.stdout, init.stderr, first.stdout, first.stderr, second.stderr):
        assert SECRET not in text
    assert SECRET not in m.spy_log.read_text()
    assert pullkit.processes_mentioning(f"--restrict-to-repository {m.repo}") == []


def test_warning_pull_keeps_the_archive(tmp_path: Path, sshd: SshdServer, leg: borgs.Leg) -> None:
    m = Matrix(tmp_path, sshd, leg)
    m.init_plain()
    m.write(paths=[str(m.data), str(tmp_path / "vanished")])
    m.seed_learned()

    result = pullkit.run_cli(m.config, "pull", "c1")

    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("c1: warning archive="), result.stdout
    assert "vanished" in result.stdout
    status = _events(result.stderr, "pull_finished")[0]["borg_status"]
    if m.modern_client:
        assert status == 107  # BackupFileNotFoundError, asked for and read as a warning
        meaning = _events(result.stderr, "borg_warning_status")[0]["meaning"]
        assert "does not exist on the client" in meaning
    else:
        assert status == 1
    names = m.archives()
    assert len(names) == 1
    m.assert_restores(names[0], "restored")
    with History.open(m.state) as history:
        last = history.last_run("c1")
        assert last is not None
        assert last.result == "warning"


def test_missing_repository_fails_with_the_reason(
    tmp_path: Path, sshd: SshdServer, leg: borgs.Leg
) -> None:
    m = Matrix(tmp_path, sshd, leg)  # the repository is never initialised
    m.write()
    m.seed_learned()

    result = pullkit.run_cli(m.config, "pull", "c1")

    assert result.returncode == 2, result.stderr
    assert result.stdout.startswith("c1: failed"), result.stdout
    assert "does not exist" in result.stdout
    status = _events(result.stderr, "pull_failed")[0]["borg_status"]
    if m.modern_client:
        assert status == 13
        assert "run `borgtunnel init CLIENT` first" in result.stdout
    else:
        assert status == 2
    assert not m.repo.exists()
    assert m.learned() == leg.client  # the failure still showed which borg runs there
    with History.open(m.state) as history:
        last = history.last_run("c1")
        assert last is not None
        assert last.result == "failed"
