"""Pure pieces of the hostile-client hardening: ready-path check, capped lines, config keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from borgtunnel.client.remote import ready_path_matches
from borgtunnel.config import ConfigError, parse_config
from borgtunnel.ssh.tunnel import MAX_LINE, _CappedLines
from borgtunnel.text import printable


@pytest.mark.parametrize(
    ("configured", "reported", "ok"),
    [
        ("/run/bt/c1.sock", "/run/bt/c1.sock", True),
        ("/run/bt/c1.sock", "/run/bt/other.sock", False),
        ("/run/bt/c1.sock", "/home/u/victim.txt", False),
        ("~/.cache/bt/c1.sock", "/home/u/.cache/bt/c1.sock", True),
        ("~/.cache/bt/c1.sock", "//.cache/bt/c1.sock", True),  # HOME=/
        ("~/.cache/bt/c1.sock", "/home/u/victim.txt", False),
        ("~/.cache/bt/c1.sock", "/home/u/../v/.cache/bt/c1.sock", False),
        ("~/.cache/bt/c1.sock", "relative/.cache/bt/c1.sock", False),
        ("~/.cache/bt/c1.sock", "/home/u/.cache/bt/c1.sock.evil", False),
        ("~/.cache/bt/c1.sock", "/home/u/x.cache/bt/c1.sock", False),
        ("~/c1.sock", "/home/u/c1.sock\n", False),
    ],
)
def test_ready_path_must_be_the_configured_one(configured: str, reported: str, ok: bool) -> None:
    assert ready_path_matches(configured, reported) is ok


def test_capped_lines_split_and_cut() -> None:
    lines = _CappedLines()
    assert lines.feed(b"one\ntw") == ["one\n"]
    assert lines.feed(b"o\n") == ["two\n"]
    huge = b"x" * (MAX_LINE * 3)
    assert lines.feed(huge) == []
    (cut,) = lines.feed(b"tail\nnext")
    assert cut.startswith("x" * MAX_LINE)
    assert f"[{MAX_LINE * 2 + 4} more bytes of this line not kept]" in cut
    assert lines.flush() == ["next\n"]
    assert lines.flush() == []


def test_printable_escapes_control_characters_only() -> None:
    assert printable("plain ünïcødé") == "plain ünïcødé"
    assert printable("a\x1b]0;t\x07\r\nb\x9b") == "a\\x1b]0;t\\x07\\r\\nb\\x9b"


def _client(**extra: object) -> dict[str, object]:
    return {"host": "h", "repository": "/r", "paths": ["/x"], "encryption": "none", **extra}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("storage_quota", "lots", "not a size borg understands"),
        ("storage_quota", "5M", "below borg's minimum storage quota of 10M"),
        ("remote_borg", "borg 'unterminated", "cannot be split into words"),
        ("remote_borg", "   ", "must name a program"),
        ("stall_timeout", 0, "greater than 0"),
    ],
)
def test_hardening_keys_are_checked_at_load(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"clients": {"c1": _client(**{key: value})}}, source=Path("/etc/bt.toml"))
    assert any(
        where == f"clients.c1.{key}" and message in text for where, text in caught.value.problems
    ), caught.value.problems


def test_every_run_has_a_limit_by_default() -> None:
    client = parse_config({"clients": {"c1": _client(storage_quota="1.5T")}}).client("c1")
    assert client.timeout == 24 * 3600
    assert client.stall_timeout == 1800
    assert client.storage_quota == "1.5T"
