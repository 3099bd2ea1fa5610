"""Staleness: a client whose newest verified archive is older than its ``max_age`` (or that never
had one) needs a look, whatever its last run said.

Pure functions of (last success, max_age, now) so status, metrics and notifications agree.
The age is counted from the *start* of the successful run: that is when its data is from.
A client never backed up is counted from its first slot (see ``is_stale``).
"""

from __future__ import annotations

from datetime import datetime

from borgtunnel.durations import format_duration


def is_stale(
    last_success: datetime | None,
    max_age: float | None,
    now: datetime,
    *,
    first_slot: datetime | None = None,
) -> bool:
    """True when ``max_age`` is set and the last success is older than it, or missing.

    A client never backed up gets until ``first_slot`` (its first due time after it was first
    seen, ``scheduling/catchup.py``) plus ``max_age``: a new client is not stale before it
    could have been pulled. Without a known first slot it is stale at once, as before.
    """
    if max_age is None:
        return False
    if last_success is None:
        return first_slot is None or (now - first_slot).total_seconds() > max_age
    return (now - last_success).total_seconds() > max_age


def age_text(last_success: datetime | None, now: datetime) -> str:
    """``"2d 3h ago"`` or ``"never"``, for messages."""
    if last_success is None:
        return "never"
    return f"{format_duration((now - last_success).total_seconds())} ago"
