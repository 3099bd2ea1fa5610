"""Log output: JSON lines off a TTY, and journald priority prefixes when stderr is the journal."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

SNIPPET = """
import structlog
from borgtunnel import logs
logs.configure("json", level="debug")
log = structlog.get_logger().bind(client="web1")
log.debug("d"); log.info("i"); log.warning("w"); log.error("e")
"""


def _run(env_extra: dict[str, str], stderr_path: Path) -> list[str]:
    with stderr_path.open("wb") as err:
        subprocess.run(
            [sys.executable, "-c", SNIPPET],
            env={**os.environ, **env_extra},
            stderr=err,
            check=True,
            timeout=30,
        )
    return stderr_path.read_text().splitlines()


def test_journal_stream_gets_priority_prefixes(tmp_path: Path) -> None:
    out = tmp_path / "stderr"
    out.touch()
    info = out.stat()
    lines = _run({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}, out)

    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    records = [json.loads(line[3:]) for line in lines]
    assert [r["event"] for r in records] == ["d", "i", "w", "e"]
    assert all(r["client"] == "web1" for r in records)


def test_no_prefix_when_stderr_is_not_the_journal(tmp_path: Path) -> None:
    lines = _run({"JOURNAL_STREAM": "1:1"}, tmp_path / "stderr")

    records = [json.loads(line) for line in lines]  # plain JSON, no "<N>"
    assert [r["level"] for r in records] == ["debug", "info", "warning", "error"]


def test_console_lines_on_a_terminal() -> None:
    """On a TTY (auto format) the lines are for people: no JSON, fields as key=value."""
    snippet = (
        "import structlog; from borgtunnel import logs; logs.configure('auto');"
        "structlog.get_logger().bind(client='web1').warning('pull_failed', error='boom')"
    )
    leader, follower = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", snippet], stderr=follower, check=True, timeout=30)
        os.close(follower)
        follower = -1
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    text = re.sub(r"\x1b\[[0-9;]*m", "", output.decode())  # colours, as on a real terminal
    assert output != text.encode()  # there were colours
    assert "pull_failed" in text
    assert "client=web1" in text
    assert "error=boom" in text
    assert not text.lstrip().startswith("{")
