"""The daemon's decisions, without clocks or I/O: when a client runs next, who starts next, whether
a failed run is retried and after how long, and the one-line status systemd shows.

Kept apart from ``daemon.py`` so each rule is unit-tested with plain values.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, tzinfo

from borgtunnel.config import ClientConfig, schedule
from borgtunnel.history import RunResult
from borgtunnel.runs.pull import PullOutcome

# Backoff doubles per attempt; without a cap, retries=10 with retry_wait=60 would wait 17 hours
# before the last attempt, long after the next scheduled run. A retry_wait above the cap wins.
MAX_RETRY_DELAY = 3600.0


def next_client_run(
    client: ClientConfig,
    zone: tzinfo,
    after: datetime,
    *,
    jitter: bool = True,
    rand: Callable[[], float] | random.Random = random.random,
) -> datetime | None:
    """The next start of ``client`` strictly after ``after``; None for a client without schedule.

    ``jitter=False`` gives the un-jittered time (what ``borgtunnel status`` can know).
    """
    if client.schedule is None:
        return None
    return schedule.next_run(
        schedule.parse_schedule(client.schedule, tz=zone),
        after,
        blackout=[schedule.parse_blackout(spec) for spec in client.blackout],
        jitter_seconds=client.jitter if jitter else 0,
        rand=rand,
    )


def retry_delay(retry_wait: float, attempt: int, *, cap: float = MAX_RETRY_DELAY) -> float:
    """Seconds before retry number ``attempt + 1``: ``retry_wait * 2**attempt``, capped.

    The cap is ``max(cap, retry_wait)`` so that a configured wait is never shortened.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    return float(min(retry_wait * 2**attempt, max(cap, retry_wait)))


def is_busy(outcome: PullOutcome) -> bool:
    """The run did not start: another process holds the client's lock."""
    return outcome.busy


def is_retryable(outcome: PullOutcome) -> bool:
    """The connection failed or dropped (client offline, network down, laptop asleep mid-backup):
    worth another try. Retrying a dropped run is safe: the next run stops the borg create the
    dead session left on the client (borgtunnel/client/remote.py).

    Anything else (borg error, refused prepare step, host key, bad passphrase, a file or program
    of this server that cannot be read or run) would fail the same way again, so it waits for
    the next scheduled run.
    """
    return outcome.result is RunResult.FAILED and outcome.link_lost


class RunQueue:
    """First come, first served, at most ``limit`` at once, each client at most once.

    A client is either waiting, running, or neither; ``push`` refuses a client that is already
    waiting or running, so a slow client cannot pile up runs, and every waiting client is
    started before any client that became due after it.
    """

    def __init__(self) -> None:
        self._waiting: deque[str] = deque()
        self._running: set[str] = set()

    @property
    def waiting(self) -> tuple[str, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> frozenset[str]:
        return frozenset(self._running)

    def busy(self, client: str) -> bool:
        """Waiting or running."""
        return client in self._running or client in self._waiting

    def push(self, client: str) -> bool:
        """Queue ``client`` at the back; False (and nothing changes) if it is already busy."""
        if self.busy(client):
            return False
        self._waiting.append(client)
        return True

    def start_next(self, limit: int) -> str | None:
        """Move the first waiting client to running if fewer than ``limit`` run; else None."""
        if not self._waiting or len(self._running) >= limit:
            return None
        client = self._waiting.popleft()
        self._running.add(client)
        return client

    def finished(self, client: str) -> None:
        """``client`` is no longer running."""
        self._running.discard(client)

    def discard(self, clients: Iterable[str]) -> None:
        """Forget waiting entries of ``clients`` (removed by a reload); running ones stay."""
        gone = set(clients)
        self._waiting = deque(c for c in self._waiting if c not in gone)

    def clear_waiting(self) -> list[str]:
        """Drop every waiting client (shutdown); returns them."""
        dropped = list(self._waiting)
        self._waiting.clear()
        return dropped


def status_line(
    running: int, waiting: int, upcoming: tuple[str, datetime] | None, now: datetime
) -> str:
    """``2 running, 1 queued, next: web1 at 02:00`` for systemd's STATUS=.

    The time is shown in the zone of ``upcoming``'s datetime, with the date when it is not on
    ``now``'s day there.
    """
    parts = [f"{running} running"]
    if waiting:
        parts.append(f"{waiting} queued")
    if upcoming is None:
        parts.append("nothing scheduled")
    else:
        name, when = upcoming
        same_day = when.date() == now.astimezone(when.tzinfo).date()
        shown = when.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M")
        parts.append(f"next: {name} at {shown}")
    return ", ".join(parts)
