"""Snapshots through the gatekeeper (issue 19, item 4), as the forced command of a real sshd.

The client's policy decides: ``snapshot = btrfs`` makes every pull read a snapshot, taken and
removed by the snapshot script installed with the gatekeeper (the copy ``borgtunnel gatekeeper``
printed), with the policy's settings and the checked paths; the request's own script is never
run. A server whose settings differ is refused, whichever way they differ. Btrfs on a loop
device, root only (skipped with the reason otherwise); the refusals need no filesystem.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import pullkit, snapfs, sourcekit, test_gatekeeper_e2e, test_snapshot_e2e
from tests.conftest import Spawn
from tests.test_gatekeeper_e2e import Client

pytestmark = pytest.mark.sshd

# The fixtures ``client`` (the gatekeeper as a real sshd's forced command) and ``btrfs``.
gatekeeper_client = test_gatekeeper_e2e.client
btrfs = test_snapshot_e2e.btrfs

# What the snapshot script runs, on the gatekeeper's PATH next to sh, nc and socat (it adds
# /usr/sbin and /sbin itself).
SCRIPT_TOOLS = (
    "btrfs", "unshare", "findmnt", "mount", "stat", "readlink", "mkdir", "rmdir", "rm",
    "sort", "tr", "wc", "grep", "head", "sleep", "cat", "find", "sed", "ls", "setsid",
)  # fmt: skip


def _snapshot_policy(client: Client, paths: Path, extra: str) -> None:
    text = client.policy.read_text().replace(str(client.data), str(paths))
    client.policy.write_text(text + extra)


def test_a_btrfs_snapshot_through_the_gatekeeper_is_consistent(
    gatekeeper_client: Client, btrfs: Path, spawn: Spawn
) -> None:
    client = gatekeeper_client
    client.add_tools(*SCRIPT_TOOLS)
    data = snapfs.create_subvolume(btrfs / "data")
    pullkit.make_client_data(data / "tree")
    _snapshot_policy(client, data, "snapshot = btrfs\n")
    client.write(paths=[str(data)], snapshot="btrfs")
    pullkit.init_repo(client.tmp, client.repo)
    writer = spawn(sys.executable, "-c", test_snapshot_e2e.WRITER, str(data))
    before = test_snapshot_e2e._gen(data)

    result = pullkit.run_cli(client.config, "pull", "c1")

    after = test_snapshot_e2e._gen(data)
    writer.kill()
    assert result.returncode == 0, result.stdout + result.stderr
    (name,) = pullkit.archives(client.tmp, client.repo)
    pullkit.extract(client.tmp, client.repo, name, client.tmp / "restored")
    restored = client.tmp / "restored" / str(data).lstrip("/")  # the original path
    big, small = (restored / "big").read_bytes(), (restored / "small").read_text()
    gen = test_snapshot_e2e._consistent(big, small)
    assert before <= gen <= after
    pullkit.assert_same_tree(data / "tree", client.tmp / "restored")
    assert f"of ['{data}'] from a btrfs snapshot" in client.logged()
    assert snapfs.subvolumes(btrfs) == ["data"]  # the snapshot is gone
    assert list((client.sshd.workdir / "rsock").iterdir()) == []


@pytest.mark.parametrize(
    ("policy", "server", "reason"),
    [
        ("", {"snapshot": "btrfs"}, "this client's policy takes none (snapshot = no)"),
        ("snapshot = btrfs\n", {}, 'set snapshot = "btrfs" for it on the server'),
        ("snapshot = btrfs\n", {"snapshot": "lvm"}, "policy says snapshot = btrfs"),
        (
            "snapshot = btrfs\n",
            {"snapshot": "btrfs", "snapshot_fallback": True},
            "snapshot_fallback differs",
        ),
    ],
    ids=["policy-none", "server-none", "other-kind", "fallback"],
)
def test_snapshot_settings_other_than_the_policys_are_refused(
    gatekeeper_client: Client, policy: str, server: dict[str, object], reason: str
) -> None:
    client = gatekeeper_client
    _snapshot_policy(client, client.data, policy)
    client.write(**server)
    pullkit.init_repo(client.tmp, client.repo)

    result = pullkit.run_cli(client.config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "borgtunnel-gatekeeper: " in result.stdout
    assert reason in result.stdout
    assert any(reason in line for line in client.logged().splitlines() if "refused: " in line)
    assert pullkit.archives(client.tmp, client.repo) == []
    assert sourcekit.leftovers(client.sshd) == []  # refused before the socket directory
