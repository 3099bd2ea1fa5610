"""``borgtunnel status`` and ``borgtunnel history``: what is backed up, and what is not.

Both read the run history (they never write it) and print a table on a terminal, JSON otherwise
or with ``--json``.

status, per configured client:

* ``last_success``: start of the newest run that created an archive (``ok`` or ``warning``);
  the start, because that is the moment the archive's data is from. ``last_success_age_seconds``
  is its age now.
* ``last_result``: result of the newest finished run. A ``running`` row whose process is gone
  counts as ``interrupted``, as the next daemon or pull start will record it.
* ``next_run``: the next scheduled start computed now from ``schedule`` and ``blackout`` in the
  daemon's zone, without jitter (the daemon draws it and does not publish it, so the real start
  is up to ``jitter`` seconds later); null without a schedule.
* ``paused`` / ``paused_until``: ``borgtunnel pause`` keeps the client from being scheduled
  (borgtunnel/pauses.py); ``next_run`` is then the first slot after the pause (null while
  paused until ``resume``).
* ``last_error`` / ``failed_sources``: the error text of that newest finished pull, and the
  configured names of the sources it failed because of (their dump failed or is not in the
  archive; ``[]`` otherwise), read from the history's ``run_sources`` rows, never from the text.
* ``running``: the newest row is ``running`` with a live pid *and* the client's run lock is held.
  The row alone could be stale (its pid reused after a crash); the lock alone would mean taking
  the lock for a moment on every call, which could make a run starting at that moment fail with
  "busy". Probing only when the row says running avoids that in every case but a stale row.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, TypeVar

from borgtunnel import logs
from borgtunnel.config import ClientConfig, Config
from borgtunnel.durations import format_duration
from borgtunnel.history import (
    KIND_MAINTAIN,
    KIND_PULL,
    SOURCE_FAILED,
    History,
    HistoryError,
    ProcessIdentity,
    RunRecord,
    RunResult,
)
from borgtunnel.lock import ClientBusy, acquire_client_lock
from borgtunnel.pauses import Pause, active_pauses
from borgtunnel.reporting.staleness import is_stale
from borgtunnel.scheduling.catchup import first_slot
from borgtunnel.scheduling.planning import next_client_run
from borgtunnel.text import format_size, printable

T = TypeVar("T")

EXIT_OK = 0
# `status` as a Nagios/cron check: some client is stale or its last run failed.
EXIT_ATTENTION = 1
EXIT_FAILURE = 2

# How far back to look past running rows for the last finished result.
_SCAN_ROWS = 50


@dataclass(frozen=True)
class ClientStatus:
    client: str
    last_success: datetime | None
    last_result: RunResult | None
    next_run: datetime | None
    running: bool
    # Maintenance (borgtunnel/maintenance/): the newest check and the newest maintain run.
    last_check: datetime | None = None
    last_check_result: RunResult | None = None
    last_maintain_result: RunResult | None = None
    # max_age is set and the last verified archive is older (or there never was one).
    stale: bool = False
    # `borgtunnel pause`: kept from being scheduled (until paused_until; None: until resumed).
    paused: bool = False
    paused_until: datetime | None = None
    # The newest finished pull's error, and the sources it failed because of.
    last_error: str | None = None
    failed_sources: tuple[str, ...] = ()

    @property
    def needs_attention(self) -> bool:
        return self.stale or self.last_result is RunResult.FAILED

    def age_seconds(self, now: datetime) -> int | None:
        if self.last_success is None:
            return None
        return max(int((now - self.last_success).total_seconds()), 0)


def client_status(
    config: Config,
    history: History,
    client: ClientConfig,
    now: datetime,
    pause: Pause | None = None,
) -> ClientStatus:
    zone = config.daemon.zone()
    if pause is None:
        next_run = next_client_run(client, zone, now, jitter=False)
    elif pause.until is None:
        next_run = None
    else:
        next_run = next_client_run(client, zone, max(now, pause.until), jitter=False)
    success = history.last_success(client.name)
    pulls = history.last_runs(client.name, _SCAN_ROWS, kind=KIND_PULL)
    last_result, _ = _last_result(pulls)
    last_pull = _newest_finished(pulls)
    failed_sources: tuple[str, ...] = ()
    if last_pull is not None:
        recorded = history.run_sources(last_pull.id)
        failed_sources = tuple(name for name, said in recorded.items() if said == SOURCE_FAILED)
    _, running_row = _last_result(history.last_runs(client.name, 1))
    check = history.last_operation(client.name, "check")
    maintained = history.last_runs(client.name, _SCAN_ROWS, kind=KIND_MAINTAIN)
    return ClientStatus(
        client=client.name,
        last_success=success.started.astimezone(zone) if success else None,
        last_result=last_result,
        next_run=next_run,
        running=running_row and _lock_held(config, client),
        last_check=check.started.astimezone(zone) if check else None,
        last_check_result=check.result if check else None,
        last_maintain_result=_last_result(maintained)[0],
        stale=is_stale(
            success.started if success else None,
            config.max_age_for(client),
            now,
            first_slot=first_slot(client, zone, history.first_seen(client.name)),
        ),
        paused=pause is not None,
        paused_until=pause.until.astimezone(zone) if pause and pause.until else None,
        last_error=last_pull.error if last_pull is not None else None,
        failed_sources=failed_sources,
    )


def _newest_finished(runs: Sequence[RunRecord]) -> RunRecord | None:
    """The row ``_last_result`` read its result from; None when that result is a dead running
    row's ``interrupted`` (no error recorded yet) or there is none."""
    for run in runs:
        if run.result is not RunResult.RUNNING:
            return run
        if not ProcessIdentity(run.pid, None, None).is_alive():
            return None
    return None


