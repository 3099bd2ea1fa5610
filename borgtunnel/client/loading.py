"""Loading a source's dump back into a database on the client: ``restore --source --load-into``.

Pure builders. The remote side is the run script (remote.py) starting LOAD_SCRIPT after "go":
it checks whether the target database (or SQLite file) exists — refused without ``--force`` —,
creates it, streams ``borg extract --stdout`` of the dump into the loader, and then finishes:
a failed load leaves no database it created behind, and a SQLite file is only renamed over its
target once the whole dump loaded and borg ended well. Nothing else touches the client's disk.
Every program is built here from the source's own validated settings (config/sources.py): the
connection options and credentials of the dump (``~/.pgpass``, peer authentication, the MariaDB
option file), never a password.

What can be loaded: a PostgreSQL source of one database (custom format: ``pg_restore
--single-transaction``, plus ``--clean --if-exists`` over an existing database with
``--force``), a MariaDB source of one database (every statement naming the original is
rewritten or dropped so it loads into the database named: _MARIADB_UNNAME), a SQLite source.
Refused with the reason: a cluster-wide ``pg_dumpall``, several databases, a command's output
(restore their files with ``--target`` and load them by hand).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from borgtunnel.client.sources import (
    DumpJob,
    dump_jobs,
    mariadb_connection,
    postgres_connection,
)
from borgtunnel.config.sources import (
    ALL,
    DB_NAME_RE,
    CommandSource,
    MariadbSource,
    PostgresSource,
    SourceSettings,
    SqliteSource,
)

REQUEST_RESTORE_LOAD = "borgtunnel-restore-load"
LOAD_FAILED_PREFIX = "borgtunnel-load-failed: "

# $1 FORCE (0/1) $2 WHAT (for messages), then four programs as COUNT WORD…: CHECK (prints 1
# when the target exists; exit 64: it can never be loaded into, its output says why), CREATE
# (may be empty), LOAD (reads the dump on stdin), FINISH (may be empty; BT_RESULT=ok|failed and
# BT_CREATED=0|1 in its environment); then borg's argv.
# Refusals use the restore target script's lines and codes (runs/restore.py).
LOAD_SCRIPT = r"""
force=$1; what=$2; shift 2
first() {  # run the first $1 of the remaining arguments
  n=$1; shift; k=$#; i=0
  for a do [ $i -lt "$n" ] && set -- "$@" "$a"; i=$((i + 1)); done
  shift "$k"; "$@"
}
refuse() { echo "borgtunnel-restore-refused: $2" >&2; exit "$1"; }
n=$1; shift
exists=$(first "$n" "$@" 2>&1); st=$?
[ "$st" != 64 ] || refuse 76 "$exists"
[ "$st" = 0 ] || refuse 76 "cannot tell whether $what exists: $exists"
shift "$n"
if [ "$exists" = 1 ] && [ "$force" != 1 ]; then
  refuse 75 "$what exists; use --force to load over it"
fi
created=0
n=$1; shift
if [ "$n" -gt 0 ] && [ "$exists" != 1 ]; then
  out=$(first "$n" "$@" 2>&1) || refuse 76 "cannot create $what: $out"
  created=1
fi
shift "$n"
ln=$1; shift
tmp=$(mktemp -d) || refuse 76 "cannot create a temporary directory"
# borg extract --stdout | LOAD; each side skips the words that are not its own.
{
  i=0; while [ $i -lt "$ln" ]; do shift; i=$((i + 1)); done
  fn=$1; shift; shift "$fn"
  "$@"; echo $? > "$tmp/borg"
} | first "$ln" "$@" 2> "$tmp/load" > /dev/null
ls=$?
shift "$ln"
bs=
read -r bs < "$tmp/borg"
BT_RESULT=ok
if [ "$ls" != 0 ] || { [ "$bs" != 0 ] && [ "$bs" != 1 ]; }; then BT_RESULT=failed; fi
BT_CREATED=$created
export BT_RESULT BT_CREATED
fn=$1; shift
if [ "$fn" -gt 0 ]; then
  first "$fn" "$@" 2>> "$tmp/load" || { [ "$ls" != 0 ] || ls=finish; }
fi
if [ "$ls" != 0 ]; then
  # the last lines that say something (pg_restore ends its error with blank lines)
  why=$(grep -v '^[[:space:]]*$' "$tmp/load" | tail -n 3 | tr '\n' ' ')
  echo "borgtunnel-load-failed: loading into $what failed (status $ls): $why" >&2
