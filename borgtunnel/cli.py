"""Command line: parse arguments, load the config, call one function, map the result to a code.

Exit codes: 0 ok, 1 borg warnings only, 2 any failure, 78 configuration error (EX_CONFIG, which
the systemd units list in RestartPreventExitStatus: restarting cannot fix a bad file); ``pull``
exits 75 when a ``before`` hook skipped a run (and nothing failed); ``status`` exits 1 when a
client is stale or its last run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import structlog

from borgtunnel import enrolment, logs, steer
from borgtunnel.arguments import build_parser
from borgtunnel.config import (
    ClientConfig,
    Config,
    ConfigError,
    UnknownClientError,
    config_path,
    load_config,
)
from borgtunnel.config.effective import effective
from borgtunnel.history import History
from borgtunnel.maintenance import command as maintenance_command
from borgtunnel.maintenance.retention import requested_plan
from borgtunnel.passphrase import PassphraseError
from borgtunnel.reporting import notify, status
from borgtunnel.reporting.live import PullEvent, Queued, finished_event, watch_run
from borgtunnel.reporting.progress import CurrentStderr, PullDisplay
from borgtunnel.reporting.reporter import Reporter
from borgtunnel.runs.jobs import run_recorded
from borgtunnel.runs.keyguard import KeyGuardError
from borgtunnel.runs.repository import init_repository
from borgtunnel.runs.restore import (
    RestoreSelection,
    RestoreUsageError,
    restore_recorded,
    select_restore,
)
from borgtunnel.scheduling import daemon
from borgtunnel.server import socketserve
from borgtunnel.ssh import doctor, enrol, trust

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_FAILURE = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug; Python's own exit 1 for a crash would read as "warning"
EXIT_SKIPPED = 75
EXIT_CONFIG = 78
# Which exit code wins when `pull` ran several clients: a bug, then any failure, then a skip.
_EXIT_RANK = {EXIT_OK: 0, EXIT_WARNING: 1, EXIT_SKIPPED: 2, EXIT_FAILURE: 3, EXIT_INTERNAL: 4}

# Exit codes whose summary line is an error line (journald priority err).
_FAILED = (EXIT_FAILURE, EXIT_INTERNAL)

log = structlog.get_logger("borgtunnel")


def _cmd_check_config(args: argparse.Namespace, _path: Path, config: Config) -> int:
    # Valid: load_config raised ConfigError (exit 78) otherwise.
    if args.client is not None:
        merged = effective(config, args.client)
        if not args.quiet:
            print(
                json.dumps(merged.as_json(), indent=2) if args.json else "\n".join(merged.lines())
            )
    elif not args.quiet:
        print(json.dumps(config.redacted(), indent=2))
    return EXIT_OK


def _log_for_a_person(args: argparse.Namespace, *, live: bool) -> None:
    """A pull (or enroll) on a terminal: a person reads it."""
    if live or sys.stderr.isatty():
        # The event stream (serve_started, pull_finished …) stays in the journal or behind
        # --log-level; warnings and errors still show. Through CurrentStderr, log lines pass
        # above the live rows instead of tearing them.
        level = args.log_level or ("warning" if sys.stderr.isatty() else "info")
        # CurrentStderr has the three methods structlog's PrintLogger uses, not all of TextIO.
        stream = cast("TextIO", CurrentStderr()) if live else None
        logs.configure(args.log_format, level=level, stream=stream)


def _cmd_pull(args: argparse.Namespace, _path: Path, config: Config) -> int:
    # A name given twice is pulled once: a second run would only find the first one's lock.
    clients = [config.client(name) for name in dict.fromkeys(args.clients)]
    live = not args.no_progress and sys.stdout.isatty()
    _log_for_a_person(args, live=live)
    # A running daemon queues the pulls (docs/control.md); without one, they run here.
    codes = steer.pull_through_daemon(
        config, [client.name for client in clients], wait=args.wait, progress=live
    )
    if codes is not None:
        return worst_exit_code(codes)
    return _run(_pull_all(config, clients, wait=args.wait, live=live))


def _cmd_cancel(args: argparse.Namespace, _path: Path, config: Config) -> int:
    return steer.cancel(config, args.client)


def _cmd_pause(args: argparse.Namespace, _path: Path, config: Config) -> int:
    return steer.pause(config, args.client, args.until)


def _cmd_resume(args: argparse.Namespace, _path: Path, config: Config) -> int:
    return steer.resume(config, args.client)


def _cmd_notify_test(args: argparse.Namespace, _path: Path, config: Config) -> int:
    if args.client is None:
        everyone = (config.notify_urls_for(c) for c in config.clients.values())
        urls = tuple(dict.fromkeys((*config.notify.urls, *(u for us in everyone for u in us))))
    else:
        urls = config.notify_urls_for(config.client(args.client))
    return _run(notify.notify_test(urls, args.client, limit=config.notify.timeout))


def _cmd_init(args: argparse.Namespace, _path: Path, config: Config) -> int:
    return _run(_init(config, config.client(args.client)))


def _cmd_daemon(_args: argparse.Namespace, path: Path, config: Config) -> int:
    return daemon.run_daemon(path, config)


def _cmd_status(args: argparse.Namespace, _path: Path, config: Config) -> int:
    return status.show_status(config, as_json=args.json)


def _cmd_history(args: argparse.Namespace, _path: Path, config: Config) -> int:
    client = config.client(args.client)
    return status.show_history(config, client, limit=args.limit, as_json=args.json)


def _cmd_serve(args: argparse.Namespace, _path: Path, config: Config) -> int:
    return socketserve.run_serve(
        config,
        listen=args.listen,
        client=args.client,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
    )


def _cmd_maintain(args: argparse.Namespace, _path: Path, config: Config) -> int:
    clients = [config.client(name) for name in args.clients]
    plan = requested_plan(prune=args.prune, compact=args.compact, check=args.check)
    return _run(
        maintenance_command.maintain_all(
            config,
            clients,
            plan=plan,
            dry_run=args.dry_run,
            accept_missing=args.accept_missing,
            wait=args.wait,
        )
    )


def _cmd_list(args: argparse.Namespace, _path: Path, config: Config) -> int:
    client = config.client(args.client)
    return _run(maintenance_command.list_archives(config, client, as_json=args.json))


def _cmd_restore(args: argparse.Namespace, _path: Path, config: Config) -> int:
    client = config.client(args.client)
    try:
        selection = select_restore(
            client,
            paths=args.paths,
            target=args.target,
            source=args.source,
            load_into=args.load_into,
            force=args.force,
            dry_run=args.dry_run,
        )
    except RestoreUsageError as exc:
        logs.print_error(f"borgtunnel: restore {client.name}: {exc}")
        return EXIT_FAILURE
    return _run(_restore(config, client, args, selection))


async def _restore(
    config: Config, client: ClientConfig, args: argparse.Namespace, selection: RestoreSelection
) -> int:
    outcome = await restore_recorded(
        config,
        client,
        args.archive,
        selection.paths,
        selection.target,
        dry_run=args.dry_run,
        force=args.force,
        wait=args.wait,
        load=selection.load,
    )
    logs.print_summary(outcome.summary(), failed=outcome.exit_code in _FAILED)
    if args.source is not None and selection.load is None and outcome.exit_code in (0, 1):
        for path in selection.paths:  # where the dump landed (borg keeps the relative path)
            logs.print_summary(f"  {selection.target.rstrip('/')}/{path}", failed=False)
    if outcome.tampering is not None:
        await _notify_tampering(config, client, outcome.tampering, run_id=outcome.run_id)
    return outcome.exit_code


async def _notify_tampering(
    config: Config, client: ClientConfig, detail: str, *, run_id: int | None
) -> None:
    """A restore that found the client writing or re-keying tells someone, as a pull would."""
    with History.open(config.server.state_dir) as history:
        reporter = Reporter(config, history, in_daemon=False)
        reporter.report_tampering(client, detail, run_id=run_id)
        await reporter.aclose()


def _cmd_trust(args: argparse.Namespace, _path: Path, config: Config) -> int:
    client = config.client(args.client)
    return _run(
        trust.trust(
            config, client, fingerprint=args.fingerprint, yes=args.yes, replace=args.replace
        )
    )


def _cmd_authorized_key(args: argparse.Namespace, _path: Path, config: Config) -> int:
    try:
        client = config.client(args.client)
        print(enrol.authorized_key_line(config, client, command=args.forced_command))
    except enrol.PublicKeyError as exc:
        logs.print_error(f"borgtunnel: {exc}")
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace, _path: Path, config: Config) -> int:
    report = asyncio.run(doctor.doctor(config, config.client(args.client)))
    print("\n".join(report.lines()))
    return report.exit_code


def _cmd_enroll(args: argparse.Namespace, _path: Path, config: Config) -> int:
    client = config.client(args.client)
    progress = not args.no_progress and sys.stdout.isatty()
    _log_for_a_person(args, live=progress)
    options = enrolment.EnrolOptions(
        fingerprint=args.fingerprint,
        wait=args.wait,
        wait_timeout=args.wait_timeout,
        command=args.forced_command,
        progress=progress,
    )
    return _run(enrolment.enroll(config, client, options))


COMMANDS: dict[str, Callable[[argparse.Namespace, Path, Config], int]] = {
    "check-config": _cmd_check_config,
    "pull": _cmd_pull,
    "cancel": _cmd_cancel,
    "pause": _cmd_pause,
    "resume": _cmd_resume,
    "init": _cmd_init,
    "daemon": _cmd_daemon,
    "status": _cmd_status,
    "history": _cmd_history,
    "serve": _cmd_serve,
    "maintain": _cmd_maintain,
    "list": _cmd_list,
    "restore": _cmd_restore,
    "trust": _cmd_trust,
    "authorized-key": _cmd_authorized_key,
    "doctor": _cmd_doctor,
    "enroll": _cmd_enroll,
    "notify-test": _cmd_notify_test,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, load the config once, dispatch. Config problems of any command exit 78."""
    args = build_parser().parse_args(argv)
    logs.configure(args.log_format, level=args.log_level or "info")
    if args.command == "gatekeeper":  # for a client: needs no server configuration
        sys.stdout.write(enrol.gatekeeper_source())
        return EXIT_OK
    path = config_path(args.config)
    try:
        config = load_config(path)
        return COMMANDS[args.command](args, path, config)
    except ConfigError as exc:
        logs.print_error(exc)
        return EXIT_CONFIG
    except UnknownClientError as exc:
        logs.print_error(f"borgtunnel: {exc}")
        return EXIT_CONFIG
    except Exception as exc:
        log.exception("internal_error", command=args.command)
        logs.print_error(f"borgtunnel: internal error: {exc!r} (a bug: please report it)")
        return EXIT_INTERNAL


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """asyncio.run, with SIGTERM treated like Ctrl-C: cancel, clean up, report a failure."""

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - we are inside a task
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        try:
            return await coro
        except asyncio.CancelledError:
            log.warning("interrupted")
            return EXIT_FAILURE

    return asyncio.run(guarded())


