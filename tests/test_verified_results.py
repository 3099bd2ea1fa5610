"""An ``ok`` is what the server verified, never the client's word (issue: trustworthy ok).

Real sshd, real borg; the client side is either the real borg or a hostile script (tests/hostile.py)
standing in for a compromised client. Each test would fail on a main that believed the client.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import pytest

from tests import hostile, pullkit
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd


def test_client_json_without_connecting_is_not_ok(tmp_path: Path, sshd: SshdServer) -> None:
    """A client that prints a perfect --json and exits 0 without sending a byte: failed."""
    liar = hostile.script(tmp_path, "liar", f"echo {shlex.quote(hostile.create_json())}\nexit 0\n")
    _, repo, config = hostile.setup(tmp_path, sshd, remote_borg=str(liar))

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.startswith("c1: failed "), result.stdout
    assert "unverified" in result.stdout
    assert pullkit.archives(tmp_path, repo) == []
    (row,) = hostile.runs(tmp_path)
    assert row["result"] == "failed"
    assert row["archive"] is None
    assert row["nfiles"] is None  # the invented stats are not recorded


def test_claiming_an_earlier_archive_is_not_ok(tmp_path: Path, sshd: SshdServer) -> None:
    """A client replaying the --json of a real earlier archive has written nothing new."""
    _, repo, config = hostile.setup(tmp_path, sshd)
    assert pullkit.run_cli(config, "pull", "c1").returncode == 0
    (first,) = pullkit.archives(tmp_path, repo)
    info = hostile.server_info(tmp_path, repo, first)
    replay = hostile.create_json(first, info["id"])
    # It even talks to the repository (read-only), so a borg serve of this run exits 0.
    body = f"borg list ssh://borgtunnel{repo} > /dev/null\necho {shlex.quote(replay)}\nexit 0\n"
    liar = hostile.script(tmp_path, "replay", body)
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(
        sshd, "c1", repo, [tmp_path / "client-data"], remote_borg=str(liar)
    )
    pullkit.write_config(config, clients={"c1": table}, **conf)

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "earlier run already recorded" in result.stdout
    assert [row["result"] for row in hostile.runs(tmp_path)] == ["ok", "failed"]


def test_a_new_junk_archive_does_not_verify_a_claimed_old_one(
    tmp_path: Path, sshd: SshdServer
) -> None:
    """The client commits something (a real archive under another name) but names a forged
    archive: the server finds no archive with that name and id."""
    data, repo, _ = hostile.setup(tmp_path, sshd, init=True)
    # Run the real create, then claim a different, invented archive.
    body = (
        f'borg "$@" > /dev/null\necho {shlex.quote(hostile.create_json("never-written"))}\nexit 0\n'
    )
    liar = hostile.script(tmp_path, "junk", body)
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(sshd, "c1", repo, [data], remote_borg=str(liar))
    config = pullkit.write_config(tmp_path / "bt2.toml", clients={"c1": table}, **conf)

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot read archive 'never-written'" in result.stdout
    assert hostile.runs(tmp_path)[-1]["result"] == "failed"


def test_recorded_stats_are_the_servers_not_the_clients(tmp_path: Path, sshd: SshdServer) -> None:
    """The real create runs, but the client inflates its numbers: the history keeps the
    numbers the server's own borg read."""
    rewrite = (
        "import json, sys; d = json.load(sys.stdin); "
        "d['archive']['stats'].update(nfiles=999999, original_size=10**15); print(json.dumps(d))"
    )
    body = (
        'out=$(borg "$@")\n'
        "rc=$?\n"
        f'printf "%s" "$out" | python3 -c {shlex.quote(rewrite)}\n'
        "exit $rc\n"
    )
    inflater = hostile.script(tmp_path, "inflate", body)
    _, repo, config = hostile.setup(tmp_path, sshd, remote_borg=str(inflater))

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    (name,) = pullkit.archives(tmp_path, repo)
    info = hostile.server_info(tmp_path, repo, name)
    (row,) = hostile.runs(tmp_path)
    assert row["result"] == "ok"
    assert row["archive_id"] == info["id"]
    assert row["nfiles"] == info["stats"]["nfiles"] != 999999
    assert row["original_size"] == info["stats"]["original_size"]
    assert f"files={info['stats']['nfiles']} " in result.stdout


