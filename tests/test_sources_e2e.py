"""End to end: SQLite and command sources, and how a dump that goes wrong fails the run.

Real sshd, real borg; each dump is read back with the server's borg. What is shown:
a SQLite dump taken while a writer commits restores to a consistent database; pipes and devices
under the client's paths are not read by ``--read-special`` (a pull with them finishes);
a command killed mid-stream, or exiting non-zero, fails the run naming the source; a dump that
blocks for ever is ended by the stall machinery and leaves nothing on the client; the server's
check refuses an archive without a configured source.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from borgtunnel.client.sources import DumpJob
from borgtunnel.config import load_config
from borgtunnel.runs.pull import pull
from borgtunnel.runs.sources import verify_sources
from borgtunnel.runs.verify import VerifyError
from tests import borgs, dbservers, pullkit, sourcekit
from tests.sshd import SshdServer
from tests.test_borg2 import Borg2

pytestmark = pytest.mark.sshd


def _sqlite_bank(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(dbservers.bank_setup_sql(padding_rows=20_000))


def _sqlite_writer(path: Path, stop: threading.Event, errors: list[str]) -> None:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    number = 1
    try:
        while not stop.is_set():
            db.executescript(dbservers.transfer_sql(number))
            number += 1
    except sqlite3.Error as exc:
        errors.append(str(exc))
    finally:
        db.close()


def _read_bank(path: Path) -> tuple[dict[int, int], list[tuple[int, int, int]]]:
    with sqlite3.connect(path) as db:
        accounts = dict(db.execute("SELECT id, balance FROM accounts").fetchall())
        transfers = db.execute("SELECT src, dst, amount FROM transfers WHERE n > 0").fetchall()
    return accounts, transfers


def test_sqlite_dump_is_consistent_and_special_files_are_not_read(
    tmp_path: Path, sshd: SshdServer
) -> None:
    database = tmp_path / "app.db"
    _sqlite_bank(database)
    data = tmp_path / "client-data"
    data.mkdir()
    (data / "file.txt").write_text("files part\n")
    # Under --read-special borg would block on these or read for ever: they must be left out.
    os.mkfifo(data / "a fifo")
    os.mkfifo(data / "new\nline [*?]\\")
    (data / "zero").symlink_to("/dev/zero")
    repo, config = sourcekit.setup(
        tmp_path, sshd, [{"type": "sqlite", "name": "app", "path": str(database)}], paths=[data]
    )
    stop, errors = threading.Event(), list[str]()
    writer = threading.Thread(target=_sqlite_writer, args=(database, stop, errors))
    writer.start()
    try:
        time.sleep(0.2)
        result = pullkit.run_cli(config, "pull", "c1")
    finally:
        stop.set()
        writer.join()
    assert not errors

    assert result.returncode == 0, result.stdout + result.stderr
    archive = sourcekit.only_archive(tmp_path, repo)
    items = sourcekit.archived(tmp_path, repo, archive)
    names = {Path(path).name for path in items}
    assert "file.txt" in names
    assert not {"a fifo", "new\nline [*?]\\", "zero"} & names
    dump = sourcekit.extract_bytes(tmp_path, repo, archive, "borgtunnel-sources/sqlite/app.sql")
    restored = tmp_path / "restored.db"
    subprocess.run(["sqlite3", str(restored)], input=dump, check=True, capture_output=True)
    accounts, transfers = _read_bank(restored)
    dbservers.check_bank(accounts, transfers)
    assert 0 < len(transfers) < len(_read_bank(database)[1])
    assert sourcekit.leftovers(sshd) == []


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        # Some data, then the dump dies: borg archives a short file and exits 0.
        (
            "head -c 300000 /dev/urandom; kill -9 $$",
            "source 'broken' (command): the dump was killed (signal 9)",
        ),
        ("echo partial; exit 3", "source 'broken' (command): sh exited with status 3"),
    ],
    ids=["killed", "exit-3"],
)
def test_a_failed_command_fails_the_run_naming_the_source(
    tmp_path: Path, sshd: SshdServer, script: str, expected: str
) -> None:
    _repo, config = sourcekit.setup(
        tmp_path,
        sshd,
        [
            {"type": "command", "name": "fine", "command": ["echo", "complete"]},
            {"type": "command", "name": "broken", "command": ["sh", "-c", script]},
        ],
    )

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stdout
    assert "'fine'" not in result.stdout
    assert sourcekit.leftovers(sshd) == []
    # The recorded run (what `history`, notifications and hooks show) names the source too.
    history = pullkit.run_cli(config, "history", "c1")
    assert expected in history.stdout


def test_a_dump_that_blocks_for_ever_is_stopped_and_cleaned_up(
    tmp_path: Path, sshd: SshdServer
) -> None:
    _repo, config = sourcekit.setup(
        tmp_path,
        sshd,
        [{"type": "command", "name": "stuck", "command": ["sleep", "7207"]}],
        stall_timeout=3,
    )

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr
    assert "stalled" in result.stdout
    deadline = time.monotonic() + 20
    while pullkit.processes_mentioning("sleep 7207") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pullkit.processes_mentioning("sleep 7207") == []
    assert sourcekit.leftovers(sshd) == []


def test_verification_refuses_an_archive_without_a_source(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    pullkit.init_repo(tmp_path, repo)
    work = tmp_path / "work"
    (work / "borgtunnel-sources" / "command").mkdir(parents=True)
    (work / "borgtunnel-sources" / "command" / "present").write_text("data\n")
    (work / "borgtunnel-sources" / "command" / "empty").write_text("")
    subprocess.run(
        ["borg", "create", f"{repo}::a1", "borgtunnel-sources"],
        cwd=work,
        env=pullkit.borg_env(tmp_path),
        check=True,
        capture_output=True,
    )
    info = pullkit.borg(tmp_path, "info", "--json", f"{repo}::a1")
    archive_id = json.loads(info)["archives"][0]["id"]

    def job(name: str) -> DumpJob:
        path = f"borgtunnel-sources/command/{name}"
        return DumpJob(label=name, source=name, kind="command", path=path, argv=("x",))

    async def check(*names: str) -> None:
        await verify_sources(
            [job(name) for name in names],
            borg_cmd="borg",
            repository=repo,
            state_dir=tmp_path / "state",
            passphrase=None,
            archive="a1",
            archive_id=archive_id,
            borg2=False,
        )

    asyncio.run(check("present"))
    with pytest.raises(VerifyError, match=r"'missing' .*not in the archive"):
        asyncio.run(check("present", "missing"))
    with pytest.raises(VerifyError, match=r"'empty' .*is empty"):
        asyncio.run(check("empty"))


def test_a_borg_1_4_client_stores_the_same_paths(tmp_path: Path, sshd: SshdServer) -> None:
    data = tmp_path / "client-data"
    data.mkdir()
    (data / "file.txt").write_text("x")
    os.mkfifo(data / "fifo")
    repo, config = sourcekit.setup(
        tmp_path,
        sshd,
        [{"type": "command", "name": "hello", "command": ["echo", "hi"]}],
        paths=[data],
        remote_borg=borgs.executable(borgs.BUILT[0]),
    )

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    items = sourcekit.archived(tmp_path, repo, sourcekit.only_archive(tmp_path, repo))
    assert items["borgtunnel-sources/command/hello"] == ("-", 3)
    assert not any(path.endswith("/fifo") for path in items)


async def test_a_cancelled_pull_with_sources_leaves_nothing_on_the_client(
    tmp_path: Path, sshd: SshdServer
) -> None:
    """Cancelled while borg reads a dump that writes a little and then hangs (the daemon's
    shutdown or timeout): the cleanup path stops borg, the dump and removes the pipes."""
    repo, config_path = sourcekit.setup(
        tmp_path,
        sshd,
        [{"type": "command", "name": "hangs", "command": ["sh", "-c", "echo x; sleep 7208"]}],
    )
    config = load_config(config_path)
    task = asyncio.create_task(pull(config, config.client("c1")))
    for _ in range(200):  # until the dump runs
        await asyncio.sleep(0.05)
        if pullkit.processes_mentioning("sleep 7208"):
            break
    await asyncio.sleep(0.3)
    assert pullkit.processes_mentioning("sleep 7208")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    for _ in range(100):  # the run script stops the dump 5 s after borg ended
        if not pullkit.processes_mentioning("sleep 7208") and not sourcekit.leftovers(sshd):
            break
        await asyncio.sleep(0.2)
    assert pullkit.processes_mentioning("sleep 7208") == []
    assert sourcekit.leftovers(sshd) == []
    assert pullkit.archives(tmp_path, repo) == []


def test_a_borg_2_client_stores_the_same_paths(tmp_path: Path, sshd: SshdServer) -> None:
    client = Borg2(tmp_path, sshd)
    client.write()
    with client.config.open("a") as file:
        source = {"type": "command", "name": "hello", "command": ["echo", "hi"]}
        file.write("\n" + sourcekit.sources_toml("c1", [source]))
    assert client.cli("init", "c1").returncode == 0

    result = client.cli("pull", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    archive_id = client.archives()[-1]["id"]
    listed = client.borg("list", "--json-lines", f"aid:{archive_id}", "borgtunnel-sources")
    items = {item["path"]: item for item in map(json.loads, listed.splitlines())}
    assert items["borgtunnel-sources/command/hello"]["size"] == 3
