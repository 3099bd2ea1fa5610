"""borgtunnel/pauses.py: the pause file (persisted pauses), ``--until`` parsing, the daemon's
watch of the file, and the ``borgtunnel_client_paused`` gauge."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from borgtunnel.pauses import (
    MAX_FILE_BYTES,
    Pause,
    PauseFileError,
    PauseWatch,
    active_pauses,
    clear_pause,
    load_pauses,
    parse_until,
    pauses_path,
    set_pause,
)
from borgtunnel.reporting.metrics import ClientMetrics, Snapshot, families

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")


def test_until_takes_an_iso_time_in_the_zone_or_with_an_offset_or_a_duration():
    assert parse_until("2026-03-03T08:00", NOW, BERLIN) == datetime(2026, 3, 3, 7, 0, tzinfo=UTC)
    assert parse_until("2026-03-03T08:00+00:00", NOW, BERLIN) == datetime(
        2026, 3, 3, 8, 0, tzinfo=UTC
    )
    assert parse_until("36h", NOW, BERLIN) == NOW + timedelta(hours=36)
    assert parse_until("1d12h", NOW, BERLIN) == NOW + timedelta(hours=36)


@pytest.mark.parametrize("text", ["tomorrow", "12x", "", "-3h"])
def test_until_that_is_neither_names_both_forms(text):
    with pytest.raises(ValueError, match=r"ISO time .* or a duration"):
        parse_until(text, NOW, UTC)


def test_until_in_the_past_is_refused():
    with pytest.raises(ValueError, match="not in the future"):
        parse_until("2026-03-01T00:00", NOW, UTC)


def test_pause_and_resume_round_trip_through_a_private_file(tmp_path):
    state = tmp_path / "state"
    assert load_pauses(state) == {}
    set_pause(state, "web1", None, NOW)
    set_pause(state, "db1", NOW + timedelta(hours=1), NOW)
    path = pauses_path(state)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_pauses(state) == {
        "web1": Pause(NOW, None),
        "db1": Pause(NOW, NOW + timedelta(hours=1)),
    }
    assert set(active_pauses(state, NOW + timedelta(hours=2))) == {"web1"}
    assert clear_pause(state, "web1", NOW) is True
    assert clear_pause(state, "web1", NOW) is False
    # An expired pause is "not paused", and writing drops it.
    assert clear_pause(state, "db1", NOW + timedelta(hours=2)) is False
    assert json.loads(path.read_text())["clients"] == {}
    assert not list(state.glob(".paused.json.*"))  # no temporary file left


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "is not a valid pause file"),
        (b'{"clients": {"web1": {"since": "yesterday"}}}', "clients.web1.since"),
        (b'{"clients": {}, "extra": 1}', "extra"),
        (b" " * (MAX_FILE_BYTES + 1), f"larger than {MAX_FILE_BYTES} bytes"),
    ],
)
def test_a_broken_pause_file_is_an_error_naming_the_file(tmp_path, content, problem):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    pauses_path(state).write_bytes(content)
    with pytest.raises(PauseFileError, match=problem) as caught:
        load_pauses(state)
    assert str(pauses_path(state)) in str(caught.value)
    with pytest.raises(PauseFileError):
        set_pause(state, "web1", None, NOW)  # never overwrites what it cannot read
    with capture_logs() as logs:
        assert active_pauses(state, NOW) == {}
    assert logs[0]["event"] == "pause_file_unreadable"


def test_the_daemon_watch_rereads_changes_and_keeps_the_last_good_copy(tmp_path):
    state = tmp_path / "state"
    watch = PauseWatch(state)
    assert watch.active(NOW) == {}
    set_pause(state, "web1", None, NOW)
    assert set(watch.active(NOW)) == {"web1"}
    pauses_path(state).write_text("garbage")
    with capture_logs() as logs:
        assert set(watch.active(NOW)) == {"web1"}
        assert set(watch.active(NOW)) == {"web1"}
    assert [e["event"] for e in logs] == ["pause_file_unreadable"]  # once per change
    pauses_path(state).unlink()
    assert watch.active(NOW) == {}


def test_the_paused_gauge_follows_the_pause_and_its_end():
    until = NOW.timestamp() + 60
    snapshot = Snapshot(
        (
            ClientMetrics("web1", paused=True),
            ClientMetrics("db1", paused=True, paused_until=until),
            ClientMetrics("mail"),
        )
    )

    def gauge(now: float) -> dict[str, float]:
        (family,) = [f for f in families(snapshot, now) if f.name == "borgtunnel_client_paused"]
        return {s.labels["client"]: s.value for s in family.samples}

    assert gauge(NOW.timestamp()) == {"web1": 1.0, "db1": 1.0, "mail": 0.0}
    assert gauge(until + 1) == {"web1": 1.0, "db1": 0.0, "mail": 0.0}
