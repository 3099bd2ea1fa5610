"""A source's settings as ONE table of cases, for both places that turn them into dump jobs.

The server (borgtunnel/config/sources.py + borgtunnel/client/sources.py ``dump_jobs``) and the
gatekeeper (``[source NAME]`` sections of its policy, borgtunnel/client/gatekeeper.py
``source_jobs``) must give the same jobs — label, archive path and argv word for word — for
every row, and refuse the same bad settings: the gatekeeper matches the server's jobs against
its own, so any drift between the two would refuse a correct pull or, worse, accept one the
policy does not list. tests/test_gatekeeper_sources_unit.py runs each row against both.

Each row holds the server's TOML table (as a Python mapping) and the policy's INI section
(key -> text), spelled as an administrator would write each.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SourceCase:
    id: str
    server: dict[str, object]
    policy: dict[str, str] = field(default_factory=dict)


VALID = [
    SourceCase(
        "pg-one",
        {"type": "postgresql", "name": "app", "database": "app"},
        {"type": "postgresql", "database": "app"},
    ),
    SourceCase(
        "pg-connection",
        {
            "type": "postgresql",
            "name": "app",
            "database": "app",
            "user": "backup",
            "host": "/var/run/postgresql",
            "port": 5433,
        },
        {
            "type": "postgresql",
            "database": "app",
            "user": "backup",
            "host": "/var/run/postgresql",
            "port": "5433",
        },
    ),
    SourceCase(
        "pg-several",
        {"type": "postgresql", "name": "pg", "database": ["app", "billing"], "host": "db.lan"},
        {"type": "postgresql", "database": "\napp\nbilling", "host": "db.lan"},
    ),
    SourceCase(
        "pg-all",
        {"type": "postgresql", "name": "cluster", "database": "all", "port": 5432},
        {"type": "postgresql", "database": "all", "port": "5432"},
    ),
    SourceCase(
        "mariadb-one",
        {
            "type": "mariadb",
            "name": "shop",
            "database": "shop",
            "defaults_file": "/root/.backup.cnf",
            "socket": "/run/mysqld/mysqld.sock",
        },
        {
            "type": "mariadb",
            "database": "shop",
            "defaults_file": "/root/.backup.cnf",
            "socket": "/run/mysqld/mysqld.sock",
        },
    ),
    SourceCase(
        "mariadb-several-tcp",
        {
            "type": "mariadb",
            "name": "m",
            "database": ["a", "b.c"],
            "host": "127.0.0.1",
            "port": 3307,
        },
        {"type": "mariadb", "database": "a b.c", "host": "127.0.0.1", "port": "3307"},
    ),
    SourceCase(
        "mariadb-all",
        {"type": "mariadb", "name": "m", "database": "all"},
        {"type": "mariadb", "database": "all"},
    ),
    SourceCase(
        "sqlite",
        {"type": "sqlite", "name": "notes", "path": "/var/lib/notes/notes db.sqlite"},
        {"type": "sqlite", "path": "/var/lib/notes/notes db.sqlite"},
    ),
    SourceCase(
        "command",
        {"type": "command", "name": "ldap", "command": ["slapcat", "-n", "1"]},
        {"type": "command", "command": "slapcat -n 1"},
    ),
    SourceCase(
        "command-quoted",
        {"type": "command", "name": "x", "command": ["sh", "-c", "echo 'a b' | tr a-z A-Z"]},
        {"type": "command", "command": "sh -c \"echo 'a b' | tr a-z A-Z\""},
    ),
]

# Settings both must refuse: (id, server table, policy section).
INVALID = [
    SourceCase(
        "name-upper",
        {"type": "command", "name": "App", "command": ["x"]},
        {"type": "command", "command": "x"},
    ),
    SourceCase(
        "name-slash",
        {"type": "command", "name": "a/b", "command": ["x"]},
        {"type": "command", "command": "x"},
    ),
    SourceCase(
        "db-option",
        {"type": "postgresql", "name": "a", "database": "-x"},
        {"type": "postgresql", "database": "-x"},
    ),
    SourceCase(
        "db-glued-option",
        {"type": "postgresql", "name": "a", "database": "--dbname=x"},
        {"type": "postgresql", "database": "--dbname=x"},
    ),
    SourceCase(
        "db-all-in-list",
        {"type": "postgresql", "name": "a", "database": ["all", "b"]},
        {"type": "postgresql", "database": "all b"},
    ),
    SourceCase(
        "db-twice",
        {"type": "mariadb", "name": "a", "database": ["b", "b"]},
        {"type": "mariadb", "database": "b b"},
    ),
    SourceCase(
        "host-option",
        {"type": "postgresql", "name": "a", "database": "a", "host": "-h"},
        {"type": "postgresql", "database": "a", "host": "-h"},
    ),
    SourceCase(
        "role-option",
        {"type": "postgresql", "name": "a", "database": "a", "user": "-U"},
        {"type": "postgresql", "database": "a", "user": "-U"},
    ),
    SourceCase(
        "port-range",
        {"type": "postgresql", "name": "a", "database": "a", "port": 70000},
        {"type": "postgresql", "database": "a", "port": "70000"},
    ),
    SourceCase(
        "mariadb-host-path",
        {"type": "mariadb", "name": "a", "database": "a", "host": "/run/x.sock"},
        {"type": "mariadb", "database": "a", "host": "/run/x.sock"},
    ),
    SourceCase(
        "relative-defaults-file",
        {"type": "mariadb", "name": "a", "database": "a", "defaults_file": "my.cnf"},
        {"type": "mariadb", "database": "a", "defaults_file": "my.cnf"},
    ),
    SourceCase(
        "sqlite-relative",
        {"type": "sqlite", "name": "a", "path": "notes.db"},
        {"type": "sqlite", "path": "notes.db"},
    ),
    SourceCase(
        "command-option",
        {"type": "command", "name": "a", "command": ["-rf"]},
        {"type": "command", "command": "-rf"},
    ),
    SourceCase(
        "unknown-key",
        {"type": "sqlite", "name": "a", "path": "/x", "password": "p"},
        {"type": "sqlite", "path": "/x", "password": "p"},
    ),
    SourceCase(
        "unknown-type",
        {"type": "mongodb", "name": "a", "database": "a"},
        {"type": "mongodb", "database": "a"},
    ),
]
