"""A maintenance run of one client: list, tamper check, prune, compact, check; server-local borg.

It runs under the same per-client lock as pulls (never a pull and maintenance of one repository
at once) and is recorded in the history as a run of kind ``maintain``, with one operation row
per step. Order and rules:

1. list the repository's archives (the server's borg, reading the manifest);
2. ``--accept-missing``: archives the history expects but the repository lacks are recorded as
   ``accepted`` removals (the administrator's acknowledgement);
3. tamper check: an expected archive that is missing means a delete we did not do (through the
   client's append-only serve). Then prune and compact are refused and the run fails with the
   names and how to roll back, on every run until it is acknowledged;
4. prune (what it removed is recorded as ``pruned``, so it is never taken for tampering);
5. compact, when asked, or configured and a prune removed something not compacted yet;
6. check, when asked or due (``every``).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from borgtunnel import borg
from borgtunnel.config import ClientConfig, Config
from borgtunnel.history import (
    KIND_MAINTAIN,
    History,
    Operation,
    RunResult,
    RunStats,
    VerifiedArchive,
)
from borgtunnel.lock import ClientBusy, client_lock
from borgtunnel.maintenance import keeprules, retention
from borgtunnel.maintenance.retention import Archive, Plan
from borgtunnel.maintenance.tamper import tamper_report, unverified_message
from borgtunnel.passphrase import PassphraseError, read_passphrase
from borgtunnel.runs.pull import PullOutcome
from borgtunnel.server.localborg import LocalResult, run_local_borg

log = structlog.get_logger("borgtunnel.maintenance")

PRUNED = "pruned"
UNVERIFIED = "unverified"
ACCEPTED = "accepted"

_RANK = {
    RunResult.OK: 0,
    RunResult.WARNING: 1,
    RunResult.FAILED: 2,
    RunResult.INTERRUPTED: 3,
}


@dataclass
class Step:
    """One step's result, as reported and recorded."""

    operation: str
    result: RunResult
    detail: str
    exit_code: int | None = None
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class MaintainOutcome:
    """Everything known about one maintenance run."""

    client: str
    dry_run: bool = False
    steps: list[Step] = field(default_factory=list)
    error: str | None = None
    busy: bool = False
    duration: float = 0.0
    missing: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()
    # Ids of archives in the repository that no verified pull made.
    unverified: tuple[str, ...] = ()

    @property
    def result(self) -> RunResult:
        if self.busy or self.error is not None:
            return RunResult.FAILED
        worst = RunResult.OK
        for step in self.steps:
            if _RANK[step.result] > _RANK[worst]:
                worst = step.result
        return worst

    @property
    def exit_code(self) -> int:
        """As for pull: 0 ok, 1 only warnings, 2 failed or interrupted."""
        return {RunResult.OK: 0, RunResult.WARNING: 1}.get(self.result, 2)

    def summary(self) -> str:
        parts = [f"{step.operation} {step.result}: {step.detail}" for step in self.steps]
        if self.error is not None:
            parts.append(self.error)
        mode = " (dry run)" if self.dry_run else ""
        text = "; ".join(parts) or "nothing due"
        return f"{self.client}: {self.result}{mode} in {self.duration:.1f}s: {text}"


def busy_outcome(client: ClientConfig, exc: ClientBusy) -> MaintainOutcome:
    holder = f" by pid {exc.pid}" if exc.pid else ""
    return MaintainOutcome(
        client=client.name,
        error=f"busy: another borgtunnel process is working on this client{holder}",
        busy=True,
    )


async def maintain(
    config: Config,
    client: ClientConfig,
    history: History,
    *,
    plan: Plan | None = None,
    dry_run: bool = False,
    accept_missing: bool = False,
    trigger: str = "maintain",
    wait: bool = False,
) -> MaintainOutcome:
    """``borgtunnel maintain``: take the client lock, then :func:`maintain_locked`."""
    try:
        async with client_lock(config.server.state_dir, client.name, wait=wait):
            return await maintain_locked(
                config,
                client,
                history,
                plan=plan,
                dry_run=dry_run,
                accept_missing=accept_missing,
                trigger=trigger,
            )
    except ClientBusy as exc:
        log.warning("client_busy", client=client.name, holder_pid=exc.pid)
        return busy_outcome(client, exc)


