"""A pull as the server runs it: under the client's lock, recorded in the history.

Both the one-shot ``borgtunnel pull`` and the daemon go through ``run_recorded``, so the lock
(one run per client across processes) and the history (every run, interrupted ones included)
cannot be bypassed by either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from borgtunnel.config import ClientConfig, Config
from borgtunnel.history import History, RunResult, RunStats
from borgtunnel.lock import ClientBusy, client_lock
from borgtunnel.runs import hooks
from borgtunnel.runs.pull import ProgressCallback, PullOutcome, State, pull
from borgtunnel.runs.sanity import sanity_warning

log = structlog.get_logger("borgtunnel.runs.jobs")


def busy_outcome(client: ClientConfig, exc: ClientBusy) -> PullOutcome:
    holder = f" by pid {exc.pid}" if exc.pid else ""
    return PullOutcome(
        client=client.name,
        result=RunResult.FAILED,
        error=f"busy: another borgtunnel process is pulling this client{holder}",
        busy=True,
    )


async def run_recorded(
    config: Config,
    client: ClientConfig,
    *,
    trigger: str,
    wait: bool = False,
    history: History | None = None,
    time_limit: float | None = None,
    after: Callable[[PullOutcome, History], Awaitable[None]] | None = None,
    progress: ProgressCallback | None = None,
) -> PullOutcome:
    """Lock, record start, pull, record the end (``interrupted`` when cancelled).

    ``history`` may be shared by a long-running caller; otherwise one is opened for this run.
    ``time_limit`` (default: the client's ``timeout``, seconds) limits the pull itself, not the
    wait for the lock; a run over it is cancelled, cleaned up like any cancellation, and recorded
    ``failed``. ``interrupted`` is kept for runs that a stop or a crash cut short.
    ``after`` runs once the pull is recorded ok or warning, still under the lock (the daemon's
    maintenance: never a pull and a prune of one repository at once).
    """
    if time_limit is None:
        time_limit = client.timeout
    state_dir = config.server.state_dir
    own_history = history is None
    db = history if history is not None else History.open(state_dir)
    try:
        try:
            async with client_lock(state_dir, client.name, wait=wait):
                outcome = await _pull_recorded(
                    config, client, trigger, db, time_limit, progress=progress
                )
                if after is not None and outcome.result in (RunResult.OK, RunResult.WARNING):
                    await after(outcome, db)
                return outcome
        except ClientBusy as exc:
            outcome = busy_outcome(client, exc)
            log.warning("client_busy", client=client.name, holder_pid=exc.pid)
            return outcome
    finally:
        if own_history:
            db.close()


async def _pull_recorded(
    config: Config,
    client: ClientConfig,
    trigger: str,
    db: History,
    time_limit: float | None,
    *,
    progress: ProgressCallback | None = None,
) -> PullOutcome:
    run_id = db.start_run(client.name, trigger)
    started = time.monotonic()
    limit = asyncio.timeout(time_limit)
    try:
        async with limit:
            # before hooks run inside the time limit: a hung hook is a hung run.
            outcome = await hooks.run_before(config, client) or await pull(
                config, client, known_ids=db.recorded_archive_ids(client.name), progress=progress
            )
    except TimeoutError:
        if not limit.expired():
            raise
        outcome = PullOutcome(
            client=client.name,
            result=RunResult.FAILED,
            error=f"timeout: the run took longer than timeout = {time_limit:g} s and was cancelled",
            duration=time.monotonic() - started,
        )
        log.error("run_timed_out", client=client.name, timeout=time_limit)
    except asyncio.CancelledError:
        db.finish_run(
            run_id,
            RunResult.INTERRUPTED,
            error="interrupted: the pull was cancelled (shutdown, `borgtunnel cancel` or Ctrl-C)",
            stats=RunStats(duration=time.monotonic() - started),
        )
        raise
    except Exception as exc:
        # A bug, not an operational failure: the row must not stay "running", the caller must
        # not read it as a warning, and the other clients of the same command still run.
        log.exception("internal_error", client=client.name)
        outcome = PullOutcome(
            client=client.name,
            result=RunResult.FAILED,
            error=f"internal error: {exc!r} (a bug in borgtunnel: please report it)",
            duration=time.monotonic() - started,
            internal_error=True,
        )
    _check_sanity(client, db, outcome)
    stats = outcome.stats
    db.finish_run(
        run_id,
        outcome.result,
        exit_code=outcome.borg_status,
        archive=stats.archive if stats else None,
        archive_id=stats.archive_id if stats else None,
        stats=RunStats(
            original_size=stats.original_size if stats else None,
            compressed_size=stats.compressed_size if stats else None,
            deduplicated_size=stats.deduplicated_size if stats else None,
            nfiles=stats.nfiles if stats else None,
            duration=outcome.duration,
        ),
        error=outcome.error,
        sources=outcome.source_results(),
    )
    outcome.run_id = run_id
    await hooks.run_after(config, client, outcome)
    return outcome


def _check_sanity(client: ClientConfig, db: History, outcome: PullOutcome) -> None:
    """A verified archive with 0 files, or much smaller than the previous one, is a warning."""
    stats = outcome.stats
    if stats is None or outcome.result not in (RunResult.OK, RunResult.WARNING):
        return
    previous = db.last_success(client.name)
    reason = sanity_warning(
        stats.nfiles,
        stats.original_size,
        previous.stats.nfiles if previous else None,
        previous.stats.original_size if previous else None,
        client.max_shrink,
    )
    if reason is None:
        return
    log.warning("archive_suspicious", client=client.name, archive=stats.archive, reason=reason)
    outcome.result = RunResult.WARNING
    outcome.suspicious = reason
    outcome.warnings.append(reason)
    outcome.warning_count += 1
    if outcome.error is None:
        outcome.error = reason


__all__ = ["PullOutcome", "State", "busy_outcome", "run_recorded"]
