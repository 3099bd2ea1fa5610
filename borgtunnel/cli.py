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
from collections.abc import Coroutine, Sequence
from typing import Any

import structlog

from borgtunnel import __version__, logs
from borgtunnel.config import (
    ClientConfig,
    Config,
    ConfigError,
    UnknownClientError,
    config_path,
    load_config,
)
from borgtunnel.passphrase import PassphraseError
from borgtunnel.pull import pull
from borgtunnel.repository import init_repository

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_FAILURE = 2
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

    init = commands.add_parser("init", help="create a client's repository on this server")
    init.add_argument("client", metavar="NAME")

    commands.add_parser("check-config", help="validate and print the effective config as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_format, level=args.log_level)
    path = config_path(args.config)
    try:
        config = load_config(path)
        if args.command == "check-config":
            print(json.dumps(config.redacted(), indent=2))
            return EXIT_OK
        if args.command == "pull":
            clients = [config.client(name) for name in args.clients]
            return _run(_pull_all(config, clients))
        if args.command == "init":
            return _run(_init(config, config.client(args.client)))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except UnknownClientError as exc:
        print(f"borgtunnel: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    raise AssertionError(args.command)  # pragma: no cover - argparse restricts commands


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


async def _pull_all(config: Config, clients: Sequence[ClientConfig]) -> int:
    worst = EXIT_OK
    for client in clients:
        outcome = await pull(config, client)
        print(outcome.summary(), flush=True)
        worst = max(worst, outcome.exit_code)
    return worst


async def _init(config: Config, client: ClientConfig) -> int:
    try:
        status = await init_repository(config, client)
    except PassphraseError as exc:
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
