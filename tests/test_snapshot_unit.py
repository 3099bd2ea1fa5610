"""Snapshot settings and the client script's refusals that need no filesystem (docs/snapshots.md).

The snapshots themselves are tested for real in tests/test_snapshot_e2e.py.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from borgtunnel import borg
from borgtunnel.client import gatekeeper as gk
from borgtunnel.client import remote
from borgtunnel.client.snapshot import (
    REQUEST_RUN_SNAPSHOT,
    SNAPSHOT_NOT_ROOT,
    SNAPSHOT_PRELUDE,
    SnapshotPlan,
    snapshot_run_command,
)
from borgtunnel.config import ConfigError, parse_config
from borgtunnel.ssh import enrol

NOBODY = 65534


def _client(**extra: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "host": "h",
        "repository": "/srv/borg/a",
        "paths": ["/srv/data"],
        "encryption": "none",
    }
    table.update(extra)
    return table


def _problems(**extra: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"clients": {"a": _client(**extra)}})
    return str(caught.value)


def test_snapshot_settings_are_client_keys_inherited_from_defaults() -> None:
    config = parse_config(
        {
            "defaults": {"snapshot": "lvm", "lvm_snapshot_size": "2G"},
            "clients": {
                "a": _client(),
                "b": _client(repository="/srv/borg/b", snapshot_fallback=True),
            },
        }
    )
    a, b = config.client("a"), config.client("b")
    assert (a.snapshot, a.lvm_snapshot_size, a.snapshot_fallback) == ("lvm", "2G", False)
    assert (b.snapshot, b.snapshot_fallback) == ("lvm", True)
    assert parse_config({"clients": {"c": _client()}}).client("c").snapshot is None


@pytest.mark.parametrize("size", ["1G", "512m", "1.5T", "10%ORIGIN", "20%FREE", "100%VG"])
def test_lvm_sizes_lvcreate_takes_are_accepted(size: str) -> None:
    parse_config({"clients": {"a": _client(snapshot="lvm", lvm_snapshot_size=size)}})


@pytest.mark.parametrize("size", ["", "10%", "-1G", "1G; rm -rf /", "10%origin", "G", "0"])
def test_bad_lvm_sizes_are_named(size: str) -> None:
    assert "clients.a.lvm_snapshot_size" in _problems(lvm_snapshot_size=size)


def test_unknown_snapshot_kind_is_named() -> None:
    assert "clients.a.snapshot" in _problems(snapshot="zfs")


@pytest.mark.parametrize(("path", "reason"), [("/", "'/' cannot"), ("/a\nb", "newline")])
def test_paths_a_snapshot_cannot_cover_are_refused(path: str, reason: str) -> None:
    text = _problems(snapshot="btrfs", paths=[path])
    assert "clients.a" in text
    assert reason in text


def _command(plan: SnapshotPlan, socket: str) -> str:
    return snapshot_run_command(
        plan,
        socket,
        borg.RSH_BY_TOOL["nc"],
        borg.RSH_BY_TOOL["socat"],
        ["borg", "create", "--", "ssh://borgtunnel/srv/borg/a::x", *plan.paths],
    )


def test_a_snapshot_run_parses_to_the_servers_snapshot_settings() -> None:
    plan = SnapshotPlan(kind="lvm", client="a", paths=("/etc", "/srv"), lvm_size="2G")
    command = _command(plan, "~/s.sock")
    kind, _args = gk.decode_command(command)
    assert kind == REQUEST_RUN_SNAPSHOT
    request = gk.parse_request(command)
    assert isinstance(request, gk.RunRequest)
    assert request.snapshot == gk.SnapshotAsk("lvm", "a", "2G", False, ("/etc", "/srv"))
    assert request.call.paths == ("/etc", "/srv")
    assert request.socket == "~/s.sock"


def _policy(tmp_path: Path, extra: str = "") -> gk.Policy:
    path = tmp_path / "gatekeeper.conf"
    path.write_text(f"[gatekeeper]\npaths =\n    /etc\n    /srv\n{extra}")
    return gk.load_policy(str(path))


def _snapshot_request(
    plan: SnapshotPlan | None, paths: tuple[str, ...] = ("/etc",)
) -> gk.RunRequest:
    if plan is None:
        argv = ["borg", "create", "--", "ssh://borgtunnel/srv/borg/a::x", *paths]
        command = remote.run_command("~/s.sock", "nc", "socat", argv)
    else:
        command = _command(plan, "~/s.sock")
    request = gk.parse_request(command)
    assert isinstance(request, gk.RunRequest)
    return request


BTRFS = SnapshotPlan(kind="btrfs", client="a", paths=("/etc",))


@pytest.mark.parametrize(
    ("policy", "plan", "reason"),
    [
        ("", BTRFS, "the server asks for a 'btrfs' snapshot; this client's policy takes none"),
        ("snapshot = lvm\n", BTRFS, "this client's policy says snapshot = lvm"),
        (
            "snapshot = btrfs\n",
            None,
            'reads every pull from a btrfs snapshot; set snapshot = "btrfs"',
        ),
        (
            "snapshot = btrfs\nsnapshot_fallback = yes\n",
            BTRFS,
            "snapshot_fallback differs from this client's policy (snapshot_fallback = yes)",
        ),
        (
            "snapshot = btrfs\n",
            SnapshotPlan(kind="btrfs", client="a", paths=("/etc",), fallback=True),
            "(snapshot_fallback = no)",
        ),
        (
            "snapshot = lvm\nlvm_snapshot_size = 1G\n",
            SnapshotPlan(kind="lvm", client="a", paths=("/etc",), lvm_size="100%FREE"),
            "lvm_snapshot_size '100%FREE' is not this client's policy's '1G'",
        ),
        # The client name becomes part of snapshot names the sweep removes: a plain name only.
        (
            "snapshot = btrfs\n",
            SnapshotPlan(kind="btrfs", client="../x", paths=("/etc",)),
            "bad client",
        ),
        (
            "snapshot = btrfs\n",
            SnapshotPlan(kind="btrfs", client="-a", paths=("/etc",)),
            "bad client",
        ),
        (
            "snapshot = btrfs\n",
            SnapshotPlan(kind="btrfs", client="a b", paths=("/etc",)),
            "bad client",
        ),
        (
            "snapshot = btrfs\n",
            SnapshotPlan(kind="btrfs", client="a*", paths=("/etc",)),
            "bad client",
        ),
    ],
)
def test_the_policy_decides_the_snapshot(
    tmp_path: Path, policy: str, plan: SnapshotPlan | None, reason: str
) -> None:
    request = _snapshot_request(plan)
    with pytest.raises(gk.RefusedError) as caught:
        gk.check_snapshot(request, _policy(tmp_path, policy))
    assert reason in caught.value.reason
    assert caught.value.code == gk.EXIT_REFUSED


def test_snapshot_paths_other_than_borgs_are_refused(tmp_path: Path) -> None:
    """Only a hand-made request can say that: the snapshot would cover other paths."""
    plan = SnapshotPlan(kind="btrfs", client="a", paths=("/srv",))
    argv = ["borg", "create", "--", "ssh://borgtunnel/srv/borg/a::x", "/etc"]
    command = snapshot_run_command(plan, "~/s.sock", "nc", "socat", argv)
    request = gk.parse_request(command)
    assert isinstance(request, gk.RunRequest)
    with pytest.raises(gk.RefusedError, match="the snapshot's paths are not borg's paths"):
        gk.check_snapshot(request, _policy(tmp_path, "snapshot = btrfs\n"))


def test_a_matching_snapshot_run_needs_the_installed_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = _snapshot_request(BTRFS)
    policy = _policy(tmp_path, "snapshot = btrfs\n")
    # Imported from the source tree the slot is empty: only the printed program has the script.
    with pytest.raises(gk.RefusedError, match="no snapshot script"):
        gk.check_snapshot(request, policy)
    monkeypatch.setattr(gk, "SNAPSHOT_SCRIPT", "exit 0")
    gk.check_snapshot(request, policy)
    gk.check_snapshot(_snapshot_request(None), _policy(tmp_path))  # neither: a plain run


def test_the_printed_gatekeeper_carries_this_versions_snapshot_script() -> None:
    printed = enrol.gatekeeper_source()
    namespace: dict[str, object] = {"__name__": "printed_gatekeeper"}
    tree = ast.parse(printed)
    [assignment] = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "SNAPSHOT_SCRIPT" for t in node.targets)
    ]
    exec(compile(ast.Module([assignment], []), "printed", "exec"), namespace)  # noqa: S102
    assert namespace["SNAPSHOT_SCRIPT"] == SNAPSHOT_PRELUDE + remote.RUN_SCRIPT


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("snapshot = zfs\n", "snapshot: must be no, btrfs or lvm"),
        ("snapshot = BTRFS\n", "snapshot: must be no, btrfs or lvm"),
        ("snapshot = lvm\nlvm_snapshot_size = 10%\n", "lvm_snapshot_size"),
        ("snapshot = lvm\nlvm_snapshot_size = 1G; rm -rf /\n", "lvm_snapshot_size"),
        ("snapshot = btrfs\nsnapshot_fallback = maybe\n", "snapshot_fallback"),
        ("snapshot = btrfs\n", "'/' cannot be read from a snapshot"),
    ],
)
def test_bad_snapshot_policies_are_named(tmp_path: Path, extra: str, reason: str) -> None:
    path = tmp_path / "gatekeeper.conf"
    paths = "/" if reason.startswith("'/'") else "/etc"
    path.write_text(f"[gatekeeper]\npaths = {paths}\n{extra}")
    with pytest.raises(gk.RefusedError) as caught:
        gk.load_policy(str(path))
    assert reason in caught.value.reason
    assert caught.value.code == gk.EXIT_POLICY


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the client script as another user")
    directory = Path(tempfile.mkdtemp(prefix="bt-snap-"))
    try:
        os.chown(directory, NOBODY, NOBODY)
        yield directory
    finally:
        shutil.rmtree(directory)


def test_a_non_root_login_user_is_a_clear_error_at_prepare(nobody_dir: Path) -> None:
    socket = str(nobody_dir / "a.sock")
    command = _command(SnapshotPlan(kind="btrfs", client="a", paths=("/etc",)), socket)

    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "sh",
            "-c",
            command,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )

    assert result.returncode == SNAPSHOT_NOT_ROOT, result.stderr
    assert 'snapshot = "btrfs" needs root on the client' in result.stderr
    assert "borgtunnel-ready" not in result.stderr  # refused before the server forwards
    assert list(nobody_dir.iterdir()) == []  # no pid file, no staging directory left


def test_snapshot_and_sources_together_are_refused_naming_the_client() -> None:
    raw = {
        "clients": {
            "db1": {
                "host": "db1.example.org",
                "repository": "/srv/borg/db1",
                "paths": ["/srv/data"],
                "snapshot": "btrfs",
                "sources": [{"type": "sqlite", "name": "app", "path": "/srv/app.db"}],
            }
        }
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert "clients.db1" in str(caught.value)
    assert "not supported together with sources" in str(caught.value)
