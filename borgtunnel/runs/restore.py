"""``borgtunnel restore``: push files of an archive back to the client through a tunnel.

The same machinery as a pull, the other way round: a fresh local socket served by the restore
policy (server/policy.py: borg 1.x ``--append-only --restrict-to-repository REPO`` with the
smallest storage quota borg accepts, behind a filter that passes only the read requests of
``borg extract`` (server/rpcfilter.py); borg 2 ``read-only``), a reverse forward to the client, and
ONE remote command (borgtunnel/client/remote.py's run script) that runs ``borg extract`` with its
working directory at the target. Before extracting, the client side creates the target 0700 if
it is missing and refuses one that exists and is not empty (``--force`` overrides), a symlink,
or a non-directory. Cleanup order and rules are those of pull.py.

A restore only reads, and borg 1.x cannot make a serve read-only: the filter refuses every
other request (ending that connection), and a refused request is reported as tampering. Behind
it, after every restore, whatever its result, the key guard runs (runs/keyguard.py) and the
repository is compared with its state before the restore (the newest transaction and segment;
borg 2: the archive objects): any change is a write that got through, reported the same way.

The run is recorded in the history as kind ``restore`` (trigger ``restore``), under the client
lock: never a pull, a maintenance run and a restore of one client at once.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from borgtunnel import borg, borgexit, oserrors
from borgtunnel.client.loading import (
    LOAD_FAILED_PREFIX,
    LOAD_SCRIPT,
    REQUEST_RESTORE_LOAD,
    LoadError,
    LoadPlan,
    load_args,
    load_plan,
    source_named,
    source_paths,
)
from borgtunnel.client.remote import (
    GO,
    REQUEST_RESTORE,
    parse_pid_line,
    run_command,
)
from borgtunnel.config import ClientConfig, Config
from borgtunnel.history import KIND_RESTORE, History, RunResult, RunStats
from borgtunnel.lock import ClientBusy, client_lock
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
from borgtunnel.runs.verify import RepositoryState, repository_state
from borgtunnel.server.policy import serve_argv
from borgtunnel.server.serve import BorgServeListener, pull_socket
from borgtunnel.ssh.tunnel import (
    ConnectError,
    RemoteRun,
    Target,
    Tunnel,
    TunnelError,
)
from borgtunnel.text import printable

log = structlog.get_logger("borgtunnel.runs.restore")

REFUSED_PREFIX = "borgtunnel-restore-refused: "
REFUSED_NOT_EMPTY = 75
REFUSED_UNUSABLE = 76

# $1 target directory, $2 mode (extract | force | dry-run), then borg's argv. Runs as the
# program the run script starts after "go"; the passphrase stays on stdin for borg.
TARGET_SCRIPT = r"""
t=$1; mode=$2; shift 2
if [ "$mode" != dry-run ]; then
  if [ -L "$t" ]; then
    echo "borgtunnel-restore-refused: target $t is a symlink" >&2; exit 76
  fi
  if [ ! -e "$t" ]; then
    (umask 077 && mkdir -p -- "$t") || {
      echo "borgtunnel-restore-refused: cannot create target $t" >&2; exit 76; }
  fi
  if [ ! -d "$t" ]; then
    echo "borgtunnel-restore-refused: target $t is not a directory" >&2; exit 76
  fi
  if [ "$mode" != force ] && [ -n "$(find "$t" -mindepth 1 -maxdepth 1 -print 2>&1 | head -n 1)" ]
  then
    echo "borgtunnel-restore-refused: target $t is not empty; use --force to restore into it" >&2
    exit 75
  fi
  cd -- "$t" || { echo "borgtunnel-restore-refused: cannot enter target $t" >&2; exit 76; }
