"""``sources`` of a client: database dumps and commands streamed into the pull's archive.

Each source is a table with a ``type`` and a ``name`` (unique per client). What a source may say
is narrow on purpose: every value ends up as one argv word of a dump program on the client, so
names are plain identifiers and paths absolute; credentials are never a key here (the client's
own ``~/.pgpass``, peer authentication or a MariaDB option file hold them), so none can reach an
argv or environment on either host. How each source is dumped: borgtunnel/client/sources.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A source's name is a file name in the archive and a word in the run's status line.
SOURCE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# A database or role name as an argv word: no option look-alike, no path, no blank.
DB_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.$-]{0,62}$")
# A host name, an address, or (PostgreSQL) an absolute socket directory.
HOST_RE = re.compile(r"^(?:/[^\0\n]{0,200}|[A-Za-z0-9_][A-Za-z0-9_.:-]{0,252})$")
ALL = "all"
MAX_SOURCES = 32


class _SourceBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str

    @field_validator("name")
    @classmethod
    def _name_valid(cls, value: str) -> str:
        if not SOURCE_NAME_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a source name: 1-64 of a-z, 0-9, '_' and '-', "
                "starting with a letter or digit"
            )
        return value


def _db_name(value: str, what: str) -> str:
    if not DB_NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a plain {what} name (letters, digits, '_', '.', '$', '-'; "
            "not starting with '-' or '.')"
        )
    return value


def _databases(value: str | tuple[str, ...]) -> str | tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not items:
        raise ValueError("names no database: give one name, a list, or 'all'")
    if ALL in items and len(items) > 1:
        raise ValueError("'all' stands alone, not in a list")
    if len(set(items)) != len(items):
        raise ValueError("names a database twice")
    for item in items:
        _db_name(item, "database")
    return value


def _absolute(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.startswith("/") or "\0" in value or "\n" in value:
        raise ValueError(f"{value!r} must be an absolute path on the client")
    return value


class _DatabaseSource(_SourceBase):
    """A database server's dump: which databases (one, a list, or "all") and on which port."""

    database: str | tuple[str, ...]
    port: Annotated[int, Field(ge=1, le=65535)] | None = None

    @field_validator("database")
    @classmethod
    def _databases_valid(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        return _databases(value)


class PostgresSource(_DatabaseSource):
    """pg_dump (custom format) per database, or pg_dumpall for ``database = "all"``."""

    type: Literal["postgresql"]
    # A database role (pg_dump --username); with peer authentication it must be the login user.
    user: str | None = None
    # A host name or an absolute socket directory (libpq reads a leading '/' as one).
    host: str | None = None

    @field_validator("user")
    @classmethod
    def _user_valid(cls, value: str | None) -> str | None:
        return None if value is None else _db_name(value, "role")

    @field_validator("host")
    @classmethod
    def _host_valid(cls, value: str | None) -> str | None:
        if value is not None and not HOST_RE.fullmatch(value):
            raise ValueError(f"{value!r} is neither a host name nor an absolute socket directory")
        return value


class MariadbSource(_DatabaseSource):
    """mariadb-dump --single-transaction of some databases or all of them."""

    type: Literal["mariadb"]
    # An option file on the client holding user and password ([client] or [mariadb-dump]).
    defaults_file: str | None = None
    socket: str | None = None
    host: str | None = None

    @field_validator("defaults_file", "socket")
    @classmethod
    def _paths_valid(cls, value: str | None) -> str | None:
        return _absolute(value)

    @field_validator("host")
    @classmethod
    def _host_valid(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith("/") or not HOST_RE.fullmatch(value)):
            raise ValueError(f"{value!r} is not a host name (a socket path goes in 'socket')")
        return value


class SqliteSource(_SourceBase):
    """sqlite3's ``.dump`` of one database file: SQL text read in one read transaction."""

    type: Literal["sqlite"]
    path: str

    @field_validator("path")
    @classmethod
    def _path_valid(cls, value: str) -> str:
        return _absolute(value) or value


class CommandSource(_SourceBase):
    """Any program whose standard output is the data; its exit status says if it is complete."""

    type: Literal["command"]
    command: tuple[str, ...] = Field(min_length=1)

    @field_validator("command")
    @classmethod
    def _command_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value[0] or value[0].startswith("-"):
            raise ValueError(f"the program {value[0]!r} must be a name or a path")
        for word in value:
            if "\0" in word:
                raise ValueError("an argument holds a NUL character")
        return value


SourceSettings = Annotated[
    PostgresSource | MariadbSource | SqliteSource | CommandSource, Field(discriminator="type")
]
SOURCE_TYPES = ("postgresql", "mariadb", "sqlite", "command")


def check_unique(sources: tuple[SourceSettings, ...]) -> tuple[SourceSettings, ...]:
    if len(sources) > MAX_SOURCES:
        raise ValueError(f"at most {MAX_SOURCES} sources per client")
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise ValueError(f"two sources are named {source.name!r}: names are unique per client")
        seen.add(source.name)
    return sources
