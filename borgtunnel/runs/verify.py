"""What makes a pull ``ok``: the server reads the new archive back with its own borg and key.

The client's word is never the result. A compromised or broken client can print a well-formed
``--json`` and exit 0 without sending a byte; so a pull only counts when

* the repository committed a new transaction during the pull (a cheap directory listing),
* the archive the client named is not one an earlier run already recorded,
* the server's own ``borg info --json REPO::ARCHIVE`` finds it with the id the client reported.

``borg info`` reads the manifest and the archive's item metadata through the server's cache, not
the file data; its numbers are the ones recorded (never the client's).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

from borgtunnel import borg
from borgtunnel.server.localborg import run_local_borg

_TRANSACTION_FILE = re.compile(r"^(?:index|hints|integrity)\.(\d+)$")


class VerifyError(Exception):
    """The server could not confirm the archive; ``str()`` says what it found instead."""


def repository_transaction(repository: Path) -> int | None:
    """The newest committed transaction of a borg 1.x repository (``index.N``/``hints.N``).

    None when the directory does not look like one (missing, or another layout): the caller
    then relies on the other checks alone.
    """
    try:
        names = [entry.name for entry in repository.iterdir()]
    except OSError:
        return None
    numbers = [int(m.group(1)) for name in names if (m := _TRANSACTION_FILE.match(name))]
    return max(numbers) if numbers else None


async def verify_archive(
    *,
    borg_cmd: str,
    repository: Path,
    state_dir: Path,
    passphrase: bytes | None,
    claim: borg.ArchiveClaim | None,
    known_ids: Collection[str],
    transaction_before: int | None,
) -> borg.ArchiveStats:
    """The server's own reading of the archive the client claims; raises VerifyError."""
    if claim is None:
        raise VerifyError(
            "unverified: the client's borg printed no well-formed --json naming an archive, so "
            "nothing is counted as backed up"
        )
    if claim.id in known_ids:
        raise VerifyError(
            f"unverified: the client named archive {claim.name!r} ({claim.id[:16]}…), which an "
            "earlier run already recorded: this run wrote no new archive"
        )
    after = repository_transaction(repository)
    if transaction_before is not None and after is not None and after <= transaction_before:
        raise VerifyError(
            f"unverified: the client reported archive {claim.name!r}, but the repository "
            f"committed nothing during this run (transaction {after})"
        )
    result = await run_local_borg(
        borg.info_argv(borg_cmd, repository, claim.name),
        state_dir=state_dir,
        passphrase=passphrase,
    )
    if result.status != 0:
        raise VerifyError(
            f"unverified: the server's borg cannot read archive {claim.name!r} that the client "
            f"reported (borg info: {result.error_text()})"
        )
    stats = borg.parse_info_json(result.stdout)
    if stats is None:
        raise VerifyError("unverified: the server's borg info --json output could not be read")
    if stats.archive_id != claim.id or stats.archive != claim.name:
        raise VerifyError(
            f"unverified: the repository's archive {stats.archive!r} has id "
            f"{stats.archive_id[:16]}…, not the {claim.id[:16]}… the client reported"
        )
    return stats
