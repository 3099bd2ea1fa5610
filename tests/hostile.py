"""Hostile clients for end-to-end tests: scripts pointed at by ``remote_borg``.

Each script is what a compromised (or broken) client could run in place of borg. They receive
the same argv and environment as the real borg (BORG_RSH to the forwarded socket, the passphrase
on stdin when the repository is encrypted).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from tests import pullkit
from tests.sshd import SshdServer

FAKE_ID = "ab" * 32


def script(tmp_path: Path, name: str, body: str) -> Path:
    """An executable ``#!/bin/sh`` script; its name contains 'borg' like a real remote borg."""
    path = tmp_path / f"hostile-borg-{name}"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def create_json(name: str = "forged", archive_id: str = FAKE_ID, **stats: Any) -> str:
    values = {"original_size": 1, "compressed_size": 1, "deduplicated_size": 1, "nfiles": 1}
    values.update(stats)
    return json.dumps({"archive": {"name": name, "id": archive_id, "stats": values}})


def setup(
    tmp_path: Path, sshd: SshdServer, *, init: bool = True, **client: Any
) -> tuple[Path, Path, Path]:
    """Data tree, repository and a config for one client c1 (extra keys go to its table)."""
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    if init:
        pullkit.init_repo(tmp_path, repo)
    conf = pullkit.base_config(tmp_path, sshd)
    paths = client.pop("paths", [data])
    table = pullkit.client_table(sshd, "c1", repo, paths, **client)
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    return data, repo, config


def runs(tmp_path: Path, client: str = "c1") -> list[dict[str, Any]]:
    """The history rows of ``client``, oldest first, read straight from the database."""
    conn = sqlite3.connect(tmp_path / "state" / "history.sqlite3")
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM runs WHERE client = ? ORDER BY id", (client,))
        return [dict(row) for row in rows]
    finally:
        conn.close()


def server_info(tmp_path: Path, repo: Path, archive: str, **env: str) -> dict[str, Any]:
    """The test's own ``borg info --json`` of one archive."""
    out = pullkit.borg(
        tmp_path, "info", "--json", f"{repo}::{archive}", env=pullkit.borg_env(tmp_path, **env)
    )
    info: dict[str, Any] = json.loads(out)["archives"][0]
    return info


PASSPHRASE = "right horse battery"


def encrypted_setup(
    tmp_path: Path, sshd: SshdServer
) -> tuple[Path, Path, Path, dict[str, Any], dict[str, Any]]:
    """An encrypted (repokey) client c1 with a 0600 passphrase file, not yet initialised:
    (data, repo, config, config sections, c1's table) so a test can rewrite the file."""
    secret = tmp_path / "pass"
    secret.write_text(PASSPHRASE)
    secret.chmod(0o600)
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "enc"
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(
        sshd, "c1", repo, [data], encryption="repokey", passphrase_file=str(secret)
    )
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    return data, repo, config, conf, table


def rekey_script(tmp_path: Path, repo: Path) -> Path:
    """A compromised client: re-wraps the repository key with its own passphrase through its
    tunnel (append-only serve allows it), then backs up normally with that passphrase."""
    body = (
        "pw=$(cat)\n"  # the passphrase arrives on stdin (BORG_PASSPHRASE_FD=0)
        "unset BORG_PASSPHRASE_FD\n"
        f'BORG_PASSPHRASE="$pw" BORG_NEW_PASSPHRASE=evil borg key change-passphrase'
        f" ssh://borgtunnel{repo} >/dev/null 2>&1 || exit 99\n"
        'BORG_PASSPHRASE=evil exec borg "$@"\n'
    )
    return script(tmp_path, "rekey", body)