async def maintain_locked(
    config: Config,
    client: ClientConfig,
    history: History,
    *,
    plan: Plan | None = None,
    dry_run: bool = False,
    accept_missing: bool = False,
    trigger: str = "maintain",
) -> MaintainOutcome:
    """One recorded maintenance run; the caller holds the client lock.

    ``plan`` None: what the configuration says is due. A dry run is not recorded.
    """
    started = time.monotonic()
    run = _Maintenance(config, client, history, dry_run=dry_run)
    if not dry_run:
        run.run_id = history.start_run(client.name, trigger, kind=KIND_MAINTAIN)
    try:
        await run.execute(plan, accept_missing=accept_missing)
    except asyncio.CancelledError:
        run.outcome.duration = time.monotonic() - started
        run.finish(RunResult.INTERRUPTED, "interrupted: the maintenance run was cancelled")
        raise
    except BaseException as exc:
        run.finish(RunResult.FAILED, f"internal error: {exc!r}")
        raise
    run.outcome.duration = time.monotonic() - started
    run.finish(run.outcome.result, run.error_text())
    _log_outcome(run)
    return run.outcome


def _log_outcome(run: _Maintenance) -> None:
    o = run.outcome
    fields = {
        "result": str(o.result),
        "duration": round(o.duration, 3),
        "steps": {s.operation: f"{s.result}: {s.detail}" for s in o.steps},
        "dry_run": o.dry_run,
    }
    if o.result is RunResult.FAILED:
        run.log.error("maintenance_failed", error=run.error_text(), **fields)
    elif o.result is RunResult.WARNING:
        run.log.warning("maintenance_finished", **fields)
    else:
        run.log.info("maintenance_finished", **fields)