fi
exec "$@"
"""


def extract_argv(
    *,
    remote_borg: str,
    repository: Path,
    archive: str,
    paths: Sequence[str],
    dry_run: bool,
    borg2: bool = False,
    stdout: bool = False,
) -> list[str]:
    """``borg extract`` for the client. ``pp:`` makes each PATH a literal path prefix (no
    pattern syntax); borg stores paths without the leading '/'. borg 2 takes the repository as
    ``--repo`` and the archive as its own word: a name, or ``aid:ID`` for one of a series."""
    url = borg.repository_url(repository)
    where = [f"--repo={url}", "--", archive] if borg2 else ["--", f"{url}::{archive}"]
    return [
        *shlex.split(remote_borg),
        "extract",
        "--log-json",
        "--list",
        *(["--dry-run"] if dry_run else []),
        *(["--stdout"] if stdout else []),
        *where,
        *(f"pp:{path.lstrip('/')}" for path in paths),
    ]


def restore_command(
    client: ClientConfig, archive: str, paths: Sequence[str], target: str, *, mode: str
) -> str:
    """The whole remote side of a restore as one command line."""
    argv = extract_argv(
        remote_borg=client.remote_borg,
        repository=client.repository,
        archive=archive,
        paths=paths,
        dry_run=mode == "dry-run",
        borg2=client.borg2,
    )
    wrapped = ["sh", "-c", TARGET_SCRIPT, "borgtunnel-restore", target, mode, *argv]
    return _remote_command(client, wrapped, REQUEST_RESTORE)


def _remote_command(client: ClientConfig, wrapped: Sequence[str], kind: str) -> str:
    """The run script around ``wrapped`` (which ends in borg's argv), with borg's environment."""
    env = borg.client_env(encrypted=client.encryption != "none")
    return run_command(
        client.remote_socket_path,
        borg.RSH_BY_TOOL["nc"],
        borg.RSH_BY_TOOL["socat"],
        borg.with_env(wrapped, env),
        kind=kind,
    )


class RestoreUsageError(ValueError):
    """A restore asked for in a way that cannot work; ``str()`` names the option."""


@dataclass(frozen=True)
class RestoreSelection:
    """What a restore extracts and where: paths into a target, or one dump into a database."""

    paths: tuple[str, ...]
    target: str
    load: LoadPlan | None = None


def select_restore(
    client: ClientConfig,
    *,
    paths: Sequence[str],
    target: str | None,
    source: str | None,
    load_into: str | None,
    force: bool,
    dry_run: bool,
) -> RestoreSelection:
    """The command line's choice, checked: --target DIR [PATH…], --source SRC --target DIR, or
    --source SRC --load-into DB."""
    if source is not None and paths:
        raise RestoreUsageError("give --source or PATHs, not both")
    if load_into is not None:
        if source is None:
            raise RestoreUsageError("--load-into needs --source (which dump to load)")
        if target is not None or dry_run:
            raise RestoreUsageError("--load-into goes without --target and --dry-run")
        try:
            plan = load_plan(source_named(client.sources, source), load_into, force=force)
        except LoadError as exc:
            raise RestoreUsageError(str(exc)) from None
        return RestoreSelection(paths=(plan.job.path,), target=plan.what, load=plan)
    if target is None:
        raise RestoreUsageError("--target DIR is required (or --source SRC --load-into DB)")
    if not target.startswith("/") or "\0" in target:
        raise RestoreUsageError(f"--target must be an absolute path, got {target!r}")
    if source is not None:
        try:
            paths = source_paths(source_named(client.sources, source))
        except LoadError as exc:
            raise RestoreUsageError(str(exc)) from None
    return RestoreSelection(paths=tuple(paths), target=target)


def load_command(client: ClientConfig, archive: str, plan: LoadPlan, *, force: bool) -> str:
    """The remote side of ``restore --source --load-into``: borg extract --stdout of the dump
    into the loader (client/loading.py LOAD_SCRIPT)."""
    argv = extract_argv(
        remote_borg=client.remote_borg,
        repository=client.repository,
        archive=archive,
        paths=[plan.job.path],
        dry_run=False,
        borg2=client.borg2,
        stdout=True,
    )
    wrapped = ["sh", "-c", LOAD_SCRIPT, "borgtunnel-load", *load_args(plan, force=force), *argv]
    return _remote_command(client, wrapped, REQUEST_RESTORE_LOAD)


@dataclass
class RestoreOutcome:
    """Everything known about one finished restore."""

    client: str
    archive: str
    target: str
    dry_run: bool = False
    result: RunResult = RunResult.FAILED
    borg_status: int | None = None
    nfiles: int = 0
    error: str | None = None
    # The last few warnings; ``warning_count`` counts them all.
    warnings: list[str] = field(default_factory=list)
    warning_count: int = 0
    duration: float = 0.0
    busy: bool = False
    # Set when the client wrote to the repository or changed its key: always a failure.
    tampering: str | None = None
    # The history row of this restore (set by restore_recorded).
    run_id: int | None = None
    # A dump loaded into a database (restore --source --load-into): the source's name.
    loaded_source: str | None = None

    @property
    def exit_code(self) -> int:
        return {RunResult.OK: 0, RunResult.WARNING: 1}.get(self.result, 2)

    def summary(self) -> str:
        took = f"{self.duration:.1f}s"
        if self.result not in (RunResult.OK, RunResult.WARNING):
            return printable(
                f"{self.client}: {self.result} restore of {self.archive} after {took}: {self.error}"
            )
        if self.loaded_source is not None:
            text = (
                f"{self.client}: {self.result} loaded source {self.loaded_source} of "
                f"archive={self.archive} into {self.target} on the client in {took}"
            )
        else:
            verb = "would restore" if self.dry_run else "restored"
            text = (
                f"{self.client}: {self.result} {verb} archive={self.archive} "
                f"to {self.target} on the client: {self.nfiles} item(s) in {took}"
            )
        if self.warnings:
            text += f" ({self.warning_count} warning(s), last: {self.warnings[-1]})"
        return printable(text)


class _Run:
    def __init__(self, config: Config, client: ClientConfig, outcome: RestoreOutcome) -> None:
        self.config = config
        self.client = client
        self.outcome = outcome
        self.log = log.bind(client=client.name)
        self.errors: list[str] = []
        self.refusal: str | None = None
        self.load_error: str | None = None
        self.remote_pid: int | None = None
        self.remote_finished = False
        # Requests the read-only filter refused (borg 1.x): each one an attempt to write.
        self.refused: list[str] = []

    def on_remote_line(self, line: str) -> None:
        if self.remote_pid is None:
            self.remote_pid = parse_pid_line(line)
            if self.remote_pid is not None:
                return
        if line.startswith(REFUSED_PREFIX):
            self.refusal = line[len(REFUSED_PREFIX) :].strip()
            return
        if line.startswith(LOAD_FAILED_PREFIX):
            self.load_error = printable(line[len(LOAD_FAILED_PREFIX) :].strip())[:2000]
            return
        parsed = borg.parse_log_line(line)
        if parsed is None:
            return
        if parsed.fields.get("name") == "borg.output.list":
            self.outcome.nfiles += 1  # one line per item; the names stay out of the log
            return
        if parsed.level == "warning":
            self.outcome.warning_count += 1
            self.outcome.warnings.append(parsed.message)
            del self.outcome.warnings[:-KEEP_MESSAGES]
        elif parsed.level == "error":
            self.errors.append(parsed.message)
            del self.errors[:-KEEP_MESSAGES]
        self.log.log(parsed.severity, parsed.message, source="borg extract")


async def restore(
    config: Config,
    client: ClientConfig,
    archive: str,
    paths: Sequence[str],
    target: str,
    *,
    dry_run: bool = False,
    force: bool = False,
    load: LoadPlan | None = None,
) -> RestoreOutcome:
    """Extract ``archive`` (or ``paths`` of it) into ``target`` on the client, or with ``load``
    stream one dump into a database there. Failures are reported in the outcome; a
    cancellation runs the full cleanup and is re-raised."""
    if load is not None:
        target = load.what
    outcome = RestoreOutcome(client=client.name, archive=archive, target=target, dry_run=dry_run)
    if load is not None:
        outcome.loaded_source = load.job.source
    run = _Run(config, client, outcome)
    started = time.monotonic()
    mode = "dry-run" if dry_run else "force" if force else "extract"
    run.log.info("restore_started", archive=archive, target=target, mode=mode)
    before = repository_state(client.repository, borg2=client.borg2)
    try:
        command = (
            load_command(client, archive, load, force=force)
            if load is not None
            else restore_command(client, archive, paths, target, mode=mode)
        )
        await _restore(run, command)
    except asyncio.CancelledError:
        outcome.result = RunResult.INTERRUPTED
        outcome.error = "interrupted"
        raise
    except (TunnelError, PassphraseError, StalledError, OSError) as exc:
        outcome.result = RunResult.FAILED
        outcome.error = oserrors.describe(exc) if isinstance(exc, OSError) else str(exc)
    finally:
        # Whatever happened, a tunnel may have been open: look at what the client did with it.
        await _check_repository(run, before)
        outcome.duration = time.monotonic() - started
    report = run.log.info if outcome.result is RunResult.OK else run.log.warning
    report(
        "restore_finished",
        result=str(outcome.result),
        items=outcome.nfiles,
        duration=round(outcome.duration, 3),
        error=outcome.error,
    )
    return outcome


async def _check_repository(run: _Run, before: RepositoryState) -> None:
    """The key guard and the write check; findings go to ``outcome.tampering``. Never raises
    (it runs in a ``finally``): a check that cannot run is a failure of the restore."""
    client, outcome = run.client, run.outcome
    found: list[str] = []
    if run.refused:
        reasons = list(dict.fromkeys(run.refused))  # distinct, in order; one per connection
        found.append(
            f"tampering: the client sent {len(run.refused)} request(s) a restore never makes "
            f"through its read-only tunnel, refused before borg saw them: "
            f"{'; '.join(reasons[:5])}. Look at the client"
        )
    changed = _repository_changes(before, repository_state(client.repository, borg2=client.borg2))
    if changed is not None:
        run.log.error("restore_wrote_repository", change=changed)
        found.append(
            f"tampering: the repository changed during a restore, which only reads ({changed}): "
            "the client wrote through its tunnel. Look at the client, and at its archives "
            f"(`borgtunnel list {client.name}`) before trusting them"
        )
    try:
        key = await keyguard.check_key(
            run.config.borg_for(client),
            client.repository,
            run.config.server.state_dir,
            client.name,
            borg2=client.borg2,
        )
    except (keyguard.KeyGuardError, OSError) as exc:
        found.append(f"key guard: {exc}")
    else:
        if key is not None:
            run.log.error("key_tampering", restored=key.restored, saved_copy=str(key.saved))
            found.append(key.message())
    if found:
        outcome.tampering = "; ".join(found)
        outcome.result = RunResult.FAILED
        outcome.error = "; ".join(filter(None, [outcome.tampering, outcome.error]))


def _repository_changes(before: RepositoryState, after: RepositoryState) -> str | None:
    """What differs between two readings of the repository (None: nothing seen)."""
    if before.archives is not None and after.archives is not None:
        added = len(after.archives - before.archives)
        removed = len(before.archives - after.archives)
        if added or removed:
            return f"{added} archive object(s) added, {removed} removed"
        return None
    if (before.transaction, before.segment) != (after.transaction, after.segment):
        return (
            f"transaction {before.transaction} -> {after.transaction}, "
            f"newest segment {before.segment} -> {after.segment}"
        )
    return None


async def _restore(run: _Run, command: str) -> None:
    passphrase = await read_passphrase(run.client)
    try:
        await _extract_remotely(run, command, passphrase)
    except (TunnelError, StalledError, OSError):
        await release_client_locks(run.config, run.client, passphrase, run.log)
        raise
    if run.outcome.result is RunResult.FAILED:
        await release_client_locks(run.config, run.client, passphrase, run.log)


async def _extract_remotely(run: _Run, command: str, passphrase: bytes | None) -> None:
    config, client = run.config, run.client
    target = Target(client.host, client.port, client.user, config.ssh_for(client))
    argv = serve_argv(config, client, restore=True)
    async with (
        pull_socket(
            config.server.socket_dir,
            client.name,
            argv,
            stop_timeout=config.server.serve_stop_timeout,
        ) as (local_path, listener),
        Tunnel.connect(target) as tunnel,
        tunnel.start(command) as rr,
    ):
        remote = await await_ready(rr, target, client.remote_socket_path, run.log)
        try:
            async with forward_retrying(tunnel, remote.path, local_path, run.log):
                rr.send_and_close(GO + (passphrase or b""))
                await _finish(run, rr, listener)
        finally:
            await stop_serve(listener, remote_finished=run.remote_finished)
            run.refused = list(listener.stats.refused_requests)
            if not run.remote_finished:
                await abandon_remote(tunnel, run.remote_pid, remote.path, run.log)


async def _finish(run: _Run, rr: RemoteRun, listener: BorgServeListener) -> None:
    status, _ = await finish_watched(
        rr, run.on_remote_line, listener, stall_timeout=run.client.stall_timeout
    )
    run.remote_finished = status is not None
    outcome = run.outcome
    outcome.borg_status = status
    # No BORG_EXIT_CODES=modern is sent for a restore: 0/1/2, anything else (the shell's 127)
    # fails. borg 2 always uses its specific codes.
    verdict = borgexit.classify_exit(status, modern=run.client.borg2)
    if run.refusal is not None:
        outcome.result = RunResult.FAILED
        outcome.error = f"refused on the client: {run.refusal}"
    elif run.load_error is not None:
        outcome.result = RunResult.FAILED
        outcome.error = run.load_error
    elif verdict is borg.Outcome.OK:
        outcome.result = RunResult.OK
    elif verdict is borg.Outcome.WARNING:
        outcome.result = RunResult.WARNING
    else:
        parts = run.errors[-1:]
        if listener.stats.last_error:
            parts.append(f"server side: {listener.stats.last_error}")
        if status is None:
            parts.append("borg extract was killed or the connection dropped")
        outcome.result = RunResult.FAILED
        detail = "; ".join(parts) or "no error message"
        outcome.error = f"borg extract failed (status {status}): {detail}"


async def restore_recorded(
    config: Config,
    client: ClientConfig,
    archive: str,
    paths: Sequence[str],
    target: str,
    *,
    dry_run: bool = False,
    force: bool = False,
    wait: bool = False,
    load: LoadPlan | None = None,
) -> RestoreOutcome:
    """Under the client lock, recorded in the history as kind ``restore``."""
    with History.open(config.server.state_dir) as db:
        db.recover_interrupted()
        try:
            async with client_lock(config.server.state_dir, client.name, wait=wait):
                run_id = db.start_run(client.name, "restore", kind=KIND_RESTORE)
                try:
                    outcome = await restore(
                        config,
                        client,
                        archive,
                        paths,
                        target,
                        dry_run=dry_run,
                        force=force,
                        load=load,
                    )
                except asyncio.CancelledError:
                    db.finish_run(
                        run_id,
                        RunResult.INTERRUPTED,
                        archive=archive,
                        error="interrupted: the restore was cancelled",
                    )
                    raise
                except BaseException as exc:
                    db.finish_run(run_id, RunResult.FAILED, error=f"internal error: {exc!r}")
                    raise
                outcome.run_id = run_id
                db.finish_run(
                    run_id,
                    outcome.result,
                    exit_code=outcome.borg_status,
                    archive=archive,
                    stats=RunStats(nfiles=outcome.nfiles, duration=outcome.duration),
                    error=outcome.error,
                )
                return outcome
        except ClientBusy as exc:
            holder = f" by pid {exc.pid}" if exc.pid else ""
            return RestoreOutcome(
                client=client.name,
                archive=archive,
                target=target,
                error=f"busy: another borgtunnel process is working on this client{holder}",
                busy=True,
            )


__all__ = [
    "ConnectError",
    "RestoreOutcome",
    "RestoreSelection",
    "RestoreUsageError",
    "restore",
    "restore_recorded",
    "select_restore",
]
