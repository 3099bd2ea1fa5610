"""What a pull with sources must show before it counts: every dump ended well and is archived.

Two independent checks, neither taking the client's word for the data:

* each dump's exit status, reported by the run script (``borgtunnel-source LABEL STATUS``): a
  dump that failed, was killed or ended early has written a truncated file that borg archived
  without complaint — only its status tells;
* the server's own ``borg list`` of the new archive: each dump's file is there and not empty
  (a file the client's excludes left out, or a dump that wrote nothing, is not a backup).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from borgtunnel.client.sources import SOURCES_DIR, DumpJob
from borgtunnel.runs.verify import VerifyError
from borgtunnel.server.localborg import run_local_borg

# Status lines kept per run: one per job is expected; anything beyond is a client talking.
MAX_STATUS_LINES = 256
# Exit statuses a shell reports for a program killed by a signal.
_SIGNALLED = 128


class SourcesNotArchivedError(VerifyError):
    """The verified archive lacks the dump of (or holds an empty file for) these sources."""

    def __init__(self, message: str, sources: Sequence[str]) -> None:
        super().__init__(message)
        self.sources = list(sources)


def source_names(jobs: Sequence[DumpJob]) -> list[str]:
    """The configured names of the jobs' sources, each once, in order (a PostgreSQL source
    with a list of databases has one job per database)."""
    return list(dict.fromkeys(job.source for job in jobs))


def status_problems(jobs: Sequence[DumpJob], statuses: Mapping[str, int]) -> list[str]:
    """One text per job whose dump did not exit 0, naming the source; [] when all did."""
    problems = []
    for job in jobs:
        status = statuses.get(job.label)
        if status is None:
            problems.append(f"{describe(job)}: no exit status reported (the dump did not finish)")
        elif status > _SIGNALLED:
            problems.append(
                f"{describe(job)}: the dump was killed (signal {status - _SIGNALLED}); "
                f"{job.path} in the archive is incomplete"
            )
        elif status != 0:
            problems.append(
                f"{describe(job)}: {job.argv[0]} exited with status {status}; "
                f"{job.path} in the archive is incomplete"
            )
    return problems


def describe(job: DumpJob) -> str:
    return f"source {job.label!r} ({job.kind})"


def list_argv(
    borg_cmd: str, repository: Path, *, archive: str, archive_id: str, borg2: bool
) -> list[str]:
    """The server's ``borg list --json-lines`` of the archive's sources directory."""
    if borg2:
        return [
            borg_cmd,
            "list",
            "--json-lines",
            f"--repo={repository}",
            f"aid:{archive_id}",
            SOURCES_DIR,
        ]
    return [borg_cmd, "list", "--json-lines", "--", f"{repository}::{archive}", SOURCES_DIR]


def archived_sizes(json_lines: str) -> dict[str, int]:
    """Regular files of a ``borg list --json-lines`` output: path -> size."""
    sizes: dict[str, int] = {}
    for line in json_lines.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if not isinstance(item, dict):
            continue
        path, kind, size = item.get("path"), item.get("type"), item.get("size")
        if isinstance(path, str) and kind == "-" and isinstance(size, int):
            sizes[path] = size
    return sizes


def archive_problems(jobs: Sequence[DumpJob], sizes: Mapping[str, int]) -> list[str]:
    return [text for _, text in _archive_problems(jobs, sizes)]


def _archive_problems(
    jobs: Sequence[DumpJob], sizes: Mapping[str, int]
) -> list[tuple[DumpJob, str]]:
    problems = []
    for job in jobs:
        size = sizes.get(job.path)
        if size is None:
            problems.append((job, f"{describe(job)}: {job.path} is not in the archive"))
        elif size == 0:
            problems.append((job, f"{describe(job)}: {job.path} in the archive is empty"))
    return problems


async def verify_sources(
    jobs: Sequence[DumpJob],
    *,
    borg_cmd: str,
    repository: Path,
    state_dir: Path,
    passphrase: bytes | None,
    archive: str,
    archive_id: str,
    borg2: bool,
) -> None:
    """Raises SourcesNotArchivedError naming every source missing or empty in the verified archive
    (VerifyError when the server's borg cannot list it: no source is at fault then)."""
    if not jobs:
        return
    argv = list_argv(borg_cmd, repository, archive=archive, archive_id=archive_id, borg2=borg2)
    result = await run_local_borg(argv, state_dir=state_dir, passphrase=passphrase)
    if result.status != 0:
        raise VerifyError(
            f"unverified: the server's borg cannot list the sources of archive {archive!r} "
            f"({result.error_text()})"
        )
    problems = _archive_problems(jobs, archived_sizes(result.stdout))
    if problems:
        raise SourcesNotArchivedError(
            "unverified: " + "; ".join(text for _, text in problems),
            source_names([job for job, _ in problems]),
        )
