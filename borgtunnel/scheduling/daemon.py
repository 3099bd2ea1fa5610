"""``borgtunnel daemon``: pull every scheduled client on time, a few at a time, until stopped.

Shape (hypercorn's ``serve(..., shutdown_trigger=)`` with one TaskGroup, uvicorn's two-phase stop):

* ``Daemon.serve`` opens the history, marks runs of dead processes ``interrupted``, computes each
  scheduled client's next run, sends ``READY=1`` and loops: queue the clients that are due, start
  as many as ``[daemon] max_parallel`` allows (first come, first served; see Order below), sleep
  until the next due time or until something happens (a run ended, a reload, a stop).
* A client runs through ``jobs.run_recorded``: its cross-process lock means a one-shot
  ``borgtunnel pull`` and the daemon never run it at the same time. A slot that finds the client
  busy, or still running from its previous slot, is skipped with a warning; the client keeps its
  schedule. Connection failures are retried ``retries`` times after ``retry_wait * 2**attempt``
  seconds; other failures wait for the next scheduled run.
* After a verified pull (ok or warning) of a client with ``retention`` the daemon prunes (and
  compacts), and checks when ``check.every`` has passed, still under the client's lock
  (borgtunnel/maintenance/run.py ``after_pull``); it is recorded as its own ``maintain`` run.
* ``timeout`` cancels a run that takes longer (its cleanup then still runs, so the run ends up
  to ``serve_stop_timeout`` later); the run is recorded ``failed`` with a "timeout" error, not
  ``interrupted``, which is kept for runs that a stop or a crash cut short: a timeout says
  something about the client, a shutdown does not.
* Catch-up (borgtunnel/scheduling/catchup.py): at start, a client whose slot passed since its
  newest verified pull (or since it was first seen, if it never had one) is queued once, at once
  (or at the end of a blackout window), not once per missed slot. A client still unreachable
  after its retries is tried again every ``retry_wait * 2**n`` seconds (capped at an hour) until
  it answers or its next slot comes. ``catch_up = false`` skips both: the client waits for its
  next slot. A slot that finds the client busy is still skipped.
* Order: clients that become due together are queued most overdue first (never backed up, then
  the oldest verified archive), so with more due than ``max_parallel`` those go first.
* Stop (SIGTERM/SIGINT, or ``shutdown_trigger`` completing): nothing new starts, running pulls
  get ``[daemon] stop_timeout`` seconds to finish, then each is cancelled once; cancellation runs
  the pull's own cleanup (``borg serve`` stopped, both sockets removed) and records the run
  ``interrupted``. A second stop request skips the wait. Runs are never cancelled twice: a second
  cancellation would abort that cleanup.
* Steering (borgtunnel/scheduling/control.py, docs/control.md): a control socket in
  ``socket_dir`` takes ``borgtunnel pull`` (queued like a due client, same ``max_parallel``,
  no retries, recorded with trigger ``pull``), ``cancel`` (the run task is cancelled once, so
  its own cleanup runs and the run is recorded ``interrupted``) and ``pause``/``resume``
  (``state_dir/paused.json``, borgtunnel/pauses.py, re-read when it changes: a paused client's
  slots and retries are skipped).
* SIGHUP re-reads the config file between two loop iterations. An invalid file is logged with its
  problems and the old config stays; a valid one replaces it for runs that start afterwards, and
  the next run of each client whose schedule, jitter or blackout (or the zone) changed is
  recomputed. Running pulls are not touched.

The clock is injectable (``now=``), for tests that put the daemon a second before a cron time and
then let real time run; sleeping is asyncio's. Wall-clock jumps (NTP, suspend) are handled by
never sleeping longer than ``MAX_SLEEP`` before looking at the clock again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from borgtunnel import systemd
from borgtunnel.config import ClientConfig, Config, ConfigError, load_config
from borgtunnel.history import History, HistoryError, RunResult
from borgtunnel.lock import ClientBusy, acquire_client_lock
from borgtunnel.maintenance.run import after_pull
from borgtunnel.pauses import Pause, PauseWatch, clear_pause, set_pause
from borgtunnel.reporting.notify import Sender, apprise_send
from borgtunnel.reporting.reporter import Reporter
from borgtunnel.runs.jobs import run_recorded
from borgtunnel.runs.pull import ProgressCallback, PullOutcome
from borgtunnel.scheduling.catchup import catch_up_start, missed_slot, most_overdue_first
from borgtunnel.scheduling.control import ControlServer, PullTicket, Refused
from borgtunnel.scheduling.control_protocol import control_socket_path
from borgtunnel.scheduling.planning import (
    RunQueue,
    is_busy,
    is_retryable,
    next_client_run,
    retry_delay,
    status_line,
)
from borgtunnel.server.serve import SocketInUseError, sweep_stale_sockets

log = structlog.get_logger("borgtunnel.scheduling.daemon")

EXIT_OK = 0
EXIT_FAILURE = 2

# Longest sleep between two looks at the clock: bounds how late a run starts after the wall
# clock jumps forward (suspend, NTP step), since asyncio sleeps on the monotonic clock.
MAX_SLEEP = 60.0

Now = Callable[[], datetime]
Runner = Callable[[Config, ClientConfig, History], Awaitable[PullOutcome]]
RequestedRunner = Callable[
    [Config, ClientConfig, History, bool, ProgressCallback | None], Awaitable[PullOutcome]
]


def system_now() -> datetime:
    return datetime.now(UTC)


async def recorded_pull(config: Config, client: ClientConfig, history: History) -> PullOutcome:
    """The real runner: one locked, recorded pull."""
    return await run_recorded(
        config,
        client,
        trigger="daemon",
        wait=False,
        history=history,
        time_limit=client.timeout,
        after=lambda outcome, db: after_pull(config, client, db, outcome),
    )


async def requested_pull(
    config: Config,
    client: ClientConfig,
    history: History,
    wait: bool,
    progress: ProgressCallback | None,
) -> PullOutcome:
    """``borgtunnel pull NAME`` run by the daemon: what the one-shot pull does, in here."""
    return await run_recorded(
        config, client, trigger="pull", wait=wait, history=history, progress=progress
    )


@dataclass
class _Slot:
    """Scheduling state of one client that has a schedule."""

    client: ClientConfig
    next_run: datetime | None
    retry_at: datetime | None = None
    attempt: int = 0  # retries used since the last scheduled start
    catch_up_at: datetime | None = None  # a missed slot, pulled once (catchup.py)

    def due(self) -> datetime | None:
        times = [t for t in (self.next_run, self.retry_at, self.catch_up_at) if t is not None]
        return min(times) if times else None


def _schedule_inputs(client: ClientConfig) -> tuple[object, ...]:
    return (client.schedule, client.jitter, client.blackout)


class Daemon:
    """The scheduler service. ``await serve()`` runs it; ``request_stop``/``request_reload``
    are safe to call from signal handlers (``loop.add_signal_handler``) and other tasks."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        now: Now = system_now,
        notifier: systemd.Notifier | None = None,
        runner: Runner = recorded_pull,
        rand: Callable[[], float] = random.random,
        max_sleep: float = MAX_SLEEP,
        notify_sender: Sender = apprise_send,
        requested_runner: RequestedRunner = requested_pull,
        control: bool = True,
    ) -> None:
        self.config = config
        self._notify_sender = notify_sender
        self.reporter: Reporter | None = None
        """Metrics, notifications, pings (borgtunnel/reporting/); set while serving."""
        self._max_sleep = max_sleep
        self._config_path = config_path
        self._now = now
        self._notifier = notifier if notifier is not None else systemd.Notifier()
        self._runner = runner
        self._rand = rand
        self._zone = config.daemon.zone()
        self._slots: dict[str, _Slot] = {}
        self._queue = RunQueue()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._history: History | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._wake = asyncio.Event()
        self._forced = asyncio.Event()
        self._stopping = False
        self._reload_pending = False
        self._last_status = ""
        self.ready = asyncio.Event()
        """Set once the daemon serves (after READY=1)."""
        # Steering (control socket): requested pulls, runs being cancelled, pauses.
        self._control = control
        self._requested_runner = requested_runner
        self._requests: dict[str, PullTicket] = {}
        self._cancelled: set[str] = set()  # run tasks cancelled once (by stop or by `cancel`)
        self._steered: set[str] = set()  # of those, the ones `cancel` asked for
        self._pauses = PauseWatch(config.server.state_dir)

    # --- control ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: stop gracefully. Second call: cancel running pulls without waiting."""
        if not self._stopping:
            self._stopping = True
            running = sorted(self._running)
            log.info("daemon_stopping", running=running)
            self._notifier.stopping(f"stopping, {len(running)} running")
            self._wake.set()
        elif not self._forced.is_set():
            log.warning("daemon_stop_forced", running=sorted(self._running))
            self._forced.set()

    def request_reload(self) -> None:
        """Re-read the config file at the next loop iteration."""
        if not self._stopping:
            self._reload_pending = True
            self._wake.set()

    def next_runs(self) -> dict[str, datetime | None]:
        """Each scheduled client's next start (scheduled or retry), for status and tests."""
        return {name: slot.due() for name, slot in self._slots.items()}

    # --- main loop ----------------------------------------------------------------------

    async def serve(
        self, *, shutdown_trigger: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        """Run until a stop is requested or ``shutdown_trigger()`` completes, then drain."""
        history = History.open(self.config.server.state_dir)
        self._history = history
        try:
            recovered = history.recover_interrupted()
            if recovered:
                log.warning("interrupted_runs_recovered", count=recovered)
            _sweep_stale_sockets(self.config)
            history.record_first_seen(self.config.clients, self._now())
            self._plan(self.config, previous={})
            self._plan_catch_up(history)
            self.reporter = Reporter(
                self.config, history, in_daemon=True, sender=self._notify_sender
            )
            self.reporter.start()
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                helpers = self._start_helpers(tasks, shutdown_trigger)
                if not self._stopping:
                    self._notifier.ready(self._status_text(self._now()))
                self._log_ready()
                self.ready.set()
                await self._schedule_loop()
                await self._drain()
                for helper in helpers:
                    helper.cancel()
        finally:
            self._tasks = None
            if self.reporter is not None:
                await self.reporter.aclose()
                self.reporter = None
            self._history = None
            history.close()
        log.info("daemon_stopped")

    def _start_helpers(
        self,
        tasks: asyncio.TaskGroup,
        shutdown_trigger: Callable[[], Awaitable[object]] | None,
    ) -> list[asyncio.Task[Any]]:
        helpers: list[asyncio.Task[Any]] = []
        interval = _watchdog_interval()
        if interval is not None and self._notifier.enabled:
            helpers.append(tasks.create_task(systemd.watchdog_loop(self._notifier, interval)))
        if shutdown_trigger is not None:
            helpers.append(tasks.create_task(self._stop_after(shutdown_trigger)))
        if self._control and (control := self._bind_control()) is not None:
            helpers.append(tasks.create_task(control.serve()))
        return helpers

    async def _stop_after(self, trigger: Callable[[], Awaitable[object]]) -> None:
        try:
            await trigger()
        except Exception:  # a broken trigger must still stop us, not crash the daemon
            log.exception("shutdown_trigger_failed")
        self.request_stop()

    async def _schedule_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if self._reload_pending:
                self._reload()
            now = self._now()
            self._queue_due(now)
            self._queue_requests()
            self._start_allowed()
            self._publish_status(now)
            self._report_state()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._seconds_until_due(now)):
                    await self._wake.wait()

    def _seconds_until_due(self, now: datetime) -> float:
        dues = [due for slot in self._slots.values() if (due := slot.due()) is not None]
        if not dues:
            return self._max_sleep
        return min(max((min(dues) - now).total_seconds(), 0.0), self._max_sleep)

    def _queue_due(self, now: datetime) -> None:
        """Queue due clients, most overdue first, and plan each one's next run."""
        due = [(d, name) for name, s in self._slots.items() if (d := s.due()) is not None]
        paused = self._pauses.active(now)
        # Stable sorts: clients due at the same instant keep the config file's order.
        ready = []
        for _, name in sorted((item for item in due if item[0] <= now), key=lambda i: i[0]):
            if name in paused:
                self._skip_paused(self._slots[name], paused[name], now)
            elif self._take_due(name, now):
                ready.append(name)
        if len(ready) > 1:
            ready = most_overdue_first(ready, self._last_successes(ready))
        for name in ready:
            self._queue.push(name)

    def _take_due(self, name: str, now: datetime) -> bool:
        """Consume the due time of ``name``'s slot; True when the client is to be queued."""
        slot = self._slots[name]
        if slot.next_run is not None and slot.next_run <= now:
            scheduled_for = slot.next_run
            # A scheduled start supersedes a pending retry or catch-up.
            slot.retry_at, slot.attempt, slot.catch_up_at = None, 0, None
            slot.next_run = next_client_run(slot.client, self._zone, now, rand=self._rand)
            if self._queue.busy(name):
                log.warning(
                    "run_skipped_still_running",
                    client=name,
                    scheduled_for=scheduled_for.isoformat(),
                    next_run=_iso(slot.next_run),
                )
                return False
            log.info("run_due", client=name, scheduled_for=scheduled_for.isoformat())
        elif slot.catch_up_at is not None and slot.catch_up_at <= now:
            slot.catch_up_at = None
            if self._queue.busy(name):
                return False
            log.info("catch_up_due", client=name)
        else:
            slot.retry_at = None
            if self._queue.busy(name):
                return False
            log.info("retry_due", client=name, attempt=slot.attempt)
        return True

    def _last_successes(self, names: list[str]) -> dict[str, datetime | None]:
        history = self._history
        if history is None:
            return {}
        found: dict[str, datetime | None] = {}
        for name in names:
            success = history.last_success(name)
            found[name] = success.started if success else None
        return found

    def _plan_catch_up(self, history: History) -> None:
        """Queue once each client whose slot passed since its newest verified pull."""
        now = self._now()
        for name, slot in self._slots.items():
            success = history.last_success(name)
            reference = success.started if success else history.first_seen(name)
            missed = missed_slot(slot.client, self._zone, reference, now)
            if missed is not None:
                slot.catch_up_at = catch_up_start(slot.client, self._zone, now)
                log.debug("catch_up_planned", client=name, missed_slot=missed.isoformat())

    def _start_allowed(self) -> None:
        assert self._tasks is not None  # noqa: S101 - only called from inside serve()
        while (name := self._queue.start_next(self.config.daemon.max_parallel)) is not None:
            if (ticket := self._requests.get(name)) is not None:
                self._start_requested(ticket)
                continue
            slot = self._slots[name]
            self._running[name] = self._tasks.create_task(
                self._run(self.config, slot.client, slot.attempt), name=f"pull {name}"
            )

    # --- one run ------------------------------------------------------------------------

    async def _run(self, config: Config, client: ClientConfig, attempt: int) -> None:
        bound = log.bind(client=client.name)
        bound.info("run_starting", attempt=attempt + 1, attempts=client.retries + 1)
        if self.reporter is not None:
            self.reporter.run_started(client)
        try:
            try:
                outcome = await self._attempt(config, client)
            except Exception as exc:  # noqa: BLE001 - one client's bug must not stop the others
                bound.exception("run_crashed")
                outcome = PullOutcome(client=client.name, error=f"internal error: {exc!r}")
            retrying = self._after_run(client.name, outcome)
            if self.reporter is not None:
                self.reporter.after_run(client, outcome, final=not retrying)
        finally:
            self._queue.finished(client.name)
            self._running.pop(client.name, None)
            self._cancelled.discard(client.name)
            self._steered.discard(client.name)
            self._wake.set()

    async def _attempt(self, config: Config, client: ClientConfig) -> PullOutcome:
        history = self._history
        assert history is not None  # noqa: S101 - only called from inside serve()
        try:
            return await self._runner(config, client, history)
        except asyncio.CancelledError:
            if not self._take_steered_cancel(client.name):
                raise
            return _cancelled_outcome(client.name, started=True)

    def _after_run(self, name: str, outcome: PullOutcome) -> bool:
        """Decide about a retry (True: one is scheduled); the slot may be gone (a reload)."""
        slot = self._slots.get(name)
        if slot is None:
            return False
        fields = {"client": name, "next_run": _iso(slot.next_run)}
        if self._stopping:
            log.info("run_finished", result=str(outcome.result), **fields)
        elif is_busy(outcome):
            log.warning("run_skipped_busy", error=outcome.error, **fields)
            slot.attempt = 0
        elif is_retryable(outcome) and slot.attempt < slot.client.retries:
            delay = retry_delay(slot.client.retry_wait, slot.attempt)
            slot.attempt += 1
            slot.retry_at = self._now() + timedelta(seconds=delay)
            log.warning(
                "retry_scheduled",
                retry=slot.attempt,
                retries=slot.client.retries,
                in_seconds=delay,
                error=outcome.error,
                **fields,
            )
            return True
        elif is_retryable(outcome) and slot.client.catch_up:
            # Keep knocking (backoff capped at an hour) until it answers or its next slot comes.
            delay = retry_delay(slot.client.retry_wait, slot.attempt)
            slot.attempt = min(slot.attempt + 1, 32)  # 2**attempt stays a float (yearly slots)
            slot.retry_at = self._now() + timedelta(seconds=delay)
            log.warning(
                "client_unreachable",
                attempts=slot.attempt,
                error=outcome.error,
                catch_up_in_seconds=delay,
                **fields,
            )
        elif is_retryable(outcome):
            log.warning(
                "client_unreachable", attempts=slot.attempt + 1, error=outcome.error, **fields
            )
            slot.attempt = 0
        else:
            log.info("run_finished", result=str(outcome.result), **fields)
            slot.attempt = 0
        return False

    # --- stop ---------------------------------------------------------------------------

    async def _drain(self) -> None:
        dropped = self._queue.clear_waiting()
        if dropped:
            log.info("queued_runs_dropped", count=len(dropped))
            for name in dropped:
                log.debug("queued_run_dropped", client=name)
        for ticket in [t for t in self._requests.values() if not t.started.is_set()]:
            self._requests.pop(ticket.client, None)
            ticket.resolve(_stopped_outcome(ticket.client))
        running = list(self._running.values())
        if not running:
            return
        if not self._forced.is_set():
            grace = self.config.daemon.stop_timeout
            log.info("waiting_for_running_pulls", clients=sorted(self._running), timeout=grace)
            await _wait_all_or(running, self._forced, grace)
        left = [task for task in running if not task.done()]
        if left:
            log.warning("cancelling_running_pulls", clients=sorted(self._running))
            for name, task in list(self._running.items()):
                if task in left and name not in self._cancelled:  # never twice: see above
                    self._cancelled.add(name)
                    task.cancel()
            await asyncio.wait(left)

    # --- reload -------------------------------------------------------------------------

    def _reload(self) -> None:
        self._reload_pending = False
        if self._config_path is None:
            log.warning("config_reload_impossible", reason="no config file path")
            return
        self._notifier.reloading("reloading configuration")
        try:
            new = load_config(self._config_path)
            _check_reloadable(self.config, new)
        except ConfigError as exc:
            log.error(
                "config_reload_failed",
                path=str(self._config_path),
                problems=[f"{key}: {message}" if key else message for key, message in exc.problems],
                keeping="the previous configuration",
            )
        else:
            previous = self.config
            self.config = new
            if self._history is not None:
                self._history.record_first_seen(new.clients, self._now())
            self._plan(new, previous=dict(self._slots), old_config=previous)
            if self.reporter is not None:
                self.reporter.reconfigure(new)
            log.info("config_reloaded", path=str(self._config_path))
        self._last_status = ""  # READY=1 below carries the status anyway
        self._notifier.ready(self._status_text(self._now()))

    def _plan(
        self,
        config: Config,
        *,
        previous: dict[str, _Slot],
        old_config: Config | None = None,
    ) -> None:
        """Build the slots for ``config``; unchanged clients keep their pending times."""
        # The configured name, not the zone objects: the system zone read from a file is a new
        # object on every call and would count as a change.
        zone_changed = (
            old_config is not None and old_config.daemon.timezone != config.daemon.timezone
        )
        zone = self._zone = config.daemon.zone() if zone_changed else self._zone
        now = self._now()
        slots: dict[str, _Slot] = {}
        for name, client in config.clients.items():
            if client.schedule is None:
                continue
            old = previous.get(name)
            if old is None:
                slots[name] = _Slot(client, next_client_run(client, zone, now, rand=self._rand))
                continue
            keep = not zone_changed and _schedule_inputs(old.client) == _schedule_inputs(client)
            next_run = old.next_run if keep else next_client_run(client, zone, now, rand=self._rand)
            slots[name] = _Slot(client, next_run, old.retry_at, old.attempt, old.catch_up_at)
        self._queue.discard(set(previous) - set(slots))
        self._slots = slots

    # --- reporting ----------------------------------------------------------------------

    def _status_text(self, now: datetime) -> str:
        pending = [
            (due, name)
            for name, slot in self._slots.items()
            if name not in self._running and (due := slot.due()) is not None
        ]
        upcoming = None
        if pending:
            due, name = min(pending)
            upcoming = (name, due.astimezone(self._zone))
        return status_line(len(self._running), len(self._queue.waiting), upcoming, now)

    def _report_state(self) -> None:
        if self.reporter is not None:
            self.reporter.daemon_state(
                queue_length=len(self._queue.waiting), running_pulls=len(self._running)
            )
            self.reporter.check_staleness()

    def _publish_status(self, now: datetime) -> None:
        text = self._status_text(now)
        if text != self._last_status:
            self._last_status = text
            self._notifier.status(text)

    def _log_ready(self) -> None:
        """One summary line whatever the fleet's size; each client's next run at debug."""
        for name, slot in self._slots.items():
            log.debug("client_scheduled", client=name, next_run=_iso(slot.next_run))
        dues = [due for slot in self._slots.values() if (due := slot.due()) is not None]
        log.info(
            "daemon_ready",
            clients=len(self.config.clients),
            scheduled=len(self._slots),
            catching_up=sum(slot.catch_up_at is not None for slot in self._slots.values()),
            next_run=_iso(min(dues)) if dues else None,
        )

    # --- steering (the control socket's Steerable) ----------------------------------------

    def _bind_control(self) -> ControlServer | None:
        path = control_socket_path(self.config.server.socket_dir)
        try:
            return ControlServer.bind(self, path)
        except (OSError, SocketInUseError) as exc:  # unsafe socket_dir, a second daemon
            log.error("control_socket_failed", path=str(path), error=str(exc))
            return None

    def knows(self, client: str) -> bool:
        return client in self.config.clients

    def submit_pull(
        self, client: str, *, wait: bool, progress: ProgressCallback | None
    ) -> PullTicket:
        """Queue ``borgtunnel pull CLIENT``; a pull of it running now answers busy (as a
        one-shot pull would) unless ``wait``, which queues it behind."""
        if self._stopping:
            raise Refused("the daemon is stopping; try again when it runs")
        ticket = PullTicket(client, wait, progress)
        earlier = self._requests.get(client)
        if earlier is not None or (client in self._running and not wait):
            why = (
                "another `borgtunnel pull` of this client is queued or running in the daemon"
                if earlier is not None
                else "the daemon is pulling this client now (--wait queues behind it)"
            )
            ticket.resolve(
                PullOutcome(client=client, result=RunResult.FAILED, error=f"busy: {why}", busy=True)
            )
            return ticket
        self._requests[client] = ticket
        ticket.position = len(self._queue.waiting) + (0 if self._queue.busy(client) else 1)
        log.info("pull_requested", client=client, wait=wait)
        self._wake.set()
        return ticket

    async def cancel_pull(self, client: str) -> str | None:
        """Cancel the queued or running pull of ``client``; "queued"/"running", or None.
        A running one is cancelled once and waited for: its cleanup has run on return."""
        ticket = self._requests.get(client)
        if ticket is not None and not ticket.started.is_set():
            self._requests.pop(client)
            self._queue.discard([client])
            ticket.resolve(_cancelled_outcome(client, started=False))
            log.info("pull_cancelled", client=client, state="queued")
            return "queued"
        if client in self._queue.waiting:
            self._queue.discard([client])
            log.info("pull_cancelled", client=client, state="queued")
            return "queued"
        task = self._running.get(client)
        if task is None:
            return None
        if client not in self._cancelled:
            self._cancelled.add(client)
            self._steered.add(client)
            log.warning("pull_cancelling", client=client)
            task.cancel()
        await asyncio.wait({task})
        return "running"

    def pause(self, client: str, until: datetime | None) -> Pause:
        pause = set_pause(self.config.server.state_dir, client, until, self._now())
        log.info("client_paused", client=client, until=_iso(until))
        self._pauses_changed()
        return pause

    def resume(self, client: str) -> bool:
        was = clear_pause(self.config.server.state_dir, client, self._now())
        log.info("client_resumed", client=client, was_paused=was)
        self._pauses_changed()
        return was

    def _pauses_changed(self) -> None:
        if self.reporter is not None:
            self.reporter.refresh_metrics()
        self._wake.set()

    def _skip_paused(self, slot: _Slot, pause: Pause, now: datetime) -> None:
        # A paused slot, retry or catch-up is not made up after the pause (docs/control.md).
        slot.retry_at, slot.attempt, slot.catch_up_at = None, 0, None
        if slot.next_run is not None and slot.next_run <= now:
            slot.next_run = next_client_run(slot.client, self._zone, now, rand=self._rand)
        log.info(
            "run_skipped_paused",
            client=slot.client.name,
            paused_until=_iso(pause.until),
            next_run=_iso(slot.next_run),
        )

    def _queue_requests(self) -> None:
        for name, ticket in self._requests.items():
            if not ticket.started.is_set() and self._queue.push(name):
                log.info("run_requested", client=name)

    def _start_requested(self, ticket: PullTicket) -> None:
        assert self._tasks is not None  # noqa: S101 - only called from inside serve()
        ticket.started.set()
        self._running[ticket.client] = self._tasks.create_task(
            self._run_requested(self.config, ticket), name=f"pull {ticket.client}"
        )

    async def _run_requested(self, config: Config, ticket: PullTicket) -> None:
        name = ticket.client
        bound = log.bind(client=name)
        client = config.clients.get(name)
        try:
            if client is None:  # removed by a reload while queued
                ticket.resolve(PullOutcome(client=name, error="no longer in the configuration"))
                return
            bound.info("run_starting", requested=True)
            if self.reporter is not None:
                self.reporter.run_started(client)
            history = self._history
            assert history is not None  # noqa: S101 - only called from inside serve()
            try:
                outcome = await self._requested_runner(
                    config, client, history, ticket.wait, ticket.progress
                )
            except asyncio.CancelledError:
                if not self._take_steered_cancel(name):
                    ticket.resolve(_stopped_outcome(name, started=True))
                    raise
                outcome = _cancelled_outcome(name, started=True)
            except Exception as exc:  # noqa: BLE001 - one client's bug must not stop the others
                bound.exception("run_crashed")
                outcome = PullOutcome(client=name, error=f"internal error: {exc!r}")
                outcome.internal_error = True
            bound.info("run_finished", result=str(outcome.result), requested=True)
            if self.reporter is not None:
                self.reporter.after_run(client, outcome)
            ticket.resolve(outcome)
        finally:
            if self._requests.get(name) is ticket:
                del self._requests[name]
            self._queue.finished(name)
            self._running.pop(name, None)
            self._cancelled.discard(name)
            self._steered.discard(name)
            self._wake.set()

    def _take_steered_cancel(self, name: str) -> bool:
        """True (and the cancellation absorbed) if ``cancel`` asked for this one."""
        if name not in self._steered:
            return False
        self._steered.discard(name)
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def _cancelled_outcome(client: str, *, started: bool) -> PullOutcome:
    when = "its cleanup ran" if started else "before it started"
    return PullOutcome(
        client=client,
        result=RunResult.INTERRUPTED,
        error=f"cancelled by `borgtunnel cancel` or the caller's Ctrl-C ({when})",
    )


