"""The daemon's pure rules: next run per client, backoff, retry/busy classification, the run
queue's fairness and the systemd status line."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from borgtunnel.config import ClientConfig
from borgtunnel.history import RunResult
from borgtunnel.lock import ClientBusy
from borgtunnel.runs.jobs import busy_outcome
from borgtunnel.runs.pull import PullOutcome, State
from borgtunnel.scheduling.planning import (
    MAX_RETRY_DELAY,
    RunQueue,
    is_busy,
    is_retryable,
    next_client_run,
    retry_delay,
    status_line,
)

BERLIN = ZoneInfo("Europe/Berlin")


def client(**keys) -> ClientConfig:
    return ClientConfig.model_validate(
        {"host": "h", "repository": "/r", "paths": ["/d"], "encryption": "none", **keys}
    )


# --- next run ----------------------------------------------------------------------------


def test_client_without_schedule_has_no_next_run():
    assert next_client_run(client(), UTC, datetime(2026, 3, 2, tzinfo=UTC)) is None


def test_next_run_uses_the_zone_and_blackout():
    c = client(schedule="30 1 * * *", blackout=["daily 01:00-02:00"])
    after = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)  # 01:00 in Berlin (CET)
    run = next_client_run(c, BERLIN, after)
    assert run == datetime(2026, 3, 2, 2, 0, tzinfo=BERLIN)  # 01:30 deferred to the window's end


def test_jitter_is_drawn_unless_switched_off():
    c = client(schedule="0 2 * * *", jitter=600)
    after = datetime(2026, 3, 2, tzinfo=UTC)
    assert next_client_run(c, UTC, after, rand=lambda: 0.5) == datetime(
        2026, 3, 2, 2, 5, tzinfo=UTC
    )
    assert next_client_run(c, UTC, after, jitter=False, rand=lambda: 0.5) == datetime(
        2026, 3, 2, 2, 0, tzinfo=UTC
    )


# --- retries -----------------------------------------------------------------------------


def test_retry_delay_doubles_per_attempt():
    assert [retry_delay(60, n) for n in range(5)] == [60, 120, 240, 480, 960]


def test_retry_delay_is_capped():
    assert retry_delay(60, 6) == MAX_RETRY_DELAY == 3600
    assert retry_delay(60, 99) == MAX_RETRY_DELAY
    assert retry_delay(1, 3, cap=5) == 5


def test_retry_delay_never_shortens_a_long_retry_wait():
    assert retry_delay(7200, 0) == 7200
    assert retry_delay(7200, 4) == 7200


def test_retry_delay_rejects_negative_attempts():
    with pytest.raises(ValueError, match="attempt"):
        retry_delay(60, -1)


@pytest.mark.parametrize(
    ("result", "state", "link_lost", "retryable"),
    [
        (RunResult.FAILED, State.CONNECTING, True, True),  # offline client, refused connection
        (RunResult.FAILED, State.RUNNING, True, True),  # link dropped mid-backup
        (RunResult.FAILED, State.CONNECTING, False, False),  # host key refused
        (RunResult.FAILED, State.PREPARING, False, False),  # the client refused the prepare step
        (RunResult.FAILED, State.RUNNING, False, False),  # borg error
        (RunResult.FAILED, State.STARTING, False, False),  # passphrase, local socket
        (RunResult.OK, State.DONE, False, False),
        (RunResult.WARNING, State.DONE, False, False),
    ],
)
def test_only_connection_failures_are_retried(result, state, link_lost, retryable):
    outcome = PullOutcome(client="c", result=result, state=state, link_lost=link_lost)
    assert is_retryable(outcome) is retryable


def test_busy_is_recognised_from_the_jobs_outcome():
    c = client()
    outcome = busy_outcome(c, ClientBusy("c", 1234))
    assert is_busy(outcome)
    assert not is_retryable(outcome)
    failed = PullOutcome(client="c", error="passphrase_command failed", state=State.STARTING)
    assert not is_busy(failed)


# --- queue -------------------------------------------------------------------------------


def test_queue_is_first_in_first_out_within_the_limit():
    queue = RunQueue()
    for name in ("b", "a", "c"):
        assert queue.push(name)
    assert queue.start_next(2) == "b"
    assert queue.start_next(2) == "a"
    assert queue.start_next(2) is None  # two running
    queue.finished("a")
    assert queue.start_next(2) == "c"
    assert queue.running == {"b", "c"}
    assert queue.waiting == ()


def test_a_client_is_never_queued_twice_nor_while_running():
    queue = RunQueue()
    assert queue.push("a")
    assert not queue.push("a")
    assert queue.start_next(4) == "a"
    assert not queue.push("a")  # still running
    queue.finished("a")
    assert queue.push("a")


def test_later_clients_do_not_overtake_earlier_ones():
    queue = RunQueue()
    queue.push("slow")
    queue.start_next(1)
    for name in ("x", "y"):
        queue.push(name)
    queue.finished("slow")
    queue.push("slow")  # due again: goes to the back
    assert queue.start_next(1) == "x"
    queue.finished("x")
    assert queue.start_next(1) == "y"
    queue.finished("y")
    assert queue.start_next(1) == "slow"


def test_discard_and_clear_leave_running_clients_alone():
    queue = RunQueue()
    for name in ("a", "b", "c"):
        queue.push(name)
    queue.start_next(1)
    queue.discard({"a", "b"})
    assert queue.waiting == ("c",)
    assert queue.running == {"a"}
    assert queue.clear_waiting() == ["c"]
    assert queue.busy("a")
    assert not queue.busy("c")


# --- status line -------------------------------------------------------------------------


def test_status_line_like_the_issue_asks():
    now = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    upcoming = ("web1", datetime(2026, 3, 2, 2, 0, tzinfo=UTC))
    assert status_line(2, 0, upcoming, now) == "2 running, next: web1 at 02:00"
    assert status_line(1, 3, upcoming, now) == "1 running, 3 queued, next: web1 at 02:00"


def test_status_line_shows_the_date_when_not_today_and_uses_the_zone():
    now = datetime(2026, 3, 2, 23, 30, tzinfo=UTC)  # already 3 March in Berlin
    upcoming = ("db", datetime(2026, 3, 3, 2, 0, tzinfo=BERLIN))
    assert status_line(0, 0, upcoming, now) == "0 running, next: db at 02:00"
    later = ("db", datetime(2026, 3, 5, 2, 0, tzinfo=BERLIN))
    assert status_line(0, 0, later, now) == "0 running, next: db at 2026-03-05 02:00"
    assert status_line(0, 0, None, now) == "0 running, nothing scheduled"
