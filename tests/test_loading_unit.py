"""The load script of ``restore --source --load-into`` (client/loading.py) run by sh with a
stand-in for ``borg extract --stdout``: what a failure half-way leaves behind, and the
gatekeeper's refusal of a load."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from borgtunnel.client import gatekeeper as gk
from borgtunnel.client.loading import LOAD_SCRIPT, load_args, load_plan
from borgtunnel.config import parse_config
from borgtunnel.config.sources import SqliteSource
from borgtunnel.runs.restore import load_command

SOURCE = SqliteSource(type="sqlite", name="notes", path="/var/lib/notes.db")
DUMP = "BEGIN TRANSACTION;\nCREATE TABLE t (x);\nINSERT INTO t VALUES (1);\nCOMMIT;\n"


def _load(into: Path, borg_script: str, *, force: bool = False) -> subprocess.CompletedProcess[str]:
    if shutil.which("sqlite3") is None:
        pytest.skip("sqlite3 is not installed")
    plan = load_plan(SOURCE, str(into), force=force)
    argv = ["sh", "-c", LOAD_SCRIPT, "borgtunnel-load", *load_args(plan, force=force)]
    return subprocess.run(
        [*argv, "sh", "-c", borg_script], capture_output=True, text=True, check=False
    )


def test_a_complete_stream_becomes_the_file(tmp_path: Path) -> None:
    into = tmp_path / "loaded.db"
    result = _load(into, f"printf '%s' '{DUMP}'")
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(into) as db:
        assert db.execute("SELECT x FROM t").fetchall() == [(1,)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loaded.db"]


@pytest.mark.parametrize("status", [2, 3, 143])
def test_borg_failing_half_way_leaves_no_file(tmp_path: Path, status: int) -> None:
    """A truncated SQL stream loads 'fine' into SQLite (an open transaction at EOF is dropped):
    only borg's status says the dump was cut, and then nothing may be renamed into place."""
    into = tmp_path / "loaded.db"
    result = _load(into, f"printf 'BEGIN TRANSACTION;\\nCREATE TABLE t (x);\\n'; exit {status}")
    assert result.returncode == status, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failed_stream_over_an_existing_file_leaves_it_as_it_was(tmp_path: Path) -> None:
    into = tmp_path / "loaded.db"
    into.write_bytes(b"the old file")
    result = _load(into, "printf 'CREATE TABLE'; exit 2", force=True)
    assert result.returncode == 2
    assert into.read_bytes() == b"the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loaded.db"]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("link", [False, True])
def test_a_directory_is_never_loaded_into(tmp_path: Path, *, force: bool, link: bool) -> None:
    """mv -f FILE DIR would put the database inside the directory and call it done."""
    directory = tmp_path / "dir.db"
    directory.mkdir()
    into = directory
    if link:
        into = tmp_path / "link.db"
        into.symlink_to(directory)
    result = _load(into, f"printf '%s' '{DUMP}'", force=force)
    assert result.returncode == 76, result.stderr
    assert (
        f"borgtunnel-restore-refused: {into} is a directory; --load-into names the database file"
        in result.stderr
    )
    assert list(directory.iterdir()) == []


def test_a_dangling_symlink_exists_and_force_replaces_only_the_link(tmp_path: Path) -> None:
    into = tmp_path / "loaded.db"
    into.symlink_to(tmp_path / "elsewhere.db")
    refused = _load(into, f"printf '%s' '{DUMP}'")
    assert refused.returncode == 75, refused.stderr
    assert f"SQLite database {into} exists; use --force" in refused.stderr
    forced = _load(into, f"printf '%s' '{DUMP}'", force=True)
    assert forced.returncode == 0, forced.stderr
    assert not into.is_symlink()
    assert not (tmp_path / "elsewhere.db").exists()
    with sqlite3.connect(into) as db:
        assert db.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_the_gatekeeper_refuses_a_load_by_name() -> None:
    config = parse_config(
        {
            "clients": {
                "c1": {
                    "host": "h",
                    "repository": "/srv/borg/c1",
                    "paths": ["/etc"],
                    "encryption": "none",
                    "sources": [SOURCE.model_dump()],
                }
            }
        }
    )
    client = config.client("c1")
    command = load_command(client, "a1", load_plan(SOURCE, "/tmp/x.db", force=False), force=False)
    with pytest.raises(gk.RefusedError) as caught:
        gk.parse_request(command)
    assert (
        "loading a dump into a database is not done through the gatekeeper" in caught.value.reason
    )
