"""Helpers for the sources tests: a client with ``sources``, reading a dump back from the archive.

Every dump is read back with the server's own borg (``borg extract --stdout``), never from
borgtunnel's report.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests import pullkit
from tests.sshd import SshdServer


def sources_toml(client: str, sources: Sequence[Mapping[str, Any]]) -> str:
    """``[[clients.NAME.sources]]`` tables (write_config's flat values cannot say them)."""
    lines: list[str] = []
    for source in sources:
        lines.append(f"[[clients.{client}.sources]]")
        lines += [f"{key} = {pullkit.toml_value(value)}" for key, value in source.items()]
        lines.append("")
    return "\n".join(lines)


def setup(
    tmp_path: Path,
    sshd: SshdServer,
    sources: Sequence[Mapping[str, Any]],
    *,
    paths: Sequence[Path] | None = None,
    **client: object,
) -> tuple[Path, Path]:
    """An initialised repository and a config for client c1 with ``sources``: (repo, config)."""
    if paths is None:
        data = tmp_path / "client-data"
        data.mkdir()
        (data / "file.txt").write_text("files part\n")
        paths = [data]
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(sshd, "c1", repo, paths, **client)
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    with config.open("a") as file:
        file.write("\n" + sources_toml("c1", sources))
    return repo, config


def only_archive(tmp_path: Path, repo: Path) -> str:
    names = pullkit.archives(tmp_path, repo)
    assert len(names) == 1, names
    return names[0]


def archived(tmp_path: Path, repo: Path, archive: str) -> dict[str, tuple[str, int]]:
    """Path -> (type, size) of every item, by the server's borg."""
    out = pullkit.borg(tmp_path, "list", "--json-lines", f"{repo}::{archive}")
    items = [json.loads(line) for line in out.splitlines()]
    return {item["path"]: (item["type"], item["size"]) for item in items}


def extract_bytes(tmp_path: Path, repo: Path, archive: str, path: str) -> bytes:
    result = subprocess.run(
        ["borg", "extract", "--stdout", f"{repo}::{archive}", path],
        env=pullkit.borg_env(tmp_path),
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def leftovers(sshd: SshdServer) -> list[Path]:
    """Anything left in the client's socket directory: sockets, pid files, sources dirs."""
    directory = sshd.workdir / "rsock"
    return sorted(directory.iterdir()) if directory.exists() else []
