"""Private PostgreSQL and MariaDB servers for the sources tests, and a writer that never stops.

Each server runs from a fresh data directory in its own temp dir, listening only on a unix
socket there (no TCP port, nothing of the system's own clusters touched), and is stopped and
removed afterwards, also when the test failed. PostgreSQL refuses to run as root: it runs as
the ``postgres`` user the Debian package creates, with ``trust`` on its private socket.

The bank: ``accounts`` (id, balance) and ``transfers`` (src, dst, amount); every transfer moves
money and logs itself in one transaction. A copy taken across transactions (some tables before
a transfer, some after) breaks ``balance = start + received - sent`` for some account.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ACCOUNTS = 20
START_BALANCE = 1000
STARTUP_TIMEOUT = 60.0


def _private_tmp(prefix: str, owner: str | None = None) -> Path:
    # Not pytest's tmp_path: its parents are 0700 root, where the postgres user cannot go.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def _run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=120, check=False, **kwargs
    )  # type: ignore[call-overload]
    if result.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({result.returncode}): {result.stderr}")
    return result  # type: ignore[no-any-return]


def _wait_until(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not become ready")
        time.sleep(0.1)


@dataclass
class Postgres:
    bindir: Path
    sockdir: Path
    user: str = "postgres"

    def psql_argv(self, database: str = "postgres") -> list[str]:
        return [
            str(self.bindir / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.sockdir),
            "-U",
            self.user,
            "-d",
            database,
        ]

    def sql(self, text: str, database: str = "postgres") -> str:
        return _run([*self.psql_argv(database), "-At", "-c", text]).stdout


@pytest.fixture(scope="module", name="postgres")
def postgres_server() -> Iterator[Postgres]:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL is not installed (Debian: postgresql; scripts/setup installs it)")
    bindir = Path(found[-1]).parent
    base = _private_tmp("bt-pg-", owner="postgres")
    data, sock = base / "data", base / "sock"
    as_postgres = ["runuser", "-u", "postgres", "--"]
    try:
        _run([*as_postgres, "mkdir", "-m", "0700", str(sock)])
        initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
        _run([*as_postgres, *initdb, "--no-sync"])
        options = f"-k {sock} -c listen_addresses='' -c fsync=off -c max_connections=20"
        _run(
            [
                *as_postgres,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-w",
                "-l",
                str(base / "log"),
                "start",
            ]
        )
        server = Postgres(bindir=bindir, sockdir=sock)
        # root's client tools reach the socket; the data directory stays 0700.
        base.chmod(0o755)
        yield server
    finally:
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Mariadb:
    socket: Path
    base: Path

    def client_argv(self, database: str | None = None) -> list[str]:
        argv = ["mariadb", "--no-defaults", f"--socket={self.socket}", "--batch", "-N"]
        return [*argv, database] if database else argv

    def sql(self, text: str, database: str | None = None) -> str:
        return _run([*self.client_argv(database), "-e", text]).stdout

    def option_file(self, directory: Path) -> Path:
        """Credentials as a client keeps them: an option file (0600), never an argument."""
        options = directory / "backup.cnf"
        options.write_text(f"[client]\nuser=root\nsocket={self.socket}\n")
        options.chmod(0o600)
        return options


@pytest.fixture(scope="module", name="mariadb")
def mariadb_server() -> Iterator[Mariadb]:
    if shutil.which("mariadb-install-db") is None or not Path("/usr/sbin/mariadbd").exists():
        pytest.skip("MariaDB is not installed (Debian: mariadb-server; scripts/setup installs it)")
    base = _private_tmp("bt-maria-")
    data, sock = base / "data", base / "mysqld.sock"
    process: subprocess.Popen[bytes] | None = None
    try:
        _run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ]
        )
        with (base / "server.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    "/usr/sbin/mariadbd",
                    "--no-defaults",
                    f"--datadir={data}",
                    f"--socket={sock}",
                    "--skip-networking",
                    "--user=root",
                    f"--pid-file={base / 'pid'}",
                    "--innodb-buffer-pool-size=32M",
                    "--innodb-flush-log-at-trx-commit=0",
                    "--skip-log-bin",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = Mariadb(socket=sock, base=base)

        def ready() -> bool:
            if process is not None and process.poll() is not None:
                raise AssertionError((base / "server.log").read_text())
            probe = [*server.client_argv(), "-e", "select 1"]
            return subprocess.run(probe, capture_output=True, check=False).returncode == 0

        _wait_until(ready, "mariadbd")
        yield server
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(base, ignore_errors=True)


BANK_SCHEMA = [
    "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)",
    (
        "CREATE TABLE transfers (n INTEGER PRIMARY KEY, src INTEGER NOT NULL, dst INTEGER NOT NULL,"
        " amount INTEGER NOT NULL)"
    ),
]


def bank_setup_sql(*, padding_rows: int = 0) -> str:
    """The bank's tables and accounts; ``padding_rows`` transfers of 0 make the dump longer."""
    values = ", ".join(f"({i}, {START_BALANCE})" for i in range(ACCOUNTS))
    lines = [*BANK_SCHEMA, f"INSERT INTO accounts VALUES {values}"]  # noqa: S608 - numbers
    if padding_rows:
        rows = ", ".join(f"({-i}, 0, 1, 0)" for i in range(1, padding_rows + 1))
        lines.append(f"INSERT INTO transfers VALUES {rows}")  # noqa: S608 - numbers only
    return ";\n".join(lines) + ";\n"


