"""What ``borgtunnel pull`` shows on a terminal while it runs: one row per client.

Pure: events in (``Queued``, ``PhaseChanged``, ``FiguresSeen``, ``Finished``), a model of rows
(``Rows``), and a renderer (``render_rows``) that turns the rows into lines of at most ``width``
terminal cells with no control characters. The terminal side (rich, stdout) is in progress.py.

The events are plain data (``event_to_dict`` / ``event_from_dict``), so a pull that runs in
another process (the daemon) can send them to the terminal that asked for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from rich.cells import cell_len, set_cell_size

from borgtunnel.borg import Progress
from borgtunnel.history import RunResult
from borgtunnel.runs.pull import ProgressCallback, PullOutcome, State
from borgtunnel.text import format_size, printable


class Phase(StrEnum):
    QUEUED = "queued"
    CONNECTING = "connecting"
    BACKING_UP = "backing up"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"


# A run's states as a person reads them: everything before borg create runs is "connecting";
# cleaning up after it still belongs to the backup.
_PHASE_OF_STATE = {
    State.STARTING: Phase.CONNECTING,
    State.CONNECTING: Phase.CONNECTING,
    State.PREPARING: Phase.CONNECTING,
    State.FORWARDING: Phase.CONNECTING,
    State.RUNNING: Phase.BACKING_UP,
    State.CLEANING_UP: Phase.BACKING_UP,
    State.VERIFYING: Phase.VERIFYING,
}
_FINISHED = (Phase.DONE, Phase.FAILED)


@dataclass(frozen=True)
class Queued:
    client: str


@dataclass(frozen=True)
class PhaseChanged:
    client: str
    phase: Phase


@dataclass(frozen=True)
class FiguresSeen:
    client: str
    figures: Progress


@dataclass(frozen=True)
class Finished:
    """The run is over: ``summary`` is ``PullOutcome.summary()``, printed once."""

    client: str
    summary: str
    exit_code: int
    failed: bool


PullEvent = Queued | PhaseChanged | FiguresSeen | Finished


def finished_event(outcome: PullOutcome) -> Finished:
    failed = outcome.result not in (RunResult.OK, RunResult.WARNING, RunResult.SKIPPED)
    return Finished(outcome.client, outcome.summary(), outcome.exit_code, failed)


def watch_run(client: str, emit: Callable[[PullEvent], None]) -> ProgressCallback:
    """The ``progress=`` callback of one run that turns its state changes and borg's figures
    into events for ``emit`` (the same phase twice is told once)."""
    last: list[Phase] = []

    def on_progress(update: Progress | State) -> None:
        if isinstance(update, Progress):
            emit(FiguresSeen(client, update))
            return
        phase = _PHASE_OF_STATE.get(update)
        if phase is not None and last[-1:] != [phase]:
            last[:] = [phase]
            emit(PhaseChanged(client, phase))

    return on_progress


@dataclass
class Row:
    client: str
    phase: Phase = Phase.QUEUED
    figures: Progress | None = None
    # monotonic seconds when borg create started sending figures: the rate's time base.
    backing_up_since: float | None = None
    figures_at: float | None = None


@dataclass
class Rows:
    """The model: one row per client, in the order they were first named."""

    rows: dict[str, Row] = field(default_factory=dict)

    def apply(self, event: PullEvent, now: float) -> None:
        row = self.rows.setdefault(event.client, Row(event.client))
        if isinstance(event, Queued):
            row.phase = Phase.QUEUED
        elif isinstance(event, PhaseChanged):
            row.phase = event.phase
            if event.phase is Phase.BACKING_UP and row.backing_up_since is None:
                row.backing_up_since = now
        elif isinstance(event, FiguresSeen):
            # borg's last progress line only says "finished" (all figures 0): keep the last real.
            if not event.figures.finished:
                row.figures = event.figures
                row.figures_at = now
                if row.backing_up_since is None:
                    row.backing_up_since = now
        else:
            row.phase = Phase.FAILED if event.failed else Phase.DONE


_NAME_WIDTH_MAX = 24
_PHASE_WIDTH = max(len(p) for p in Phase)
_GAP = "  "


def fit(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` cells, ending in "…" when cut."""
    if width <= 0:
        return ""
    if cell_len(text) <= width:
        return text
    return set_cell_size(text, width - 1).rstrip() + "…"


def fit_left(text: str, width: int) -> str:
    """``text`` cut from the left (a path's end says most), starting with "…" when cut."""
    if width <= 0:
        return ""
    if cell_len(text) <= width:
        return text
    kept = ""
    for char in reversed(text):
        if cell_len(char + kept) > width - 1:
            break
        kept = char + kept
    return "…" + kept


