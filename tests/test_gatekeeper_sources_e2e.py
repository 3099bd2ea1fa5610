"""Sources through the gatekeeper (issue 19, item 4), as the forced command of a real sshd.

The client's policy lists its sources (``[source NAME]``); the server names them, and the
gatekeeper runs its own dump commands into its own FIFOs for the client's real borg. A source
the policy does not list, or one whose parameters differ from the policy's, is refused before
anything runs. The gatekeeper is installed as in tests/test_gatekeeper_e2e.py (same fixture).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests import pullkit, sourcekit, test_gatekeeper_e2e
from tests.test_gatekeeper_e2e import Client

pytestmark = pytest.mark.sshd

# test_gatekeeper_e2e's fixture ``client``: the gatekeeper as a real sshd's forced command.
gatekeeper_client = test_gatekeeper_e2e.client


def _configure(
    client: Client, server: Sequence[Mapping[str, object]], policy: str, **table: object
) -> None:
    client.write(**table)
    with client.config.open("a") as file:
        file.write("\n" + sourcekit.sources_toml("c1", server))
    with client.policy.open("a") as file:
        file.write(policy)
    pullkit.init_repo(client.tmp, client.repo)


def _notes_db(path: Path, rows: int) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.executemany("INSERT INTO notes (body) VALUES (?)", [(f"n{i}",) for i in range(rows)])
    assert path.exists()


def test_listed_sources_are_dumped_by_the_gatekeeper(gatekeeper_client: Client) -> None:
    client = gatekeeper_client
    database = client.tmp / "notes.db"
    _notes_db(database, 500)
    os.mkfifo(client.data / "a fifo")  # --read-special must leave it out, not hang on it
    client.add_tools("sqlite3", "awk", "head", "printf")
    _configure(
        client,
        [
            {"type": "sqlite", "name": "notes", "path": str(database)},
            {"type": "command", "name": "export", "command": ["printf", "exported %s", "data"]},
        ],
        f"\n[source notes]\ntype = sqlite\npath = {database}\n"
        "\n[source export]\ntype = command\ncommand = printf 'exported %s' data\n",
    )

    result = pullkit.run_cli(client.config, "pull", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    archive = sourcekit.only_archive(client.tmp, client.repo)
    items = sourcekit.archived(client.tmp, client.repo, archive)
    assert not [path for path in items if path.endswith("a fifo")]
    export = "borgtunnel-sources/command/export"
    assert sourcekit.extract_bytes(client.tmp, client.repo, archive, export) == b"exported data"
    dump = sourcekit.extract_bytes(
        client.tmp, client.repo, archive, "borgtunnel-sources/sqlite/notes.sql"
    )
    restored = client.tmp / "restored.db"
    subprocess.run(["sqlite3", str(restored)], input=dump, check=True, capture_output=True)
    with sqlite3.connect(restored) as db:
        assert db.execute("SELECT count(*), max(body) FROM notes").fetchone() == (500, "n99")
    assert "and sources ['notes', 'export']" in client.logged()
    assert sourcekit.leftovers(client.sshd) == []


def _assert_refused(client: Client, reason: str) -> None:
    result = pullkit.run_cli(client.config, "pull", "c1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "borgtunnel-gatekeeper: " in result.stdout
    assert reason in result.stdout
    assert f"refused: {reason}" in client.logged()
    assert pullkit.archives(client.tmp, client.repo) == []
    assert sourcekit.leftovers(client.sshd) == []


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        (
            {"type": "sqlite", "name": "other", "path": "/etc/secret.db"},
            "source 'other' is not in this client's policy (listed: notes)",
        ),
        # The listed name with a parameter the policy does not give: another file.
        (
            {"type": "sqlite", "name": "notes", "path": "/etc/secret.db"},
            "source 'notes': the server asks for '/etc/secret.db' where the policy has",
        ),
        # The listed name as a command: another archive path, refused before anything runs.
        (
            {"type": "command", "name": "notes", "command": ["cat", "/etc/shadow"]},
            "source 'notes': the server's archive path",
        ),
    ],
    ids=["unlisted", "other-path", "other-type"],
)
def test_a_source_outside_the_policy_is_refused(
    gatekeeper_client: Client, server: Mapping[str, object], reason: str
) -> None:
    client = gatekeeper_client
    _configure(client, [server], "\n[source notes]\ntype = sqlite\npath = /var/lib/notes.db\n")
    _assert_refused(client, reason)


def test_a_failed_dump_through_the_gatekeeper_fails_the_run(gatekeeper_client: Client) -> None:
    client = gatekeeper_client
    _configure(
        client,
        [{"type": "command", "name": "broken", "command": ["sh", "-c", "echo partial; exit 3"]}],
        "\n[source broken]\ntype = command\ncommand = sh -c 'echo partial; exit 3'\n",
    )

    result = pullkit.run_cli(client.config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "source 'broken' (command): sh exited with status 3" in result.stdout
    assert sourcekit.leftovers(client.sshd) == []


def test_a_stuck_dump_through_the_gatekeeper_is_stopped(gatekeeper_client: Client) -> None:
    client = gatekeeper_client
    client.add_tools("sleep")
    _configure(
        client,
        [{"type": "command", "name": "stuck", "command": ["sleep", "7213"]}],
        "\n[source stuck]\ntype = command\ncommand = sleep 7213\n",
        stall_timeout=3,
    )

    result = pullkit.run_cli(client.config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "stalled" in result.stdout
    deadline = time.monotonic() + 30
    while pullkit.processes_mentioning("sleep 7213") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pullkit.processes_mentioning("sleep 7213") == []
    deadline = time.monotonic() + 10
    while sourcekit.leftovers(client.sshd) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sourcekit.leftovers(client.sshd) == []


def test_doctor_lists_the_policys_sources(gatekeeper_client: Client) -> None:
    client = gatekeeper_client
    with client.policy.open("a") as file:
        file.write("\n[source app]\ntype = postgresql\ndatabase = a b\n")
        file.write("\n[source notes]\ntype = sqlite\npath = /var/lib/notes.db\n")

    result = pullkit.run_cli(client.config, "doctor", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "restore refused; sources app/a, app/b, notes\n" in result.stdout
