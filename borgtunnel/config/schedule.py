"""When does a client's next backup run? Pure time maths, no clock, no I/O.

Everything here takes the current moment as an argument (``after``) and returns a new
timezone-aware datetime, so it can be tested with fixed datetimes (the same approach as
arq's ``arq/cron.py``). The daemon reads the clock and sleeps; this module only computes.

Schedule
    A standard 5-field cron expression (``"0 2 * * *"``), parsed and evaluated by
    `cronsim`_, or one of the aliases ``@hourly``, ``@daily``/``@midnight``, ``@weekly``,
    ``@monthly``, ``@yearly``/``@annually``. It is interpreted in the schedule's time zone
    (default: the system local zone, see :func:`system_zone`).

Daylight saving time
    We keep cronsim's behaviour, which copies Debian cron. For jobs at a fixed hour and
    minute (neither field starts with ``*``):

    * spring forward (the wall-clock hour 02:00-03:00 does not exist): a job due in the
      skipped hour runs at the first wall-clock minute after the gap. In Europe/Berlin on
      2026-03-29 a ``30 2 * * *`` job runs once, at 03:00 CEST.
    * fall back (02:00-03:00 happens twice): the job runs once, in the first pass
      (CEST); it does not run again when the clock repeats the hour. cronsim alone
      would return the first-pass time again when asked from inside the second pass,
      i.e. a time in the past; :func:`next_fire` skips such times, so the result is
      always strictly after ``after``.

    Jobs whose minute or hour field starts with ``*`` (``*/15 * * * *``) run on real
    elapsed time: they have no runs inside the skipped hour and run in both passes of
    the repeated hour.

Blackout windows
    ``"<days> HH:MM-HH:MM"`` in wall-clock time of the schedule's zone, e.g.
    ``"Mon-Fri 08:00-18:00"``, ``"Sat 00:00-06:00"``, ``"daily 22:00-23:30"``,
    ``"Mon,Wed 09:00-17:00"``. Days are three-letter English names, case-insensitive,
    as a comma-separated list of names and ranges (a range may wrap: ``Fri-Mon``), or
    ``daily``. Windows are half-open ``[start, end)``; ``24:00`` is accepted as the end
    of the day. An end earlier than the start crosses midnight: ``"Fri 22:00-02:00"``
    starts on Friday 22:00 and ends on Saturday 02:00. A run that falls inside a window
    is deferred to the window's end; if that moment is inside another window it is
    deferred again. Windows that together cover the whole week are rejected.

Jitter
    A uniform random delay in ``[0, jitter_seconds)`` is drawn once per run and added
    *after* any blackout deferral, so clients deferred by the same window are still
    spread out instead of all starting at the window's end. If the jitter pushes the run
    into a blackout window, the run is deferred to that window's end (without drawing
    again); jitter therefore never puts a run inside a blackout. Keep the jitter smaller
    than the schedule's interval, or the delayed run may pass the following cron time.

.. _cronsim: https://github.com/cuu508/cronsim
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

__all__ = [
    "BlackoutWindow",
    "Schedule",
    "blackout_end",
    "in_blackout",
    "next_fire",
    "next_run",
    "parse_blackout",
    "parse_schedule",
    "system_zone",
    "validate_blackouts",
]

_ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}

_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index == date.weekday()
_MINUTES_PER_DAY = 24 * 60
_MINUTES_PER_WEEK = 7 * _MINUTES_PER_DAY
_WEEK = timedelta(days=7)

# A fixed reference moment for checking at parse time that an expression ever fires.
_PARSE_REFERENCE = datetime(2000, 1, 1, tzinfo=UTC)

_BLACKOUT_FORMAT = (
    "expected '<days> HH:MM-HH:MM' such as 'Mon-Fri 08:00-18:00', 'Sat 00:00-06:00', "
    "'Mon,Wed 09:00-17:00' or 'daily 22:00-23:30' (days: Mon Tue Wed Thu Fri Sat Sun, "
    "lists with ',', ranges with '-', or 'daily'; an end before the start crosses midnight)"
)
_TIME_RANGE = re.compile(r"([0-9]{1,2}):([0-9]{2})-([0-9]{1,2}):([0-9]{2})")


def system_zone() -> tzinfo:
    """The system's local time zone, with its DST rules (not a fixed UTC offset).

    Uses ``$TZ`` if it names an IANA zone, else ``/etc/localtime``, else UTC (which is
    also what the C library assumes without either). This reads the environment and the
    file system, so it is only called when a schedule is parsed without a zone, never
    from the time maths.
    """
    env = os.environ.get("TZ", "").removeprefix(":")
    if env:
        try:
            return ZoneInfo(env)
        except (ZoneInfoNotFoundError, ValueError):
            pass  # a POSIX rule string like "CET-1CEST,M3.5.0,M10.5.0/3": use the file
    localtime = Path("/etc/localtime")
    _, sep, key = str(localtime.resolve()).partition("/zoneinfo/")
    if sep:
        try:
            return ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with localtime.open("rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return UTC


@dataclass(frozen=True, slots=True)
class Schedule:
    """A validated cron expression and the zone its wall-clock times are in."""

    expr: str
    """Normalised 5-field expression (aliases expanded, single spaces)."""
    tz: tzinfo

    def __str__(self) -> str:
        return self.expr


def parse_schedule(expr: str, *, tz: tzinfo | None = None) -> Schedule:
    """Validate a 5-field cron expression (or an ``@alias``) and bind it to a zone.

    Raises ``ValueError`` saying what is wrong. ``tz=None`` means :func:`system_zone`.
    """
    text = " ".join(expr.split())
    normalised = _ALIASES.get(text.lower(), text)
    fields = normalised.split()
    if len(fields) != 5:
        raise ValueError(
            f"invalid cron expression {expr!r}: expected 5 fields "
            f"'minute hour day-of-month month day-of-week' (e.g. '0 2 * * *') "
            f"or one of {', '.join(_ALIASES)}; got {len(fields)} field(s)"
        )
    try:
        it = CronSim(normalised, _PARSE_REFERENCE)
    except CronSimError as exc:
        raise ValueError(f"invalid cron expression {expr!r}: {str(exc).lower()} field") from exc
    if next(it, None) is None:
        raise ValueError(f"invalid cron expression {expr!r}: it never fires")
    return Schedule(expr=normalised, tz=system_zone() if tz is None else tz)


@dataclass(frozen=True, slots=True)
class BlackoutWindow:
    """A weekly recurring wall-clock period during which no run may start.

    Each day in ``days`` (``0`` = Monday, as ``date.weekday()``) starts one occurrence at
    ``start`` minutes after midnight lasting ``length`` minutes (1 to 1440); an occurrence
    may run past midnight into the next day.
    """

    days: frozenset[int]
    start: int
    length: int
    spec: str

    def __str__(self) -> str:
        return self.spec

    def occurrences(self) -> list[tuple[int, int]]:
        """``[start, end)`` in minutes since Monday 00:00; ``end`` may exceed a week."""
        return [
            (day * _MINUTES_PER_DAY + self.start, day * _MINUTES_PER_DAY + self.start + self.length)
            for day in sorted(self.days)
        ]


def _parse_days(text: str) -> tuple[frozenset[int], str | None]:
    if text.lower() == "daily":
        return frozenset(range(7)), None
    days: set[int] = set()
    bad: list[str] = []
    for item in text.split(","):
        first, sep, last = item.partition("-")
        names = [first, last] if sep else [first]
        indexes = [_DAY_NAMES.index(n.lower()) if n.lower() in _DAY_NAMES else -1 for n in names]
        if -1 in indexes:
            bad.extend(n for n, i in zip(names, indexes, strict=True) if i == -1)
            continue
        lo, hi = indexes[0], indexes[-1]
        days.update((lo + k) % 7 for k in range((hi - lo) % 7 + 1))  # ranges may wrap
    if bad:
        listed = ", ".join(repr(n) for n in bad)
        return frozenset(), f"unknown day name(s) {listed} in {text!r}"
    return frozenset(days), None


def _parse_times(text: str) -> tuple[int, int, str | None]:
    m = _TIME_RANGE.fullmatch(text)
    if m is None:
        return 0, 0, f"time range {text!r} is not HH:MM-HH:MM"
    sh, sm, eh, em = (int(g) for g in m.groups())
    if sh > 23 or sm > 59:
        return 0, 0, f"start time {sh:02d}:{sm:02d} is not a time of day (00:00 to 23:59)"
    if em > 59 or eh > 24 or (eh == 24 and em != 0):
        return 0, 0, f"end time {eh:02d}:{em:02d} is not a time of day (00:00 to 24:00)"
    start, end = sh * 60 + sm, eh * 60 + em
    if end == start:
        return 0, 0, "start and end are equal; for a whole day write 00:00-24:00"
    return start, (end - start) % _MINUTES_PER_DAY or _MINUTES_PER_DAY, None


def parse_blackout(spec: str) -> BlackoutWindow:
    """Parse ``"<days> HH:MM-HH:MM"`` (see the module docstring); ``ValueError`` if invalid."""
    days_text, _, times_text = spec.strip().partition(" ")
    times_text = "".join(times_text.split())  # tolerate "08:00 - 18:00"
    if not days_text or not times_text:
        raise ValueError(f"invalid blackout window {spec!r}: {_BLACKOUT_FORMAT}")
    days, day_error = _parse_days(days_text)
    start, length, time_error = _parse_times(times_text)
    errors = [e for e in (day_error, time_error) if e is not None]
    if errors:
        raise ValueError(
            f"invalid blackout window {spec!r}: {'; '.join(errors)}; {_BLACKOUT_FORMAT}"
        )
    window = BlackoutWindow(days=days, start=start, length=length, spec=" ".join(spec.split()))
    validate_blackouts([window])
    return window


def validate_blackouts(windows: Sequence[BlackoutWindow]) -> tuple[BlackoutWindow, ...]:
    """Reject windows that together leave no time in the week to run; return them as a tuple."""
    intervals: list[tuple[int, int]] = []
    for window in windows:
        for start, end in window.occurrences():
            if end > _MINUTES_PER_WEEK:  # Sunday night into Monday morning
                intervals += [(start, _MINUTES_PER_WEEK), (0, end - _MINUTES_PER_WEEK)]
            else:
                intervals.append((start, end))
    covered_until = 0
    for start, end in sorted(intervals):
        if start > covered_until:
            return tuple(windows)
        covered_until = max(covered_until, end)
    if covered_until >= _MINUTES_PER_WEEK:
        specs = ", ".join(repr(w.spec) for w in windows)
        raise ValueError(f"blackout windows {specs} cover the whole week: no backup could ever run")
    return tuple(windows)


def _require_aware(when: datetime, name: str) -> None:
    if when.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {when!r}")


def _local(when: datetime, tz: tzinfo) -> datetime:
    """``when`` in ``tz`` with a correct ``fold``; imaginary wall times are normalised.

    (``astimezone`` is a no-op when ``when`` is already in ``tz``, hence the UTC hop.)
    """
    return when.astimezone(UTC).astimezone(tz)


def _later(a: datetime, b: datetime) -> bool:
    """``a > b`` as instants. Python compares datetimes sharing a tzinfo by wall clock,
    ignoring ``fold``, which is wrong in the repeated hour of a DST change."""
    return a.astimezone(UTC) > b.astimezone(UTC)


def _window_containing(
    local: datetime, windows: Sequence[BlackoutWindow]
) -> tuple[BlackoutWindow, timedelta] | None:
    """The first window whose wall-clock occurrence contains ``local``, and the wall-clock
    time left until that occurrence ends."""
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    since_monday = local.replace(tzinfo=None) - midnight + timedelta(days=local.weekday())
    for window in windows:
        for start, end in window.occurrences():
            into = (since_monday - timedelta(minutes=start)) % _WEEK
            if into < timedelta(minutes=end - start):
                return window, timedelta(minutes=end - start) - into
    return None


def in_blackout(
    when: datetime, windows: Sequence[BlackoutWindow], *, tz: tzinfo | None = None
) -> BlackoutWindow | None:
    """The window ``when`` falls in (wall clock in ``tz``, default ``when``'s zone), or None."""
    _require_aware(when, "when")
    found = _window_containing(_local(when, tz if tz is not None else when.tzinfo or UTC), windows)
    return None if found is None else found[0]


def _resolve_wall(wall: datetime, tz: tzinfo, after: datetime) -> datetime:
    """The earliest instant later than ``after`` showing wall-clock time ``wall`` in ``tz``,
    or, if ``wall`` is skipped by a DST change, the first instant after the gap."""
    first = wall.replace(tzinfo=tz, fold=0)
    if _local(first, tz).replace(tzinfo=None) != wall:  # in a spring-forward gap
        while _local(first, tz).replace(tzinfo=None) != first.replace(tzinfo=None):
            first += timedelta(minutes=1)  # wall-clock arithmetic: walks out of the gap
        return _local(first, tz)
    if _later(first, after):
        return _local(first, tz)
    return _local(wall.replace(tzinfo=tz, fold=1), tz)  # the repeated pass of a fall-back


def blackout_end(
    when: datetime, windows: Sequence[BlackoutWindow], *, tz: tzinfo | None = None
) -> datetime:
    """The first instant at or after ``when`` outside every window (``when`` itself if it is
    outside). Chained and overlapping windows are followed to the end of the last one.

    The result is in ``tz`` (default ``when``'s zone), which is also the zone whose wall
    clock the windows are read in. ``ValueError`` if the windows cover the whole week.
    """
    _require_aware(when, "when")
    zone = tz if tz is not None else when.tzinfo or UTC
    validate_blackouts(windows)
    current = _local(when, zone)
    # Each step jumps to the end of a different occurrence; DST gaps can add a few.
    for _ in range(4 * sum(len(w.days) for w in windows) + 8):
        found = _window_containing(current, windows)
        if found is None:
            return current
        current = _resolve_wall(current.replace(tzinfo=None) + found[1], zone, current)
    raise ValueError(f"could not find a moment after {when} outside the blackout windows")


def next_fire(schedule: Schedule, after: datetime) -> datetime:
    """The first cron time strictly after ``after``, in ``schedule.tz`` (no blackout, no jitter)."""
    _require_aware(after, "after")
    start = _local(after, schedule.tz)
    for fire in CronSim(schedule.expr, start):
        # cronsim works on naive wall-clock time for fixed-time jobs, so from inside the
        # second pass of a fall-back hour it can return the first pass: skip those.
        result = _local(fire, schedule.tz)
        if _later(result, after):
            return result
    raise ValueError(f"cron expression {schedule.expr!r} does not fire within 50 years of {after}")


def _draw(rand: Callable[[], float] | random.Random) -> float:
    value = rand.random() if isinstance(rand, random.Random) else rand()
    if not 0.0 <= value < 1.0:
        raise ValueError(f"the random source must return a float in [0, 1), got {value!r}")
    return value


def next_run(
    schedule: Schedule,
    after: datetime,
    *,
    blackout: Sequence[BlackoutWindow] = (),
    jitter_seconds: float = 0,
    rand: Callable[[], float] | random.Random = random.random,
) -> datetime:
    """When to start the next run: the first cron time strictly after ``after``, deferred to
    the end of any blackout window it falls in, plus jitter (see the module docstring).

    ``rand`` is called once if ``jitter_seconds > 0`` and must return a float in ``[0, 1)``;
    pass a seeded ``random.Random`` or a function for deterministic results. The result
    is in ``schedule.tz`` and always later than ``after`` and outside every window.
    """
    if not (math.isfinite(jitter_seconds) and jitter_seconds >= 0):
        raise ValueError(f"jitter must be a finite number of seconds >= 0, got {jitter_seconds!r}")
    windows = validate_blackouts(blackout)
    run = blackout_end(next_fire(schedule, after), windows, tz=schedule.tz)
    if jitter_seconds > 0:
        delay = timedelta(seconds=jitter_seconds * _draw(rand))
        # Add in UTC: aware-datetime arithmetic in one zone is wall-clock arithmetic.
        run = blackout_end(run.astimezone(UTC) + delay, windows, tz=schedule.tz)
    return run
