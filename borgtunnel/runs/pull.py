"""One pull of one client: local socket -> SSH forward -> remote ``borg create`` -> cleanup.

The run moves through explicit states so logs and status say where a run failed. Cleanup order
matters and is fixed here: stop the local ``borg serve`` children first (that is what makes a
remote ``borg create`` exit promptly — closing the SSH channel does not kill it), then remove the
remote socket, then close the connection, then remove the local socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import reprlib
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from borgtunnel import borg, borgexit, clientborg, oserrors
from borgtunnel.client import sources
from borgtunnel.client.remote import (
    GO,
    REQUEST_RUN_SOURCES,
    parse_pid_line,
    parse_source_line,
    run_command,
)
from borgtunnel.client.snapshot import SnapshotPlan, snapshot_run_command
from borgtunnel.config import ClientConfig, Config
from borgtunnel.history import SOURCE_FAILED, SOURCE_OK, RunResult
from borgtunnel.passphrase import PassphraseError, read_passphrase
from borgtunnel.runs import keyguard
from borgtunnel.runs.remoterun import (
    KEEP_MESSAGES,
    StalledError,
    abandon_remote,
    await_ready,
    finish_watched,
    forward_retrying,
    release_client_locks,
    stop_serve,
)
from borgtunnel.runs.sources import (
    MAX_STATUS_LINES,
    SourcesNotArchivedError,
    source_names,
    status_problems,
    verify_sources,
)
from borgtunnel.runs.verify import (
    RepositoryState,
    VerifyError,
    repository_state,
    verify_archive,
)
from borgtunnel.server.policy import serve_argv
from borgtunnel.server.serve import BorgServeListener, pull_socket, run_to_completion
from borgtunnel.ssh.tunnel import (
    ConnectError,
    RemoteRun,
    Target,
    Tunnel,
    TunnelError,
)
from borgtunnel.text import printable

log = structlog.get_logger("borgtunnel.runs.pull")

# EX_SOFTWARE: borgtunnel itself failed. Distinct from 2 so a bug is never mistaken for a
# client problem, and never 1, which the units accept as "warnings only".
EXIT_INTERNAL = 70


# What a run keeps of the client's messages: every warning is counted, the last few kept; past
# MAX_LOGGED_LINES the client's lines are counted, not logged (a flood costs the client's run,
# not the server's journal).
MAX_LOGGED_LINES = 10_000


class State(StrEnum):
    STARTING = "starting"
    CONNECTING = "connecting"
    PREPARING = "preparing"
    FORWARDING = "forwarding"
    RUNNING = "running"
    CLEANING_UP = "cleaning_up"
    VERIFYING = "verifying"
    DONE = "done"


@dataclass
class PullOutcome:
    """Everything known about one finished pull."""

    client: str
    result: RunResult = RunResult.FAILED
    state: State = State.STARTING
    borg_status: int | None = None
    # The archive as the server's own borg read it; None unless verified.
    stats: borg.ArchiveStats | None = None
    error: str | None = None
    # The last few warnings; ``warning_count`` counts them all.
    warnings: list[str] = field(default_factory=list)
    warning_count: int = 0
    # Set when the client changed the repository key (see keyguard): always a failure.
    tampering: str | None = None
    started: float = field(default_factory=time.time)
    duration: float = 0.0
    tool: str | None = None
    # The run never started: another process holds the client's lock.
    busy: bool = False
    # The SSH connection could not be made or was lost (offline client, dropped link): the only
    # kind of failure another try may cure.
    link_lost: bool = False
    # borgtunnel itself failed (a bug): exit 70, never read as "warnings only".
    internal_error: bool = False
    # Set after verification when the archive looks wrong (0 files, a large drop): the daemon
    # then does not prune after it (borgtunnel/runs/sanity.py).
    suspicious: str | None = None
    # A `before` hook stopped the run (failed, or exit 75 for skipped): no pull was attempted.
    hook_failed: bool = False
    # The history row of this run (set by jobs.run_recorded; None for a busy client).
    run_id: int | None = None
    # The configured names of the client's sources this run dumped, and of those whose dump
    # failed or is missing from the archive (the error text names each dump's label too).
    sources: list[str] = field(default_factory=list)
    failed_sources: list[str] = field(default_factory=list)

    def source_results(self) -> dict[str, str]:
        """Source name -> ``ok`` / ``failed`` for the history; sources this run says nothing
        about (it failed before or for another reason) are left out."""
        if self.result in (RunResult.OK, RunResult.WARNING):
            return dict.fromkeys(self.sources, SOURCE_OK)
        return {name: SOURCE_FAILED for name in self.sources if name in self.failed_sources}

    @property
    def exit_code(self) -> int:
        """CLI meaning: 0 ok (verified), 1 verified with warnings, 2 failed or interrupted,
        70 internal error, 75 skipped by a before hook."""
        if self.internal_error:
            return EXIT_INTERNAL
        return {RunResult.OK: 0, RunResult.WARNING: 1, RunResult.SKIPPED: 75}.get(self.result, 2)

    def summary(self) -> str:
        """The one line per client that `borgtunnel pull` prints."""
        took = f"{self.duration:.1f}s"
        if self.stats is not None and self.result in (RunResult.OK, RunResult.WARNING):
            s = self.stats
            text = (
                f"{self.client}: {self.result} archive={s.archive} files={s.nfiles} "
                f"original={_size(s.original_size)} compressed={_size(s.compressed_size)} "
                f"deduplicated={_size(s.deduplicated_size)} in {took}"
            )
            if self.warnings:
                text += f" ({self.warning_count} warning(s), last: {self.warnings[-1]})"
            return printable(text)
        return printable(
            f"{self.client}: {self.result} in state {self.state} after {took}: {self.error}"
        )


def _size(n: int | None) -> str:
    if n is None:
        return "?"  # borg 2 does not report it
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.2f}{unit}"
        value /= 1000
    return f"{n}B"  # pragma: no cover - loop always returns


# What a run tells a display while it runs: its state on each change, borg's figures on each
# progress line. Called synchronously; what it raises is ignored.
ProgressCallback = Callable[[borg.Progress | State], None]

# What of a client's record is logged: keys and texts are cut, values that are not plain
# scalars (lists, objects, nested to any depth) are logged as a short repr.
_MAX_FIELD_KEY = 64
_MAX_FIELD_TEXT = 1024


def _client_fields(fields: Mapping[str, object]) -> dict[str, object]:
    """A client's record fields as plain data a log renderer cannot trip over."""
    return {str(key)[:_MAX_FIELD_KEY]: _plain(value) for key, value in fields.items()}


