"""Durations as administrators write them. Two spellings, each where it belongs:

* ``parse_duration``: ``"36h"``, ``"1d12h"``, ``"90m"``, ``"45s"`` or seconds (w d h m s) —
  ``max_age``, hook timeouts and the like;
* ``parse_borg_interval``: borg's own ``--keep-within`` letters, ``"30d"``, ``"12H"``, ``"6m"``
  (H d w m y, where **m is a month**) — the ``[retention]`` and ``[check]`` tables, so that one
  spelling works in borgtunnel's config and in what is handed to borg.

Kept apart from ``config/`` so the parsers are unit-tested on their own and other modules
(staleness, status) can format ages the same way.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Final

_UNITS: Final = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_PART: Final = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")


def parse_duration(value: str | float) -> float:
    """Seconds in ``value``; a number is already seconds. Raises ValueError saying what is wrong.

    Units: w(eeks) d(ays) h(ours) m(inutes) s(econds), largest first, each at most once
    (``"1d12h"``); no spaces, no signs. Zero is refused: a zero age would make every client stale.
    """
    if isinstance(value, bool):
        # pydantic turns a ValueError into a key-named config error; a TypeError would escape.
        raise ValueError("must be a duration such as '36h', not a boolean")  # noqa: TRY004
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        parts = _PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{value!r} is not a duration such as '36h', '1d12h' or '90m'")
        units = [u for _, u in parts]
        order = list(_UNITS)
        if len(set(units)) != len(units) or units != sorted(units, key=order.index):
            raise ValueError(f"{value!r}: give each unit once, largest first (e.g. '1d12h')")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """``"2d 3h"``, ``"5h 10m"``, ``"7m"``, ``"12s"``: an age for messages and tables."""
    whole = max(int(seconds), 0)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{whole}s"


# borg's --keep-within accepts H (hours), d, w, m (31 days), y (365 days).
_BORG_UNIT_SECONDS: Final = {
    "H": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "m": 31 * 86400,
    "y": 365 * 86400,
}
_BORG_INTERVAL: Final = re.compile(r"^([1-9][0-9]{0,5})([Hdwmy])$")


def parse_borg_interval(text: str) -> timedelta:
    """``"30d"`` -> 30 days, in borg's ``--keep-within`` syntax. Raises ValueError naming the
    accepted form."""
    match = _BORG_INTERVAL.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: a whole number followed by one of "
            "H (hours), d (days), w (weeks), m (months of 31 days), y (years of 365 days), "
            "e.g. '30d'"
        )
    return timedelta(seconds=int(match.group(1)) * _BORG_UNIT_SECONDS[match.group(2)])
