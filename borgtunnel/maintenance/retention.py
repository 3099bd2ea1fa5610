"""Pure rules of server-side maintenance: borg argv (prune, compact, check, list) and what is due.

Nothing here runs a process or reads the history; ``run.py`` feeds in what the history says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from borgtunnel import borg2 as borg2_argv
from borgtunnel.config import CheckSettings, ClientConfig, RetentionSettings
from borgtunnel.durations import parse_borg_interval

# The lines of `borg prune --list` end in the archive id in brackets: names may hold any
# character (spaces, brackets), the id is 64 hex digits, so that is what is matched.
_LISTED_ID = re.compile(r"\[([0-9a-f]{64})\]\s*$")
WOULD_PRUNE = "Would prune:"


def prune_argv(
    borg: str,
    repository: Path,
    retention: RetentionSettings,
    *,
    dry_run: bool,
    borg2: bool = False,
) -> list[str]:
    """``borg prune`` with the configured rules; counts of 0 are left out (borg: rule unused).

    borg 2 spells 1.x's ``--keep-within=I`` as ``--keep=I``; the counts keep their names.
    """
    rules: list[str] = []
    if retention.keep_within is not None:
        within = "--keep" if borg2 else "--keep-within"
        rules.append(f"{within}={retention.keep_within}")
    for name in ("hourly", "daily", "weekly", "monthly", "yearly"):
        count = getattr(retention, f"keep_{name}")
        if count:
            rules.append(f"--keep-{name}={count}")
    if borg2:
        return borg2_argv.prune_argv(borg, repository, rules, dry_run=dry_run)
    return [
        borg,
        "prune",
        "--log-json",
        "--list",
        *(["--dry-run"] if dry_run else []),
        *rules,
        "--",
        str(repository),
    ]


def compact_argv(borg: str, repository: Path, *, borg2: bool = False) -> list[str]:
    if borg2:
        return borg2_argv.compact_argv(borg, repository)
    return [borg, "compact", "--log-json", "--", str(repository)]


def check_argv(
    borg: str, repository: Path, check: CheckSettings | None, *, borg2: bool = False
) -> list[str]:
    verify_data = check is not None and check.verify_data
    if borg2:
        return borg2_argv.check_argv(borg, repository, verify_data=verify_data)
    verify = ["--verify-data"] if verify_data else []
    return [borg, "check", "--log-json", *verify, "--", str(repository)]


def list_argv(borg: str, repository: Path, *, borg2: bool = False) -> list[str]:
    """Name, id and time of every archive (cheap: reads only the manifest / archives/)."""
    if borg2:
        return borg2_argv.list_argv(borg, repository)
    return [borg, "list", "--json", "--", str(repository)]


def info_argv(borg: str, repository: Path, *, borg2: bool = False) -> list[str]:
    """Per-archive stats (files, original and deduplicated size) of every archive."""
    if borg2:
        return borg2_argv.archives_info_argv(borg, repository)
    return [borg, "info", "--json", "--glob-archives=*", "--", str(repository)]


def data_dir(repository: Path, *, borg2: bool = False) -> Path:
    """Where the repository keeps its chunks: what compact frees."""
    return repository / ("packs" if borg2 else "data")


def identity(archive: Archive, *, borg2: bool = False) -> str:
    """How the history tells archives apart: 1.x names are unique in a repository; borg 2
    names are series (every pull of a client writes one more of the same name), its ids are."""
    return archive.id if borg2 else archive.name


@dataclass(frozen=True)
class Archive:
    """One archive as the server's borg reports it."""

    name: str
    id: str
    time: str
    nfiles: int | None = None
    original_size: int | None = None
    deduplicated_size: int | None = None


def parse_archives(text: str) -> list[Archive]:
    """The ``archives`` of ``borg list --json`` / ``borg info --json``; ValueError if unreadable."""
    try:
        data = json.loads(text)
        items = data["archives"]
        return [_archive(item) for item in items]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable borg JSON output: {exc}") from None


def _archive(item: Mapping[str, Any]) -> Archive:
    stats = item.get("stats") or {}
    return Archive(
        name=str(item["name"]),
        id=str(item["id"]),
        time=str(item.get("start") or item.get("time") or ""),
        nfiles=_int_or_none(stats.get("nfiles")),
        original_size=_int_or_none(stats.get("original_size")),
        deduplicated_size=_int_or_none(stats.get("deduplicated_size")),
    )


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def would_prune(
    messages: Sequence[str], archives: Sequence[Archive], *, borg2: bool = False
) -> list[str]:
    """What a ``prune --dry-run --list`` would remove (names; borg 2: ids, see identity), from
    its list lines and the listing."""
    by_id = {archive.id: identity(archive, borg2=borg2) for archive in archives}
    names = []
    for message in messages:
        if not message.startswith(WOULD_PRUNE):
            continue
        match = _LISTED_ID.search(message)
        if match is not None and match.group(1) in by_id:
            names.append(by_id[match.group(1)])
    return names


# --- due logic ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which steps a maintenance run does."""

    prune: bool = False
    compact: bool = False
    check: bool = False

    def __bool__(self) -> bool:
        return self.prune or self.compact or self.check

    def names(self) -> list[str]:
        return [name for name in ("prune", "compact", "check") if getattr(self, name)]


def check_due(check: CheckSettings | None, last_check: datetime | None, now: datetime) -> bool:
    """A check is due when configured and the last one that ran is older than ``every``."""
    if check is None:
        return False
    return last_check is None or now - last_check >= parse_borg_interval(check.every)


def compact_pending(
    retention: RetentionSettings | None,
    last_removal: datetime | None,
    last_compact: datetime | None,
) -> bool:
    """Something our prune removed has not been compacted yet (a refused or failed compact is
    retried by the next run)."""
    if retention is None or not retention.compact or last_removal is None:
        return False
    return last_compact is None or last_compact < last_removal


def due_plan(
    client: ClientConfig,
    *,
    now: datetime,
    last_check: datetime | None,
    last_removal: datetime | None,
    last_compact: datetime | None,
) -> Plan:
    """What the configuration says is due: prune when there is a retention, a compact after a
    prune that removed something (decided again after the prune), a check when due."""
    return Plan(
        prune=client.retention is not None,
        compact=compact_pending(client.retention, last_removal, last_compact),
        check=check_due(client.check, last_check, now),
    )


def requested_plan(*, prune: bool, compact: bool, check: bool) -> Plan | None:
    """The steps named on the command line; None when none was named (then: what is due)."""
    plan = Plan(prune=prune, compact=compact, check=check)
    return plan if plan else None