def _last_result(runs: Sequence[RunRecord]) -> tuple[RunResult | None, bool]:
    """(newest finished result, whether the newest row is a live running one)."""
    running = False
    for index, run in enumerate(runs):
        if run.result is not RunResult.RUNNING:
            return run.result, running
        if not ProcessIdentity(run.pid, None, None).is_alive():
            return RunResult.INTERRUPTED, running
        running = running or index == 0
    return None, running


def _lock_held(config: Config, client: ClientConfig) -> bool:
    try:
        acquire_client_lock(config.server.state_dir, client.name, wait=False).release()
    except ClientBusy:
        return True
    return False


def status_json(rows: Sequence[ClientStatus], now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "client": row.client,
            "last_success": _iso(row.last_success),
            "last_result": str(row.last_result) if row.last_result else None,
            "next_run": _iso(row.next_run),
            "running": row.running,
            "last_success_age_seconds": row.age_seconds(now),
            "last_check": _iso(row.last_check),
            "last_check_result": str(row.last_check_result) if row.last_check_result else None,
            "last_maintain_result": (
                str(row.last_maintain_result) if row.last_maintain_result else None
            ),
            "stale": row.stale,
            "paused": row.paused,
            "paused_until": _iso(row.paused_until),
            "last_error": row.last_error,
            "failed_sources": list(row.failed_sources),
        }
        for row in rows
    ]


def status_table(rows: Sequence[ClientStatus], now: datetime) -> str:
    header = (
        "CLIENT",
        "LAST SUCCESS",
        "AGE",
        "LAST RESULT",
        "NEXT RUN",
        "RUNNING",
        "LAST CHECK",
        "MAINTENANCE",
        "STALE",
        "PAUSED",
    )
    lines = [
        (
            row.client,
            _when(row.last_success) if row.last_success else "never",
            _age(row.age_seconds(now)),
            _result(row),
            _when(row.next_run) if row.next_run else ("paused" if row.paused else "not scheduled"),
            "yes" if row.running else "no",
            f"{_when(row.last_check)} {row.last_check_result}" if row.last_check else "never",
            str(row.last_maintain_result) if row.last_maintain_result else "-",
            "STALE" if row.stale else "no",
            _paused(row),
        )
        for row in rows
    ]
    return _table(header, lines)


