"""Durations written like borg's own intervals: ``30d``, ``12H``, ``2w``. Pure."""

from __future__ import annotations

import re
from datetime import timedelta

# borg's --keep-within accepts H (hours), d, w, m (31 days), y (365 days); the same letters here,
# so one spelling works in both places.
_UNIT_SECONDS = {"H": 3600, "d": 86400, "w": 7 * 86400, "m": 31 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"^([1-9][0-9]{0,5})([Hdwmy])$")


def parse_duration(text: str) -> timedelta:
    """``"30d"`` -> 30 days. Raises ValueError naming the accepted form."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: a whole number followed by one of "
            "H (hours), d (days), w (weeks), m (months of 31 days), y (years of 365 days), "
            "e.g. '30d'"
        )
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