def transfer_sql(number: int) -> str:
    src, dst = number % ACCOUNTS, (number * 7 + 3) % ACCOUNTS
    if src == dst:
        dst = (dst + 1) % ACCOUNTS
    amount = number % 13 + 1
    return (
        "BEGIN;\n"
        f"UPDATE accounts SET balance = balance - {amount} WHERE id = {src};\n"
        f"INSERT INTO transfers VALUES ({number}, {src}, {dst}, {amount});\n"
        f"UPDATE accounts SET balance = balance + {amount} WHERE id = {dst};\n"
        "COMMIT;\n"
    )


def check_bank(accounts: dict[int, int], transfers: list[tuple[int, int, int]]) -> None:
    """The invariant: every balance is its start plus what it received minus what it sent."""
    expected = dict.fromkeys(range(ACCOUNTS), START_BALANCE)
    for src, dst, amount in transfers:
        expected[src] -= amount
        expected[dst] += amount
    assert accounts == expected
    assert sum(accounts.values()) == ACCOUNTS * START_BALANCE


def parse_rows(text: str) -> list[tuple[int, ...]]:
    """Rows printed by ``psql -At`` ('|' between columns) or ``mariadb -N --batch`` (tabs)."""
    return [
        tuple(int(x) for x in line.replace("|", "\t").split("\t"))
        for line in text.splitlines()
        if line.strip()
    ]


@dataclass
class Writer:
    """A client session committing transfers one after another until stopped."""

    argv: list[str]
    committed: int = 0
    process: subprocess.Popen[str] | None = None
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    error: list[str] = field(default_factory=list)

    def _loop(self) -> None:
        assert self.process is not None
        assert self.process.stdin is not None
        number = 1
        try:
            while not self.stop.is_set():
                self.process.stdin.write(transfer_sql(number))
                self.process.stdin.flush()
                number += 1
                if number % 50 == 0:
                    time.sleep(0.001)
        except OSError as exc:
            self.error.append(str(exc))
        self.committed = number - 1


@contextlib.contextmanager
def writing(argv: list[str]) -> Iterator[Writer]:
    """Transfers are committed the whole time the block runs; at least some before it starts."""
    writer = Writer(argv=argv)
    writer.process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    writer.thread = threading.Thread(target=writer._loop, daemon=True)
    writer.thread.start()
    try:
        time.sleep(0.3)
        yield writer
    finally:
        writer.stop.set()
        writer.thread.join(timeout=30)
        assert writer.process.stdin is not None
        with contextlib.suppress(OSError):
            writer.process.stdin.close()
        try:
            writer.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            writer.process.kill()
            writer.process.wait()
        assert writer.process.stderr is not None
        err = writer.process.stderr.read()
        writer.process.stderr.close()
        if writer.process.returncode != 0:
            writer.error.append(err)