@pytest.mark.parametrize(
    "payload",
    [
        '{"archive": {"name": "a", "id": "' + hostile.FAKE_ID + '", "stats": '
        '{"original_size": Infinity, "compressed_size": 1, "deduplicated_size": 1, "nfiles": 1}}}',
        hostile.create_json(nfiles=10**19),
        '{"archive": {"name": "\\ud800", "id": "' + hostile.FAKE_ID + '"}}',
        "x" * 5000,
    ],
    ids=["infinity", "sqlite-overflow", "lone-surrogate", "garbage"],
)
def test_hostile_json_fails_one_client_and_the_next_still_pulls(
    tmp_path: Path, sshd: SshdServer, payload: str
) -> None:
    """What used to crash the command (exit 1, read as "warning"; a row left "running")."""
    data = pullkit.make_client_data(tmp_path / "client-data")
    bad_repo, good_repo = tmp_path / "repos" / "bad", tmp_path / "repos" / "good"
    for repo in (bad_repo, good_repo):
        pullkit.init_repo(tmp_path, repo)
    liar = hostile.script(tmp_path, "json", f"echo {shlex.quote(payload)}\nexit 0\n")
    clients = {
        "bad": pullkit.client_table(sshd, "bad", bad_repo, [data], remote_borg=str(liar)),
        "good": pullkit.client_table(sshd, "good", good_repo, [data]),
    }
    config = pullkit.write_config(
        tmp_path / "bt.toml", clients=clients, **pullkit.base_config(tmp_path, sshd)
    )

    result = pullkit.run_cli(config, "pull", "bad", "good")

    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bad: failed "), lines
    assert lines[1].startswith("good: ok "), lines
    assert [r["result"] for r in hostile.runs(tmp_path, "bad")] == ["failed"]
    assert len(pullkit.archives(tmp_path, good_repo)) == 1


def test_key_change_through_the_tunnel_is_undone_and_reported(
    tmp_path: Path, sshd: SshdServer
) -> None:
    """A compromised client re-wraps the repository key with its own passphrase (append-only
    serve allows it) and then backs up normally: the run is failed as tampering, the server's
    copy of the key is put back, and the next honest pull works with the server's passphrase."""
    data, repo, config, conf, table = hostile.encrypted_setup(tmp_path, sshd)
    assert pullkit.run_cli(config, "init", "c1").returncode == 0
    saved = tmp_path / "state" / "keys" / "c1.key"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    table["remote_borg"] = str(hostile.rekey_script(tmp_path, repo))
    pullkit.write_config(config, clients={"c1": table}, **conf)

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "tampering: the repository key was changed" in result.stdout
    assert "was put back" in result.stdout
    # The server's passphrase opens the repository again, and the tampering run's archive too.
    (name,) = pullkit.archives(tmp_path, repo, BORG_PASSPHRASE="right horse battery")
    assert hostile.runs(tmp_path)[-1]["result"] == "failed"
    del table["remote_borg"]
    pullkit.write_config(config, clients={"c1": table}, **conf)
    assert pullkit.run_cli(config, "pull", "c1").returncode == 0
    assert len(pullkit.archives(tmp_path, repo, BORG_PASSPHRASE="right horse battery")) == 2
    pullkit.extract(
        tmp_path, repo, name, tmp_path / "restored", BORG_PASSPHRASE="right horse battery"
    )
    pullkit.assert_same_tree(data, tmp_path / "restored")


def test_first_verified_pull_saves_the_key_of_an_existing_repository(
    tmp_path: Path, sshd: SshdServer
) -> None:
    secret = tmp_path / "pass"
    secret.write_text("pw")
    secret.chmod(0o600)
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "made-elsewhere"
    pullkit.borg(
        tmp_path,
        "init",
        "--encryption=repokey",
        "--make-parent-dirs",
        str(repo),
        env=pullkit.borg_env(tmp_path, BORG_PASSPHRASE="pw"),
    )
    table = pullkit.client_table(
        sshd, "c1", repo, [data], encryption="repokey", passphrase_file=str(secret)
    )
    config = pullkit.write_config(
        tmp_path / "bt.toml", clients={"c1": table}, **pullkit.base_config(tmp_path, sshd)
    )
    saved = tmp_path / "state" / "keys" / "c1.key"
    assert not saved.exists()

    assert pullkit.run_cli(config, "pull", "c1").returncode == 0

    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert saved.read_text().startswith("BORG_KEY ")


def test_storage_quota_stops_a_client_filling_the_disk(tmp_path: Path, sshd: SshdServer) -> None:
    data = tmp_path / "client-data"
    data.mkdir()
    (data / "big.bin").write_bytes(os.urandom(15_000_000))
    _, repo, config = hostile.setup(tmp_path, sshd, paths=[data], storage_quota="10M")

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "storage quota (10.00 MB) has been exceeded" in result.stdout, result.stderr
    assert pullkit.archives(tmp_path, repo) == []
    pullkit.borg(tmp_path, "check", str(repo))  # consistent


def test_check_config_refuses_unsplittable_remote_borg(tmp_path: Path, sshd: SshdServer) -> None:
    _, _, config = hostile.setup(tmp_path, sshd, remote_borg="borg 'unterminated")

    result = pullkit.run_cli(config, "check-config")

    assert result.returncode == 78
    assert "clients.c1.remote_borg" in result.stderr
