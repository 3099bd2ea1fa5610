"""Tamper-aware compact: did an archive vanish without our own prune? Pure.

A client reaches its repository only through ``borg serve --append-only``: its deletes and
prunes are written as new transactions, but the old segments stay until a server-side
``borg compact`` removes them for good. So before compacting, the archives in the repository are
compared with those the history expects (created by verified pulls, minus what our own prune
removed or an administrator accepted). A missing one means a delete we did not do: compacting
now would make it permanent, so compact (and prune, whose transactions would complicate the
roll-back) is refused until an administrator looks and runs ``maintain NAME --accept-missing``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TamperReport:
    """Archives the history expects that the repository no longer has."""

    client: str
    repository: Path
    missing: tuple[str, ...]

    def message(self) -> str:
        names = ", ".join(repr(name) for name in self.missing)
        return (
            f"tampering suspected: {len(self.missing)} archive(s) vanished from {self.repository} "
            f"without a prune by borgtunnel: {names}. Compact (and prune) refused: they would "
            "make the deletion permanent. The repository is append-only for the client, so the "
            "data is still there: to roll back, stop borgtunnel, find the last transaction from "
            f"before the deletion in {self.repository / 'transactions'}, remove the segment files "
            f"in {self.repository / 'data'} with higher numbers and the index.*, hints.* and "
            "integrity.* files, then run borg check (borg docs: 'append-only mode'); look at "
            "the client (it had write access to this repository's log). If the removal was "
            f"intended, run `borgtunnel maintain {self.client} --accept-missing`."
        )


def missing_archives(expected: Iterable[str], present: Iterable[str]) -> tuple[str, ...]:
    """Expected names not present, sorted (new archives the client made are not a problem)."""
    return tuple(sorted(set(expected) - set(present)))


def tamper_report(
    client: str, repository: Path, expected: Iterable[str], present: Iterable[str]
) -> TamperReport | None:
    missing = missing_archives(expected, present)
    return TamperReport(client, repository, missing) if missing else None
