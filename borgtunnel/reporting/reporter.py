"""The one object the daemon and ``borgtunnel pull`` tell about runs: ``Reporter``.

Call sequence (daemon and one-shot alike)::

    reporter = Reporter(config, history, in_daemon=...)
    reporter.start()                       # metrics server, resend pending messages, stale check
    reporter.run_started(client)           # healthchecks /start, borgtunnel_running 1
    outcome = await jobs.run_recorded(...)
    reporter.after_run(client, outcome, final=...)   # metrics, textfile, notifications, pings
    ...
    await reporter.aclose(grace)           # let background sends finish (bounded), stop server

A tampering event comes from ``outcome.tampering`` (the key guard's finding) by default;
``after_run(..., tampering="...")`` or ``report_tampering(client, detail)`` feed one from any
other check (archives vanished). ``final=False`` says the
daemon will retry this failure, so no failure message or /fail ping yet.

Every public method logs and swallows its own errors: a notifier, a ping or a metrics file that
fails never fails, delays or changes a backup. Sends and pings run as background tasks.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from typing import Any, ParamSpec, TypeVar

import structlog

from borgtunnel.config import ClientConfig, Config
from borgtunnel.config.reporting import parse_listen
from borgtunnel.history import History, RunResult
from borgtunnel.reporting import healthchecks, metrics
from borgtunnel.reporting.notify import Dispatcher, Sender, apprise_send, compose
from borgtunnel.reporting.staleness import is_stale
from borgtunnel.runs.pull import PullOutcome
from borgtunnel.scheduling.catchup import first_slot

log = structlog.get_logger("borgtunnel.reporting")

P = ParamSpec("P")
R = TypeVar("R")

Pinger = Callable[[str, healthchecks.Ping, str, float], Any]

# The daemon's loop may call check_staleness() often; once per this many seconds is plenty.
STALE_CHECK_INTERVAL = 30.0


def _never_raises(method: Callable[P, R]) -> Callable[P, R | None]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        try:
            return method(*args, **kwargs)
        except Exception:  # reporting must never break a backup; the traceback is for a bug report
            log.exception("reporting_failed", step=method.__name__)
            return None

    return wrapper


def _now() -> datetime:
    return datetime.now(UTC)


class Reporter:
    def __init__(
        self,
        config: Config,
        history: History,
        *,
        in_daemon: bool,
        sender: Sender = apprise_send,
        pinger: Pinger = healthchecks.send_ping,
        now: Callable[[], datetime] = _now,
    ) -> None:
        self.config = config
        self._history = history
        self._in_daemon = in_daemon
        self._pinger = pinger
        self._now = now
        self._running: set[str] = set()
        self._queue_length = 0
        self._running_pulls = 0
        self._collector = metrics.SnapshotCollector()
        self.registry = metrics.new_registry(self._collector)
        self._dispatcher = Dispatcher(
            config.notify, history, urls_for=self._urls_for, sender=sender
        )
        self._background: set[asyncio.Task[Any]] = set()
        self._server: metrics.MetricsServer | None = None
        self._last_stale_check = float("-inf")

    # --- lifecycle ----------------------------------------------------------------------

    @_never_raises
    def start(self) -> None:
        """Daemon: serve metrics, resend pending messages, check every client's staleness."""
        if self._in_daemon:
            listen = self.config.metrics.listen
            if listen is not None:
                host, port = parse_listen(listen)
                try:
                    self._server = metrics.MetricsServer(self.registry, host, port)
                except OSError as exc:
                    log.error("metrics_listen_failed", listen=listen, error=str(exc))
                else:
                    log.info("metrics_listening", host=host, port=self._server.port)
            resumed = self._dispatcher.resume_pending()
            if resumed:
                log.info("notifications_resumed", count=resumed)
            self.check_staleness(force=True)
        self._refresh()

    @property
    def metrics_port(self) -> int | None:
        return self._server.port if self._server is not None else None

    @_never_raises
    def reconfigure(self, config: Config) -> None:
        """A reloaded config: new URLs, max_age, clients. The metrics server stays as it is."""
        self.config = config
        self._dispatcher.settings = config.notify
        self.check_staleness(force=True)

    async def aclose(self, grace: float | None = None) -> None:
        """Wait up to ``grace`` seconds (default ``[notify] timeout``) for sends, then stop."""
        try:
            limit = self.config.notify.timeout if grace is None else grace
            started = time.monotonic()
            await self._dispatcher.aclose(limit)
            pings = list(self._background)
            if pings:
                _, left = await asyncio.wait(
                    pings, timeout=max(limit - (time.monotonic() - started), 0.1)
                )
                for task in left:
                    task.cancel()
                if left:
                    await asyncio.wait(left)
        except Exception:  # shutting down: log and go on
            log.exception("reporting_failed", step="aclose")
        finally:
            if self._server is not None:
                self._server.close()
                self._server = None

    # --- events -------------------------------------------------------------------------

    @_never_raises
    def run_started(self, client: ClientConfig) -> None:
        self._running.add(client.name)
        self._ping(client, "start", "")
        self._refresh(write=False)

    @_never_raises
    def after_run(
        self,
        client: ClientConfig,
        outcome: PullOutcome,
        *,
        final: bool = True,
        tampering: str | None = None,
    ) -> None:
        """After every recorded run: metrics and textfile, pings, notifications.

        ``tampering`` defaults to the outcome's own (the key guard's ``tampering:`` finding); a
        tampering run is notified as tampering, not also as a failure.
        """
        self._running.discard(client.name)
        if tampering is None:
            tampering = outcome.tampering
        if outcome.busy:  # nothing ran and nothing was recorded
            self._refresh(write=False)
            return
        succeeded = outcome.result in (RunResult.OK, RunResult.WARNING)
        if succeeded:
            self._ping(client, "success", outcome.summary())
        elif outcome.result is RunResult.FAILED and final:
            self._ping(client, "fail", outcome.error or outcome.summary())
        if tampering is not None:
            self.report_tampering(client, tampering, run_id=outcome.run_id, outcome=outcome)
        problems = self._dispatcher.open_problems(client.name)
        if tampering is not None:
            pass  # reported above
        elif succeeded and problems:
            self._notify(client, "recovery", outcome)
        elif outcome.result is RunResult.FAILED and final and "failure" not in problems:
            self._notify(client, "failure", outcome)
        self._check_client(client)
        self._refresh()

    @_never_raises
    def report_tampering(
        self,
        client: ClientConfig,
        detail: str,
        *,
        run_id: int | None = None,
        outcome: PullOutcome | None = None,
    ) -> None:
        """The repository key changed or archives vanished: always notified, each time."""
        log.error("tampering_reported", client=client.name, detail=detail)
        self._notify(client, "tampering", outcome, error=detail, run_id=run_id)

    @_never_raises
    def check_staleness(self, *, force: bool = False) -> None:
        """Stale notices for clients that became stale; daemon: rewrite the textfile."""
        mono = time.monotonic()
        if not force and mono - self._last_stale_check < STALE_CHECK_INTERVAL:
            return
        self._last_stale_check = mono
        zone = self.config.daemon.zone()
        turned = sum(self._check_client(client, zone) for client in self.config.clients.values())
        if turned:
            # One line however many: each client has its own debug line (client_stale).
            log.warning("clients_turned_stale", count=turned)
        self._refresh()

    @_never_raises
    def refresh_metrics(self) -> None:
        """Something outside the history changed (a pause): export it now."""
        self._refresh()

    @_never_raises
    def daemon_state(self, *, queue_length: int, running_pulls: int) -> None:
        if (queue_length, running_pulls) != (self._queue_length, self._running_pulls):
            self._queue_length, self._running_pulls = queue_length, running_pulls
            self._refresh(write=False)

    # --- internals ----------------------------------------------------------------------

    def _urls_for(self, name: str) -> tuple[str, ...]:
        return self.config.notify_urls_for(self.config.clients.get(name))

    def _check_client(self, client: ClientConfig, zone: tzinfo | None = None) -> bool:
        """Notify ``client`` as stale if it just became so; True when it did."""
        max_age = self.config.max_age_for(client)
        if max_age is None:
            return False
        success = self._history.last_success(client.name)
        last = success.started if success else None
        now = self._now()
        first = None
        if last is None:
            zone = zone if zone is not None else self.config.daemon.zone()
            first = first_slot(client, zone, self._history.first_seen(client.name))
        if is_stale(
            last, max_age, now, first_slot=first
        ) and "stale" not in self._dispatcher.open_problems(client.name):
            message = compose(
                "stale",
                client.name,
                now=now,
                last_success=last,
                max_age=max_age,
                archive=success.archive if success else None,
            )
            log.debug("client_stale", client=client.name, max_age=max_age)
            self._dispatcher.submit(message)
            return True
        return False

    def _notify(
        self,
        client: ClientConfig,
        kind: str,
        outcome: PullOutcome | None,
        *,
        error: str | None = None,
        run_id: int | None = None,
    ) -> None:
        success = self._history.last_success(client.name)
        message = compose(
            kind,
            client.name,
            now=self._now(),
            result=str(outcome.result) if outcome else None,
            error=error if error is not None else (outcome.error if outcome else None),
            archive=outcome.stats.archive if outcome and outcome.stats else None,
            last_success=success.started if success else None,
            failed_sources=outcome.failed_sources if outcome else (),
        )
        self._dispatcher.submit(message, run_id=run_id or (outcome.run_id if outcome else None))

    def _ping(self, client: ClientConfig, kind: healthchecks.Ping, body: str) -> None:
        if client.healthchecks is None:
            return
        url, limit = client.healthchecks, self.config.notify.timeout
        retries, wait = self.config.notify.retries, self.config.notify.retry_wait

        async def ping() -> None:
            for attempt in range(retries + 1):
                if attempt:
                    await asyncio.sleep(wait)
                error = await self._pinger(url, kind, body, limit)
                if error is None:
                    return
                log.warning(
                    "healthchecks_ping_failed",
                    client=client.name,
                    ping=kind,
                    attempt=attempt + 1,
                    error=error,
                )

        task = asyncio.get_running_loop().create_task(ping(), name=f"ping {client.name} {kind}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _refresh(self, *, write: bool = True) -> None:
        snapshot = metrics.build_snapshot(
            self.config,
            self._history,
            running=frozenset(self._running),
            queue_length=self._queue_length if self._in_daemon else None,
            running_pulls=self._running_pulls if self._in_daemon else None,
        )
        self._collector.update(snapshot)
        path = self.config.metrics.textfile
        if write and path is not None:
            try:
                metrics.write_textfile(path, self.registry)
            except OSError as exc:
                log.warning("metrics_textfile_failed", path=path, error=str(exc))
