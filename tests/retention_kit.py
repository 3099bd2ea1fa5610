"""Test helpers for retention: archives the server's history records as verified.

A verified pull records its archive's name, id and the server's start time. Tests that need
verified archives on several days (a pull always runs "now") make the archive with the server's
borg and record it here the way a verified pull would, at the time they choose.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

from borgtunnel.history import History, RunResult


def archive_ids(repo: Path, env: Mapping[str, str], exe: str = "borg") -> dict[str, str]:
    """Name -> id of every archive, read by the test's own borg 1.x."""
    out = subprocess.run(
        [exe, "list", "--json", str(repo)],
        env=dict(env),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {a["name"]: a["id"] for a in json.loads(out)["archives"]}


def record_verified(
    state_dir: Path, client: str, archives: Mapping[str, tuple[str, datetime]]
) -> None:
    """Record name -> (id, server time) as verified pulls of ``client`` at those times."""
    with History.open(state_dir) as history:
        for name, (archive_id, when) in archives.items():
            run = history.start_run(client, "test", started=when)
            history.finish_run(
                run,
                RunResult.OK,
                exit_code=0,
                archive=name,
                archive_id=archive_id,
                finished=when + timedelta(seconds=5),
            )
