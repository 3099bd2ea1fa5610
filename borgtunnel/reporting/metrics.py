"""Prometheus metrics (prometheus-client): served by the daemon and/or written to a textfile.

The values come from the run history, not from counters kept in memory, so the daemon's endpoint
and a textfile written by a one-shot ``pull`` say the same thing and survive restarts
(``borgtunnel_runs_total`` counts the recorded runs). The event loop builds an immutable
``Snapshot`` after every run; the scrape thread of the HTTP server only reads the current one,
so it never touches SQLite (whose connections belong to one thread). Staleness is evaluated at
scrape time from the snapshot, so ``borgtunnel_stale`` flips without a run.

Timestamps are Unix seconds; ``last_success`` is the *start* of the newest verified run (when its
data is from), ``last_run`` the end of the newest finished run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from borgtunnel.config import Config
from borgtunnel.history import History, RunRecord, RunResult, SourceSummary
from borgtunnel.pauses import active_pauses
from borgtunnel.scheduling.catchup import first_slot

# Every result a finished run can have: `last_result` exports each as 0/1 so alerts can match.
RESULTS: Final = tuple(r for r in RunResult if r is not RunResult.RUNNING)
_SCAN_ROWS: Final = 50


@dataclass(frozen=True)
class SourceMetrics:
    """One configured source of a client, from the history's ``run_sources`` rows."""

    source: str
    last_success: float | None = None
    failures: int = 0
    # The newest pull that had a word on this source failed because of it.
    failing: bool = False


@dataclass(frozen=True)
class ClientMetrics:
    client: str
    last_success: float | None = None
    last_run: float | None = None
    last_duration: float | None = None
    last_result: RunResult | None = None
    original_bytes: int | None = None
    deduplicated_bytes: int | None = None
    files: int | None = None
    runs: dict[RunResult, int] = field(default_factory=dict)
    max_age: float | None = None
    running: bool = False
    # Never backed up: not stale before this (Unix seconds) plus max_age; see staleness.is_stale.
    first_slot: float | None = None
    # `borgtunnel pause`: paused at snapshot time, until this Unix time (None: until resumed).
    paused: bool = False
    paused_until: float | None = None
    # The client's configured sources (at most 32, names checked by config/sources.py).
    sources: tuple[SourceMetrics, ...] = ()

    def is_paused(self, now: float) -> bool:
        return self.paused and (self.paused_until is None or now < self.paused_until)

    def stale(self, now: float) -> bool:
        if self.max_age is None:
            return False
        if self.last_success is None:
            return self.first_slot is None or now - self.first_slot > self.max_age
        return now - self.last_success > self.max_age


@dataclass(frozen=True)
class Snapshot:
    clients: tuple[ClientMetrics, ...] = ()
    # Only the daemon has a queue; a one-shot pull leaves these out.
    queue_length: int | None = None
    running_pulls: int | None = None


def _newest_finished(runs: Iterable[RunRecord]) -> RunRecord | None:
    return next((run for run in runs if run.result is not RunResult.RUNNING), None)


def build_snapshot(
    config: Config,
    history: History,
    *,
    running: frozenset[str] = frozenset(),
    queue_length: int | None = None,
    running_pulls: int | None = None,
) -> Snapshot:
    counts = history.result_counts()
    summaries = history.source_summaries()
    pauses = active_pauses(config.server.state_dir, datetime.now(UTC))
    clients = []
    zone = config.daemon.zone()
    for name, client in config.clients.items():
        success = history.last_success(name)
        first = None if success else first_slot(client, zone, history.first_seen(name))
        last = _newest_finished(history.last_runs(name, _SCAN_ROWS))
        took = None
        if last is not None and last.finished is not None:
            took = max((last.finished - last.started).total_seconds(), 0.0)
        clients.append(
            ClientMetrics(
                client=name,
                last_success=success.started.timestamp() if success else None,
                last_run=last.finished.timestamp() if last and last.finished else None,
                last_duration=took,
                last_result=last.result if last else None,
                original_bytes=success.stats.original_size if success else None,
                deduplicated_bytes=success.stats.deduplicated_size if success else None,
                files=success.stats.nfiles if success else None,
                runs={r: n for (c, r), n in counts.items() if c == name},
                max_age=config.max_age_for(client),
                running=name in running,
                paused=name in pauses,
                paused_until=_timestamp(pauses[name].until) if name in pauses else None,
                first_slot=first.timestamp() if first else None,
                sources=tuple(
                    _source_metrics(source.name, summaries.get((name, source.name)))
                    for source in client.sources
                ),
            )
        )
    return Snapshot(tuple(clients), queue_length, running_pulls)


