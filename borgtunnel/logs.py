"""structlog setup: readable console lines on a terminal, JSON lines everywhere else.

JSON lines on stderr are what journald, log shippers and ``jq`` want; each line carries
``client`` where it concerns one, so one client's story can be filtered out of hundreds.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

from borgtunnel.systemd import journal_stream_matches
from borgtunnel.text import printable

LogFormat = Literal["auto", "json", "console"]


# syslog priorities, as journald reads them from a "<N>" line prefix on a stream.
_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}


def _journald_priority(_logger: object, method: str, rendered: object) -> str:
    """Prefix the rendered line so journald files it under the right priority."""
    return f"<{_PRIORITY.get(method, 6)}>{rendered}"


def _on_the_journal(stream: TextIO) -> bool:
    try:
        return journal_stream_matches(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (a StringIO, a closed stream)
        return False


def print_error(text: object, *, file: TextIO | None = None) -> None:
    """Print an error message for a person (stderr unless ``file``). On the journal's stream
    every line gets the ``<3>`` prefix, so ``journalctl -p err`` shows why a command or unit
    failed, not only systemd's "Failed to start"; elsewhere the text is printed as it is."""
    out = file if file is not None else sys.stderr
    lines = str(text).splitlines() or [""]
    if _on_the_journal(out):
        lines = [f"<{_PRIORITY['error']}>{line}" for line in lines]
    print("\n".join(lines), file=out, flush=True)


def print_summary(text: str, *, failed: bool) -> None:
    """A run's one-line result on stdout; a failure is an error line (see print_error)."""
    if failed:
        print_error(text, file=sys.stdout)
    else:
        print(text, flush=True)


def _escape_for_terminal(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Console lines only (JSON escapes by itself): remote text shown with escapes. A
    traceback keeps its line breaks; each of its lines is escaped (messages quote client text)."""
    return {
        key: (
            "\n".join(printable(line) for line in value.split("\n"))
            if key == "exception"
            else printable(value)
        )
        if isinstance(value, str)
        else value
        for key, value in event_dict.items()
    }


def configure(
    fmt: LogFormat = "auto", *, level: str = "info", stream: TextIO | None = None
) -> None:
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        *(() if use_json else (_escape_for_terminal,)),
        renderer,
    ]
    if stream is None and journal_stream_matches(2):
        processors.append(_journald_priority)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
