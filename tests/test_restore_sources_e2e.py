"""``borgtunnel restore NAME ARCHIVE --source SRC`` (issue 19, item 5): a dump back on the client.

Into a directory (``--target``: the dump's file as the archive holds it) or loaded into a
database the administrator names (``--load-into``: never over an existing one without
``--force``; a failed load fails the restore and leaves nothing it created). Real sshd, real
borg, private PostgreSQL and MariaDB servers (tests/dbservers.py), SQLite; everything restored
is compared with what was backed up: bytes with the server's own ``borg extract --stdout``,
rows with the original database.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests import pullkit, sourcekit, test_gatekeeper_e2e
from tests.dbservers import Mariadb, Postgres, mariadb_server, postgres_server  # noqa: F401
from tests.sshd import SshdServer
from tests.test_gatekeeper_e2e import Client

pytestmark = pytest.mark.sshd

gatekeeper_client = test_gatekeeper_e2e.client
SQLITE_DUMP = "borgtunnel-sources/sqlite/notes.sql"


def _notes(path: Path, rows: int) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.executemany("INSERT INTO notes (body) VALUES (?)", [(f"n{i}",) for i in range(rows)])


def _rows(path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, body FROM notes ORDER BY id").fetchall()


def _pulled(
    tmp_path: Path, sshd: SshdServer, sources: list[dict[str, Any]]
) -> tuple[Path, Path, str]:
    """Client c1 with these sources, pulled once: (repository, config, archive)."""
    repo, config = sourcekit.setup(tmp_path, sshd, sources)
    return repo, config, _pull(tmp_path, config, repo)


def _pull(tmp_path: Path, config: Path, repo: Path) -> str:
    result = pullkit.run_cli(config, "pull", "c1")
    assert result.returncode == 0, result.stdout + result.stderr
    return sourcekit.only_archive(tmp_path, repo)


@pytest.fixture
def sqlite_pulled(tmp_path: Path, sshd: SshdServer) -> tuple[Path, Path, str, Path]:
    database = tmp_path / "notes.db"
    _notes(database, 300)
    repo, config = sourcekit.setup(
        tmp_path,
        sshd,
        [
            {"type": "sqlite", "name": "notes", "path": str(database)},
            {"type": "command", "name": "export", "command": ["echo", "exported"]},
        ],
    )
    return config, repo, _pull(tmp_path, config, repo), database


def test_a_sources_dump_file_is_restored_into_a_target(
    tmp_path: Path, sqlite_pulled: tuple[Path, Path, str, Path]
) -> None:
    config, repo, archive, _database = sqlite_pulled
    target = tmp_path / "restore-here"

    result = pullkit.run_cli(
        config, "restore", "c1", archive, "--source", "notes", "--target", str(target)
    )

    assert result.returncode == 0, result.stdout + result.stderr
    restored = target / SQLITE_DUMP
    assert f"  {restored}\n" in result.stdout  # says where it landed
    assert restored.read_bytes() == sourcekit.extract_bytes(tmp_path, repo, archive, SQLITE_DUMP)
    assert sorted(p.name for p in (target / "borgtunnel-sources").rglob("*") if p.is_file()) == [
        "notes.sql"
    ]  # only that source, not the files part or the other source
    assert not (target / str(tmp_path).lstrip("/")).exists()


def test_a_sqlite_dump_loads_into_a_new_file_and_never_over_one_without_force(
    tmp_path: Path, sqlite_pulled: tuple[Path, Path, str, Path]
) -> None:
    config, _repo, archive, database = sqlite_pulled
    into = tmp_path / "loaded.db"
    load = ["restore", "c1", archive, "--source", "notes", "--load-into", str(into)]

    first = pullkit.run_cli(config, *load)

    assert first.returncode == 0, first.stdout + first.stderr
    assert f"loaded source notes of archive={archive} into SQLite database {into}" in first.stdout
    assert _rows(into) == _rows(database)
    with sqlite3.connect(into) as db:
        db.execute("DELETE FROM notes WHERE id > 10")
    second = pullkit.run_cli(config, *load)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"SQLite database {into} exists; use --force to load over it" in second.stdout
    assert len(_rows(into)) == 10  # untouched
    forced = pullkit.run_cli(config, *load, "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert _rows(into) == _rows(database)
    assert sorted(p.name for p in tmp_path.iterdir() if "loaded" in p.name) == ["loaded.db"]


def test_a_failed_load_fails_the_restore_and_leaves_nothing(
    tmp_path: Path, sqlite_pulled: tuple[Path, Path, str, Path]
) -> None:
    config, _repo, archive, _database = sqlite_pulled
    into = tmp_path / "no-such-dir" / "loaded.db"

    result = pullkit.run_cli(
        config, "restore", "c1", archive, "--source", "notes", "--load-into", str(into)
    )

    assert result.returncode == 2, result.stdout + result.stderr
    assert f"loading into SQLite database {into} failed (status " in result.stdout
    assert not into.parent.exists()
    history = pullkit.run_cli(config, "history", "c1")
    assert "loading into SQLite database" in history.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--source", "nope", "--target", "/r"],
            "no source 'nope' in this client's configuration (its sources: notes, export, cluster)",
        ),
        (["etc", "--source", "notes", "--target", "/r"], "give --source or PATHs, not both"),
        (["--load-into", "x"], "--load-into needs --source"),
        (
            ["--source", "notes", "--load-into", "/x.db", "--target", "/r"],
            "--load-into goes without --target",
        ),
        (
            ["--source", "notes", "--load-into", "/x.db", "--dry-run"],
            "--load-into goes without --target and --dry-run",
        ),
        (["--source", "export", "--load-into", "x"], "a command's output, which has no loader"),
        (["--source", "cluster", "--load-into", "x"], "dumps every database"),
        (["--source", "notes", "--load-into", "relative.db"], "loads into an absolute file path"),
        (["--source", "notes"], "--target DIR is required"),
        (["--target", "relative"], "--target must be an absolute path"),
    ],
)
def test_a_restore_asked_for_wrongly_is_refused_before_connecting(
    tmp_path: Path, sshd: SshdServer, args: list[str], message: str
) -> None:
    _repo, config = sourcekit.setup(
        tmp_path,
        sshd,
        [
            {"type": "sqlite", "name": "notes", "path": "/var/lib/notes.db"},
            {"type": "command", "name": "export", "command": ["echo", "x"]},
            {"type": "postgresql", "name": "cluster", "database": "all"},
        ],
    )

    result = pullkit.run_cli(config, "restore", "c1", "some-archive", *args)

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("borgtunnel: restore c1: ")
    assert message in result.stderr
    assert "restore_started" not in result.stdout + result.stderr


def test_a_postgres_dump_loads_into_a_new_database(
    tmp_path: Path, sshd: SshdServer, postgres: Postgres
) -> None:
    postgres.sql("CREATE DATABASE shop")
    postgres.sql("CREATE TABLE items (id int PRIMARY KEY, name text)", "shop")
    postgres.sql("INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 500) i", "shop")
    connection = {"host": str(postgres.sockdir), "user": "postgres"}
    repo, config, archive = _pulled(
        tmp_path,
        sshd,
        [{"type": "postgresql", "name": "shop", "database": "shop", **connection}],
    )
    postgres.sql("DELETE FROM items WHERE id > 100", "shop")  # the live one moves on
    as_file = tmp_path / "as-file"
    dump = "borgtunnel-sources/postgresql/shop.dump"
    restored = pullkit.run_cli(
        config, "restore", "c1", archive, "--source", "shop", "--target", str(as_file)
    )
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"  {as_file / dump}\n" in restored.stdout
    assert (as_file / dump).read_bytes() == sourcekit.extract_bytes(tmp_path, repo, archive, dump)
    load = ["restore", "c1", archive, "--source", "shop", "--load-into", "shop_restored"]

    first = pullkit.run_cli(config, *load)

    assert first.returncode == 0, first.stdout + first.stderr
    assert "into PostgreSQL database 'shop_restored'" in first.stdout
    count = "SELECT count(*), max(name) FROM items"
    assert postgres.sql(count, "shop_restored").strip() == "500|item 99"
    assert postgres.sql(count, "shop").strip() == "100|item 99"
    postgres.sql("DELETE FROM items", "shop_restored")
    again = pullkit.run_cli(config, *load)
    assert again.returncode == 2, again.stdout + again.stderr
    assert "PostgreSQL database 'shop_restored' exists; use --force" in again.stdout
    assert postgres.sql(count, "shop_restored").strip() == "0|"
    forced = pullkit.run_cli(config, *load, "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert postgres.sql(count, "shop_restored").strip() == "500|item 99"


def test_a_mariadb_dump_loads_into_the_database_named_not_its_own(
    tmp_path: Path, sshd: SshdServer, mariadb: Mariadb
) -> None:
    mariadb.sql("CREATE DATABASE inventory CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    mariadb.sql("CREATE TABLE items (id INT PRIMARY KEY, name TEXT) ENGINE=InnoDB", "inventory")
    mariadb.sql("INSERT INTO items SELECT seq, CONCAT('item ', seq) FROM seq_1_to_300", "inventory")
    options = mariadb.option_file(tmp_path)
    _repo, config, archive = _pulled(
        tmp_path,
        sshd,
        [
            {
                "type": "mariadb",
                "name": "inv",
                "database": "inventory",
                "defaults_file": str(options),
            }
        ],
    )
    mariadb.sql("DELETE FROM items WHERE id > 100", "inventory")

    result = pullkit.run_cli(
        config, "restore", "c1", archive, "--source", "inv", "--load-into", "inv_copy"
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert mariadb.sql("SELECT count(*) FROM items", "inv_copy").strip() == "300"
    assert mariadb.sql("SELECT count(*) FROM items", "inventory").strip() == "100"  # not reloaded
    collation = "SELECT default_collation_name FROM information_schema.schemata WHERE schema_name"
    assert mariadb.sql(f"{collation} = 'inv_copy'").strip() == "utf8mb4_bin"  # the dump's
    again = pullkit.run_cli(
        config, "restore", "c1", archive, "--source", "inv", "--load-into", "inv_copy"
    )
    assert again.returncode == 2
    assert "MariaDB database 'inv_copy' exists; use --force" in again.stdout


def test_through_the_gatekeeper_a_dump_file_restores_only_where_the_policy_allows(
    gatekeeper_client: Client,
) -> None:
    client = gatekeeper_client
    allowed = client.tmp / "restores"
    allowed.mkdir()
    export = ["printf", "exported"]
    client.add_tools("printf")
    client.write()
    with client.config.open("a") as file:
        file.write(
            "\n"
            + sourcekit.sources_toml(
                "c1", [{"type": "command", "name": "export", "command": export}]
            )
        )
    client.policy.write_text(
        client.policy.read_text() + "\n[source export]\ntype = command\ncommand = printf exported\n"
    )
    pullkit.init_repo(client.tmp, client.repo)
    pulled = pullkit.run_cli(client.config, "pull", "c1")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    archive = sourcekit.only_archive(client.tmp, client.repo)
    restore = ["restore", "c1", archive, "--source", "export"]

    refused = pullkit.run_cli(client.config, *restore, "--target", str(allowed))
    assert refused.returncode == 2
    assert "restore is not allowed by this client's policy" in refused.stdout

    text = client.policy.read_text().replace(
        "[source export]", f"restore = yes\nrestore_targets = {allowed}\n\n[source export]"
    )
    client.policy.write_text(text)
    done = pullkit.run_cli(client.config, *restore, "--target", str(allowed))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (allowed / "borgtunnel-sources/command/export").read_bytes() == b"exported"

    load = pullkit.run_cli(client.config, *restore, "--load-into", "x")
    assert load.returncode == 2
    assert "a command's output, which has no loader" in load.stderr


def test_a_mariadb_load_with_views_routines_and_a_changed_charset_leaves_the_original_alone(
    tmp_path: Path, sshd: SshdServer, mariadb: Mariadb
) -> None:
    """mariadb-dump names its database beyond CREATE DATABASE/USE: a routine created under
    another default character set is wrapped in ``ALTER DATABASE `orig` CHARACTER SET …`` lines.
    Loaded as they are, they would alter the original (and fail when it is gone)."""
    mariadb.sql("CREATE DATABASE stock CHARACTER SET latin1")
    mariadb.sql("CREATE TABLE items (id INT PRIMARY KEY, name TEXT) ENGINE=InnoDB", "stock")
    mariadb.sql("INSERT INTO items SELECT seq, CONCAT('item ', seq) FROM seq_1_to_200", "stock")
    mariadb.sql("CREATE VIEW many AS SELECT count(*) AS n FROM items", "stock")
    mariadb.sql("CREATE PROCEDURE total() SELECT count(*) FROM items", "stock")
    mariadb.sql("ALTER DATABASE stock CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    options = mariadb.option_file(tmp_path)
    repo, config, archive = _pulled(
        tmp_path,
        sshd,
        [{"type": "mariadb", "name": "stock", "database": "stock", "defaults_file": str(options)}],
    )
    dump = sourcekit.extract_bytes(tmp_path, repo, archive, "borgtunnel-sources/mariadb/stock.sql")
    assert b"ALTER DATABASE `stock` CHARACTER SET latin1" in dump  # what this test is about
    mariadb.sql("DELETE FROM items WHERE id > 50", "stock")
    mariadb.sql("ALTER DATABASE stock CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    charset = "SELECT default_collation_name FROM information_schema.schemata WHERE schema_name = "

    result = pullkit.run_cli(
        config, "restore", "c1", archive, "--source", "stock", "--load-into", "stock_copy"
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert mariadb.sql(f"{charset}'stock'").strip() == "utf8mb4_unicode_ci"  # untouched
    assert mariadb.sql("SELECT count(*) FROM items", "stock").strip() == "50"
    assert mariadb.sql("SELECT n FROM many", "stock_copy").strip() == "200"  # the copy's table
    assert mariadb.sql("CALL total()", "stock_copy").strip() == "200"
    assert mariadb.sql(f"{charset}'stock_copy'").strip() == "utf8mb4_bin"  # as when dumped

    mariadb.sql("DROP DATABASE stock")  # the usual reason to restore: the original is gone
    again = pullkit.run_cli(
        config, "restore", "c1", archive, "--source", "stock", "--load-into", "stock"
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert mariadb.sql("SELECT n FROM many", "stock").strip() == "200"


def test_a_failed_postgres_load_is_a_failed_restore_that_leaves_the_databases_as_they_were(
    tmp_path: Path, sshd: SshdServer, postgres: Postgres
) -> None:
    """pg_restore stops at the first error (--exit-on-error) inside one transaction: a database
    the load created is dropped again, one it loaded over with --force is left as it was."""
    postgres.sql("CREATE DATABASE ledger")
    postgres.sql("CREATE TABLE entries (id int PRIMARY KEY, amount int)", "ledger")
    postgres.sql("INSERT INTO entries SELECT i, i * 10 FROM generate_series(1, 50) i", "ledger")
    postgres.sql("CREATE ROLE auditor")
    postgres.sql("GRANT SELECT ON entries TO auditor", "ledger")
    connection = {"host": str(postgres.sockdir), "user": "postgres"}
    _repo, config, archive = _pulled(
        tmp_path,
        sshd,
        [{"type": "postgresql", "name": "ledger", "database": "ledger", **connection}],
    )
    load = ["restore", "c1", archive, "--source", "ledger", "--load-into"]
    # Over an existing database: its view depends on the table the dump drops and recreates.
    postgres.sql("CREATE DATABASE ledger_old")
    postgres.sql("CREATE TABLE entries (id int PRIMARY KEY, amount int)", "ledger_old")
    postgres.sql("INSERT INTO entries VALUES (1, 1), (2, 2)", "ledger_old")
    postgres.sql("CREATE VIEW total AS SELECT sum(amount) AS s FROM entries", "ledger_old")

    over = pullkit.run_cli(config, *load, "ledger_old", "--force")

    assert over.returncode == 2, over.stdout + over.stderr
    assert "loading into PostgreSQL database 'ledger_old' failed (status 1): " in over.stdout
    assert "depend" in over.stdout  # pg_restore's own reason
    assert postgres.sql("SELECT s FROM total", "ledger_old").strip() == "3"  # as it was

    # Into a new database, on a server without the role the dump grants to.
    postgres.sql("DROP OWNED BY auditor", "ledger")
    postgres.sql("DROP ROLE auditor")
    new = pullkit.run_cli(config, *load, "ledger_new")

    assert new.returncode == 2, new.stdout + new.stderr
    assert "loading into PostgreSQL database 'ledger_new' failed (status 1): " in new.stdout
    assert 'role "auditor" does not exist' in new.stdout
    exists = "SELECT count(*) FROM pg_database WHERE datname = 'ledger_new'"
    assert postgres.sql(exists).strip() == "0"  # created for the load, dropped again
    history = pullkit.run_cli(config, "history", "c1")
    assert "loading into PostgreSQL database 'ledger_new' failed" in history.stdout


def test_through_the_gatekeeper_a_sqlite_dump_restores_as_a_file_and_a_load_is_refused(
    gatekeeper_client: Client,
) -> None:
    client = gatekeeper_client
    database = client.tmp / "notes.db"
    _notes(database, 200)
    allowed = client.tmp / "restores"
    allowed.mkdir()
    client.add_tools("sqlite3", "awk")
    client.write()
    with client.config.open("a") as file:
        file.write(
            "\n"
            + sourcekit.sources_toml(
                "c1", [{"type": "sqlite", "name": "notes", "path": str(database)}]
            )
        )
    with client.policy.open("a") as file:
        file.write(
            f"restore = yes\nrestore_targets = {allowed}\n"
            f"\n[source notes]\ntype = sqlite\npath = {database}\n"
        )
    pullkit.init_repo(client.tmp, client.repo)
    pulled = pullkit.run_cli(client.config, "pull", "c1")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    archive = sourcekit.only_archive(client.tmp, client.repo)
    restore = ["restore", "c1", archive, "--source", "notes"]

    done = pullkit.run_cli(client.config, *restore, "--target", str(allowed))

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"  {allowed / SQLITE_DUMP}\n" in done.stdout
    expected = sourcekit.extract_bytes(client.tmp, client.repo, archive, SQLITE_DUMP)
    assert (allowed / SQLITE_DUMP).read_bytes() == expected

    into = allowed / "loaded.db"
    load = pullkit.run_cli(client.config, *restore, "--load-into", str(into))

    assert load.returncode == 2, load.stdout + load.stderr
    reason = "loading a dump into a database is not done through the gatekeeper"
    assert f"borgtunnel-gatekeeper: {reason}" in load.stdout
    assert f"refused: {reason}" in client.logged()
    assert not into.exists()
    assert not list(allowed.glob("loaded.db*"))
    assert sourcekit.leftovers(client.sshd) == []
