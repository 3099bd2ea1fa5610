"""Catch-up and "most overdue first": pure decisions, no clock and no I/O.

* **Catch-up.** A client whose scheduled slot passed since its last verified pull (the daemon was
  not running, the client was unreachable, the pull failed) is pulled once when the daemon starts,
  not once per missed slot. The reference is the start of its newest verified pull; a client never
  backed up counts from when the daemon first saw it (``History.first_seen``), so a new client
  waits for its first slot. ``catch_up = false`` opts a client out: it waits for its next slot.
* **First slot.** A client never backed up is not stale before its first slot after it was first
  seen, plus ``max_age`` (``reporting/staleness.py``); this module computes that slot.
* **Order.** When more pulls are due than ``[daemon] max_parallel`` allows, the most overdue go
  first: never backed up, then the oldest verified archive; ties keep their order (the config's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, tzinfo

from borgtunnel.config import ClientConfig, schedule
from borgtunnel.scheduling.planning import next_client_run


def missed_slot(
    client: ClientConfig, zone: tzinfo, reference: datetime | None, now: datetime
) -> datetime | None:
    """The first slot of ``client`` after ``reference`` if it is not later than ``now``, else None.

    ``reference`` is the start of the newest verified pull, or the first sighting of a client
    never backed up; None (nothing known) never catches up. The slot is the un-jittered one,
    deferred past blackout windows, as the daemon would have run it.
    """
    if not client.catch_up or client.schedule is None or reference is None:
        return None
    slot = next_client_run(client, zone, reference, jitter=False)
    return slot if slot is not None and slot <= now else None


def catch_up_start(client: ClientConfig, zone: tzinfo, now: datetime) -> datetime:
    """When a catch-up may start: now, or the end of the blackout window ``now`` falls in."""
    windows = [schedule.parse_blackout(spec) for spec in client.blackout]
    return schedule.blackout_end(now, windows, tz=zone) if windows else now


def first_slot(client: ClientConfig, zone: tzinfo, first_seen: datetime | None) -> datetime | None:
    """The first time the client was due after it was first seen (without jitter).

    A client without a schedule is due when it is first seen (it is pulled on demand); None when
    it was never seen (nothing is known about it).
    """
    if first_seen is None:
        return None
    if client.schedule is None:
        return first_seen
    return next_client_run(client, zone, first_seen, jitter=False)


def most_overdue_first(
    names: Sequence[str], last_success: Mapping[str, datetime | None]
) -> list[str]:
    """``names`` ordered never-backed-up first, then by oldest verified archive; stable."""
    never = [name for name in names if last_success.get(name) is None]
    dated = [
        (when, index, name)
        for index, name in enumerate(names)
        if (when := last_success.get(name)) is not None
    ]
    return never + [name for _, _, name in sorted(dated)]
