"""borg's own prune selection, for test_keeprules.py: run by the Python of one borg install.

Reads one JSON request per line (archives as [key, ISO time], the rules, "now") and answers one
JSON line: key -> the rule borg keeps it by. It calls borg's functions, in the order its
``prune`` command does (1.2/1.4: ``do_prune``; 2: ``PruneMixIn._compute_keep``), nothing else.
"""

from __future__ import annotations

import json
import sys
from collections import namedtuple
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import borg  # type: ignore[import-not-found]  # the child's own borg, any major

MAJOR = int(borg.__version__.split(".")[0])
Archive1 = namedtuple("Archive1", "id ts")
COUNTS = ("hourly", "daily", "weekly", "monthly", "yearly")
UNIT = {"H": 1, "d": 24, "w": 24 * 7, "m": 24 * 31, "y": 24 * 365}


def hours(text: str) -> int:
    return int(text[:-1]) * UNIT[text[-1]]


def borg1(
    archives: list[tuple[str, datetime]], rules: dict[str, Any], now: datetime
) -> dict[str, str]:
    # Imported here: each borg major has only one of the two modules.
    from borg.helpers import misc  # type: ignore[import-not-found]  # noqa: PLC0415

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return now.astimezone(tz)

    misc.datetime = Frozen  # prune_within reads the clock itself
    ordered = sorted((Archive1(key, ts) for key, ts in archives), key=lambda a: a.ts, reverse=True)
    kept: dict[str, Any] = {}
    if rules.get("within"):
        misc.prune_within(ordered, hours(rules["within"]), kept)
    for rule in misc.PRUNING_PATTERNS:
        if rule in COUNTS and rules.get(rule):
            misc.prune_split(ordered, rule, rules[rule], kept)
    return {key: why[0] for key, why in kept.items()}


def borg2(
    archives: list[tuple[str, datetime]], rules: dict[str, Any], now: datetime
) -> dict[str, str]:
    from borg.archiver.prune_cmd import (  # type: ignore[import-not-found]  # noqa: PLC0415
        PRUNE_FROM,
        PRUNING_RULES,
        PruneMixIn,
    )
    from borg.manifest import ArchiveInfo  # type: ignore[import-not-found]  # noqa: PLC0415

    infos = [ArchiveInfo(name="series", id=key, ts=ts) for key, ts in archives]
    infos.sort(key=lambda a: a.ts, reverse=True)
    args = SimpleNamespace(**{rule.key: None for rule in PRUNING_RULES})
    setattr(args, PRUNE_FROM.key, None)
    if rules.get("within"):
        args.keep = timedelta(hours=hours(rules["within"]))
    for rule in COUNTS:
        if rules.get(rule):
            setattr(args, rule, rules[rule])
    PruneMixIn._validate_prune_args(None, args)
    kept = PruneMixIn._compute_keep(None, infos, args, now.astimezone())
    return {a.id: f"{r.rule.key}{'[oldest]' if r.oldest else ''}" for a, r in kept.items()}


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        archives = [(key, datetime.fromisoformat(ts)) for key, ts in request["archives"]]
        now = datetime.fromisoformat(request["now"])
        select = borg2 if MAJOR >= 2 else borg1
        print(json.dumps(select(archives, request["rules"], now)), flush=True)


if __name__ == "__main__":
    main()
