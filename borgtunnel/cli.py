"""Command line: parse arguments, load the config, call one function, map the result to a code.

Exit codes: 0 ok, 1 borg warnings only, 2 any failure, 78 configuration error (EX_CONFIG, which
the systemd units list in RestartPreventExitStatus: restarting cannot fix a bad file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog

from borgtunnel import __version__, daemon, doctor, enrol, logs, socketserve, status, trust
from borgtunnel.config import (
    ClientConfig,
    Config,
    ConfigError,
    UnknownClientError,
    config_path,
    load_config,
)
from borgtunnel.history import History
from borgtunnel.jobs import run_recorded
from borgtunnel.keyguard import KeyGuardError
from borgtunnel.maintenance import command as maintenance_command
from borgtunnel.maintenance.retention import requested_plan
from borgtunnel.passphrase import PassphraseError
from borgtunnel.repository import init_repository
from borgtunnel.restore import restore_recorded

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_FAILURE = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug; Python's own exit 1 for a crash would read as "warning"
EXIT_CONFIG = 78

log = structlog.get_logger("borgtunnel")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="borgtunnel",
        description="The backup server pulls borg archives from its clients over SSH.",
    )
    parser.add_argument("--version", action="version", version=f"borgtunnel {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $BORGTUNNEL_CONFIG or /etc/borgtunnel/borgtunnel.toml)",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="auto: console on a terminal, JSON lines otherwise",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pull = commands.add_parser("pull", help="pull an archive from each named client now")
    pull.add_argument("clients", nargs="+", metavar="NAME")
    pull.add_argument(
        "--wait",
        action="store_true",
        help="if another borgtunnel process is pulling a client, wait for it instead of failing",
    )

    commands.add_parser("daemon", help="run the scheduler service (systemd Type=notify)")

    status = commands.add_parser("status", help="last and next run of every client")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    history = commands.add_parser("history", help="recorded runs of one client, newest first")
    history.add_argument("client", metavar="NAME")
    history.add_argument("--limit", type=int, default=20, metavar="N")
    history.add_argument("--json", action="store_true", help="machine-readable output")

    serve = commands.add_parser(
        "serve",
        help="serve borg clients on unix sockets (systemd socket activation or --listen)",
    )
    serve.add_argument("--listen", metavar="PATH", type=Path, help="create this socket ourselves")
    serve.add_argument("--client", metavar="NAME", help="the client served on --listen")
    serve.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="exit after this long without a connection (systemd starts us again on the next)",
    )
    serve.add_argument(
        "--max-connections", type=int, default=8, metavar="N", help="served in parallel"
    )

    init = commands.add_parser("init", help="create a client's repository on this server")
    init.add_argument("client", metavar="NAME")

    commands.add_parser("check-config", help="validate and print the effective config as JSON")

    maintain = commands.add_parser(
        "maintain", help="prune, compact, check client repositories now (no flag: what is due)"
    )
    maintain.add_argument("clients", nargs="+", metavar="NAME")
    maintain.add_argument("--prune", action="store_true", help="borg prune by the retention")
    maintain.add_argument("--compact", action="store_true", help="borg compact")
    maintain.add_argument("--check", action="store_true", help="borg check")
    maintain.add_argument("--dry-run", action="store_true", help="show, change nothing")
    maintain.add_argument(
        "--accept-missing",
        action="store_true",
        help="acknowledge archives that vanished without our prune (after a tamper report)",
    )
    maintain.add_argument("--wait", action="store_true", help="wait if the client is busy")

    archives = commands.add_parser("list", help="the archives of a client, read on this server")
    archives.add_argument("client", metavar="NAME")
    archives.add_argument("--json", action="store_true", help="machine-readable output")

    restore = commands.add_parser(
        "restore", help="extract an archive (or paths of it) on the client, through a tunnel"
    )
    restore.add_argument("client", metavar="NAME")
    restore.add_argument("archive", metavar="ARCHIVE")
    restore.add_argument("paths", nargs="*", metavar="PATH", help="only these paths of it")
    restore.add_argument(
        "--target", required=True, metavar="DIR", help="absolute directory on the client"
    )
    restore.add_argument("--dry-run", action="store_true", help="read everything, write nothing")
    restore.add_argument("--force", action="store_true", help="restore into a non-empty target")
    restore.add_argument("--wait", action="store_true", help="wait if the client is busy")

    trust_cmd = commands.add_parser("trust", help="add a client's host key to its known_hosts")
    trust_cmd.add_argument("client", metavar="NAME")
    trust_cmd.add_argument(
        "--fingerprint", metavar="SHA256:...", help="trust only if the offered key has this one"
    )
    trust_cmd.add_argument("--yes", action="store_true", help="do not ask")
    trust_cmd.add_argument(
        "--replace", action="store_true", help="replace a different key known for the host"
    )
    commands.add_parser(
        "gatekeeper", help="print the gatekeeper program to install on clients (forced command)"
    )
    key = commands.add_parser(
        "authorized-key", help="print the client's authorized_keys line (with the gatekeeper)"
    )
    key.add_argument("client", metavar="NAME")
    key.add_argument(
        "--command",
        dest="forced_command",  # not `command`: that names the subcommand
        default=enrol.GATEKEEPER_PATH,
        metavar="PATH",
        help=f"the gatekeeper on the client (default {enrol.GATEKEEPER_PATH})",
    )
    doctor_cmd = commands.add_parser(
        "doctor", help="connect to a client: borg, nc/socat, forwarding, gatekeeper and policy"
    )
    doctor_cmd.add_argument("client", metavar="NAME")
    return parser


def _cmd_check_config(_args: argparse.Namespace, _path: Path, config: Config) -> int:
    print(json.dumps(config.redacted(), indent=2))
    return EXIT_OK


def _cmd_pull(args: argparse.Namespace, _path: Path, config: Config) -> int:
    clients = [config.client(name) for name in args.clients]
    return _run(_pull_all(config, clients, wait=args.wait))


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
    if not args.target.startswith("/") or "\0" in args.target:
        print(
            f"borgtunnel: --target must be an absolute path, got {args.target!r}", file=sys.stderr
        )
        return EXIT_FAILURE
    return _run(_restore(config, client, args))


async def _restore(config: Config, client: ClientConfig, args: argparse.Namespace) -> int:
    outcome = await restore_recorded(
        config,
        client,
        args.archive,
        args.paths,
        args.target,
        dry_run=args.dry_run,
        force=args.force,
        wait=args.wait,
    )
    print(outcome.summary(), flush=True)
    return outcome.exit_code


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
        print(f"borgtunnel: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace, _path: Path, config: Config) -> int:
    report = asyncio.run(doctor.doctor(config, config.client(args.client)))
    print("\n".join(report.lines()))
    return report.exit_code


COMMANDS: dict[str, Callable[[argparse.Namespace, Path, Config], int]] = {
    "check-config": _cmd_check_config,
    "pull": _cmd_pull,
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
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, load the config once, dispatch. Config problems of any command exit 78."""
    args = build_parser().parse_args(argv)
    logs.configure(args.log_format, level=args.log_level)
    if args.command == "gatekeeper":  # for a client: needs no server configuration
        sys.stdout.write(enrol.gatekeeper_source())
        return EXIT_OK
    path = config_path(args.config)
    try:
        config = load_config(path)
        return COMMANDS[args.command](args, path, config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except UnknownClientError as exc:
        print(f"borgtunnel: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:
        log.exception("internal_error", command=args.command)
        print(f"borgtunnel: internal error: {exc!r} (a bug: please report it)", file=sys.stderr)
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


async def _pull_all(config: Config, clients: Sequence[ClientConfig], *, wait: bool) -> int:
    """One after the other: a one-shot run should not compete with itself for bandwidth."""
    with History.open(config.server.state_dir) as history:
        history.recover_interrupted()
        worst = EXIT_OK
        for client in clients:
            outcome = await run_recorded(config, client, trigger="pull", wait=wait, history=history)
            print(outcome.summary(), flush=True)
            worst = max(worst, outcome.exit_code)
    return worst


async def _init(config: Config, client: ClientConfig) -> int:
    try:
        status = await init_repository(config, client)
    except (PassphraseError, KeyGuardError) as exc:
        print(f"borgtunnel: {client.name}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if status == 0:
        print(f"{client.name}: repository {client.repository} created ({client.encryption})")
        return EXIT_OK
    print(f"{client.name}: borg init failed with status {status}", file=sys.stderr)
    return EXIT_FAILURE


def run() -> None:
    """Console-script entry point: the only place that calls sys.exit."""
    sys.exit(main())
