"""A compromised client during `borgtunnel restore` (issue 16, item 7).

borg 1.x `borg serve` has no read-only mode, so the restore's serve is append-only with the
smallest quota borg accepts, and the repository is checked after every restore: a write or a
re-key through the tunnel is tampering. Real sshd, real borg; the client is a `remote_borg`
script that abuses its tunnel and then runs the real `borg extract`.
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
    """No quota configured: during a restore the client tries to add a 15 MB archive. The
    restore's serve has borg's minimal quota (10M), so it is refused, and the write reported."""
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
    assert "storage quota" in fill_log.lower(), fill_log
    assert pullkit.archives(tmp_path, repo) == [archive]
    # borg 1.x writes each chunk before it checks the quota: the refused transaction's data
    # is on disk (until the next writing transaction removes it), and that is reported.
    assert result.returncode == 2, result.stdout + result.stderr
    assert "tampering: the repository changed during a restore" in result.stdout
    print(f"repository data grew by {_data_bytes(repo) - size_before} bytes (uncommitted)")
    pullkit.assert_same_tree(data, target)  # the real extract after the attempt still worked
    pullkit.borg(tmp_path, "check", str(repo))


def test_a_write_and_a_rekey_during_a_restore_are_reported(
    tmp_path: Path, sshd: SshdServer, receiver: Receiver
) -> None:
    """The client re-wraps the key with its own passphrase and commits a small archive during
    the restore: both are reported as tampering (and notified), the restore fails, the key is
    put back."""
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
        f" ssh://borgtunnel{repo} >/dev/null 2>&1 || exit 99\n"
        f"BORG_PASSPHRASE=evil borg create ssh://borgtunnel{repo}::sneaky {data}/plain.txt"
        " >/dev/null 2>&1 || exit 98\n"
        'BORG_PASSPHRASE=evil exec borg "$@"\n',
    )
    pullkit.write_config(config, clients={"c1": {**table, "remote_borg": str(sneak)}}, **conf)
    append_tables(config, notify)
    target = tmp_path / "target"

    result = pullkit.run_cli(config, "restore", "c1", archive, "--target", str(target))

    assert result.returncode == 2, result.stdout + result.stderr
    assert kinds(receiver.titles()) == ["tampering"]
    assert "the repository changed during a restore" in receiver.messages()[0]["message"]
    assert "tampering: the repository changed during a restore" in result.stdout
    assert "tampering: the repository key was changed" in result.stdout
    assert "was put back" in result.stdout
    # The server's passphrase opens the repository again; the client's archive is there to see.
    assert sorted(pullkit.archives(tmp_path, repo, **right)) == sorted([archive, "sneaky"])
    with History.open(tmp_path / "state") as history:
        run = history.last_run("c1")
        assert run is not None
        assert (run.kind, str(run.result)) == ("restore", "failed")
        assert run.error is not None
        assert "the repository changed during a restore" in run.error
