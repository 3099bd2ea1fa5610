"""The command line's grammar: every subcommand and option, grouped by what it acts on.

Kept apart from cli.py so that module stays what it says: parse, load, dispatch, exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from borgtunnel import __version__, logs
from borgtunnel.ssh import enrol

# argparse's own (private) type of what add_subparsers returns.
Commands = argparse._SubParsersAction


class _Parser(argparse.ArgumentParser):
    """A usage error is an error line too: journald files it at error priority (logs.py)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        logs.print_error(f"{self.prog}: error: {message}")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The whole parser; each group below adds its subcommands."""
    parser: argparse.ArgumentParser = _Parser(
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
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default info; warning for `pull` when stderr is a terminal",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _backup_commands(commands)
    _steering_commands(commands)
    _reading_commands(commands)
    _repository_commands(commands)
    _client_commands(commands)
    return parser


def _backup_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Pulling backups: now, on a schedule, or serving a manual ssh -R."""

    pull = commands.add_parser("pull", help="pull an archive from each named client now")
    pull.add_argument("clients", nargs="+", metavar="NAME")
    pull.add_argument(
        "--wait",
        action="store_true",
        help="if another borgtunnel process is pulling a client, wait for it instead of failing",
    )
    pull.add_argument(
        "--no-progress",
        action="store_true",
        help="no live progress line on a terminal, only the summary lines",
    )

    commands.add_parser("daemon", help="run the scheduler service (systemd Type=notify)")

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
        help="exit after this long without a connection; under socket activation 300 by "
        "default (systemd starts it again on the next), 0 for never",
    )
    serve.add_argument(
        "--max-connections", type=int, default=8, metavar="N", help="served in parallel"
    )

    init = commands.add_parser("init", help="create a client's repository on this server")
    init.add_argument("client", metavar="NAME")

    check = commands.add_parser(
        "check-config", help="validate and print the effective config as JSON"
    )
    check.add_argument(
        "--quiet",
        action="store_true",
        help="print nothing when it is valid (systemd's ExecReload= runs this before reloading)",
    )
    check.add_argument(
        "--client",
        metavar="NAME",
        help="print one client's merged settings and where each came from (built-in, "
        "[defaults], its group, its own table; and the file)",
    )
    check.add_argument("--json", action="store_true", help="with --client: machine-readable output")


def _steering_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Steering a running daemon through its control socket (docs/control.md)."""
    cancel = commands.add_parser(
        "cancel", help="cancel the daemon's queued or running pull of a client (full cleanup)"
    )
    cancel.add_argument("client", metavar="NAME")
    pause = commands.add_parser(
        "pause", help="keep a client from being scheduled (persisted; status shows it)"
    )
    pause.add_argument("client", metavar="NAME")
    pause.add_argument(
        "--until",
        metavar="TIME",
        help="an ISO time (2026-03-02T08:00, the daemon's zone without an offset) or a "
        "duration such as 36h or 1d12h; default: until `borgtunnel resume`",
    )
    resume = commands.add_parser("resume", help="let a paused client be scheduled again")
    resume.add_argument("client", metavar="NAME")


def _reading_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """What is backed up and what is not: status, history, notification test."""
    status = commands.add_parser("status", help="last and next run of every client")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    history = commands.add_parser("history", help="recorded runs of one client, newest first")
    history.add_argument("client", metavar="NAME")
    history.add_argument("--limit", type=int, default=20, metavar="N")
    history.add_argument("--json", action="store_true", help="machine-readable output")

    notify_test = commands.add_parser(
        "notify-test", help="send a test notification through every configured URL"
    )
    notify_test.add_argument(
        "client", nargs="?", metavar="NAME", help="only the URLs that apply to this client"
    )


def _repository_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """The repositories on this server: retention, check, list, restore."""
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
    restore.add_argument("--target", metavar="DIR", help="absolute directory on the client")
    restore.add_argument(
        "--source", metavar="SRC", help="only this source's dump files (docs/sources.md)"
    )
    restore.add_argument(
        "--load-into",
        metavar="DB",
        help="with --source: load the dump into this database (SQLite: this file) on the client",
    )
    restore.add_argument("--dry-run", action="store_true", help="read everything, write nothing")
    restore.add_argument("--force", action="store_true", help="restore into a non-empty target")
    restore.add_argument("--wait", action="store_true", help="wait if the client is busy")


def _client_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    """Enrolling and inspecting clients: host key, gatekeeper, authorized_keys, doctor."""
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
    _enroll_command(commands)
    doctor_cmd = commands.add_parser(
        "doctor", help="connect to a client: borg, nc/socat, forwarding, gatekeeper and policy"
    )
    doctor_cmd.add_argument("client", metavar="NAME")


def _enroll_command(commands: Commands[argparse.ArgumentParser]) -> None:
    enroll = commands.add_parser(
        "enroll",
        help="host key, authorized key, repository, first pull: each step once (resumable)",
    )
    enroll.add_argument("client", metavar="NAME")
    enroll.add_argument(
        "--fingerprint",
        metavar="SHA256:...",
        help="pin the host key only if it has this fingerprint (else: confirm on a terminal)",
    )
    enroll.add_argument(
        "--wait",
        action="store_true",
        help="wait until the client accepts the server's key and passes doctor",
    )
    enroll.add_argument(
        "--wait-timeout",
        type=_seconds,
        default=900.0,
        metavar="SECONDS",
        help="how long --wait waits at most (default 900)",
    )
    enroll.add_argument(
        "--command",
        dest="forced_command",  # not `command`: that names the subcommand
        default=enrol.GATEKEEPER_PATH,
        metavar="PATH",
        help=f"the gatekeeper on the client, in the printed line (default {enrol.GATEKEEPER_PATH})",
    )
    enroll.add_argument(
        "--no-progress", action="store_true", help="no live progress of the first pull"
    )


def _seconds(text: str) -> float:
    """A non-negative, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds (0 or more), got {text!r}")
    return value
