"""Helpers for the reporting tests: an HTTP receiver on 127.0.0.1 (apprise ``json://`` messages
and healthchecks pings), configs with the reporting tables, scripts for hooks and a flaky borg.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests import pullkit
from tests.sshd import SshdServer


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Records every POST; ``url(kind)`` gives apprise and healthchecks URLs pointing at it."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.requests.append(Request(self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def json_url(self) -> str:
        return f"json://127.0.0.1:{self.port}/notify"

    def ping_base(self, uuid: str = "abc-123") -> str:
        return f"http://127.0.0.1:{self.port}/ping/{uuid}"

    def messages(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.json() for r in self.requests if r.path == "/notify"]

    def titles(self) -> list[str]:
        return [m["title"] for m in self.messages()]

    def pings(self) -> list[tuple[str, str]]:
        with self._lock:
            return [
                (r.path, r.body.decode(errors="replace"))
                for r in self.requests
                if r.path.startswith("/ping/")
            ]

    def wait_for(self, count: int, *, within: float = 60, what: str = "messages") -> None:
        deadline = time.monotonic() + within
        while len(self.messages()) + len(self.pings()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {count} {what}: {self.requests}")
            time.sleep(0.05)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


def closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kinds(titles: list[str]) -> list[str]:
    """Message titles -> failure / recovery / stale / tampering, in order."""
    found = []
    for title in titles:
        if "FAILED" in title:
            found.append("failure")
        elif "working again" in title:
            found.append("recovery")
        elif "no recent backup" in title:
            found.append("stale")
        elif "TAMPERING" in title:
            found.append("tampering")
        else:
            found.append(title)
    return found


def setup_client(
    tmp_path: Path,
    sshd: SshdServer,
    *,
    client: Mapping[str, Any] | None = None,
    tables: Mapping[str, Mapping[str, Any]] | None = None,
    name: str = "c1",
    random_bytes: int = 50_000,
) -> tuple[Path, Path, Path]:
    """(data, repository, config path) for one client with extra top-level tables."""
    data = pullkit.make_client_data(tmp_path / "client-data", random_bytes=random_bytes)
    repo = tmp_path / "repos" / name
    pullkit.init_repo(tmp_path, repo)
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(sshd, name, repo, [data], **(client or {}))
    path = pullkit.write_config(tmp_path / "bt.toml", clients={name: table}, **conf)
    append_tables(path, tables or {})
    return data, repo, path


def append_tables(path: Path, tables: Mapping[str, Mapping[str, Any]]) -> None:
    lines = []
    for header, keys in tables.items():
        lines.append(f"[{header}]")
        lines += [f"{key} = {pullkit.toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    path.write_text(path.read_text() + "\n" + "\n".join(lines))


def flaky_borg(directory: Path) -> tuple[Path, Path]:
    """(script, flag): a remote_borg that fails (exit 2, with a message) while ``flag`` exists
    and is the real borg otherwise."""
    directory.mkdir(parents=True, exist_ok=True)
    flag = directory / "fail-now"
    script = directory / "flaky-borg"
    script.write_text(
        "#!/bin/sh\n"
        f"if [ -e '{flag}' ]; then echo 'flaky-borg: disk on fire' >&2; exit 2; fi\n"
        'exec borg "$@"\n'
    )
    script.chmod(0o755)
    return script, flag


def recorder_hook(directory: Path, name: str, *, exit_code: int = 0, stderr: str = "") -> Path:
    """A hook program that appends its argv and BORGTUNNEL_* environment to ``NAME.jsonl``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / name
    out = directory / f"{name}.jsonl"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(out)!r}, 'a') as f:\n"
        "    env = {k: v for k, v in os.environ.items() if k.startswith('BORGTUNNEL_')}\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'env': env}) + '\\n')\n"
        f"sys.stderr.write({stderr!r})\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(0o755)
    return script


def recorded_calls(script: Path) -> list[dict[str, Any]]:
    out = script.parent / f"{script.name}.jsonl"
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines()]
