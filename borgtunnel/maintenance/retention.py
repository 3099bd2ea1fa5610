"""Pure rules of server-side maintenance: borg argv (delete, compact, check, list) and what is due.

Nothing here runs a process or reads the history; ``run.py`` feeds in what the history says.
Which archives the retention keeps is decided in ``keeprules.py``, never by ``borg prune``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from borgtunnel import borg2 as borg2_argv
from borgtunnel.config import CheckSettings, ClientConfig, RetentionSettings
from borgtunnel.durations import parse_borg_interval

# borg 1.x takes many archive names per delete; a bounded batch keeps argv short.
DELETE_BATCH = 50


def delete_argv(borg: str, repository: Path, keys: Sequence[str], *, borg2: bool) -> list[str]:
    """Delete exactly these archives: 1.x by name (unique in a repository; the caller has just
    seen each name with its verified id, under the client lock), borg 2 one archive by id
    (``aid:``; its names are series). Never a pattern a client's archive could also match."""
    if borg2:
        (archive_id,) = keys
        return borg2_argv.delete_argv(borg, repository, archive_id)
    return [borg, "delete", "--log-json", "--", str(repository), *keys]


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
    """Name, id and time of every archive (cheap: reads only the manifest / archives/).

    1.x hides archives named ``*.checkpoint`` / ``*.checkpoint.N`` unless asked: a client picks
    its archive names, so maintenance must see those too (verified or not)."""
    if borg2:
        return borg2_argv.list_argv(borg, repository)
    return [borg, "list", "--json", "--consider-checkpoints", "--", str(repository)]


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