fi
rm -rf -- "$tmp"
case $bs in 0|1) ;; *) exit "${bs:-2}" ;; esac
[ "$ls" = 0 ] || exit 2
exit "$bs"
"""

# mariadb-dump --databases names its database, each statement on a line of its own; these sed
# expressions make the SQL land in the database named on mariadb's command line, never in the
# original: CREATE DATABASE becomes an ALTER DATABASE of the default database with the dump's
# character set and collation (and comment); USE goes; and the ALTER DATABASE `orig` lines
# around a routine, event or trigger created under another default character set name no
# database any more. Database names have no backtick (DB_NAME_RE).
_MARIADB_UNNAME = (
    r"s|^CREATE DATABASE /\*!32312 IF NOT EXISTS\*/ `[^`]*` \(..*\);$|ALTER DATABASE \1;|",
    "/^CREATE DATABASE /d",
    "/^USE `/d",
    "s/^ALTER DATABASE `[^`]*` CHARACTER SET /ALTER DATABASE CHARACTER SET /",
)

# FINISH programs: only after a failure, and only what this load created.
_DROP_CREATED = '[ "$BT_RESULT" = failed ] && [ "$BT_CREATED" = 1 ] || exit 0; exec "$@"'
# A directory (or a link to one) is never a database file: mv would put the file inside it. A
# symlink, even a dangling one, exists: --force replaces the link, never what it points to.
_SQLITE_CHECK = (
    'if [ -d "$1" ]; then echo "$1 is a directory; --load-into names the database file"; exit 64; '
    'fi; if [ -e "$1" ] || [ -L "$1" ]; then echo 1; fi'
)
_SQLITE_LOAD = 'rm -f -- "$1.borgtunnel-load" && exec sqlite3 -bail "$1.borgtunnel-load"'
_SQLITE_FINISH = (
    'if [ "$BT_RESULT" = ok ]; then exec mv -f -- "$1.borgtunnel-load" "$1"; fi; '
    'rm -f -- "$1.borgtunnel-load"'
)


class LoadError(ValueError):
    """The source cannot be loaded as asked; ``str()`` says why and what to do instead."""


@dataclass(frozen=True)
class LoadPlan:
    """The programs of one load, and what they load into (``what``, for messages)."""

    job: DumpJob
    what: str
    check: tuple[str, ...]
    create: tuple[str, ...]
    load: tuple[str, ...]
    finish: tuple[str, ...] = ()


def source_named(sources: Sequence[SourceSettings], name: str) -> SourceSettings:
    for source in sources:
        if source.name == name:
            return source
    known = ", ".join(source.name for source in sources) or "none"
    raise LoadError(f"no source {name!r} in this client's configuration (its sources: {known})")


def source_paths(source: SourceSettings) -> list[str]:
    """The archive paths of a source's dump files (one per job)."""
    return [job.path for job in dump_jobs([source])]


def load_plan(source: SourceSettings, into: str, *, force: bool) -> LoadPlan:
    job, *more = dump_jobs([source])
    if isinstance(source, CommandSource):
        raise LoadError(
            f"source {source.name!r} is a command's output, which has no loader; restore "
            "its file with --target"
        )
    if isinstance(source, SqliteSource):
        return _sqlite_plan(job, into)
    if more or source.database == ALL:
        several = "every database" if source.database == ALL else "several databases"
        raise LoadError(
            f"source {source.name!r} dumps {several}; only a source of one database loads "
            "into a database: restore its files with --target and load them by hand"
        )
    if not DB_NAME_RE.fullmatch(into):
        raise LoadError(f"--load-into {into!r} is not a plain database name")
    if isinstance(source, PostgresSource):
        return _postgres_plan(source, job, into, force=force)
    return _mariadb_plan(source, job, into)


def _postgres_plan(source: PostgresSource, job: DumpJob, into: str, *, force: bool) -> LoadPlan:
    connection = postgres_connection(source)
    exists = f"SELECT 1 FROM pg_database WHERE datname = {_quoted(into)}"  # noqa: S608 - _quoted
    restore = ["pg_restore", *connection, "--no-owner", "--exit-on-error", "--single-transaction"]
    if force:
        restore += ["--clean", "--if-exists"]
    return LoadPlan(
        job=job,
        what=f"PostgreSQL database {into!r}",
        check=("psql", *connection, "-X", "-A", "-t", "-q", "--dbname=postgres", "-c", exists),
        create=("createdb", *connection, into),
        load=(*restore, f"--dbname={into}"),
        finish=("sh", "-c", _DROP_CREATED, "pg-finish", "dropdb", *connection, into),
    )


def _mariadb_plan(source: MariadbSource, job: DumpJob, into: str) -> LoadPlan:
    connection = mariadb_connection(source)
    schemata = "SELECT 1 FROM information_schema.schemata WHERE schema_name"
    exists = f"{schemata} = {_quoted(into)}"
    # The original's name out of the SQL, so it lands in the database named here.
    unname = " ".join(f"-e {shlex.quote(expression)}" for expression in _MARIADB_UNNAME)
    load = f'sed {unname} | "$@"'
    return LoadPlan(
        job=job,
        what=f"MariaDB database {into!r}",
        check=("mariadb", *connection, "-N", "-B", "-e", exists),
        create=("mariadb", *connection, "-e", f"CREATE DATABASE `{into}`"),
        load=("sh", "-c", load, "mariadb-load", "mariadb", *connection, into),
        finish=(
            "sh",
            "-c",
            _DROP_CREATED,
            "mariadb-finish",
            "mariadb",
            *connection,
            "-e",
            f"DROP DATABASE `{into}`",
        ),
    )


def _quoted(name: str) -> str:
    """A database name as an SQL string literal: only a plain name (DB_NAME_RE has no quote,
    backslash or backtick), checked again here because it is written into SQL text."""
    if not DB_NAME_RE.fullmatch(name):
        raise LoadError(f"{name!r} is not a plain database name")
    return f"'{name}'"


def _sqlite_plan(job: DumpJob, into: str) -> LoadPlan:
    if not into.startswith("/") or "\0" in into or "\n" in into or into.endswith("/"):
        raise LoadError(f"--load-into {into!r}: a SQLite source loads into an absolute file path")
    return LoadPlan(
        job=job,
        what=f"SQLite database {into}",
        check=("sh", "-c", _SQLITE_CHECK, "sqlite-check", into),
        create=(),
        load=("sh", "-c", _SQLITE_LOAD, "sqlite-load", into),
        finish=("sh", "-c", _SQLITE_FINISH, "sqlite-finish", into),
    )


def load_args(plan: LoadPlan, *, force: bool) -> list[str]:
    """LOAD_SCRIPT's arguments before borg's argv."""
    args = ["1" if force else "0", plan.what]
    for program in (plan.check, plan.create, plan.load, plan.finish):
        args += [str(len(program)), *program]
    return args
