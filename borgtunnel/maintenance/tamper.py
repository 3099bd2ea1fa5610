"""Tamper-aware compact: did an archive vanish without our own prune? Pure.

A client reaches its repository only through ``borg serve --append-only``: its deletes and
prunes are written as new transactions, but the old segments stay until a server-side
``borg compact`` removes them for good. So before compacting, the archives in the repository are
compared with those the history expects (created by verified pulls, minus what our own prune
removed or an administrator accepted). A missing one means a delete we did not do: compacting
now would make it permanent, so compact (and prune, whose transactions would complicate the
roll-back) is refused until an administrator looks and runs ``maintain NAME --accept-missing``.

The other direction: an archive in the repository that no verified pull made (the client can
add any number, with any name and date) is reported too; retention ignores it (keeprules.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from borgtunnel.config import ClientConfig
from borgtunnel.maintenance.retention import Archive


@dataclass(frozen=True)
class TamperReport:
    """Archives the history expects that the repository no longer has (``missing``), or has
    under another id than before (``replaced``: deleted and made again under the same name)."""

    client: str
    repository: Path
    missing: tuple[str, ...]
    replaced: tuple[str, ...] = ()
    # A borg 2 repository: ``missing`` holds archive ids, and the way back differs.
    borg2: bool = False

    def message(self) -> str:
        if self.borg2:
            return self._borg2_message()
        repo = self.repository
        found = []
        if self.missing:
            names = ", ".join(repr(name) for name in self.missing)
            found.append(
                f"{len(self.missing)} archive(s) vanished from {repo} without a prune by "
                f"borgtunnel: {names}"
            )
        if self.replaced:
            names = ", ".join(repr(name) for name in self.replaced)
            found.append(
                f"{len(self.replaced)} archive(s) in {repo} were replaced by another archive "
                f"of the same name (the id changed): {names}"
            )
        return (
            f"tampering suspected: {'; '.join(found)}. Compact and prune refused: they would "
            "make the deletion permanent. The client's serve is append-only, so the data is "
            "still there. "
            f"To roll back: stop borgtunnel; in {repo / 'transactions'} find the last "
            "transaction N from before the deletion; remove the segment files numbered above N "
            f"under {repo / 'data'} and {repo}/index.*, hints.*, integrity.*; run borg check; "
            "then remove this repository's borg cache (.cache/borg/ID) and "
            ".config/borg/security/ID/manifest-timestamp, which are newer than the rolled-back "
            "repository, on the server (in state_dir/borg) and on the client "
            "(docs/maintenance.md: 'Rolling back a client's deletes'). Look at the client: it "
            "deleted through its tunnel. If "
            f"the removal was intended: `borgtunnel maintain {self.client} --accept-missing`."
        )

    def _borg2_message(self) -> str:
        ids = ", ".join(archive_id[:16] for archive_id in self.missing)
        return (
            f"tampering suspected: {len(self.missing)} archive(s) vanished from "
            f"{self.repository} without a prune by borgtunnel (ids {ids}…). Compact and prune "
            "refused: compact would make the deletion permanent. The client's serve refuses "
            "deletes (--permissions), so look at who else can write the repository. borg 2 "
            "deletes softly: until a compact, the server's `borg undelete --repo="
            f"{self.repository} --list` brings them back. If the removal was intended: "
            f"`borgtunnel maintain {self.client} --accept-missing`."
        )


def missing_archives(expected: Iterable[str], present: Iterable[str]) -> tuple[str, ...]:
    """Expected names not present, sorted (new archives the client made are not a problem)."""
    return tuple(sorted(set(expected) - set(present)))


def replaced_archives(known_ids: Mapping[str, str], present: Mapping[str, str]) -> tuple[str, ...]:
    """Names present now under another id than the one remembered for them, sorted."""
    return tuple(
        sorted(name for name, old in known_ids.items() if name in present and present[name] != old)
    )


def tamper_report(
    client: str,
    repository: Path,
    expected: Iterable[str],
    present: Mapping[str, str],
    known_ids: Mapping[str, str] | None = None,
    *,
    borg2: bool = False,
) -> TamperReport | None:
    """``present``: name (borg 2: id) -> id in the repository now; ``known_ids``: name -> id
    seen before."""
    missing = missing_archives(expected, present)
    replaced = replaced_archives(known_ids or {}, present)
    if not (missing or replaced):
        return None
    return TamperReport(client, repository, missing, replaced, borg2=borg2)


def unverified_message(client: ClientConfig, archives: Sequence[Archive], limit: int = 10) -> str:
    """What to say about archives in the repository that no verified pull made; the same
    words for the same archives, whatever order the listing had."""
    archives = sorted(archives, key=lambda a: (a.name, a.id))
    shown = ", ".join(
        f"{archive.name!r} (id {archive.id[:16]}, dated {archive.time[:19]!r} by its maker)"
        for archive in archives[:limit]
    )
    more = f" and {len(archives) - limit} more" if len(archives) > limit else ""
    repo = client.repository
    how = (
        f"`borg delete --repo={repo} aid:ID`"
        if client.borg2
        else f"`borg delete {repo}::NAME` (a name starting with '-' after `--`)"
    )
    return (
        f"tampering suspected: {len(archives)} archive(s) in {repo} were not made by a verified "
        f"pull: {shown}{more}. The client wrote them through its tunnel (look at the client), "
        "or a pull was cut off before the server read its archive back. Retention neither "
        "counts them nor deletes them: the time in an archive is the client's word, so they "
        "cannot push a verified archive out. If they are not wanted, delete them with the "
        f"server's borg: {how}. [{len(archives)} unverified, fingerprint "
        f"{fingerprint(a.id for a in archives)}]"
    )


def fingerprint(ids: Iterable[str]) -> str:
    """A short digest of a set of archive ids: tells whether a report is news."""
    return hashlib.sha256(" ".join(sorted(ids)).encode()).hexdigest()[:12]
