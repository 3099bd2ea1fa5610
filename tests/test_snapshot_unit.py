"""Snapshot settings and the client script's refusals that need no filesystem (docs/snapshots.md).

The snapshots themselves are tested for real in tests/test_snapshot_e2e.py.
"""

from __future__ import annotations

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
from borgtunnel.client.snapshot import (
    REQUEST_RUN_SNAPSHOT,
    SNAPSHOT_NOT_ROOT,
    SnapshotPlan,
    snapshot_run_command,
)
from borgtunnel.config import ConfigError, parse_config

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


def test_the_gatekeeper_refuses_a_snapshot_run_by_name() -> None:
    command = _command(SnapshotPlan(kind="btrfs", client="a", paths=("/etc",)), "~/s.sock")
    kind, args = gk.decode_command(command)
    assert kind == REQUEST_RUN_SNAPSHOT
    assert args[:6] == ["btrfs", "a", "10%ORIGIN", "0", "1", "/etc"]
    with pytest.raises(gk.RefusedError) as caught:
        gk.parse_request(command)
    assert "snapshot" in caught.value.reason


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
