"""Next-run maths with fixed datetimes only (no clock reads).

Expected values are written as ISO strings with their UTC offset, so a result that shows
the right wall-clock time in the wrong pass of a DST change fails. (Python compares two
datetimes sharing a tzinfo by wall clock and ignores ``fold``, so ``==`` would not.)

2026-05-06 is a Wednesday, 2026-05-08 a Friday. In Europe/Berlin, DST starts on Sunday
2026-03-29 (02:00 CET -> 03:00 CEST) and ends on Sunday 2026-10-25 (03:00 CEST -> 02:00 CET).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest

from borgtunnel.config.schedule import (
    BlackoutWindow,
    Schedule,
    blackout_end,
    in_blackout,
    next_fire,
    next_run,
    parse_blackout,
    parse_schedule,
    system_zone,
    validate_blackouts,
)

BERLIN = ZoneInfo("Europe/Berlin")


def at(iso: str) -> datetime:
    """An aware datetime from an ISO string with an explicit offset, shown in Berlin."""
    parsed = datetime.fromisoformat(iso)
    assert parsed.utcoffset() is not None, "test datetimes must carry their offset"
    return parsed.astimezone(BERLIN)


def sched(expr: str, tz: tzinfo = BERLIN) -> Schedule:
    return parse_schedule(expr, tz=tz)


def windows(*specs: str) -> tuple[BlackoutWindow, ...]:
    return validate_blackouts([parse_blackout(s) for s in specs])


def iso(when: datetime) -> str:
    assert when.tzinfo is BERLIN
    return when.isoformat()


def seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - deterministic test data, not cryptography


def fake_rand(value: float) -> Callable[[], float]:
    return lambda: value


# --- parse_schedule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "normalised"),
    [
        ("0 2 * * *", "0 2 * * *"),
        ("  */15   *  * * * ", "*/15 * * * *"),
        ("0 2 * * mon-fri", "0 2 * * mon-fri"),
        ("@daily", "0 0 * * *"),
        ("@Weekly", "0 0 * * 0"),
    ],
)
def test_parse_schedule_normalises(expr, normalised):
    schedule = parse_schedule(expr, tz=BERLIN)
    assert schedule == Schedule(expr=normalised, tz=BERLIN)
    assert str(schedule) == normalised


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "invalid cron expression '': expected 5 fields"),
        ("0 2 * *", "expected 5 fields 'minute hour day-of-month month day-of-week'"),
        ("0 0 2 * * *", "got 6 field(s)"),
        ("@reboot", "or one of @hourly, @daily"),
        ("61 * * * *", "invalid cron expression '61 * * * *': bad minute field"),
        ("0 24 * * *", "bad hour field"),
        ("0 0 30 2 *", "bad day-of-month field"),
        ("0 0 * 13 *", "bad month field"),
        ("0 0 * * Mon-Fry", "bad day-of-week field"),
        ("*/0 * * * *", "bad minute field"),
        ("* * */20 * 1L", "it never fires"),
    ],
)
def test_parse_schedule_rejects(expr, message):
    with pytest.raises(ValueError, match="invalid cron expression") as excinfo:
        parse_schedule(expr, tz=BERLIN)
    assert message in str(excinfo.value)


def test_parse_schedule_defaults_to_the_system_zone(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")
    assert system_zone() == BERLIN
    assert parse_schedule("0 2 * * *").tz == BERLIN
    monkeypatch.setenv("TZ", ":Asia/Tokyo")
    assert system_zone() == ZoneInfo("Asia/Tokyo")


def test_system_zone_ignores_a_posix_tz_string(monkeypatch):
    monkeypatch.delenv("TZ", raising=False)
    expected = system_zone()  # from /etc/localtime (or UTC without one)
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    assert system_zone() == expected


# --- next_fire: plain cron ----------------------------------------------------------------


def test_daily_later_same_day_and_next_day():
    daily = sched("0 2 * * *")
    assert iso(next_fire(daily, at("2026-05-06T01:00:00+02:00"))) == "2026-05-06T02:00:00+02:00"
    assert iso(next_fire(daily, at("2026-05-06T10:00:00+02:00"))) == "2026-05-07T02:00:00+02:00"


def test_every_15_minutes():
    every = sched("*/15 * * * *")
    assert iso(next_fire(every, at("2026-05-06T10:07:00+02:00"))) == "2026-05-06T10:15:00+02:00"
    assert iso(next_fire(every, at("2026-05-06T23:50:00+02:00"))) == "2026-05-07T00:00:00+02:00"


def test_strictly_after():
    every = sched("*/15 * * * *")
    assert iso(next_fire(every, at("2026-05-06T10:15:00+02:00"))) == "2026-05-06T10:30:00+02:00"
    just_before = at("2026-05-06T10:14:59.999999+02:00")
    assert iso(next_fire(every, just_before)) == "2026-05-06T10:15:00+02:00"
    just_after = at("2026-05-06T10:15:00.000001+02:00")
    assert iso(next_fire(every, just_after)) == "2026-05-06T10:30:00+02:00"
    daily = sched("0 2 * * *")
    assert iso(next_fire(daily, at("2026-05-06T02:00:00+02:00"))) == "2026-05-07T02:00:00+02:00"


def test_after_in_another_zone_is_the_same_instant():
    daily = sched("0 2 * * *")
    # 23:30 UTC on the 5th is 01:30 on the 6th in Berlin.
    after = datetime(2026, 5, 5, 23, 30, tzinfo=UTC)
    assert iso(next_fire(daily, after)) == "2026-05-06T02:00:00+02:00"


def test_schedule_in_utc():
    daily = parse_schedule("0 2 * * *", tz=UTC)
    result = next_fire(daily, datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert result.isoformat() == "2026-03-29T02:00:00+00:00"


def test_naive_after_is_rejected():
    with pytest.raises(ValueError, match="after must be a timezone-aware datetime"):
        next_run(sched("0 2 * * *"), datetime(2026, 5, 6, 10))  # noqa: DTZ001


# --- DST ----------------------------------------------------------------------------------


def runs_between(schedule: Schedule, start: datetime, end: datetime, **kwargs) -> list[str]:
    result: list[str] = []
    current = start
    while True:
        current = next_run(schedule, current, **kwargs)
        if current.astimezone(UTC) >= end.astimezone(UTC):
            return result
        result.append(iso(current))


def test_spring_forward_job_in_the_skipped_hour_runs_once_just_after_the_gap():
    job = sched("30 2 * * *")
    runs = runs_between(job, at("2026-03-28T00:00:00+01:00"), at("2026-03-31T00:00:00+02:00"))
    assert runs == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:30 does not exist that day
        "2026-03-30T02:30:00+02:00",
    ]


def test_spring_forward_job_at_three_is_unaffected():
    job = sched("0 3 * * *")
    assert iso(next_run(job, at("2026-03-29T01:59:00+01:00"))) == "2026-03-29T03:00:00+02:00"


def test_fall_back_job_in_the_repeated_hour_runs_once():
    job = sched("30 2 * * *")
    runs = runs_between(job, at("2026-10-24T00:00:00+02:00"), at("2026-10-27T00:00:00+01:00"))
    assert runs == [
        "2026-10-24T02:30:00+02:00",
        "2026-10-25T02:30:00+02:00",  # first pass only
        "2026-10-26T02:30:00+01:00",
    ]


def test_fall_back_asked_from_inside_the_second_pass_does_not_return_the_past():
    # 02:15 CET is after 02:30 CEST; cronsim on its own answers 02:30 CEST (in the past).
    second_pass = datetime(2026, 10, 25, 2, 15, tzinfo=BERLIN, fold=1)
    assert second_pass.utcoffset() == timedelta(hours=1)
    assert iso(next_run(sched("30 2 * * *"), second_pass)) == "2026-10-26T02:30:00+01:00"


def test_frequent_job_runs_on_real_time_across_fall_back():
    job = sched("*/30 * * * *")
    runs = runs_between(job, at("2026-10-25T01:45:00+02:00"), at("2026-10-25T03:15:00+01:00"))
    assert runs == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]


def test_frequent_job_has_no_runs_in_the_skipped_hour():
    job = sched("*/30 * * * *")
    runs = runs_between(job, at("2026-03-29T01:15:00+01:00"), at("2026-03-29T03:45:00+02:00"))
    assert runs == [
        "2026-03-29T01:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T03:30:00+02:00",
    ]


# --- parse_blackout -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "days", "start", "length"),
    [
        ("Mon-Fri 08:00-18:00", {0, 1, 2, 3, 4}, 8 * 60, 10 * 60),
        ("Sat 00:00-06:00", {5}, 0, 6 * 60),
        ("daily 22:00-23:30", set(range(7)), 22 * 60, 90),
        ("DAILY 22:00-23:30", set(range(7)), 22 * 60, 90),
        ("Mon,Wed 09:00-17:00", {0, 2}, 9 * 60, 8 * 60),
        ("mon,WED,Fri-Sun 9:00-17:00", {0, 2, 4, 5, 6}, 9 * 60, 8 * 60),
        ("Fri 22:00-02:00", {4}, 22 * 60, 4 * 60),
        ("Fri-Mon 12:00-13:00", {4, 5, 6, 0}, 12 * 60, 60),
        ("Sun 00:00-24:00", {6}, 0, 24 * 60),
        ("Sun 18:00-00:00", {6}, 18 * 60, 6 * 60),
        ("  Tue   08:00 - 09:30 ", {1}, 8 * 60, 90),
    ],
)
def test_parse_blackout(spec, days, start, length):
    window = parse_blackout(spec)
    assert (window.days, window.start, window.length) == (frozenset(days), start, length)
    assert str(window) == " ".join(spec.split())


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("Mon-Fry 8-18", "unknown day name(s) 'Fry' in 'Mon-Fry'; time range '8-18' is not"),
        ("", "invalid blackout window '': expected '<days> HH:MM-HH:MM'"),
        ("Mon", "invalid blackout window 'Mon': expected '<days> HH:MM-HH:MM'"),
        ("Monday 08:00-18:00", "unknown day name(s) 'Monday'"),
        ("08:00-18:00", "invalid blackout window '08:00-18:00': expected"),
        ("Mon,,Tue 08:00-18:00", "unknown day name(s) ''"),
        ("Mon 8-18", "time range '8-18' is not HH:MM-HH:MM"),
        ("Mon 08:00-18:00 extra", "time range '08:00-18:00extra' is not HH:MM-HH:MM"),
        ("Mon 24:00-02:00", "start time 24:00 is not a time of day"),
        ("Mon 08:60-09:00", "start time 08:60 is not a time of day"),
        ("Mon 08:00-24:30", "end time 24:30 is not a time of day"),
        ("Mon 08:00-08:00", "start and end are equal; for a whole day write 00:00-24:00"),
        ("daily 00:00-24:00", "cover the whole week: no backup could ever run"),
    ],
)
def test_parse_blackout_rejects(spec, problem):
    with pytest.raises(ValueError, match=r"blackout window") as excinfo:
        parse_blackout(spec)
    assert problem in str(excinfo.value)


def test_format_is_explained_in_errors():
    with pytest.raises(ValueError, match=r"such as 'Mon-Fri 08:00-18:00'"):
        parse_blackout("Mon-Fry 8-18")


def test_windows_together_covering_the_week_are_rejected():
    with pytest.raises(ValueError, match="cover the whole week"):
        windows("Mon-Thu 00:00-24:00", "Fri 00:00-12:00", "Fri 12:00-00:00", "Sat-Sun 00:00-24:00")
    with pytest.raises(ValueError, match="cover the whole week"):
        windows("daily 12:00-11:59", "daily 11:00-12:00")  # both cross midnight
    with pytest.raises(ValueError, match="cover the whole week"):
        next_run(
            sched("0 9 * * *"),
            at("2026-05-06T00:00:00+02:00"),
            blackout=[parse_blackout("daily 06:00-18:00"), parse_blackout("daily 18:00-06:00")],
        )
    # One free minute a week is enough.
    assert len(windows("Mon-Sat 00:00-24:00", "Sun 00:01-00:00")) == 2


# --- in_blackout / blackout_end -----------------------------------------------------------


def test_in_blackout_is_half_open():
    office = windows("Mon-Fri 08:00-18:00")
    assert in_blackout(at("2026-05-06T07:59:59+02:00"), office) is None
    assert in_blackout(at("2026-05-06T08:00:00+02:00"), office) is office[0]
    assert in_blackout(at("2026-05-06T17:59:59.999999+02:00"), office) is office[0]
    assert in_blackout(at("2026-05-06T18:00:00+02:00"), office) is None
    assert in_blackout(at("2026-05-09T12:00:00+02:00"), office) is None  # Saturday


def test_in_blackout_reads_the_wall_clock_of_the_given_zone():
    office = windows("Mon-Fri 08:00-18:00")
    utc_morning = datetime(2026, 5, 6, 7, 0, tzinfo=UTC)  # 09:00 in Berlin
    assert in_blackout(utc_morning, office) is None  # read in its own zone: 07:00
    assert in_blackout(utc_morning, office, tz=BERLIN) is office[0]
    utc_evening = datetime(2026, 5, 6, 17, 0, tzinfo=UTC)  # 19:00 in Berlin
    assert in_blackout(utc_evening, office) is office[0]
    assert in_blackout(utc_evening, office, tz=BERLIN) is None


def test_midnight_crossing_window():
    night = windows("Fri 22:00-02:00")
    assert in_blackout(at("2026-05-08T21:59:59+02:00"), night) is None
    assert in_blackout(at("2026-05-08T22:00:00+02:00"), night) is night[0]
    assert in_blackout(at("2026-05-09T01:59:59+02:00"), night) is night[0]  # Saturday
    assert in_blackout(at("2026-05-09T02:00:00+02:00"), night) is None
    assert in_blackout(at("2026-05-08T01:00:00+02:00"), night) is None  # Friday morning
    assert iso(blackout_end(at("2026-05-08T23:00:00+02:00"), night)) == "2026-05-09T02:00:00+02:00"


def test_window_crossing_from_sunday_into_monday():
    night = windows("Sun 23:00-01:00")
    assert in_blackout(at("2026-05-11T00:30:00+02:00"), night) is night[0]  # Monday
    assert in_blackout(at("2026-05-10T00:30:00+02:00"), night) is None  # Sunday morning
    assert iso(blackout_end(at("2026-05-10T23:30:00+02:00"), night)) == "2026-05-11T01:00:00+02:00"


def test_blackout_end_outside_any_window_is_the_same_instant():
    outside = at("2026-05-06T19:00:00+02:00")
    assert blackout_end(outside, windows("Mon-Fri 08:00-18:00")) == outside
    assert blackout_end(outside, ()) == outside


def test_blackout_end_follows_chained_and_overlapping_windows():
    chain = windows(
        "Mon-Fri 08:00-18:00", "Wed 17:00-20:00", "Wed 20:00-21:15", "daily 21:00-21:30"
    )
    assert iso(blackout_end(at("2026-05-06T09:00:00+02:00"), chain)) == "2026-05-06T21:30:00+02:00"
    assert iso(blackout_end(at("2026-05-07T09:00:00+02:00"), chain)) == "2026-05-07T18:00:00+02:00"


def test_blackout_end_in_a_spring_forward_gap_is_the_end_of_the_gap():
    night = windows("Sun 01:00-02:30")
    result = blackout_end(at("2026-03-29T01:30:00+01:00"), night)
    assert iso(result) == "2026-03-29T03:00:00+02:00"


def test_blackout_end_in_the_repeated_fall_back_hour():
    night = windows("Sun 01:00-02:30")
    first_pass = at("2026-10-25T01:30:00+02:00")
    assert iso(blackout_end(first_pass, night)) == "2026-10-25T02:30:00+02:00"
    second_pass = datetime(2026, 10, 25, 2, 15, tzinfo=BERLIN, fold=1)  # wall clock inside again
    assert iso(blackout_end(second_pass, night)) == "2026-10-25T02:30:00+01:00"


# --- next_run with blackout ---------------------------------------------------------------

OFFICE = ("Mon-Fri 08:00-18:00",)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        ("2026-05-06T05:00:00+02:00", "2026-05-06T18:00:00+02:00"),  # Wednesday: deferred
        ("2026-05-06T18:00:00+02:00", "2026-05-07T18:00:00+02:00"),  # already ran Wednesday
        ("2026-05-08T10:00:00+02:00", "2026-05-09T09:00:00+02:00"),  # Friday -> Saturday 09:00
        ("2026-05-09T05:00:00+02:00", "2026-05-09T09:00:00+02:00"),  # Saturday: not deferred
        ("2026-05-10T10:00:00+02:00", "2026-05-11T18:00:00+02:00"),  # Sunday -> Monday evening
    ],
)
def test_office_hours_blackout(after, expected):
    result = next_run(sched("0 9 * * *"), at(after), blackout=windows(*OFFICE))
    assert iso(result) == expected


def test_hourly_schedule_collapses_into_one_run_at_the_window_end():
    hourly, office = sched("0 * * * *"), windows(*OFFICE)
    runs = runs_between(
        hourly,
        at("2026-05-06T06:30:00+02:00"),
        at("2026-05-06T20:30:00+02:00"),
        blackout=office,
    )
    assert runs == [
        "2026-05-06T07:00:00+02:00",
        "2026-05-06T18:00:00+02:00",  # 08:00 deferred; 09:00..17:00 are before it
        "2026-05-06T19:00:00+02:00",
        "2026-05-06T20:00:00+02:00",
    ]


def test_midnight_crossing_window_defers_runs_on_both_days():
    night = windows("Fri 22:00-02:00")
    late = next_run(sched("0 23 * * *"), at("2026-05-08T12:00:00+02:00"), blackout=night)
    assert iso(late) == "2026-05-09T02:00:00+02:00"
    early = next_run(sched("0 1 * * *"), at("2026-05-08T12:00:00+02:00"), blackout=night)
    assert iso(early) == "2026-05-09T02:00:00+02:00"
    thursday = next_run(sched("0 23 * * *"), at("2026-05-07T12:00:00+02:00"), blackout=night)
    assert iso(thursday) == "2026-05-07T23:00:00+02:00"


# --- jitter -------------------------------------------------------------------------------


def test_jitter_bounds_with_fake_rand():
    daily, after = sched("0 2 * * *"), at("2026-05-06T10:00:00+02:00")
    low = next_run(daily, after, jitter_seconds=3600, rand=fake_rand(0.0))
    assert iso(low) == "2026-05-07T02:00:00+02:00"
    high = next_run(daily, after, jitter_seconds=3600, rand=fake_rand(0.999))
    assert iso(high) == "2026-05-07T02:59:56.400000+02:00"


def test_jitter_with_a_seeded_random():
    daily, after = sched("0 2 * * *"), at("2026-05-06T10:00:00+02:00")
    result = next_run(daily, after, jitter_seconds=3600, rand=seeded(42))
    # seeded(42).random() == 0.6394267984578837 -> 2301.936474 s
    assert iso(result) == "2026-05-07T02:38:21.936474+02:00"


def test_jitter_stays_in_bounds():
    rng, daily = seeded(1234), sched("0 2 * * *")
    after = at("2026-05-06T10:00:00+02:00")
    fire = at("2026-05-07T02:00:00+02:00")
    delays = [next_run(daily, after, jitter_seconds=900, rand=rng) - fire for _ in range(500)]
    assert all(timedelta(0) <= d < timedelta(seconds=900) for d in delays)
    assert max(delays) - min(delays) > timedelta(seconds=800)  # actually spread


def test_jitter_is_added_after_the_deferral():
    result = next_run(
        sched("0 9 * * *"),
        at("2026-05-06T05:00:00+02:00"),
        blackout=windows(*OFFICE),
        jitter_seconds=600,
        rand=fake_rand(0.5),
    )
    assert iso(result) == "2026-05-06T18:05:00+02:00"


def test_jitter_never_pushes_a_run_into_a_blackout():
    result = next_run(
        sched("0 7 * * *"),
        at("2026-05-06T05:00:00+02:00"),
        blackout=windows(*OFFICE),
        jitter_seconds=7200,
        rand=fake_rand(0.75),  # 07:00 + 1h30 = 08:30, inside the window
    )
    assert iso(result) == "2026-05-06T18:00:00+02:00"


def test_jitter_is_real_elapsed_time_across_spring_forward():
    result = next_run(
        sched("0 1 * * *"),
        at("2026-03-28T12:00:00+01:00"),
        jitter_seconds=7200,
        rand=fake_rand(0.75),
    )
    assert iso(result) == "2026-03-29T03:30:00+02:00"  # 01:00 CET + 1h30, not 02:30


def test_jitter_is_real_elapsed_time_across_fall_back():
    result = next_run(
        sched("30 1 * * *"),
        at("2026-10-24T12:00:00+02:00"),
        jitter_seconds=7200,
        rand=fake_rand(0.75),
    )
    assert iso(result) == "2026-10-25T02:00:00+01:00"  # 01:30 CEST + 1h30, not 03:00 CET


def test_rand_is_not_called_without_jitter():
    def forbidden() -> float:
        raise AssertionError("rand called")

    result = next_run(sched("0 2 * * *"), at("2026-05-06T10:00:00+02:00"), rand=forbidden)
    assert iso(result) == "2026-05-07T02:00:00+02:00"


@pytest.mark.parametrize("jitter", [-1, float("nan"), float("inf")])
def test_invalid_jitter_is_rejected(jitter):
    with pytest.raises(ValueError, match="jitter must be a finite number of seconds >= 0"):
        next_run(sched("0 2 * * *"), at("2026-05-06T10:00:00+02:00"), jitter_seconds=jitter)


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_rand_out_of_range_is_rejected(value):
    with pytest.raises(ValueError, match=r"must return a float in \[0, 1\)"):
        next_run(
            sched("0 2 * * *"),
            at("2026-05-06T10:00:00+02:00"),
            jitter_seconds=60,
            rand=fake_rand(value),
        )


# --- property-style loop against a brute-force oracle -------------------------------------


def oracle(
    after: datetime,
    fires: Callable[[datetime], bool],
    blocked: Callable[[datetime], bool],
) -> str:
    """Scan real minutes after ``after`` for the first cron match, then skip blocked minutes."""
    t = after.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    while not fires(t.astimezone(BERLIN)):
        t += timedelta(minutes=1)
    while blocked(t.astimezone(BERLIN)):
        t += timedelta(minutes=1)
    return iso(t.astimezone(BERLIN))


def minute_of_day(w: datetime) -> int:
    return w.hour * 60 + w.minute


CASES = [
    (
        "0 9 * * *",
        ("Mon-Fri 08:00-18:00",),
        lambda w: (w.hour, w.minute) == (9, 0),
        lambda w: w.weekday() < 5 and 8 <= w.hour < 18,
    ),
    (
        "*/15 * * * *",
        ("daily 22:00-23:30", "Fri 22:00-02:00", "Sat 01:30-03:00"),
        lambda w: w.minute % 15 == 0,
        lambda w: (
            22 * 60 <= minute_of_day(w) < 23 * 60 + 30
            or (w.weekday() == 4 and minute_of_day(w) >= 22 * 60)
            or (w.weekday() == 5 and minute_of_day(w) < 3 * 60)
        ),
    ),
    (
        "0 3 * * mon,wed,fri",
        ("Mon 00:00-24:00", "Tue 00:00-12:00"),
        lambda w: (w.hour, w.minute) == (3, 0) and w.weekday() in (0, 2, 4),
        lambda w: w.weekday() == 0 or (w.weekday() == 1 and w.hour < 12),
    ),
]

# Odd steps from fixed bases, across both 2026 DST changes, plus some exact edges.
STEP = timedelta(hours=7, minutes=13, seconds=11)
STARTS = [
    *(datetime(2026, 3, 24, 0, 0, 17, tzinfo=UTC) + k * STEP for k in range(25)),
    *(datetime(2026, 10, 20, 0, 0, 17, tzinfo=UTC) + k * STEP for k in range(25)),
    at("2026-05-06T09:00:00+02:00"),
    at("2026-05-06T18:00:00+02:00"),
    at("2026-05-08T22:00:00+02:00"),
    at("2026-05-09T01:59:59.999999+02:00"),
    at("2026-05-11T03:00:00+02:00"),
]


@pytest.mark.parametrize(("expr", "specs", "fires", "blocked"), CASES)
def test_next_run_matches_brute_force(expr, specs, fires, blocked):
    schedule, blackout = sched(expr), windows(*specs)
    for after in STARTS:
        result = next_run(schedule, after, blackout=blackout)
        assert result.astimezone(UTC) > after.astimezone(UTC), after
        assert in_blackout(result, blackout) is None, (after, result)
        assert iso(result) == oracle(after, fires, blocked), after


@pytest.mark.parametrize(("expr", "specs", "fires", "blocked"), CASES)
def test_jittered_runs_stay_after_and_outside_blackouts(expr, specs, fires, blocked):
    schedule, blackout, rng = sched(expr), windows(*specs), seeded(7)
    for after in STARTS:
        plain = next_run(schedule, after, blackout=blackout)
        result = next_run(schedule, after, blackout=blackout, jitter_seconds=5400, rand=rng)
        assert result.astimezone(UTC) >= plain.astimezone(UTC), after
        assert not blocked(result), (after, result)
        assert in_blackout(result, blackout) is None, (after, result)
