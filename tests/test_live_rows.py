"""The rows ``borgtunnel pull`` shows on a terminal (borgtunnel/reporting/live.py): pure model
and renderer. Client-chosen text (paths; names are config keys but are escaped all the same)
never reaches the terminal as control characters, and no line is wider than the terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len

from borgtunnel.borg import Progress
from borgtunnel.history import RunResult
from borgtunnel.reporting import progress
from borgtunnel.reporting.live import (
    EventError,
    FiguresSeen,
    Finished,
    Phase,
    PhaseChanged,
    PullEvent,
    Queued,
    Rows,
    event_from_dict,
    event_to_dict,
    finished_event,
    fit_left,
    render_rows,
    watch_run,
)
from borgtunnel.runs.pull import PullOutcome, State
from borgtunnel.text import printable


def figures(nfiles: int = 42, size: int = 5_000_000, path: str = "/srv/a") -> Progress:
    return Progress(size, 1, 2, nfiles, path, finished=False)


def test_a_run_becomes_phases_and_figures_each_told_once():
    seen: list[PullEvent] = []
    watch = watch_run("web1", seen.append)
    for state in (State.STARTING, State.CONNECTING, State.PREPARING, State.FORWARDING):
        watch(state)
    watch(State.RUNNING)
    watch(figures())
    watch(State.CLEANING_UP)  # still the backup, as a person sees it
    watch(State.VERIFYING)
    watch(State.DONE)  # the end is told by finished_event, with the outcome
    assert seen == [
        PhaseChanged("web1", Phase.CONNECTING),
        PhaseChanged("web1", Phase.BACKING_UP),
        FiguresSeen("web1", figures()),
        PhaseChanged("web1", Phase.VERIFYING),
    ]


def test_rows_follow_the_events_and_the_rate_is_per_second_of_backing_up():
    rows = Rows()
    rows.apply(Queued("web1"), 0.0)
    rows.apply(Queued("db1"), 0.0)
    assert render_rows(rows, 80) == ["web1  queued", "db1   queued"]
    rows.apply(PhaseChanged("web1", Phase.CONNECTING), 1.0)
    rows.apply(PhaseChanged("web1", Phase.BACKING_UP), 10.0)
    rows.apply(FiguresSeen("web1", figures(1843, 20_000_000, "/srv/www/a.jpg")), 12.0)
    assert render_rows(rows, 80)[0] == (
        "web1  backing up  1843 files  20.0MB  10.0MB/s  /srv/www/a.jpg"
    )
    # borg's closing progress line has no figures: the last real ones stay.
    rows.apply(FiguresSeen("web1", Progress(0, 0, 0, 0, "", finished=True)), 13.0)
    rows.apply(PhaseChanged("web1", Phase.VERIFYING), 14.0)
    assert render_rows(rows, 80)[0] == "web1  verifying   1843 files  20.0MB"
    rows.apply(Finished("web1", "web1: ok …", 0, failed=False), 15.0)
    rows.apply(Finished("db1", "db1: failed …", 2, failed=True), 15.0)
    assert render_rows(rows, 80) == ["web1  done        1843 files  20.0MB", "db1   failed"]


def test_a_narrow_terminal_cuts_the_path_from_the_left_then_the_line():
    rows = Rows()
    rows.apply(PhaseChanged("web1", Phase.BACKING_UP), 0.0)
    rows.apply(FiguresSeen("web1", figures(7, 1000, "/srv/" + "d" * 50 + "/end.txt")), 1.0)
    line = render_rows(rows, 60)[0]
    assert cell_len(line) == 60
    assert line.endswith("d/end.txt")
    assert "…" in line
    assert render_rows(rows, 12) == ["web1  backi…"]
    assert render_rows(rows, 1) == ["…"]
    assert render_rows(rows, 0) == []


def test_a_short_terminal_keeps_the_running_rows_and_counts_the_rest():
    rows = Rows()
    for index in range(10):
        rows.apply(Queued(f"c{index}"), 0.0)
    rows.apply(Finished("c0", "c0: ok", 0, failed=False), 1.0)
    rows.apply(PhaseChanged("c7", Phase.CONNECTING), 1.0)
    rows.apply(PhaseChanged("c9", Phase.BACKING_UP), 1.0)
    lines = render_rows(rows, 40, height=4)
    assert lines == ["c1  queued", "c7  connecting", "c9  backing up", "… 7 more"]


def test_hostile_text_is_escaped():
    rows = Rows()
    rows.apply(PhaseChanged("web\x1b]0;owned\x07", Phase.BACKING_UP), 0.0)
    rows.apply(FiguresSeen("web\x1b]0;owned\x07", figures(path="/x\x1b[2J\r\nfake: ok\u202e")), 1.0)
    (line,) = render_rows(rows, 200)
    assert line.isprintable()
    assert "\\x1b[2J\\r\\nfake: ok\\u202e" in line
    assert line.startswith("web\\x1b]0;owned\\x07")


text = st.text(st.characters(codec="utf-8"), max_size=120)


@settings(max_examples=400, deadline=None)
@given(
    names=st.lists(text, min_size=1, max_size=6),
    path=text,
    width=st.integers(min_value=0, max_value=200),
    height=st.none() | st.integers(min_value=0, max_value=8),
    nfiles=st.integers(min_value=0, max_value=10**12),
    size=st.integers(min_value=0, max_value=10**18),
)
def test_any_text_any_size_fits_and_prints_nothing_but_text(
    *, names: list[str], path: str, width: int, height: int | None, nfiles: int, size: int
):
    rows = Rows()
    for index, name in enumerate(names):
        rows.apply(Queued(name), 0.0)
        rows.apply(PhaseChanged(name, list(Phase)[index % len(Phase)]), 1.0)
        rows.apply(FiguresSeen(name, figures(nfiles, size, path)), 2.0)
    lines = render_rows(rows, width, height)
    clients = len(rows.rows)
    assert len(lines) == (0 if width == 0 else min(clients, clients if height is None else height))
    for line in lines:
        assert cell_len(line) <= width
        assert line.isprintable(), ascii(line)


@given(text, st.integers(min_value=1, max_value=80))
def test_cutting_from_the_left_keeps_the_end(value: str, width: int):
    value = printable(value)  # what fit_left is given
    cut = fit_left(value, width)
    assert cell_len(cut) <= width
    assert cut == value or (cut.startswith("…") and value.endswith(cut[1:]))


events = st.one_of(
    st.builds(Queued, text),
    st.builds(PhaseChanged, text, st.sampled_from(Phase)),
    st.builds(
        FiguresSeen,
        text,
        st.builds(
            Progress,
            st.integers(min_value=0),
            st.integers(min_value=0),
            st.integers(min_value=0),
            st.integers(min_value=0),
            text,
            st.booleans(),
        ),
    ),
    st.builds(Finished, text, text, st.integers(0, 255), st.booleans()),
)


@given(events)
def test_events_survive_plain_data(event: PullEvent):
    assert event_from_dict(event_to_dict(event)) == event


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"event": "queued"}, "client"),
        ({"event": "phase", "client": "a", "phase": "hacking"}, "phase"),
        ({"event": "finished", "client": "a", "summary": "s", "exit_code": True}, "exit_code"),
        ({"event": "figures", "client": "a", "nfiles": "3"}, "original_size"),
        ({"event": "nope", "client": "a"}, "unknown event"),
        ({"client": "a"}, "event"),
    ],
)
def test_a_bad_event_names_what_is_wrong(data: dict[str, object], named: str):
    with pytest.raises(EventError, match=named):
        event_from_dict(data)


@pytest.mark.parametrize(
    ("result", "failed", "code"),
    [
        (RunResult.OK, False, 0),
        (RunResult.WARNING, False, 1),
        (RunResult.SKIPPED, False, 75),
        (RunResult.FAILED, True, 2),
        (RunResult.INTERRUPTED, True, 2),
    ],
)
def test_the_finished_event_carries_the_summary_line(result: RunResult, failed: bool, code: int):
    outcome = PullOutcome(client="web1", result=result, error="boom\x1b[2J")
    event = finished_event(outcome)
    assert (event.failed, event.exit_code, event.summary) == (failed, code, outcome.summary())
    assert event.summary.isprintable()


def test_not_on_a_terminal_only_the_summary_lines_in_the_order_named(
    capsys: pytest.CaptureFixture[str],
):
    with progress.PullDisplay(live=False) as display:
        for name in ("a", "b", "c", "d"):
            display.feed(Queued(name))
        display.feed(PhaseChanged("a", Phase.BACKING_UP))
        display.feed(FiguresSeen("a", figures()))
        display.feed(Finished("b", "b: failed in state connecting", 2, failed=True))
        assert capsys.readouterr().out == ""  # a is still running
        display.feed(Finished("a", "a: ok archive=x", 0, failed=False))
        assert capsys.readouterr().out == "a: ok archive=x\nb: failed in state connecting\n"
        display.feed(Finished("d", "d: ok archive=y", 0, failed=False))
        assert capsys.readouterr().out == ""
    # Interrupted while c ran: what finished is still printed.
    assert capsys.readouterr().out == "d: ok archive=y\n"
    assert [f.client for f in display.finished] == ["b", "a", "d"]


def test_the_documented_example_is_what_an_80_column_terminal_shows():
    doc = (Path(__file__).parent.parent / "docs" / "reporting.md").read_text()
    section = doc[doc.index("## Live progress") :]
    block = section.split("```\n")[1]
    example = block.splitlines()[1:]  # after the command line
    rows = Rows()
    for name in ("web1", "db1"):
        rows.apply(PhaseChanged(name, Phase.BACKING_UP), 0.0)
    path = "/srv/www/uploads/2026/11/IMG_2291.jpg"
    rows.apply(FiguresSeen("web1", figures(1843, 412_600_000, path)), 4.2937)
    rows.apply(FiguresSeen("db1", figures(212, 2_100_000_000, "/var/lib/db")), 10.0)
    rows.apply(PhaseChanged("db1", Phase.VERIFYING), 11.0)
    assert render_rows(rows, 80) == example
