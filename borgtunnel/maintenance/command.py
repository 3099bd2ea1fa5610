"""``borgtunnel maintain`` and ``borgtunnel list``: the command-line side of maintenance."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from borgtunnel import logs
from borgtunnel.config import ClientConfig, Config
from borgtunnel.history import History
from borgtunnel.maintenance import retention
from borgtunnel.maintenance.retention import Archive, Plan
from borgtunnel.maintenance.run import maintain
from borgtunnel.passphrase import PassphraseError, read_passphrase
from borgtunnel.server.localborg import run_local_borg
from borgtunnel.text import format_size, printable

EXIT_OK = 0
EXIT_FAILURE = 2


async def maintain_all(
    config: Config,
    clients: Sequence[ClientConfig],
    *,
    plan: Plan | None,
    dry_run: bool,
    accept_missing: bool,
    wait: bool,
) -> int:
    """One client after the other, one summary line each; the worst exit code."""
    with History.open(config.server.state_dir) as history:
        history.recover_interrupted()
        worst = EXIT_OK
        for client in clients:
            outcome = await maintain(
                config,
                client,
                history,
                plan=plan,
                dry_run=dry_run,
                accept_missing=accept_missing,
                wait=wait,
            )
            # Archive names (prune, tamper report) and borg's messages are the client's text.
            logs.print_summary(printable(outcome.summary()), failed=outcome.exit_code >= 2)
            worst = max(worst, outcome.exit_code)
    return worst


async def list_archives(config: Config, client: ClientConfig, *, as_json: bool) -> int:
    """``borgtunnel list``: the client's archives, read by the server's own borg."""
    try:
        passphrase = await read_passphrase(client)
    except PassphraseError as exc:
        logs.print_error(f"borgtunnel: {client.name}: {exc}")
        return EXIT_FAILURE
    result = await run_local_borg(
        retention.info_argv(config.borg_for(client), client.repository, borg2=client.borg2),
        state_dir=config.server.state_dir,
        passphrase=passphrase,
        stop_timeout=config.server.serve_stop_timeout,
    )
    if result.status != 0:
        logs.print_error(f"borgtunnel: {client.name}: borg info {printable(result.error_text())}")
        return EXIT_FAILURE
    try:
        archives = retention.parse_archives(result.stdout)
    except ValueError as exc:
        logs.print_error(f"borgtunnel: {client.name}: {printable(str(exc))}")
        return EXIT_FAILURE
    if as_json or not sys.stdout.isatty():
        # ASCII: a name's control characters (C1 ones too, which JSON leaves raw) as \u escapes.
        print(json.dumps(archives_json(archives), indent=2))
    else:
        print(archives_table(archives))
    return EXIT_OK


def archives_json(archives: Sequence[Archive]) -> list[dict[str, Any]]:
    return [
        {
            "name": a.name,
            "time": a.time,
            "id": a.id,
            "nfiles": a.nfiles,
            "original_size": a.original_size,
            "deduplicated_size": a.deduplicated_size,
        }
        for a in archives
    ]


def archives_table(archives: Sequence[Archive]) -> str:
    header = ("NAME", "TIME", "ID", "FILES", "ORIGINAL", "DEDUPLICATED")
    rows = [
        (
            # The client chose the name: escape sequences, newlines and C1 controls shown escaped.
            printable(a.name),
            a.time[:19].replace("T", " "),
            a.id[:16],
            "-" if a.nfiles is None else str(a.nfiles),
            format_size(a.original_size),
            format_size(a.deduplicated_size),
        )
        for a in archives
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    )
