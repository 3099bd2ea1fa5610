"""Live progress of ``borgtunnel pull`` on a terminal (rich): one line per client while it runs,
then that client's summary line in its place.

The figures are borg's own ``archive_progress`` lines (``--log-json --progress``, asked for only
when this display is on). Not on a terminal, or with ``--no-progress``, nothing here is used and
``pull`` prints only the summary lines.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Self, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from borgtunnel.borg import Progress
from borgtunnel.runs.pull import ProgressCallback
from borgtunnel.text import printable

_PATH_WIDTH = 50


def human_bytes(n: float) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover - the loop always returns


def progress_line(client: str, figures: Progress | None, elapsed: float) -> str:
    """``web1: 1234 files, 56.7 MB, 12.3 MB/s, /srv/data/x``: what the live line says."""
    if figures is None:
        return f"{client}: connecting…"
    rate = figures.original_size / elapsed if elapsed > 0 else 0.0
    path = printable(figures.path)  # the client's file name, escapes and all
    if len(path) > _PATH_WIDTH:
        path = "…" + path[-(_PATH_WIDTH - 1) :]
    return (
        f"{client}: {figures.nfiles} files, {human_bytes(figures.original_size)}, "
        f"{human_bytes(rate)}/s, {path}".rstrip(", ")
    )


class CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time of each write.

    Log lines written through it pass through rich's stderr redirection while the live display
    runs, so they appear above the live lines instead of tearing them.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class LiveProgress:
    """``with LiveProgress(sys.stdout) as live: cb = live.track("web1"); ...; live.done(...)``.

    When stderr is the same kind of terminal, it is redirected through the display while it
    runs (see ``CurrentStderr``); stderr going to a file is left alone.
    """

    def __init__(self, stream: TextIO) -> None:
        self._console = Console(file=stream, highlight=False)
        self._lines: dict[str, tuple[Progress | None, float]] = {}
        self._live = Live(
            Group(),
            console=self._console,
            refresh_per_second=4,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=sys.stderr.isatty(),
        )

    def __enter__(self) -> Self:
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.stop()

    def track(self, client: str) -> ProgressCallback:
        self._lines[client] = (None, time.monotonic())
        self._render()

        def update(figures: Progress) -> None:
            started = self._lines.get(client, (None, time.monotonic()))[1]
            self._lines[client] = (figures, started)
            self._render()

        return update

    def done(self, client: str, summary: str) -> None:
        """Replace the client's live line by its summary line."""
        self._lines.pop(client, None)
        self._render()
        self._console.print(Text(summary))

    def _render(self) -> None:
        now = time.monotonic()
        self._live.update(
            Group(
                *(
                    Text(progress_line(name, figures, now - started))
                    for name, (figures, started) in self._lines.items()
                )
            )
        )
