"""The terminal side of ``borgtunnel pull``: ``PullDisplay`` shows a pull's events.

On a terminal (``live=True``) a rich ``Live`` region holds one row per client (rows and their
text come from live.py) and each client's summary line is printed above it when it finishes;
the region is removed at the end, so the summary lines (``PullOutcome.summary()``, escaped)
are what stays. Not on a terminal, or
with ``--no-progress``, only the summary lines are printed, in the order the clients were named.

``PullDisplay.feed`` (or ``show_pull_events`` for an async stream of them) is the one entry
point: events from this process's runs (``live.watch_run``) and events received from elsewhere
(``live.event_from_dict``) are shown the same way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterable, Callable, Iterator
from types import TracebackType
from typing import Self

from rich.console import Console, ConsoleOptions
from rich.live import Live
from rich.text import Text

from borgtunnel import logs
from borgtunnel.reporting.live import FiguresSeen, Finished, PullEvent, Rows, render_rows

# borg sends a progress line per file it reads; redrawing for each would cost more than it shows.
_MIN_REDRAW = 0.1


class CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time of each write.

    Log lines written through it pass through rich's stderr redirection while the live display
    runs, so they appear above the live rows instead of tearing them.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _RowsView:
    """Rendered at each refresh with the terminal's size at that moment (it may be resized)."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        # One line less than the screen: the cursor's own line must not scroll the rows away.
        height = max(console.size.height - 1, 1)
        for line in render_rows(self.rows, options.max_width, height):
            yield Text(line, no_wrap=True, overflow="crop")


class PullDisplay:
    """``with PullDisplay(live=sys.stdout.isatty()) as display: display.feed(event) ...``"""

    def __init__(self, *, live: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.rows = Rows()
        self.finished: list[Finished] = []
        self._clock = clock
        self._last_redraw = float("-inf")
        self._held: dict[str, Finished] = {}
        self._printed: set[str] = set()
        self._live: Live | None = None
        if live:
            console = Console(file=sys.stdout, highlight=False)
            self._live = Live(
                _RowsView(self.rows),
                console=console,
                auto_refresh=False,  # no thread: rows change on the event loop only
                transient=True,
                redirect_stdout=True,  # summary lines (print_summary) go above the rows
                redirect_stderr=sys.stderr.isatty(),  # so do log lines on the same terminal
            )

    def __enter__(self) -> Self:
        if self._live is not None:
            self._live.start(refresh=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
        self._print_in_order(until_unfinished=False)  # interrupted: what did finish

    def _print_in_order(self, *, until_unfinished: bool) -> None:
        """Not on a terminal, summary lines come in the order the clients were named (as when
        pulls ran one after another), each as soon as the ones before it are printed."""
        for client in self.rows.rows:
            if client in self._printed:
                continue
            event = self._held.pop(client, None)
            if event is None:
                if until_unfinished:
                    return
                continue
            self._printed.add(client)
            logs.print_summary(event.summary, failed=event.failed)

    def feed(self, event: PullEvent) -> None:
        """Show one event: update the client's row; a finished run prints its summary line."""
        now = self._clock()
        self.rows.apply(event, now)
        if isinstance(event, Finished):
            self.finished.append(event)
            if self._live is None:
                self._held[event.client] = event
                self._print_in_order(until_unfinished=True)
            else:
                # Above the rows, as one line (soft_wrap: the terminal wraps it, rich does not
                # break it up, so a copied summary line is still one line).
                self._live.console.print(Text(event.summary), soft_wrap=True)
        if self._live is None:
            return
        if isinstance(event, FiguresSeen) and now - self._last_redraw < _MIN_REDRAW:
            return
        self._last_redraw = now
        self._live.refresh()


async def show_pull_events(events: AsyncIterable[PullEvent], *, live: bool) -> list[Finished]:
    """Show a stream of events until it ends; the runs' ``Finished`` events, in order."""
    with PullDisplay(live=live) as display:
        async for event in events:
            display.feed(event)
    return display.finished