def _source_metrics(name: str, summary: SourceSummary | None) -> SourceMetrics:
    if summary is None:
        return SourceMetrics(name)
    success, failure = summary.last_success, summary.last_failure
    return SourceMetrics(
        source=name,
        last_success=_timestamp(success),
        failures=summary.failures,
        failing=failure is not None and (success is None or failure > success),
    )


def _timestamp(when: datetime | None) -> float | None:
    return when.timestamp() if when is not None else None


def families(snapshot: Snapshot, now: float) -> list[Metric]:
    """The metric families of ``snapshot`` at time ``now`` (Unix seconds)."""

    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"borgtunnel_{name}", doc, labels=["client"])

    success = gauge("last_success_timestamp_seconds", "Start of the newest verified run.")
    last_run = gauge("last_run_timestamp_seconds", "End of the newest finished run.")
    duration = gauge("last_run_duration_seconds", "Wall-clock duration of the newest run.")
    result = GaugeMetricFamily(
        "borgtunnel_last_result",
        "1 for the result of the newest finished run, 0 for the others.",
        labels=["client", "result"],
    )
    original = gauge("last_original_bytes", "Original size of the newest verified archive.")
    dedup = gauge("last_deduplicated_bytes", "Deduplicated size added by the newest archive.")
    files = gauge("last_files", "Files in the newest verified archive.")
    runs = CounterMetricFamily(
        "borgtunnel_runs", "Recorded runs by result.", labels=["client", "result"]
    )
    stale = gauge("stale", "1 when the newest verified archive is older than max_age.")
    running = gauge("running", "1 while a pull of the client runs in this process.")
    paused = gauge("client_paused", "1 while `borgtunnel pause` keeps the client unscheduled.")
    source_labels = ["client", "source"]
    source_success = GaugeMetricFamily(
        "borgtunnel_source_last_success_timestamp_seconds",
        "Start of the newest verified run whose archive holds the source's dump.",
        labels=source_labels,
    )
    source_failures = CounterMetricFamily(
        "borgtunnel_source_failures",
        "Runs that failed because of the source (its dump failed or is not in the archive).",
        labels=source_labels,
    )
    source_failing = GaugeMetricFamily(
        "borgtunnel_source_failing",
        "1 when the newest run with a word on the source failed because of it.",
        labels=source_labels,
    )
    for c in snapshot.clients:
        labels = [c.client]
        for fam, value in (
            (success, c.last_success),
            (last_run, c.last_run),
            (duration, c.last_duration),
            (original, c.original_bytes),
            (dedup, c.deduplicated_bytes),
            (files, c.files),
        ):
            if value is not None:
                fam.add_metric(labels, float(value))
        if c.last_result is not None:
            for r in RESULTS:
                result.add_metric([c.client, str(r)], 1.0 if r is c.last_result else 0.0)
        for r in RESULTS:
            runs.add_metric([c.client, str(r)], float(c.runs.get(r, 0)))
        stale.add_metric(labels, 1.0 if c.stale(now) else 0.0)
        running.add_metric(labels, 1.0 if c.running else 0.0)
        paused.add_metric(labels, 1.0 if c.is_paused(now) else 0.0)
        for source in c.sources:
            pair = [c.client, source.source]
            if source.last_success is not None:
                source_success.add_metric(pair, source.last_success)
            source_failures.add_metric(pair, float(source.failures))
            source_failing.add_metric(pair, 1.0 if source.failing else 0.0)
    found: list[Metric] = [
        success,
        last_run,
        duration,
        result,
        original,
        dedup,
        files,
        runs,
        stale,
        running,
        paused,
        source_success,
        source_failures,
        source_failing,
    ]
    if snapshot.queue_length is not None:
        found.append(
            GaugeMetricFamily(
                "borgtunnel_queue_length",
                "Clients due and waiting for a slot.",
                value=snapshot.queue_length,
            )
        )
    if snapshot.running_pulls is not None:
        found.append(
            GaugeMetricFamily(
                "borgtunnel_running_pulls",
                "Pulls running in the daemon.",
                value=snapshot.running_pulls,
            )
        )
    return found


class SnapshotCollector(Collector):
    """Hands the current snapshot's families to prometheus-client (from any thread)."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self._snapshot = snapshot or Snapshot()
        self._lock = threading.Lock()

    def update(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    @property
    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot, time.time())


def new_registry(collector: SnapshotCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def write_textfile(path: str, registry: CollectorRegistry) -> None:
    """Write + rename in the target directory: node-exporter never reads half a file."""
    write_to_textfile(path, registry)


class MetricsServer:
    """prometheus-client's HTTP server (a thread) on ``host:port``; ``port`` 0 picks a free one."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port: int = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
