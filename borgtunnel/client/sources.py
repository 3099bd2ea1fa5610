"""How each configured source is dumped on the client, and where it lands in the archive. Pure.

A source becomes one or more dump jobs. Each job writes to a named pipe that the client's
``borg create --read-special`` reads like a file, at a path relative to the run's private
directory (borg stores a relative path as given, so the archive holds
``borgtunnel-sources/TYPE/NAME.EXT`` with borg 1.2, 1.4 and 2 alike). No dump touches the disk.

Formats, chosen for a consistent copy that restores:

* PostgreSQL: ``pg_dump --format=custom --compress=0`` per database (uncompressed, so borg's
  chunks deduplicate from one pull to the next and borg's own compression applies; one
  snapshot per database; restore with ``pg_restore``), or ``pg_dumpall`` (plain SQL) for
  ``database = "all"``. ``--no-password``: a prompt would hang the run, credentials come
  from ``~/.pgpass`` or peer authentication.
* MariaDB: ``mariadb-dump --single-transaction`` (one consistent InnoDB snapshot across the
  databases named), with routines, events and triggers; ``--defaults-file`` first, as the
  program requires.
* SQLite: ``sqlite3 -readonly FILE .dump``. The shell's ``.dump`` runs inside one read
  transaction (``SAVEPOINT``), so the SQL is one consistent state; the online backup API
  (``.backup``) needs a seekable destination file and cannot write into a pipe. It waits up to
  10 minutes for a writer's lock, and its output must end in ``COMMIT;`` (see _SQLITE_DUMP).
* command: the program's standard output as is; its exit status is the only word on whether
  the data is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from borgtunnel.config.sources import (
    ALL,
    CommandSource,
    MariadbSource,
    PostgresSource,
    SourceSettings,
    SqliteSource,
)

# The top directory of every source in the archive.
SOURCES_DIR = "borgtunnel-sources"
# The exclude file the run script fills with the special files found under the paths, relative
# to the run's private directory (borg's working directory there).
SPECIAL_EXCLUDES = "borgtunnel-special-files"
# Marks the start of the sources block in a run's arguments (borgtunnel/client/remote.py).
SOURCES_MARK = "borgtunnel-sources"
# What `borg create` gets on top of the client's own options when a run has sources.
CREATE_OPTIONS = ("--read-special", f"--exclude-from={SPECIAL_EXCLUDES}")


@dataclass(frozen=True)
class DumpJob:
    """One dump program writing one file of the archive.

    ``label`` names it in the run's status line and in errors: the source's name, or
    ``NAME/DATABASE`` for one of a PostgreSQL source's databases.
    """

    label: str
    source: str
    kind: str
    path: str  # relative: borgtunnel-sources/TYPE/FILE
    argv: tuple[str, ...]


def dump_jobs(sources: Sequence[SourceSettings]) -> list[DumpJob]:
    jobs: list[DumpJob] = []
    for source in sources:
        jobs.extend(_jobs_of(source))
    return jobs


def _jobs_of(source: SourceSettings) -> list[DumpJob]:
    if isinstance(source, PostgresSource):
        return _postgres_jobs(source)
    if isinstance(source, MariadbSource):
        return [_job(source, source.name, f"{source.name}.sql", _mariadb_argv(source))]
    if isinstance(source, SqliteSource):
        return [_job(source, source.name, f"{source.name}.sql", _sqlite_argv(source))]
    if isinstance(source, CommandSource):
        return [_job(source, source.name, source.name, source.command)]
    raise AssertionError(f"unknown source {source!r}")  # pragma: no cover - the union is closed


def _job(source: SourceSettings, label: str, file: str, argv: Sequence[str]) -> DumpJob:
    return DumpJob(
        label=label,
        source=source.name,
        kind=source.type,
        path=f"{SOURCES_DIR}/{source.type}/{file}",
        argv=tuple(argv),
    )


def postgres_connection(source: PostgresSource) -> list[str]:
    options = ["--no-password"]
    if source.user is not None:
        options.append(f"--username={source.user}")
    if source.host is not None:
        options.append(f"--host={source.host}")
    if source.port is not None:
        options.append(f"--port={source.port}")
    return options


def _postgres_jobs(source: PostgresSource) -> list[DumpJob]:
    connection = postgres_connection(source)
    if source.database == ALL:
        return [_job(source, source.name, f"{source.name}.sql", ["pg_dumpall", *connection])]
    if isinstance(source.database, str):
        argv = [
            "pg_dump",
            "--format=custom",
            "--compress=0",
            *connection,
            f"--dbname={source.database}",
        ]
        return [_job(source, source.name, f"{source.name}.dump", argv)]
    return [
        _job(
            source,
            f"{source.name}/{database}",
            f"{source.name}/{database}.dump",
            ["pg_dump", "--format=custom", "--compress=0", *connection, f"--dbname={database}"],
        )
        for database in source.database
    ]


# sqlite3 exits 0 even when .dump failed (a locked database gives "ROLLBACK; -- due to
# errors" as the last line): awk passes the SQL through and fails unless it ends in COMMIT.
# The pipeline's status is awk's; a sqlite3 that could not open the file printed nothing.
_SQLITE_DUMP = (
    'sqlite3 -readonly -bail -cmd ".timeout 600000" "$1" .dump | '
    "awk '{ print } END { exit $0 != \"COMMIT;\" }'"
)


def _sqlite_argv(source: SqliteSource) -> list[str]:
    return ["sh", "-c", _SQLITE_DUMP, "sqlite-dump", source.path]


def mariadb_connection(source: MariadbSource) -> list[str]:
    """How the dump (and a load: client/loading.py) reaches the server and logs in."""
    options = []
    if source.defaults_file is not None:
        options.append(f"--defaults-file={source.defaults_file}")  # must come first
    if source.socket is not None:
        options.append(f"--socket={source.socket}")
    if source.host is not None:
        options.append(f"--host={source.host}")
    if source.port is not None:
        options.append(f"--port={source.port}")
    return options


def _mariadb_argv(source: MariadbSource) -> list[str]:
    argv = ["mariadb-dump", *mariadb_connection(source)]
    argv += ["--single-transaction", "--routines", "--events", "--triggers"]
    if source.database == ALL:
        argv.append("--all-databases")
    else:
        names = (source.database,) if isinstance(source.database, str) else source.database
        argv += ["--databases", *names]
    return argv


def sources_args(paths: Sequence[str], jobs: Sequence[DumpJob]) -> list[str]:
    """The block of a run's arguments the run script reads before borg's argv:
    ``borgtunnel-sources NPATHS PATH… NJOBS (LABEL RELPATH ARGC ARGV…)…``."""
    args = [SOURCES_MARK, str(len(paths)), *paths, str(len(jobs))]
    for job in jobs:
        args += [job.label, job.path, str(len(job.argv)), *job.argv]
    return args