def _read(config: Config, query: Callable[[History], T]) -> T | None:
    """Run one query on the history; None (after saying why on stderr) when it cannot be read."""
    try:
        with History.open(config.server.state_dir) as history:
            return query(history)
    except (OSError, sqlite3.Error, HistoryError) as exc:
        logs.print_error(f"borgtunnel: cannot read the history in {config.server.state_dir}: {exc}")
        return None


def show_status(config: Config, *, as_json: bool) -> int:
    now = datetime.now(UTC)
    pauses = active_pauses(config.server.state_dir, now)
    rows = _read(
        config,
        lambda history: [
            client_status(config, history, c, now, pauses.get(c.name))
            for c in config.clients.values()
        ],
    )
    if rows is None:
        return EXIT_FAILURE
    if as_json or not sys.stdout.isatty():
        print(json.dumps(status_json(rows, now), indent=2))
    else:
        print(status_table(rows, now))
    return EXIT_ATTENTION if any(row.needs_attention for row in rows) else EXIT_OK


# --- history ----------------------------------------------------------------------------


def history_json(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    return [
        {
            "id": run.id,
            "client": run.client,
            "trigger": run.trigger,
            "kind": run.kind,
            "started": _iso(run.started),
            "finished": _iso(run.finished),
            "result": str(run.result),
            "exit_code": run.exit_code,
            "archive": run.archive,
            "original_size": run.stats.original_size,
            "compressed_size": run.stats.compressed_size,
            "deduplicated_size": run.stats.deduplicated_size,
            "nfiles": run.stats.nfiles,
            "duration": run.stats.duration,
            "error": run.error,
        }
        for run in runs
    ]


def history_table(runs: Sequence[RunRecord], zone: tzinfo) -> str:
    header = ("STARTED", "TOOK", "RESULT", "KIND", "TRIGGER", "ARCHIVE", "FILES", "ADDED", "ERROR")
    lines = [
        (
            _when(run.started.astimezone(zone), seconds=True),
            _took(run),
            str(run.result),
            run.kind,
            run.trigger,
            # Archive names and errors carry the client's text.
            printable(run.archive or "-"),
            "-" if run.stats.nfiles is None else str(run.stats.nfiles),
            format_size(run.stats.deduplicated_size),
            printable(run.error or ""),
        )
        for run in runs
    ]
    return _table(header, lines)


def show_history(config: Config, client: ClientConfig, *, limit: int, as_json: bool) -> int:
    if limit < 1:
        logs.print_error(f"borgtunnel: --limit must be at least 1, got {limit}")
        return EXIT_FAILURE
    runs = _read(config, lambda history: history.last_runs(client.name, limit))
    if runs is None:
        return EXIT_FAILURE
    if as_json or not sys.stdout.isatty():
        print(json.dumps(history_json(runs), indent=2))
    elif runs:
        print(history_table(runs, config.daemon.zone()))
    else:
        print(f"{client.name}: no runs recorded")
    return EXIT_OK


# --- formatting -------------------------------------------------------------------------


def _iso(when: datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when is not None else None


def _when(when: datetime, *, seconds: bool = False) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")


def _result(row: ClientStatus) -> str:
    if row.last_result is None:
        return "-"
    if row.failed_sources:
        return f"{row.last_result} (sources: {', '.join(row.failed_sources)})"
    return str(row.last_result)


def _paused(row: ClientStatus) -> str:
    if not row.paused:
        return "no"
    return f"until {_when(row.paused_until)}" if row.paused_until else "yes"


def _age(seconds: int | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _took(run: RunRecord) -> str:
    if run.finished is None:
        return "-"
    seconds = (run.finished - run.started).total_seconds()
    return f"{seconds:.1f}s" if seconds < 600 else _age(int(seconds))


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in (header, *lines)) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *lines)
    )
