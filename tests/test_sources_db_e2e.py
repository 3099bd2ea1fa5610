"""End to end: PostgreSQL and MariaDB dumps pulled into the archive while a writer commits.

A real sshd and real borg on both ends; one private database server per module
(tests/dbservers.py). Each dump is extracted with the server's borg, loaded into a fresh
database and checked against the bank's invariant: a copy torn across transactions fails it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import dbservers, pullkit, sourcekit
from tests.dbservers import Mariadb, Postgres, mariadb_server, postgres_server  # noqa: F401
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd


def _psql_script(server: Postgres, database: str, script: str) -> None:
    subprocess.run(
        [*server.psql_argv(database)], input=script, text=True, check=True, capture_output=True
    )


def _new_bank(server: Postgres, database: str, **kwargs: int) -> None:
    server.sql(f"CREATE DATABASE {database}")
    _psql_script(server, database, dbservers.bank_setup_sql(**kwargs))


def _pg_bank(server: Postgres, database: str) -> tuple[dict[int, int], list[tuple[int, ...]]]:
    accounts = dbservers.parse_rows(server.sql("SELECT id, balance FROM accounts", database))
    transfers = dbservers.parse_rows(
        server.sql("SELECT src, dst, amount FROM transfers WHERE n > 0", database)
    )
    return {row[0]: row[1] for row in accounts}, transfers


def test_postgres_dump_restores_a_consistent_copy_taken_during_writes(
    tmp_path: Path, sshd: SshdServer, postgres: Postgres
) -> None:
    _new_bank(postgres, "bank1")
    repo, config = sourcekit.setup(
        tmp_path,
        sshd,
        [
            {
                "type": "postgresql",
                "name": "bank",
                "database": "bank1",
                "host": str(postgres.sockdir),
                "user": "postgres",
            },
            {
                "type": "postgresql",
                "name": "cluster",
                "database": "all",
                "host": str(postgres.sockdir),
                "user": "postgres",
            },
        ],
    )

    with dbservers.writing(postgres.psql_argv("bank1")) as writer:
        result = pullkit.run_cli(config, "pull", "c1")
    assert not writer.error, writer.error

    assert result.returncode == 0, result.stdout + result.stderr
    archive = sourcekit.only_archive(tmp_path, repo)
    items = sourcekit.archived(tmp_path, repo, archive)
    assert items["borgtunnel-sources/postgresql/bank.dump"][0] == "-"
    assert items["borgtunnel-sources/postgresql/cluster.sql"][1] > 0
    dump = sourcekit.extract_bytes(
        tmp_path, repo, archive, "borgtunnel-sources/postgresql/bank.dump"
    )
    postgres.sql("CREATE DATABASE restored1")
    subprocess.run(
        [
            str(postgres.bindir / "pg_restore"),
            "-h",
            str(postgres.sockdir),
            "-U",
            "postgres",
            "-d",
            "restored1",
            "--exit-on-error",
        ],
        input=dump,
        check=True,
        capture_output=True,
    )
    accounts, transfers = _pg_bank(postgres, "restored1")
    dbservers.check_bank(accounts, transfers)  # type: ignore[arg-type]
    _, live = _pg_bank(postgres, "bank1")
    # Transfers were committed before and after the dump's snapshot: it was taken mid-stream.
    assert 0 < len(transfers) < len(live)
    cluster = sourcekit.extract_bytes(
        tmp_path, repo, archive, "borgtunnel-sources/postgresql/cluster.sql"
    )
    assert b"CREATE DATABASE bank1" in cluster
    assert sourcekit.leftovers(sshd) == []


def test_killed_pg_dump_fails_the_run_naming_the_source(
    tmp_path: Path, sshd: SshdServer, postgres: Postgres
) -> None:
    _new_bank(postgres, "bank2")
    _repo, config = sourcekit.setup(
        tmp_path,
        sshd,
        [
            {
                "type": "postgresql",
                "name": "locked",
                "database": "bank2",
                "host": str(postgres.sockdir),
                "user": "postgres",
            }
        ],
    )
    # A session holding the table makes pg_dump wait, so the test can find it and kill it.
    locker = subprocess.Popen(
        postgres.psql_argv("bank2"),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    pull = subprocess.Popen(
        [*pullkit.cli_argv(config), "pull", "c1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdin is not None
        locker.stdin.write("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE;\n")
        locker.stdin.flush()
        killed = _kill_when_running("--dbname=bank2")
        out, err = pull.communicate(timeout=90)
    finally:
        pull.kill()
        pull.wait()
        locker.kill()
        locker.wait()
        assert locker.stdin is not None
        with contextlib.suppress(OSError):
            locker.stdin.close()

    assert killed
    assert pull.returncode == 2, out + err
    assert "source 'locked' (postgresql): the dump was killed (signal 9)" in out
    assert sourcekit.leftovers(sshd) == []
    # borg archived what it got, but the run is not counted: nothing says ok.
    assert ": ok " not in out


def _kill_when_running(needle: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [pid for pid, line in pullkit.processes_mentioning(needle) if "pg_dump" in line]
        if found:
            for pid in found:
                os.kill(pid, signal.SIGKILL)
            return True
        time.sleep(0.05)
    return False


def _maria_bank(server: Mariadb, database: str) -> tuple[dict[int, int], list[tuple[int, ...]]]:
    accounts = dbservers.parse_rows(server.sql("SELECT id, balance FROM accounts", database))
    transfers = dbservers.parse_rows(
        server.sql("SELECT src, dst, amount FROM transfers WHERE n > 0", database)
    )
    return {row[0]: row[1] for row in accounts}, transfers


def test_mariadb_dump_restores_a_consistent_copy_taken_during_writes(
    tmp_path: Path, sshd: SshdServer, mariadb: Mariadb
) -> None:
    mariadb.sql("CREATE DATABASE bank")
    subprocess.run(
        mariadb.client_argv("bank"),
        input=dbservers.bank_setup_sql().replace(
            "INTEGER NOT NULL)", "INTEGER NOT NULL) ENGINE=InnoDB"
        ),
        text=True,
        check=True,
        capture_output=True,
    )
    options = mariadb.option_file(tmp_path)
    repo, config = sourcekit.setup(
        tmp_path,
        sshd,
        [{"type": "mariadb", "name": "shop", "database": "bank", "defaults_file": str(options)}],
    )

    with dbservers.writing(mariadb.client_argv("bank")) as writer:
        result = pullkit.run_cli(config, "pull", "c1")
    assert not writer.error, writer.error

    assert result.returncode == 0, result.stdout + result.stderr
    archive = sourcekit.only_archive(tmp_path, repo)
    dump = sourcekit.extract_bytes(tmp_path, repo, archive, "borgtunnel-sources/mariadb/shop.sql")
    # The dump names its database (--databases): load it under another name.
    text = dump.decode().replace("`bank`", "`restored`")
    subprocess.run(mariadb.client_argv(), input=text, text=True, check=True, capture_output=True)
    accounts, transfers = _maria_bank(mariadb, "restored")
    dbservers.check_bank(accounts, transfers)  # type: ignore[arg-type]
    _, live = _maria_bank(mariadb, "bank")
    assert 0 < len(transfers) < len(live)
    assert sourcekit.leftovers(sshd) == []