async def _pull_all(
    config: Config, clients: Sequence[ClientConfig], *, wait: bool, live: bool = False
) -> int:
    """Pull ``clients``, showing their progress events (``PullDisplay``); the worst exit code.

    Reporting (metrics textfile, notifications, pings) as in the daemon; before exiting, pending
    notifications get at most ``[notify] timeout`` seconds (the summaries are printed already).
    """
    with History.open(config.server.state_dir) as history:
        history.recover_interrupted()
        reporter = Reporter(config, history, in_daemon=False)
        reporter.start()
        try:
            with PullDisplay(live=live) as display:
                codes = await _pull_parallel(
                    config, clients, history, reporter, wait=wait, emit=display.feed
                )
        finally:
            await reporter.aclose()
    return worst_exit_code(codes)


async def _pull_parallel(
    config: Config,
    clients: Sequence[ClientConfig],
    history: History,
    reporter: Reporter,
    *,
    wait: bool,
    emit: Callable[[PullEvent], None],
) -> list[int]:
    """At most ``[daemon] max_parallel`` at once, started in the order named (as the daemon
    would: a one-shot pull competes for bandwidth no more than scheduled ones). Each run takes
    its client's lock as always (``run_recorded``); one exit code per client."""
    slots = asyncio.Semaphore(config.daemon.max_parallel)
    for client in clients:
        emit(Queued(client.name))

    async def pull_one(client: ClientConfig) -> int:
        async with slots:
            reporter.run_started(client)
            outcome = await run_recorded(
                config,
                client,
                trigger="pull",
                wait=wait,
                history=history,
                progress=watch_run(client.name, emit),
            )
            emit(finished_event(outcome))
            reporter.after_run(client, outcome)
            return outcome.exit_code

    async with asyncio.TaskGroup() as group:
        runs = [group.create_task(pull_one(client)) for client in clients]
    return [run.result() for run in runs]


def worst_exit_code(codes: Iterable[int]) -> int:
    """The exit code of a command that ran several clients: a bug, then any failure, then a
    skip, then warnings."""
    return max(codes, key=_EXIT_RANK.__getitem__, default=EXIT_OK)


async def _init(config: Config, client: ClientConfig) -> int:
    try:
        status = await init_repository(config, client)
    except (PassphraseError, KeyGuardError) as exc:
        logs.print_error(f"borgtunnel: {client.name}: {exc}")
        return EXIT_FAILURE
    if status == 0:
        print(f"{client.name}: repository {client.repository} created ({client.encryption})")
        return EXIT_OK
    logs.print_error(f"{client.name}: borg init failed with status {status}")
    return EXIT_FAILURE


def run() -> None:
    """Console-script entry point: the only place that calls sys.exit."""
    sys.exit(main())
