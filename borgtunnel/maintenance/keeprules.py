"""Which verified archives the retention keeps: borg prune's rules, computed here. Pure.

``borg prune`` decides by the time borg stored in each archive, and a client writes that time
itself (``borg create --timestamp 2099-01-01``) and may add any number of archives through its
append-only tunnel: a few archives dated in the future take every keep slot and the server's own
prune deletes the real ones. So borgtunnel never runs ``borg prune``: the rules are applied here
to the archives the server verified, each at the time the server recorded for its pull (the
pull's start, from the server's clock), and only the verified archives that fall out are deleted,
by name (1.x) or id (borg 2). Archives nobody verified are neither counted nor deleted.

The selection is borg's, read in its sources (``prune_within``/``prune_split`` in borg 1.2 and
1.4 ``helpers/misc.py``; ``prune()``/``_compute_keep`` in 2.0.0b25 ``archiver/prune_cmd.py``):
periods are local-time ``strftime`` keys (``%Y-%m-%d %H``, ``%Y-%m-%d``, ``%G-%V``, ``%Y-%m``,
``%Y``); each rule walks the archives newest first and keeps the first of each period not kept
by an earlier rule, until it has kept its count; a rule that did not reach its count also keeps
the oldest archive. The two majors differ in three places:

* 1.x ``--keep-within`` keeps archives strictly newer than now minus the interval; borg 2's
  ``--keep`` interval also keeps one exactly at the boundary;
* 1.x gives every rule the "oldest" fallback; borg 2 only the last (coarsest) configured rule;
* borg 2 groups by series name and host; all verified archives of a client are one group here
  (the client chooses both, so they must not decide how many archives are kept).

One addition to borg: the newest verified archive is always kept (``--keep-within`` alone
would otherwise delete everything once pulls stop).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from borgtunnel.config import RetentionSettings
from borgtunnel.durations import parse_borg_interval

# borg's period keys, coarsest last (the order borg applies the rules in).
PERIODS: Final = (
    ("hourly", "%Y-%m-%d %H"),
    ("daily", "%Y-%m-%d"),
    ("weekly", "%G-%V"),
    ("monthly", "%Y-%m"),
    ("yearly", "%Y"),
)
NEWEST: Final = "newest"


@dataclass(frozen=True)
class Dated:
    """One verified archive: ``key`` tells it apart (1.x name, borg 2 id), ``time`` is when the
    server started the pull that made it (aware)."""

    key: str
    time: datetime


def _local(when: datetime) -> datetime:
    # borg 1.x: datetime(*time.localtime(epoch)[:6]); borg 2: dt.astimezone(). The same wall
    # clock for whole seconds; the period keys never look below seconds.
    return datetime(*time.localtime(when.timestamp())[:6])  # noqa: DTZ001 - local wall time, as borg


def _rules(rules: RetentionSettings) -> list[tuple[str, int]]:
    return [(name, getattr(rules, f"keep_{name}")) for name, _ in PERIODS]


def keep(
    archives: Sequence[Dated], rules: RetentionSettings, now: datetime, *, borg2: bool
) -> dict[str, str]:
    """key -> the rule that keeps it (borg's wording: ``daily``, ``yearly[oldest]``, ...)."""
    ordered = sorted(archives, key=lambda a: (a.time, a.key), reverse=True)
    kept: dict[str, str] = {}
    if not ordered:
        return kept
    counts = [(name, n) for name, n in _rules(rules) if n]
    within = None if rules.keep_within is None else parse_borg_interval(rules.keep_within)
    active = [*(["within"] if within is not None else []), *(name for name, _ in counts)]
    if within is not None:
        _keep_within(ordered, within, now, kept, oldest=borg2 and active[-1] == "within", b2=borg2)
    patterns = dict(PERIODS)
    for name, n in counts:
        oldest = not borg2 or active[-1] == name
        _keep_periods(ordered, name, patterns[name], n, kept, oldest=oldest)
    kept.setdefault(ordered[0].key, NEWEST)
    return kept


def _keep_within(
    ordered: Sequence[Dated],
    within: timedelta,
    now: datetime,
    kept: dict[str, str],
    *,
    oldest: bool,
    b2: bool,
) -> None:
    earliest = now.astimezone(UTC) - within
    rule = "keep" if b2 else "within"
    for archive in ordered:
        inside = archive.time >= earliest if b2 else archive.time > earliest
        if not inside:
            if b2:
                break  # borg 2 stops at the first archive outside; 1.x looks at all (same set)
            continue
        kept.setdefault(archive.key, rule)
    last = ordered[-1]
    if oldest and last.key not in kept and last.time >= earliest:
        kept[last.key] = f"{rule}[oldest]"


def _keep_periods(
    ordered: Sequence[Dated],
    name: str,
    pattern: str,
    n: int,
    kept: dict[str, str],
    *,
    oldest: bool,
) -> None:
    previous: str | None = None
    mine = 0
    for archive in ordered:
        if mine >= n:
            break
        period = _local(archive.time).strftime(pattern)
        if period == previous:
            continue
        previous = period
        if archive.key not in kept:
            kept[archive.key] = name
            mine += 1
    last = ordered[-1]
    if oldest and mine < n and last.key not in kept:
        kept[last.key] = f"{name}[oldest]"