def _stopped_outcome(client: str, *, started: bool = False) -> PullOutcome:
    return PullOutcome(
        client=client,
        result=RunResult.INTERRUPTED,
        error="the daemon stopped " + ("during this pull" if started else "before it started"),
    )


def _check_reloadable(old: Config, new: Config) -> None:
    """The history and the locks live in state_dir: moving it needs a restart."""
    if new.server.state_dir != old.server.state_dir:
        raise ConfigError(
            new.source,
            [("server.state_dir", "cannot change while the daemon runs; restart it instead")],
        )


async def _wait_all_or(tasks: list[asyncio.Task[None]], event: asyncio.Event, grace: float) -> None:
    """Until every task is done, ``event`` is set, or ``grace`` seconds pass."""
    all_done = asyncio.ensure_future(asyncio.wait(tasks))
    event_set = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait(
            {all_done, event_set}, timeout=grace, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        # Cancelling asyncio.wait() does not cancel the tasks it watches.
        all_done.cancel()
        event_set.cancel()


def _watchdog_interval() -> float | None:
    try:
        return systemd.watchdog_interval()
    except ValueError as exc:
        log.warning("watchdog_ignored", error=str(exc))
        return None


def run_daemon(config_path: Path, config: Config, *, now: Now | None = None) -> int:
    """``borgtunnel daemon``: serve until SIGTERM/SIGINT (twice forces); SIGHUP reloads."""
    return asyncio.run(_main(config_path, config, now or system_now))


async def _main(config_path: Path, config: Config, now: Now) -> int:
    daemon = Daemon(config, config_path=config_path, now=now)
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in handled[:2]:
        loop.add_signal_handler(signum, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
    try:
        await daemon.serve()
    except (OSError, sqlite3.Error, HistoryError) as exc:
        log.error("daemon_failed", error=str(exc), state_dir=str(config.server.state_dir))
        return EXIT_FAILURE
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    return EXIT_OK


def _sweep_stale_sockets(config: Config) -> None:
    """Pull sockets left by killed pulls. A client whose lock is held has a live one-shot pull
    (another process): its sockets are left to it."""
    for name in config.clients:
        try:
            with acquire_client_lock(config.server.state_dir, name, wait=False):
                if swept := sweep_stale_sockets(config.server.socket_dir, [name]):
                    log.warning("stale_sockets_removed", client=name, paths=[str(p) for p in swept])
        except ClientBusy:
            continue
        except OSError as exc:  # an unsafe socket_dir: every pull will refuse it with the reason
            log.warning("stale_socket_sweep_failed", client=name, error=str(exc))
            return
