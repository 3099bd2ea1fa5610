"""What makes a pull ``ok``: the server reads the new archive back with its own borg and key.

The client's word is never the result. A compromised or broken client can print a well-formed
``--json`` and exit 0 without sending a byte; so a pull only counts when

* the repository changed during the pull, seen on the server's disk: borg 1.x committed a new
  transaction; borg 2 holds a new object named by the claimed id in its ``archives/`` namespace,
* the archive the client named is not one an earlier run already recorded,
* the server's own ``borg info --json`` finds it with the name and id the client reported
  (1.x: ``REPO::NAME``; borg 2, whose names are series: the archive with that id),
* its name does not start with '-' or whitespace: the name reaches hooks (``{archive}``,
  ``BORGTUNNEL_ARCHIVE``), where ``--output=x`` would be an option (text.option_like).

``borg info`` reads the manifest and the archive's item metadata through the server's cache, not
the file data; its numbers are the ones recorded (never the client's).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from borgtunnel import borg
from borgtunnel import borg2 as borg2_argv
from borgtunnel.server.localborg import run_local_borg
from borgtunnel.text import option_like

_TRANSACTION_FILE = re.compile(r"^(?:index|hints|integrity)\.(\d+)$")


class VerifyError(Exception):
    """The server could not confirm the archive; ``str()`` says what it found instead."""


@dataclass(frozen=True)
class RepositoryState:
    """What the server's disk says before a pull, to compare with afterwards.

    ``transaction``: borg 1.x's newest committed transaction; ``archives``: the object names in
    borg 2's ``archives/`` namespace. None where the directory does not look like one (missing,
    another layout): the other checks then stand alone.
    """

    transaction: int | None = None
    archives: frozenset[str] | None = None
    # borg 1.x: the newest segment file under data/; a write that was never committed (a quota
    # stopped it, the client left) still shows here until the next exclusive open cleans it up.
    segment: int | None = None


def repository_transaction(repository: Path) -> int | None:
    """The newest committed transaction of a borg 1.x repository (``index.N``/``hints.N``)."""
    try:
        names = [entry.name for entry in repository.iterdir()]
    except OSError:
        return None
    numbers = [int(m.group(1)) for name in names if (m := _TRANSACTION_FILE.match(name))]
    return max(numbers) if numbers else None


def repository_segment(repository: Path) -> int | None:
    """The newest segment file of a borg 1.x repository (``data/D/N``, numbered dirs and files)."""
    try:
        dirs = [int(e.name) for e in (repository / "data").iterdir() if e.name.isdigit()]
        for number in sorted(dirs, reverse=True):
            folder = repository / "data" / str(number)
            names = [int(e.name) for e in folder.iterdir() if e.name.isdigit()]
            if names:
                return max(names)
    except (OSError, ValueError):
        return None
    return None


def repository_archives(repository: Path) -> frozenset[str] | None:
    """The archive objects of a borg 2 repository: one file per archive, named by its id."""
    try:
        return frozenset(entry.name for entry in (repository / "archives").iterdir())
    except OSError:
        return None


def repository_state(repository: Path, *, borg2: bool) -> RepositoryState:
    if borg2:
        return RepositoryState(archives=repository_archives(repository))
    return RepositoryState(
        transaction=repository_transaction(repository), segment=repository_segment(repository)
    )


def _check_changed(
    repository: Path, claim: borg.ArchiveClaim, before: RepositoryState, *, borg2: bool
) -> None:
    after = repository_state(repository, borg2=borg2)
    if borg2:
        if before.archives is None or after.archives is None:
            return
        if claim.id not in after.archives or claim.id in before.archives:
            raise VerifyError(
                f"unverified: the client reported archive {claim.name!r} ({claim.id[:16]}…), but "
                "no archive object of that id was written to the repository during this run"
            )
        return
    if (
        before.transaction is not None
        and after.transaction is not None
        and after.transaction <= before.transaction
    ):
        raise VerifyError(
            f"unverified: the client reported archive {claim.name!r}, but the repository "
            f"committed nothing during this run (transaction {after.transaction})"
        )


async def verify_archive(
    *,
    borg_cmd: str,
    repository: Path,
    state_dir: Path,
    passphrase: bytes | None,
    claim: borg.ArchiveClaim | None,
    known_ids: Collection[str],
    before: RepositoryState,
    borg2: bool = False,
) -> borg.ArchiveStats:
    """The server's own reading of the archive the client claims; raises VerifyError."""
    if claim is None:
        raise VerifyError(
            "unverified: the client's borg printed no well-formed --json naming an archive, so "
            "nothing is counted as backed up"
        )
    if (problem := option_like(claim.name)) is not None:
        raise VerifyError(
            f"unverified: the client named its archive {claim.name!r}, which {problem}; "
            "borgtunnel never accepts such a name (it reaches hooks as {archive})"
        )
    if claim.id in known_ids:
        raise VerifyError(
            f"unverified: the client named archive {claim.name!r} ({claim.id[:16]}…), which an "
            "earlier run already recorded: this run wrote no new archive"
        )
    _check_changed(repository, claim, before, borg2=borg2)
    argv = (
        borg2_argv.info_argv(borg_cmd, repository, claim.id)
        if borg2
        else borg.info_argv(borg_cmd, repository, claim.name)
    )
    result = await run_local_borg(
        argv,
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
