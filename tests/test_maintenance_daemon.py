"""The daemon prunes, compacts and checks after a verified pull, under the client's lock."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from borgtunnel.config import load_config
from borgtunnel.history import History, RunResult
from borgtunnel.runs.jobs import run_recorded
from borgtunnel.runs.pull import PullOutcome
from borgtunnel.scheduling.daemon import Daemon
from borgtunnel.systemd import Notifier
from tests import retention_kit
from tests.daemon_support import (
    FIRE_AT,
    archives,
    clock_offset,
    eventually,
    make_data,
    make_repo,
    run_cli,
    runs,
    server_env,
    serving,
    shifted_now,
    sshd_client,
    write_config,
)
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd


@pytest.fixture
def server_borg_env(tmp_path, monkeypatch):
    for key, value in server_env(tmp_path).items():
        monkeypatch.setenv(key, value)


def forge_old_archives(tmp_path: Path, repo: Path) -> None:
    """Two archives made on the server, dated January: prune by keep_daily = 1 removes them."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "x").write_text("old\n")
    for name, when in (("old-1", "2026-01-01T10:00:00"), ("old-2", "2026-01-02T10:00:00")):
        subprocess.run(
            ["borg", "create", "--timestamp", when, f"{repo}::{name}", str(old)],
            env=server_env(tmp_path),
            check=True,
            capture_output=True,
            timeout=60,
        )


def forge_future_archive(tmp_path: Path, repo: Path) -> None:
    """What a compromised client can add through its tunnel: an archive dated 2099."""
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "note").write_text("pay\n")
    subprocess.run(
        ["borg", "create", "--timestamp", "2099-01-01T00:00:00", f"{repo}::evil-2099", str(evil)],
        env=server_env(tmp_path),
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.usefixtures("server_borg_env")
async def test_daemon_maintains_after_a_verified_pull(sshd: SshdServer, tmp_path: Path) -> None:
    """old-1 and old-2 were verified in January (by the server's clock): keep_daily = 1 removes
    them. evil-2099 was never verified: borg prune would have kept it alone and deleted the
    daemon's own archive; it is reported (a warning) and neither counted nor deleted."""
    repo = make_repo(tmp_path, "web1")
    data = make_data(tmp_path, "web1", random_bytes=20_000)
    forge_old_archives(tmp_path, repo)
    ids = retention_kit.archive_ids(repo, server_env(tmp_path))
    january = {
        name: (ids[name], datetime(2026, 1, day, 10, tzinfo=UTC))
        for day, name in ((1, "old-1"), (2, "old-2"))
    }
    forge_future_archive(tmp_path, repo)
    client = sshd_client(sshd, "web1", repo, data, schedule="0 2 * * *")
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, sshd=sshd, clients={"web1": client})
    path.write_text(
        path.read_text()
        + '\n[clients.web1.retention]\nkeep_daily = 1\n\n[clients.web1.check]\nevery = "30d"\n'
    )
    config = load_config(path)
    state_dir = config.server.state_dir
    retention_kit.record_verified(state_dir, "web1", january)
    daemon = Daemon(config, now=shifted_now(clock_offset(FIRE_AT, 1.0)), notifier=Notifier(""))
    async with serving(daemon):
        await eventually(
            lambda: (
                [r.result for r in runs(state_dir, "web1")[2:]] == [RunResult.OK, RunResult.WARNING]
            ),
            within=90,
            what="a pull and a maintenance run",
        )
    pull, maintain = runs(state_dir, "web1")[2:]
    assert (pull.kind, pull.trigger) == ("pull", "daemon")
    assert (maintain.kind, maintain.trigger) == ("maintain", "daemon")
    assert pull.finished is not None
    assert maintain.started >= pull.finished  # after the pull, not beside it
    assert sorted(archives(tmp_path, repo)) == sorted([str(pull.archive), "evil-2099"])
    with History.open(state_dir) as history:
        for operation in ("prune", "compact", "check"):
            step = history.last_operation("web1", operation)
            assert step is not None, operation
            assert step.result is RunResult.OK, (operation, step.detail)
        prune = history.last_operation("web1", "prune")
        assert prune is not None
        assert prune.detail == "removed 2: old-1, old-2; kept 2"
        unverified = history.last_operation("web1", "unverified")
        assert unverified is not None
        assert unverified.result is RunResult.WARNING
        assert unverified.detail is not None
        assert "tampering suspected: 1 archive(s)" in unverified.detail
        assert "'evil-2099'" in unverified.detail


@pytest.mark.usefixtures("server_borg_env")
async def test_daemon_does_not_prune_after_a_suspicious_archive(
    sshd: SshdServer, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, "web1")
    forge_old_archives(tmp_path, repo)
    empty = tmp_path / "emptied"
    empty.mkdir()
    client = sshd_client(sshd, "web1", repo, empty, schedule="0 2 * * *")
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, sshd=sshd, clients={"web1": client})
    path.write_text(path.read_text() + "\n[clients.web1.retention]\nkeep_daily = 1\n")
    config = load_config(path)
    daemon = Daemon(config, now=shifted_now(clock_offset(FIRE_AT, 1.0)), notifier=Notifier(""))
    async with serving(daemon):
        await eventually(
            lambda: (
                [r.result for r in runs(config.server.state_dir, "web1")] == [RunResult.WARNING]
            ),
            within=90,
            what="the pull of an empty tree",
        )
    # The stop waited for the run, hook included: no maintenance run, nothing pruned.
    (pull,) = runs(config.server.state_dir, "web1")
    assert pull.error is not None
    assert "0 files" in pull.error
    assert sorted(archives(tmp_path, repo)) == sorted(["old-1", "old-2", str(pull.archive)])


@pytest.mark.usefixtures("server_borg_env")
async def test_the_maintenance_after_a_pull_holds_the_client_lock(
    sshd: SshdServer, tmp_path: Path
) -> None:
    """Between the pull and the end of its maintenance a one-shot pull is busy, and `--wait`
    waits for the end."""
    repo = make_repo(tmp_path, "web1")
    data = make_data(tmp_path, "web1")
    client = sshd_client(sshd, "web1", repo, data)
    path = write_config(tmp_path / "borgtunnel.toml", tmp_path, sshd=sshd, clients={"web1": client})
    config = load_config(path)
    in_hook = asyncio.Event()
    release = asyncio.Event()

    async def slow_maintenance(outcome: PullOutcome, history: History) -> None:
        assert outcome.result is RunResult.OK
        in_hook.set()
        await release.wait()

    with History.open(config.server.state_dir) as history:
        first = asyncio.create_task(
            run_recorded(
                config,
                config.clients["web1"],
                trigger="daemon",
                history=history,
                after=slow_maintenance,
            )
        )
        try:
            async with asyncio.timeout(60):
                await in_hook.wait()
            busy = await run_cli("--config", str(path), "pull", "web1")
            assert busy.returncode == 2
            assert "busy" in busy.stdout
            waiting = asyncio.create_task(run_cli("--config", str(path), "pull", "web1", "--wait"))
            await asyncio.sleep(1)
            assert not waiting.done()
        finally:
            release.set()
        outcome = await first
        assert outcome.result is RunResult.OK
        waited = await waiting
        assert waited.returncode == 0, waited.stdout + waited.stderr
    assert len(archives(tmp_path, repo)) == 2
