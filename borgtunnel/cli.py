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

from borgtunnel import __version__, daemon, logs, socketserve, status
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
from borgtunnel.passphrase import PassphraseError
from borgtunnel.repository import init_repository

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


COMMANDS: dict[str, Callable[[argparse.Namespace, Path, Config], int]] = {
    "check-config": _cmd_check_config,
    "pull": _cmd_pull,
    "init": _cmd_init,
    "daemon": _cmd_daemon,
    "status": _cmd_status,
    "history": _cmd_history,
    "serve": _cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, load the config once, dispatch. Config problems of any command exit 78."""
    args = build_parser().parse_args(argv)
    logs.configure(args.log_format, level=args.log_level)
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