def _figures(row: Row) -> str:
    figures = row.figures
    if figures is None:
        return ""
    text = f"{figures.nfiles} files  {format_size(figures.original_size)}"
    if row.phase is Phase.BACKING_UP and row.backing_up_since is not None:
        elapsed = (row.figures_at or row.backing_up_since) - row.backing_up_since
        if elapsed > 0:
            text += f"  {format_size(int(figures.original_size / elapsed))}/s"
    return text


def render_row(row: Row, name_width: int, width: int) -> str:
    """``web1  backing up  1843 files  412.6MB  96.1MB/s  /srv/www/…``, within ``width``."""
    name = printable(row.client)
    head = f"{fit(name, name_width):<{name_width}}{_GAP}{row.phase:<{_PHASE_WIDTH}}"
    figures = _figures(row)
    line = f"{head}{_GAP}{figures}" if figures else head.rstrip()
    if row.phase is Phase.BACKING_UP and row.figures is not None and row.figures.path:
        room = width - cell_len(line) - len(_GAP)
        if room >= 8:  # less than that is noise, not a path
            line += _GAP + fit_left(printable(row.figures.path), room)
    return fit(line, width)


def _order(row: Row) -> int:
    """Which rows a short terminal keeps: running first, then queued, then finished."""
    if row.phase in _FINISHED:
        return 2
    return 1 if row.phase is Phase.QUEUED else 0


def render_rows(rows: Rows, width: int, height: int | None = None) -> list[str]:
    """One line per client, each at most ``width`` cells; at most ``height`` lines, the last
    saying how many rows did not fit (running rows are kept before queued, then finished)."""
    if width <= 0 or height == 0:
        return []
    shown = list(rows.rows.values())
    names = [cell_len(printable(r.client)) for r in shown]
    name_width = min(max(names, default=0), _NAME_WIDTH_MAX)
    hidden = 0
    if height is not None and len(shown) > height:
        keep = sorted(shown, key=_order)[: height - 1]
        hidden = len(shown) - len(keep)
        shown = [r for r in shown if r in keep]
    lines = [render_row(row, name_width, width) for row in shown]
    if hidden:
        lines.append(fit(f"… {hidden} more", width))
    return lines


# --- events as plain data (for a pull that runs in another process) -------------------------


def event_to_dict(event: PullEvent) -> dict[str, object]:
    if isinstance(event, Queued):
        return {"event": "queued", "client": event.client}
    if isinstance(event, PhaseChanged):
        return {"event": "phase", "client": event.client, "phase": str(event.phase)}
    if isinstance(event, FiguresSeen):
        f = event.figures
        return {
            "event": "figures",
            "client": event.client,
            "original_size": f.original_size,
            "compressed_size": f.compressed_size,
            "deduplicated_size": f.deduplicated_size,
            "nfiles": f.nfiles,
            "path": f.path,
            "finished": f.finished,
        }
    return {
        "event": "finished",
        "client": event.client,
        "summary": event.summary,
        "exit_code": event.exit_code,
        "failed": event.failed,
    }


T = TypeVar("T")


class EventError(ValueError):
    """A progress event that is not one: says which field."""


def _get(data: Mapping[str, object], key: str, kind: type[T]) -> T:
    value = data.get(key)
    # bool is an int in Python; a figure that is true/false is still wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EventError(f"progress event: {key} must be {kind.__name__}, got {value!r:.80}")
    return value


def event_from_dict(data: Mapping[str, object]) -> PullEvent:
    """The inverse of ``event_to_dict``; anything else raises ``EventError``."""
    kind = _get(data, "event", str)
    client = _get(data, "client", str)
    if kind == "queued":
        return Queued(client)
    if kind == "phase":
        try:
            return PhaseChanged(client, Phase(_get(data, "phase", str)))
        except ValueError as exc:
            raise EventError(f"progress event: unknown phase {data.get('phase')!r:.80}") from exc
    if kind == "figures":
        return FiguresSeen(
            client,
            Progress(
                original_size=_get(data, "original_size", int),
                compressed_size=_get(data, "compressed_size", int),
                deduplicated_size=_get(data, "deduplicated_size", int),
                nfiles=_get(data, "nfiles", int),
                path=_get(data, "path", str),
                finished=_get(data, "finished", bool),
            ),
        )
    if kind == "finished":
        return Finished(
            client,
            _get(data, "summary", str),
            _get(data, "exit_code", int),
            _get(data, "failed", bool),
        )
    raise EventError(f"progress event: unknown event {kind!r:.80}")