class _Maintenance:
    def __init__(
        self, config: Config, client: ClientConfig, history: History, *, dry_run: bool
    ) -> None:
        self.config = config
        self.client = client
        self.history = history
        self.dry_run = dry_run
        self.run_id: int | None = None
        self.outcome = MaintainOutcome(client=client.name, dry_run=dry_run)
        self.log = log.bind(client=client.name)
        self.passphrase: bytes | None = None
        self.server_borg = config.borg_for(client)
        self.borg2 = client.borg2

    # --- bookkeeping ----------------------------------------------------------------------

    def error_text(self) -> str | None:
        if self.outcome.error is not None:
            return self.outcome.error
        failed = [s for s in self.outcome.steps if s.result is RunResult.FAILED]
        return "; ".join(f"{s.operation}: {s.detail}" for s in failed) or None

    def finish(self, result: RunResult, error: str | None) -> None:
        if self.run_id is None:
            return
        self.history.finish_run(
            self.run_id,
            result,
            error=error,
            stats=RunStats(duration=self.outcome.duration),
        )
        self.run_id = None

    def add(self, step: Step) -> Step:
        step.finished = datetime.now(UTC)
        self.outcome.steps.append(step)
        if self.run_id is not None:
            self.history.record_operation(
                self.run_id,
                self.client.name,
                Operation(
                    operation=step.operation,
                    started=step.started,
                    finished=step.finished,
                    result=step.result,
                    exit_code=step.exit_code,
                    detail=step.detail,
                ),
            )
        return step

    async def borg(self, argv: list[str]) -> LocalResult:
        self.log.debug("local_borg", argv=argv)

        def relay(line: borg.LogLine) -> None:
            self.log.log(line.severity, line.message, source=argv[1], **dict(line.fields))

        return await run_local_borg(
            argv,
            state_dir=self.config.server.state_dir,
            passphrase=self.passphrase,
            stop_timeout=self.config.server.serve_stop_timeout,
            on_line=relay,
        )

    # --- the run --------------------------------------------------------------------------

    async def execute(self, requested: Plan | None, *, accept_missing: bool) -> None:
        try:
            self.passphrase = await read_passphrase(self.client)
        except PassphraseError as exc:
            self.outcome.error = str(exc)
            return
        archives = await self.list_archives()
        if archives is None:
            return
        name = self.client.name
        present = {retention.identity(a, borg2=self.borg2): a.id for a in archives}
        if accept_missing:
            self.accept(present)
        plan = requested if requested is not None else self.due_plan()
        verified = self.history.verified_archives(name, by_id=self.borg2)
        report = tamper_report(
            name,
            self.client.repository,
            verified,
            present,
            self.known_ids(verified),
            borg2=self.borg2,
        )
        if not self.dry_run and not self.borg2:
            # First sight of an archive of ours: remember the id its pull verified (known ones
            # are kept as they were, so a replacement keeps being reported).
            ours = {n: verified[n].id or i for n, i in present.items() if n in verified}
            self.history.remember_archive_ids(name, ours)
        if self.dry_run and accept_missing and report is not None:
            report = None  # the dry run shows what would happen after the acknowledgement
        # The id each verified archive must have; 1.x: an accepted replacement's new id.
        ids = {key: made.id for key, made in verified.items()}
        ids.update({n: i for n, i in self.known_ids(verified).items() if n in ids})
        self.report_unverified(archives, ids)
        if report is not None:
            self.outcome.missing = report.missing
            if plan.prune or plan.compact:
                self.log.error(
                    "tampering_suspected",
                    missing=list(report.missing),
                    replaced=list(report.replaced),
                )
                self.add(Step("tamper", RunResult.FAILED, report.message()))
                plan = Plan(check=plan.check)
        removed: list[str] = []
        if plan.prune:
            removed = await self.prune(archives, verified, ids)
        compact = plan.compact or (
            requested is None
            and bool(removed)
            and self.client.retention is not None
            and self.client.retention.compact
        )
        if compact:
            await self.compact()
        if plan.check:
            await self.check()

    def report_unverified(self, archives: list[Archive], known: Mapping[str, str | None]) -> None:
        """Archives no verified pull made: the client wrote them through its tunnel (any name,
        any date), or a pull was cut off before the server read its archive back. Retention
        never counts them (they cannot push a verified archive out) and never deletes them
        (they may hold the only copy of something); the run says so, as tampering suspected."""
        strangers = [
            a
            for a in archives
            if (key := retention.identity(a, borg2=self.borg2)) not in known
            or known[key] not in (None, a.id)
        ]
        if not strangers:
            return
        self.outcome.unverified = tuple(a.id for a in strangers)
        self.log.error(
            "unverified_archives",
            archives=[{"name": a.name, "id": a.id, "time": a.time} for a in strangers[:50]],
            count=len(strangers),
        )
        self.add(Step(UNVERIFIED, RunResult.WARNING, unverified_message(self.client, strangers)))

    def known_ids(self, verified: Mapping[str, VerifiedArchive] | None = None) -> dict[str, str]:
        """Name -> the id its pull verified (or an administrator accepted as its replacement):
        how a 1.x replacement (deleted, made again under the same name) shows, also before
        maintenance first saw the archive. borg 2's archives are told apart by id, so nothing
        to replace."""
        if self.borg2:
            return {}
        if verified is None:
            verified = self.history.verified_archives(self.client.name)
        ids = {name: made.id for name, made in verified.items() if made.id is not None}
        ids.update(self.history.archive_ids(self.client.name))
        return ids

    def due_plan(self) -> Plan:
        name = self.client.name
        last_check = self.history.last_operation(name, "check")
        last_compact = self.history.last_operation(name, "compact", succeeded=True)
        return retention.due_plan(
            self.client,
            now=datetime.now(UTC),
            last_check=last_check.started if last_check is not None else None,
            last_removal=self.history.last_removal(name, PRUNED),
            last_compact=last_compact.started if last_compact is not None else None,
        )

    async def list_archives(self) -> list[Archive] | None:
        argv = retention.list_argv(self.server_borg, self.client.repository, borg2=self.borg2)
        result = await self.borg(argv)
        if result.outcome is borg.Outcome.ERROR:
            self.outcome.error = f"cannot list the repository: borg list {result.error_text()}"
            return None
        try:
            return retention.parse_archives(result.stdout)
        except ValueError as exc:
            self.outcome.error = f"cannot list the repository: {exc}"
            return None

    def accept(self, present: dict[str, str]) -> None:
        """The administrator's acknowledgement: missing archives are recorded as removed,
        replaced ones are remembered with their new id."""
        name = self.client.name
        report = tamper_report(
            name,
            self.client.repository,
            self.history.expected_archives(name, by_id=self.borg2),
            present,
            self.known_ids(),
            borg2=self.borg2,
        )
        if report is None:
            self.add(Step("accept", RunResult.OK, "no archive is missing or replaced"))
            return
        said = []
        if report.missing:
            if not self.dry_run:
                self.history.record_removals(name, report.missing, ACCEPTED, self.run_id)
            said.append("accepted as gone: " + ", ".join(repr(n) for n in report.missing))
        if report.replaced:
            if not self.dry_run:
                new_ids = {n: present[n] for n in report.replaced}
                self.history.remember_archive_ids(name, new_ids, replace=True)
            said.append("accepted as replaced: " + ", ".join(repr(n) for n in report.replaced))
        self.log.warning(
            "missing_archives_accepted",
            archives=list(report.missing),
            replaced=list(report.replaced),
        )
        self.add(Step("accept", RunResult.OK, "; ".join(said)))

    async def prune(
        self,
        before: list[Archive],
        verified: Mapping[str, VerifiedArchive],
        ids: Mapping[str, str | None],
    ) -> list[str]:
        """Delete the verified archives the rules do not keep, judged by the server's times;
        returns the keys removed (1.x names, borg 2 ids)."""
        rules = self.client.retention
        step = Step("prune", RunResult.FAILED, "")
        if rules is None:
            step.detail = f"no [clients.{self.client.name}.retention] configured"
            self.add(step)
            return []
        present = {retention.identity(a, borg2=self.borg2): a for a in before}
        # Only a verified archive that is still there under the id its pull verified; the
        # tamper check has already stopped the prune when one is missing or replaced.
        candidates = [
            keeprules.Dated(key, made.time)
            for key, made in verified.items()
            if key in present and ids[key] in (None, present[key].id)
        ]
        kept = keeprules.keep(candidates, rules, datetime.now(UTC), borg2=self.borg2)
        doomed = sorted(c.key for c in candidates if c.key not in kept)
        if self.dry_run:
            step.result = RunResult.OK
            step.detail = (
                f"would remove {len(doomed)}: {_names(doomed)}; keep {len(before) - len(doomed)}"
            )
            self.outcome.pruned = tuple(doomed)
            self.add(step)
            return doomed  # so that the dry run also shows the compact that would follow
        failures = await self.delete(doomed)
        after = await self.list_archives()
        if after is None:
            # What was removed is unknown: report it, and the next run's tamper check errs on
            # the safe side (it may then refuse until `--accept-missing`).
            step.detail = "listing after the deletes failed"
            self.add(step)
            return []
        key = functools.partial(retention.identity, borg2=self.borg2)
        removed = sorted(set(doomed) - {key(a) for a in after})
        if removed:
            self.history.record_removals(self.client.name, removed, PRUNED, self.run_id)
        self.outcome.pruned = tuple(removed)
        step.result = RunResult.FAILED if failures else RunResult.OK
        step.detail = f"removed {len(removed)}: {_names(removed)}; kept {len(after)}"
        if failures:
            step.exit_code = failures[0].status
            step.detail = f"borg delete {failures[0].error_text()}; {step.detail}"
        self.add(step)
        return removed

    async def delete(self, doomed: list[str]) -> list[LocalResult]:
        """The deletes, by name (1.x, in batches) or one id at a time (borg 2); the failures."""
        size = 1 if self.borg2 else retention.DELETE_BATCH
        failures = []
        for start in range(0, len(doomed), size):
            argv = retention.delete_argv(
                self.server_borg,
                self.client.repository,
                doomed[start : start + size],
                borg2=self.borg2,
            )
            result = await self.borg(argv)
            if result.outcome is not borg.Outcome.OK:
                failures.append(result)
        return failures

    async def compact(self) -> None:
        step = Step("compact", RunResult.FAILED, "")
        if self.dry_run:
            step.result, step.detail = RunResult.OK, "would compact"
            self.add(step)
            return
        chunks = retention.data_dir(self.client.repository, borg2=self.borg2)
        size_before = _size(chunks)
        result = await self.borg(
            retention.compact_argv(self.server_borg, self.client.repository, borg2=self.borg2)
        )
        freed = size_before - _size(chunks)
        step.exit_code = result.status
        step.result = _result(result)
        step.detail = (
            f"freed {freed} bytes"
            if step.result is not RunResult.FAILED
            else f"borg compact {result.error_text()}"
        )
        self.add(step)

    async def check(self) -> None:
        step = Step("check", RunResult.FAILED, "")
        if self.dry_run:
            step.result, step.detail = RunResult.OK, "would check"
            self.add(step)
            return
        argv = retention.check_argv(
            self.server_borg, self.client.repository, self.client.check, borg2=self.borg2
        )
        result = await self.borg(argv)
        step.exit_code = result.status
        # borg check says 1 ("warning") when it found errors: for a check that is a failure.
        if result.status == 0:
            step.result, step.detail = RunResult.OK, "no problems found"
            if self.client.check is not None and self.client.check.verify_data:
                step.detail += " (data verified)"
        else:
            step.detail = f"problems found: borg check {result.error_text()}"
        self.add(step)