def _plain(value: object) -> object:
    if isinstance(value, str):
        return value[:_MAX_FIELD_TEXT]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN/Infinity would make the JSON log line invalid JSON
    if isinstance(value, int | float | bool) or value is None:
        return value
    return reprlib.repr(value)


class _Run:
    """Mutable bookkeeping of the pull in progress."""

    def __init__(
        self,
        config: Config,
        client: ClientConfig,
        known_ids: Collection[str],
        progress: ProgressCallback | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.known_ids = known_ids
        self.progress = progress
        self.outcome = PullOutcome(client=client.name)
        self.log = log.bind(client=client.name)
        self.errors: list[str] = []
        self.remote_pid: int | None = None
        self.remote_finished = False
        # Which borg the client runs: what earlier pulls learned (decides whether we ask for
        # borg 1.4's specific exit codes), and what this pull's --show-version line says.
        self.known_borg = clientborg.known_version(config.server.state_dir, client.name)
        # borg 2 always returns its specific codes; 1.4 only when asked (and then is asked).
        self.borg2 = client.borg2
        self.modern_exit_codes = self.borg2 or (
            self.known_borg is not None and self.known_borg.modern_exit_codes
        )
        self.server_borg = config.borg_for(client)
        self.seen_borg: clientborg.BorgVersion | None = None
        # The exception line of a traceback borg logged (e.g. "OSError: [Errno 28] No space left
        # on device"): borg logs its system info after it, which says nothing about the cause.
        self.exception: str | None = None
        self.lines_seen = 0
        self.stdout = ""
        # The client's dumps (none without sources) and the exit status the run script
        # reported for each.
        self.jobs = sources.dump_jobs(client.sources)
        self.outcome.sources = source_names(self.jobs)
        self.labels = frozenset(job.label for job in self.jobs)
        self.source_status: dict[str, int] = {}
        self.status_lines = 0

    def _keep(self, kept: list[str], message: str) -> None:
        kept.append(message)
        del kept[:-KEEP_MESSAGES]

    def enter(self, state: State) -> None:
        self.outcome.state = state
        self.log.debug("pull_state", state=str(state))
        self._tell(state)

    def _tell(self, update: borg.Progress | State) -> None:
        if self.progress is not None:
            with contextlib.suppress(Exception):  # a display problem must not break the pull
                self.progress(update)

    def _source_line(self, line: str) -> bool:
        """A dump's exit status from the run script: kept, and True; other lines: False."""
        if not self.labels or (reported := parse_source_line(line)) is None:
            return False
        label, status = reported
        self.status_lines += 1
        if label in self.labels and self.status_lines <= MAX_STATUS_LINES:
            # The script prints these last: a later line for a label wins over any earlier
            # look-alike in a dump's own messages.
            self.source_status[label] = status
            if status != 0:
                self.log.warning("source_dump_failed", source=label, status=status)
        return True

    def on_remote_line(self, line: str) -> None:
        if self._source_line(line):
            return
        if self.remote_pid is None:
            self.remote_pid = parse_pid_line(line)
            if self.remote_pid is not None:
                return
        if self.progress is not None and (figures := borg.parse_progress(line)) is not None:
            self._tell(figures)
        parsed = borg.parse_log_line(line)
        if parsed is None:
            return
        fields = dict(parsed.fields)
        if self.seen_borg is None and isinstance(name := fields.get("name"), str):
            self.seen_borg = clientborg.version_from_log(parsed.message, name)
        if parsed.level == "warning":
            self.outcome.warning_count += 1
            self._keep(self.outcome.warnings, parsed.message)
        elif parsed.level == "error":
            self._keep(self.errors, parsed.message)
            if "Traceback (most recent call last)" in parsed.message:
                lines = [x.strip() for x in parsed.message.splitlines() if x.strip()]
                self.exception = lines[-1].removeprefix("Borg server: ")
        self.lines_seen += 1
        if self.lines_seen == MAX_LOGGED_LINES:
            self.log.warning("remote_lines_not_logged", after=MAX_LOGGED_LINES)
        if self.lines_seen < MAX_LOGGED_LINES:
            # The client chooses the keys: nested under one key of ours, never beside our own
            # fields (a "source", "event", "client" or "exc_info" of its own would replace them
            # or clash with structlog's).
            borg_fields = _client_fields(fields)
            extra = {"borg": borg_fields} if borg_fields else {}
            self.log.log(parsed.severity, parsed.message, source="borg create", **extra)


async def pull(
    config: Config,
    client: ClientConfig,
    *,
    known_ids: Collection[str] = (),
    progress: ProgressCallback | None = None,
) -> PullOutcome:
    """Pull one archive from ``client``. Operational failures are reported in the outcome.

    ``known_ids`` are the archive ids earlier runs recorded: a client naming one of them has
    not written a new archive. Cancellation (daemon shutdown, timeout) runs the full cleanup
    and is then re-raised; the caller records the run as interrupted. ``progress`` gets borg's
    live figures and each state change (a terminal's display).
    """
    run = _Run(config, client, known_ids, progress)
    started = time.monotonic()
    run.log.info("pull_started", host=client.host, repository=str(client.repository))
    try:
        await _pull(run)
    except asyncio.CancelledError:
        run.outcome.result = RunResult.INTERRUPTED
        run.outcome.error = f"interrupted while {run.outcome.state}"
        run.outcome.duration = time.monotonic() - started
        run.log.warning("pull_interrupted", state=str(run.outcome.state))
        raise
    except (
        TunnelError,
        PassphraseError,
        StalledError,
        VerifyError,
        keyguard.KeyGuardError,
        OSError,
    ) as exc:
        run.outcome.result = RunResult.FAILED
        run.outcome.stats = None
        # A file or program of this server names its path and operation (oserrors).
        run.outcome.error = oserrors.describe(exc) if isinstance(exc, OSError) else str(exc)
        # Only the link may come back by itself; a LocalError (a file here) is not retried.
        run.outcome.link_lost = isinstance(exc, ConnectError)
    if run.outcome.tampering is not None:
        run.outcome.result = RunResult.FAILED
        run.outcome.error = "; ".join(filter(None, [run.outcome.tampering, run.outcome.error]))
    run.outcome.duration = time.monotonic() - started
    _learn_client_borg(run)
    _log_outcome(run)
    return run.outcome


def _learn_client_borg(run: _Run) -> None:
    """Keep the client's borg version for the next pull; re-learn it after a failure."""
    try:
        clientborg.update_after_pull(
            run.config.server.state_dir,
            run.client.name,
            run.seen_borg,
            # Only a run whose remote command ended says anything about the client's borg: an
            # offline client or a dropped link keeps what was known.
            failed=run.outcome.result is RunResult.FAILED and run.remote_finished,
        )
    except OSError as exc:  # a hint for the next pull, not worth failing this one
        run.log.warning("client_borg_not_recorded", error=str(exc))


def _log_outcome(run: _Run) -> None:
    o = run.outcome
    fields: dict[str, object] = {
        "result": str(o.result),
        "duration": round(o.duration, 3),
        "borg_status": o.borg_status,
        "client_borg": str(run.seen_borg) if run.seen_borg else None,
        "modern_exit_codes": run.modern_exit_codes,
    }
    if o.stats is not None:
        fields.update(
            archive=o.stats.archive,
            archive_id=o.stats.archive_id,
            original_size=o.stats.original_size,
            compressed_size=o.stats.compressed_size,
            deduplicated_size=o.stats.deduplicated_size,
            nfiles=o.stats.nfiles,
            borg_duration=o.stats.duration,
        )
    if o.result is RunResult.FAILED and o.link_lost:
        # Offline clients are routine (laptops, maintenance): a soft failure, retried by the daemon.
        run.log.warning("pull_failed", error=o.error, state=str(o.state), **fields)
    elif o.result is RunResult.FAILED:
        run.log.error("pull_failed", error=o.error, state=str(o.state), **fields)
    elif o.result is RunResult.WARNING:
        run.log.warning("pull_finished", **fields)
    else:
        run.log.info("pull_finished", **fields)


async def _pull(run: _Run) -> None:
    config, client = run.config, run.client
    passphrase = await read_passphrase(client)
    target = Target(client.host, client.port, client.user, config.ssh_for(client))
    argv = serve_argv(config, client)
    before = repository_state(client.repository, borg2=run.borg2)

    try:
        try:
            listener = await _run_remote(run, target, argv, passphrase)
        except (TunnelError, StalledError, OSError):
            await release_client_locks(run.config, run.client, passphrase, run.log)
            raise
        if run.outcome.result is RunResult.FAILED:
            await release_client_locks(run.config, run.client, passphrase, run.log)
    finally:
        # Whatever ended the run — a failure, a bug, a cancellation — the client may have
        # changed the key through its tunnel: the guard always looks.
        await run_to_completion(_guard_key(run))
    if run.outcome.result in (RunResult.OK, RunResult.WARNING):
        run.enter(State.VERIFYING)
        await _verify(run, listener, passphrase, before)
    run.enter(State.DONE)


async def _run_remote(
    run: _Run, target: Target, argv: list[str], passphrase: bytes | None
) -> BorgServeListener:
    """Socket, tunnel, remote ``borg create``, then the fixed cleanup order; the listener's
    stats (serve exit codes, traffic) are what verification reads."""
    config, client = run.config, run.client
    async with pull_socket(
        config.server.socket_dir,
        client.name,
        argv,
        stop_timeout=config.server.serve_stop_timeout,
    ) as (local_path, listener):
        run.enter(State.CONNECTING)
        async with Tunnel.connect(target) as tunnel:
            run.enter(State.PREPARING)
            async with tunnel.start(_remote_command(run, encrypted=passphrase is not None)) as rr:
                remote = await await_ready(rr, target, client.remote_socket_path, run.log)
                run.outcome.tool = remote.tool
                try:
                    run.enter(State.FORWARDING)
                    async with forward_retrying(tunnel, remote.path, local_path, run.log):
                        run.enter(State.RUNNING)
                        rr.send_and_close(GO + (passphrase or b""))
                        await _finish_create(run, rr, listener)
                finally:
                    reached = run.outcome.state
                    run.enter(State.CLEANING_UP)
                    await stop_serve(listener, remote_finished=run.remote_finished)
                    if not run.remote_finished:  # a finished run removed its socket itself
                        await abandon_remote(tunnel, run.remote_pid, remote.path, run.log)
                    run.outcome.state = reached  # a failure reports where it happened
    return listener


async def _guard_key(run: _Run) -> None:
    """After every run, whatever its result: a client that changed the key is tampering.

    Never raises (it runs in a ``finally``, where it must not replace the run's own error): a
    guard that could not look fails the run with its reason.
    """
    client, server = run.client, run.config.server
    try:
        tampering = await keyguard.check_key(
            run.server_borg, client.repository, server.state_dir, client.name, borg2=run.borg2
        )
    except (keyguard.KeyGuardError, OSError) as exc:
        run.outcome.tampering = f"key guard: could not check the repository key: {exc}"
        run.log.error("key_guard_failed", error=str(exc))
        return
    if tampering is not None:
        run.outcome.tampering = tampering.message()
        run.log.error(
            "key_tampering",
            restored=tampering.restored,
            saved_copy=str(tampering.saved),
            detail=tampering.detail or None,
            other_repository=tampering.other_repository,
        )


async def _verify(
    run: _Run, listener: BorgServeListener, passphrase: bytes | None, before: RepositoryState
) -> None:
    """ok/warning only for an archive the server itself reads back; see verify.py."""
    client, server = run.client, run.config.server
    if 0 not in listener.stats.exit_codes:
        raise VerifyError(
            "unverified: no borg serve of this run finished cleanly (exit codes "
            f"{listener.stats.exit_codes or 'none: the client never connected'}), so no archive "
            "can have been committed"
        )
    claim = borg.parse_create_claim(run.stdout)
    started = time.monotonic()
    run.outcome.stats = await verify_archive(
        borg_cmd=run.server_borg,
        repository=client.repository,
        state_dir=server.state_dir,
        passphrase=passphrase,
        claim=claim,
        known_ids=run.known_ids,
        before=before,
        borg2=run.borg2,
    )
    if run.jobs:
        try:
            await verify_sources(
                run.jobs,
                borg_cmd=run.server_borg,
                repository=client.repository,
                state_dir=server.state_dir,
                passphrase=passphrase,
                archive=run.outcome.stats.archive,
                archive_id=run.outcome.stats.archive_id,
                borg2=run.borg2,
            )
        except SourcesNotArchivedError as exc:
            run.outcome.failed_sources = exc.sources
            raise
    run.log.info("archive_verified", seconds=round(time.monotonic() - started, 3))
    # The first verified pull of a repository made elsewhere saves the key the server now
    # knows opens it; later pulls compare against that copy.
    await keyguard.save_key_copy(
        run.server_borg, client.repository, server.state_dir, client.name, borg2=run.borg2
    )


def _remote_command(run: _Run, *, encrypted: bool) -> str:
    client = run.client
    argv = borg.create_argv(
        borg2=run.borg2,
        remote_borg=client.remote_borg,
        repository=client.repository,
        archive=client.archive,
        # A run with sources reads its dumps' pipes from a private directory, its working
        # directory on the client: the relative path is what the archive holds.
        paths=[*client.paths, sources.SOURCES_DIR] if run.jobs else client.paths,
        exclude=client.exclude,
        extra=[*client.create_args, *sources.CREATE_OPTIONS] if run.jobs else client.create_args,
    )
    run.log.debug("remote_command", argv=argv)
    args = (
        client.remote_socket_path,
        borg.RSH_BY_TOOL["nc"],
        borg.RSH_BY_TOOL["socat"],
        borg.with_env(
            argv, borg.client_env(encrypted=encrypted, modern_exit_codes=run.modern_exit_codes)
        ),
    )
    if run.jobs:  # sources and snapshot together are refused at load (config/model.py)
        return run_command(
            *args,
            kind=REQUEST_RUN_SOURCES,
            sources=sources.sources_args(client.paths, run.jobs),
        )
    if client.snapshot is not None:
        plan = SnapshotPlan(
            kind=client.snapshot,
            client=client.name,
            paths=client.paths,
            fallback=client.snapshot_fallback,
            lvm_size=client.lvm_snapshot_size,
        )
        return snapshot_run_command(plan, *args)
    return run_command(*args)


async def _finish_create(run: _Run, rr: RemoteRun, listener: BorgServeListener) -> None:
    # On cancellation, _pull's cleanup stops serve first: that breaks the remote borg's RPC pipe
    # and it exits within a second, where closing the channel would leave it running.
    status, stdout = await finish_watched(
        rr, run.on_remote_line, listener, stall_timeout=run.client.stall_timeout, log=run.log
    )
    run.remote_finished = status is not None
    run.stdout = stdout
    outcome = run.outcome
    outcome.borg_status = status
    verdict = borgexit.classify_exit(status, modern=run.modern_exit_codes)
    if verdict is borg.Outcome.OK:
        outcome.result = RunResult.OK
    elif verdict is borg.Outcome.WARNING:
        outcome.result = RunResult.WARNING
        run.log.info("borg_warning_status", status=status, meaning=_explain(run, status))
    else:
        outcome.result = RunResult.FAILED
        outcome.error = _failure_text(run, status, listener)
    if run.jobs and run.remote_finished:
        _check_dumps(run)


def _check_dumps(run: _Run) -> None:
    """A dump that did not exit 0 fails the run, whatever borg said: borg archived a pipe that
    simply ended, so the archive holds a truncated file that looks like any other."""
    problems = status_problems(run.jobs, run.source_status)
    if not problems:
        return
    outcome = run.outcome
    outcome.failed_sources = source_names(
        [job for job in run.jobs if run.source_status.get(job.label) != 0]
    )
    outcome.result = RunResult.FAILED
    text = "; ".join(problems)
    outcome.error = f"{text}; {outcome.error}" if outcome.error else text


def _explain(run: _Run, status: int | None) -> str:
    return borgexit.explain_exit(
        status,
        modern=run.modern_exit_codes,
        remote_borg=run.client.remote_borg,
        borg_ran=run.seen_borg is not None,
    )


def _failure_text(run: _Run, status: int | None, listener: BorgServeListener) -> str:
    meaning = _explain(run, status)
    if run.seen_borg is None and status in (
        borgexit.SHELL_NOT_FOUND,
        borgexit.SHELL_NOT_EXECUTABLE,
    ):
        return meaning  # the shell's word: borg never started, there is nothing else to say
    parts = [meaning]
    name, version = run.client.name, run.client.borg_version
    if run.seen_borg is not None:
        mismatch = clientborg.major_mismatch(run.seen_borg, client=name, configured=version)
        if mismatch is not None:
            parts.append(mismatch)
    elif any(": error: " in line for line in (*run.errors, *run.outcome.warnings)):
        # argparse refused our command line before borg could log its version.
        parts.append(
            f"the client's borg did not understand a borg {version} command line: does it run "
            f"borg {version} (clients.{name}.borg_version)?"
        )
    if run.exception:
        parts.append(run.exception)
    elif run.errors:
        parts.append(run.errors[-1])
    elif run.outcome.warnings:  # plain text (a shell, nc) is kept as a warning
        parts.append(run.outcome.warnings[-1])
    if listener.stats.last_error:
        parts.append(f"server side: {listener.stats.last_error}")
    return f"borg create failed (status {status}): {'; '.join(parts)}"
