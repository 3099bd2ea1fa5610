"""A compromised client during `borgtunnel restore` (issue 16, item 7).

borg 1.x `borg serve` has no read-only mode, so the restore's serve gets only the read requests
of `borg extract` (server/rpcfilter.py; any other request ends its connection and is reported
as tampering), has the smallest quota borg accepts, and the repository and its key are checked
after every restore. Real sshd, real borg; the client is a `remote_borg` script that abuses its
tunnel and then runs the real `borg extract`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from borgtunnel.history import History
from tests import hostile, pullkit
from tests.reporting_kit import Receiver, append_tables, kinds
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd


def _data_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "data").rglob("*") if p.is_file())


def _pulled(config: Path, tmp_path: Path, repo: Path, **env: str) -> str:
    pulled = pullkit.run_cli(config, "pull", "c1")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    (archive,) = pullkit.archives(tmp_path, repo, **env)
    return archive


def test_a_restore_cannot_fill_the_repository(tmp_path: Path, sshd: SshdServer) -> None:
    """No quota configured: during a restore the client tries to add a 15 MB archive. Its first
    write request ends the connection before borg sees it: nothing reaches the disk."""
    big = tmp_path / "client-big"
    big.mkdir()
    (big / "big.bin").write_bytes(os.urandom(15_000_000))
    data, repo, config = hostile.setup(tmp_path, sshd)
    table = pullkit.client_table(sshd, "c1", repo, [data])
    conf = pullkit.base_config(tmp_path, sshd)
    archive = _pulled(config, tmp_path, repo)
    size_before = _data_bytes(repo)
    fill = hostile.script(
        tmp_path,
        "fill",
        f'borg create ssh://borgtunnel{repo}::evil {big} >"{tmp_path}/fill.log" 2>&1\n'
        f'echo "create status $?" >>"{tmp_path}/fill.log"\n'
        'exec borg "$@"\n',
    )
    pullkit.write_config(config, clients={"c1": {**table, "remote_borg": str(fill)}}, **conf)
    target = tmp_path / "target"

    result = pullkit.run_cli(config, "restore", "c1", archive, "--target", str(target))

    fill_log = (tmp_path / "fill.log").read_text()
    assert "create status 0" not in fill_log, fill_log
    assert pullkit.archives(tmp_path, repo) == [archive]
    # borg 1.x writes each chunk before it checks a quota: without the filter all 15 MB were
    # on disk (uncommitted) after this attempt. Now not one byte.
    assert _data_bytes(repo) == size_before
    assert result.returncode == 2, result.stdout + result.stderr
    assert "tampering: the client sent 1 request(s) a restore never makes" in result.stdout
    assert "'put'" in result.stdout
    pullkit.assert_same_tree(data, target)  # the real extract after the attempt still worked
    pullkit.borg(tmp_path, "check", str(repo))


def test_a_write_and_a_rekey_during_a_restore_are_reported(
    tmp_path: Path, sshd: SshdServer, receiver: Receiver
) -> None:
    """The client tries to re-wrap the key with its own passphrase and to add a small archive
    during the restore: both requests are refused and reported as tampering (and notified),
    the key and the archives stay as they were."""
    data, repo, config, conf, table = hostile.encrypted_setup(tmp_path, sshd)
    notify = {"notify": {"urls": [receiver.json_url], "timeout": 10}}
    assert pullkit.run_cli(config, "init", "c1").returncode == 0
    right = {"BORG_PASSPHRASE": hostile.PASSPHRASE}
    archive = _pulled(config, tmp_path, repo, **right)
    sneak = hostile.script(
        tmp_path,
        "rekey-and-write",
        "pw=$(cat)\n"
        "unset BORG_PASSPHRASE_FD\n"
        f'BORG_PASSPHRASE="$pw" BORG_NEW_PASSPHRASE=evil borg key change-passphrase'
        f" ssh://borgtunnel{repo} >/dev/null 2>&1 && echo rekeyed >>{tmp_path}/sneak.log\n"
        f'BORG_PASSPHRASE="$pw" borg create ssh://borgtunnel{repo}::sneaky {data}/plain.txt'
        f" >/dev/null 2>&1 && echo created >>{tmp_path}/sneak.log\n"
        'BORG_PASSPHRASE="$pw" exec borg "$@"\n',
    )
    key_before = (repo / "config").read_text()
    pullkit.write_config(config, clients={"c1": {**table, "remote_borg": str(sneak)}}, **conf)
    append_tables(config, notify)
    target = tmp_path / "target"

    result = pullkit.run_cli(config, "restore", "c1", archive, "--target", str(target))

    assert result.returncode == 2, result.stdout + result.stderr
    assert kinds(receiver.titles()) == ["tampering"]
    assert "a restore never makes" in receiver.messages()[0]["message"]
    assert "tampering: the client sent 2 request(s) a restore never makes" in result.stdout
    assert "'save_key'" in result.stdout  # borg key change-passphrase
    assert "'get_free_nonce'" in result.stdout  # borg create, before its first 'put'
    assert not (tmp_path / "sneak.log").exists()  # neither succeeded
    assert (repo / "config").read_text() == key_before
    assert pullkit.archives(tmp_path, repo, **right) == [archive]
    pullkit.assert_same_tree(data, target)  # and the restore itself happened
    with History.open(tmp_path / "state") as history:
        run = history.last_run("c1")
        assert run is not None
        assert (run.kind, str(run.result)) == ("restore", "failed")
        assert run.error is not None
        assert "a restore never makes" in run.error