def _result(result: LocalResult) -> RunResult:
    return {
        borg.Outcome.OK: RunResult.OK,
        borg.Outcome.WARNING: RunResult.WARNING,
    }.get(result.outcome, RunResult.FAILED)


def _names(names: list[str], limit: int = 20) -> str:
    if not names:
        return "-"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except FileNotFoundError:
                continue
    return total


async def after_pull(
    config: Config, client: ClientConfig, history: History, outcome: PullOutcome | None = None
) -> None:
    """The daemon's hook after a verified pull (the caller still holds the client lock): prune
    (+ compact) when the client has a retention, a check when due. Never raises an operational
    failure: it is logged and recorded.

    After a suspicious archive (0 files, a large drop) nothing is pruned: a week of emptied
    archives would otherwise push the last good ones out of ``keep_daily = 7``.
    """
    if client.retention is None and client.check is None:
        return
    due = _Maintenance(config, client, history, dry_run=False).due_plan()
    plan: Plan | None = None
    if outcome is not None and outcome.suspicious is not None and (due.prune or due.compact):
        log.warning("prune_skipped_after_suspicious_archive", client=client.name)
        due = plan = Plan(check=due.check)
    if not due:
        return
    before = history.last_operation(client.name, UNVERIFIED)
    try:
        done = await maintain_locked(config, client, history, plan=plan, trigger="daemon")
    except Exception:  # a maintenance bug must not turn a good pull into a crash
        log.exception("maintenance_crashed", client=client.name)
        return
    if outcome is not None and outcome.tampering is None:
        outcome.tampering = news_of_unverified(done, before)


def news_of_unverified(done: MaintainOutcome, before: Operation | None) -> str | None:
    """The unverified-archives report of this run when it is news: the set changed since the
    last report (its text ends in a fingerprint of every id), so the daemon's notifier says
    it once per change, not after every pull."""
    step = next((s for s in done.steps if s.operation == UNVERIFIED), None)
    if step is None or (before is not None and before.detail == step.detail):
        return None
    return step.detail
