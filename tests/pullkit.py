"""Helpers for end-to-end pull tests: configs, client data, and reading archives back.

Verification always goes through the real borg on the server side (``borg list``, ``borg
extract``) and compares bytes, never through borgtunnel's own report of what it did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.sshd import SshdServer

# File names that break naive quoting: each must arrive in the archive exactly as written.
NASTY_NAMES = [
    "plain.txt",
    "with space.txt",
    "ünïcødé-ファイル.txt",
    "single'quote",
    'double"quote',
    "$(touch PWNED)",
    "`touch PWNED`",
    "semi;colon && amp",
    "new\nline",
    "-leading-dash",
    "--also-leading",
    "*glob?",
    "back\\slash",
    "tab\there",
]


def make_client_data(root: Path, *, random_bytes: int = 200_000) -> Path:
    """A small tree with nasty names, nested directories and some incompressible data."""
    root.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(NASTY_NAMES):
        (root / name).write_text(f"content {index} of {name!r}\n")
    nested = root / "dir with space" / "$(id)" / "-deeper"
    nested.mkdir(parents=True)
    (nested / "leaf.bin").write_bytes(os.urandom(random_bytes))
    (root / "empty").write_bytes(b"")
    return root


def toml_value(value: Any) -> str:
    """TOML literal for a str/int/float/bool/list; json strings are valid TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def write_config(
    path: Path,
    *,
    server: Mapping[str, Any],
    ssh: Mapping[str, Any],
    clients: Mapping[str, Mapping[str, Any]],
    daemon: Mapping[str, Any] | None = None,
) -> Path:
    lines: list[str] = []
    sections: list[tuple[str, Mapping[str, Any]]] = [("server", server), ("ssh", ssh)]
    if daemon:
        sections.append(("daemon", daemon))
    sections += [(f"clients.{name}", table) for name, table in clients.items()]
    for header, table in sections:
        lines.append(f"[{header}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def client_table(
    sshd: SshdServer, name: str, repository: Path, paths: Iterable[Path | str], **extra: Any
) -> dict[str, Any]:
    """A client entry pointing at the test sshd, socket inside the sshd's work dir."""
    table: dict[str, Any] = {
        "host": sshd.host,
        "port": sshd.port,
        "user": sshd.user,
        "repository": str(repository),
        "paths": [str(p) for p in paths],
        "encryption": "none",
        "remote_socket": str(sshd.workdir / "rsock" / f"{name}.sock"),
    }
    table.update(extra)
    return table


def base_config(tmp_path: Path, sshd: SshdServer) -> dict[str, Any]:
    return {
        "server": {
            "socket_dir": str(tmp_path / "run"),
            "state_dir": str(tmp_path / "state"),
            "serve_stop_timeout": 5,
        },
        "ssh": {
            "identity": str(sshd.client_key),
            "known_hosts": str(sshd.known_hosts),
            "connect_timeout": 10,
        },
    }


def borg_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for the test's own (server-side) borg calls."""
    env = dict(os.environ)
    env.update(
        BORG_BASE_DIR=str(tmp_path / "verify-borg"),
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        PYTHONUTF8="1",
    )
    env.update(extra)
    return env


def borg(
    tmp_path: Path, *args: str, env: Mapping[str, str] | None = None, exe: str = "borg"
) -> str:
    result = subprocess.run(
        [exe, *args],
        env=dict(env) if env is not None else borg_env(tmp_path),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"borg {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def init_repo(tmp_path: Path, repository: Path, *, exe: str = "borg") -> None:
    borg(tmp_path, "init", "--encryption=none", "--make-parent-dirs", str(repository), exe=exe)


def archives(tmp_path: Path, repository: Path, *, exe: str = "borg", **env: str) -> list[str]:
    out = borg(tmp_path, "list", "--json", str(repository), env=borg_env(tmp_path, **env), exe=exe)
    return [a["name"] for a in json.loads(out)["archives"]]


def extract(
    tmp_path: Path, repository: Path, archive: str, dest: Path, *, exe: str = "borg", **env: str
) -> None:
    dest.mkdir(parents=True)
    result = subprocess.run(
        [exe, "extract", f"{repository}::{archive}"],
        cwd=dest,
        env=borg_env(tmp_path, **env),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"borg extract failed: {result.stderr}")


def tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for directories): what a comparison needs."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = None if path.is_dir() else path.read_bytes()
    return found


def assert_same_tree(original: Path, extracted_root: Path) -> None:
    """borg stores absolute paths without the leading '/': look them up under the extract dir."""
    restored = extracted_root / str(original).lstrip("/")
    expected, got = tree(original), tree(restored)
    assert sorted(got) == sorted(expected)
    for rel, content in expected.items():
        assert got[rel] == content, f"content differs: {rel!r}"


def cli_argv(config: Path) -> list[str]:
    """The start of a borgtunnel command line for ``config``."""
    return [sys.executable, "-m", "borgtunnel", "--config", str(config)]


def run_cli(config: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """The real command line, as an administrator runs it (JSON logs, since not a TTY)."""
    return subprocess.run(
        [*cli_argv(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def processes_mentioning(needle: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append((int(entry.name), cmdline))
    return found


def files_named(root: Path, name: str) -> list[Path]:
    return [p for p in root.rglob(name) if p.name == name]
