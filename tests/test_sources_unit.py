"""Pure parts of sources: config validation naming the key, dump argv, status lines, checks."""

from __future__ import annotations

import tomllib

import pytest

from borgtunnel.client import sources
from borgtunnel.client.remote import parse_source_line, run_command
from borgtunnel.config import ConfigError, parse_config
from borgtunnel.runs.sources import archive_problems, archived_sizes, status_problems

BASE = """
[clients.c1]
host = "h"
repository = "/srv/borg/c1"
paths = ["/etc"]
encryption = "none"
"""


def _load(extra: str) -> list[sources.DumpJob]:
    config = parse_config(tomllib.loads(BASE + extra))
    return sources.dump_jobs(config.clients["c1"].sources)


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ('type = "postgresql"\nname = "Bad"\ndatabase = "a"', "sources[0].postgresql.name"),
        ('type = "postgresql"\nname = "a"\ndatabase = "-x"', "sources[0].postgresql.database"),
        ('type = "postgresql"\nname = "a"\ndatabase = ["all", "b"]', "postgresql.database"),
        ('type = "postgresql"\nname = "a"\ndatabase = "a"\nhost = "-h"', "postgresql.host"),
        ('type = "mariadb"\nname = "a"\ndatabase = "a"\ndefaults_file = "x"', "defaults_file"),
        ('type = "sqlite"\nname = "a"\npath = "rel.db"', "sources[0].sqlite.path"),
        ('type = "command"\nname = "a"\ncommand = []', "sources[0].command.command"),
        ('type = "command"\nname = "a"\ncommand = ["-x"]', "sources[0].command.command"),
        ('type = "mongodb"\nname = "a"', "clients.c1.sources[0]"),
        ('type = "sqlite"\nname = "a"\npath = "/a"\npassword = "x"', "sqlite.password"),
    ],
)
def test_a_bad_source_is_refused_naming_the_key(table: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        _load("[[clients.c1.sources]]\n" + table + "\n")


def test_source_names_are_unique_per_client() -> None:
    table = '[[clients.c1.sources]]\ntype = "sqlite"\nname = "a"\npath = "/a"\n'
    with pytest.raises(ConfigError, match="two sources are named 'a'"):
        _load(table + table)


def test_sources_are_inherited_and_extended() -> None:
    text = """
[defaults]
sources = [{ type = "sqlite", name = "base", path = "/b.db" }]
[clients.c1]
host = "h"
repository = "/srv/borg/c1"
paths = ["/etc"]
encryption = "none"
sources = { extend = [{ type = "command", name = "extra", command = ["true"] }] }
"""
    config = parse_config(tomllib.loads(text))
    assert [s.name for s in config.clients["c1"].sources] == ["base", "extra"]


def test_each_type_dumps_to_its_stable_path() -> None:
    jobs = _load(
        """
[[clients.c1.sources]]
type = "postgresql"
name = "one"
database = "app"
user = "backup"
host = "/run/pg"
port = 5433
[[clients.c1.sources]]
type = "postgresql"
name = "two"
database = ["a", "b"]
[[clients.c1.sources]]
type = "postgresql"
name = "every"
database = "all"
[[clients.c1.sources]]
type = "mariadb"
name = "shop"
database = ["x", "y"]
defaults_file = "/etc/b.cnf"
[[clients.c1.sources]]
type = "sqlite"
name = "wiki"
path = "/var/wiki.db"
[[clients.c1.sources]]
type = "command"
name = "ldap"
command = ["slapcat", "-n", "1"]
"""
    )
    by_label = {job.label: job for job in jobs}
    assert {label: job.path for label, job in by_label.items()} == {
        "one": "borgtunnel-sources/postgresql/one.dump",
        "two/a": "borgtunnel-sources/postgresql/two/a.dump",
        "two/b": "borgtunnel-sources/postgresql/two/b.dump",
        "every": "borgtunnel-sources/postgresql/every.sql",
        "shop": "borgtunnel-sources/mariadb/shop.sql",
        "wiki": "borgtunnel-sources/sqlite/wiki.sql",
        "ldap": "borgtunnel-sources/command/ldap",
    }
    assert by_label["one"].argv == (
        "pg_dump",
        "--format=custom",
        "--compress=0",
        "--no-password",
        "--username=backup",
        "--host=/run/pg",
        "--port=5433",
        "--dbname=app",
    )
    assert by_label["every"].argv[0] == "pg_dumpall"
    shop = by_label["shop"].argv
    assert shop[:3] == ("mariadb-dump", "--defaults-file=/etc/b.cnf", "--single-transaction")
    assert shop[-3:] == ("--databases", "x", "y")
    assert by_label["wiki"].argv[-1] == "/var/wiki.db"
    assert by_label["ldap"].argv == ("slapcat", "-n", "1")


def test_a_run_with_sources_carries_them_as_arguments_only() -> None:
    jobs = _load('[[clients.c1.sources]]\ntype = "command"\nname = "c"\ncommand = ["x;rm"]\n')
    block = sources.sources_args(["/etc"], jobs)
    assert block == ["borgtunnel-sources", "1", "/etc", "1", "c", jobs[0].path, "1", "x;rm"]
    command = run_command("~/s.sock", "nc", "socat", ["borg"], sources=block)
    assert "x;rm" not in command  # base64 inside one quoted word


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("borgtunnel-source app 0\n", ("app", 0)),
        ("borgtunnel-source two/a 141\n", ("two/a", 141)),
        ("borgtunnel-source app x\n", None),
        ("borgtunnel-source app 12345\n", None),
        ("borgtunnel-source  0\n", None),
        ("something else\n", None),
    ],
)
def test_status_lines_are_parsed_strictly(line: str, parsed: tuple[str, int] | None) -> None:
    assert parse_source_line(line) == parsed


def test_status_problems_name_each_source() -> None:
    jobs = _load(
        '[[clients.c1.sources]]\ntype = "command"\nname = "a"\ncommand = ["x"]\n'
        '[[clients.c1.sources]]\ntype = "command"\nname = "b"\ncommand = ["y"]\n'
        '[[clients.c1.sources]]\ntype = "command"\nname = "c"\ncommand = ["z"]\n'
    )
    problems = status_problems(jobs, {"a": 0, "b": 137})
    assert problems == [
        (
            "source 'b' (command): the dump was killed (signal 9); "
            "borgtunnel-sources/command/b in the archive is incomplete"
        ),
        "source 'c' (command): no exit status reported (the dump did not finish)",
    ]
    assert status_problems(jobs, {"a": 0, "b": 0, "c": 0}) == []


def test_archive_listing_is_read_for_regular_files_only() -> None:
    lines = "\n".join(
        [
            '{"path": "borgtunnel-sources/command/a", "type": "-", "size": 5}',
            '{"path": "borgtunnel-sources/command/b", "type": "-", "size": 0}',
            '{"path": "borgtunnel-sources/command/c", "type": "p", "size": 0}',
            "not json",
            "[1]",
        ]
    )
    sizes = archived_sizes(lines)
    assert sizes == {"borgtunnel-sources/command/a": 5, "borgtunnel-sources/command/b": 0}
    jobs = _load(
        '[[clients.c1.sources]]\ntype = "command"\nname = "a"\ncommand = ["x"]\n'
        '[[clients.c1.sources]]\ntype = "command"\nname = "b"\ncommand = ["x"]\n'
        '[[clients.c1.sources]]\ntype = "command"\nname = "c"\ncommand = ["x"]\n'
    )
    assert [p.split(":")[0] for p in archive_problems(jobs, sizes)] == [
        "source 'b' (command)",
        "source 'c' (command)",
    ]
