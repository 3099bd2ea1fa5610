"""Prometheus metrics after real pulls: the daemon's endpoint and the textfile (daemon and
one-shot ``pull``), parsed with prometheus-client's own parser and checked against what borg
itself says about the archive."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from borgtunnel.config import load_config
from borgtunnel.history import History, RunResult
from tests import pullkit
from tests.daemon_support import (
    FIRE_AT,
    clock_offset,
    eventually,
    finished_runs,
    make_data,
    make_repo,
    server_env,
    serving,
    shifted_now,
    sshd_client,
    write_config,
)
from tests.reporting_kit import append_tables, setup_client
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def borg_stats(root_env: dict[str, str], repo: Path, archive: str) -> tuple[int, int]:
    """(nfiles, original_size) as borg itself reports the archive."""
    import subprocess  # noqa: PLC0415 - only this helper runs borg here

    out = subprocess.run(
        ["borg", "info", "--json", f"{repo}::{archive}"],
        env=root_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    stats = json.loads(out)["archives"][0]["stats"]
    return int(stats["nfiles"]), int(stats["original_size"])


def check_client_samples(got: Samples, *, borg: tuple[int, int], started: float) -> None:
    web1 = (("client", "web1"),)
    assert got[("borgtunnel_last_result", (("client", "web1"), ("result", "ok")))] == 1
    assert got[("borgtunnel_last_result", (("client", "web1"), ("result", "failed")))] == 0
    assert got[("borgtunnel_runs_total", (("client", "web1"), ("result", "ok")))] == 1
    assert got[("borgtunnel_runs_total", (("client", "web1"), ("result", "failed")))] == 0
    assert got[("borgtunnel_last_files", web1)] == borg[0]
    # borg create --json counts a little metadata that borg info leaves out (~0.3 % here).
    assert got[("borgtunnel_last_original_bytes", web1)] == pytest.approx(borg[1], rel=0.05)
    assert got[("borgtunnel_last_deduplicated_bytes", web1)] > 0
    assert got[("borgtunnel_last_success_timestamp_seconds", web1)] == pytest.approx(started)
    assert got[("borgtunnel_last_run_timestamp_seconds", web1)] >= started
    assert got[("borgtunnel_last_run_duration_seconds", web1)] > 0
    assert got[("borgtunnel_stale", web1)] == 0
    assert got[("borgtunnel_running", web1)] == 0


async def test_daemon_serves_metrics_and_writes_the_textfile(tmp_path: Path, sshd: SshdServer):
    repo = make_repo(tmp_path, "web1")
    data = make_data(tmp_path, "web1", random_bytes=200_000)
    textfile = tmp_path / "textfile" / "borgtunnel.prom"
    textfile.parent.mkdir()
    path = write_config(
        tmp_path / "bt.toml",
        tmp_path,
        sshd=sshd,
        clients={"web1": sshd_client(sshd, "web1", repo, data, schedule="0 2 * * *")},
    )
    append_tables(path, {"metrics": {"listen": "127.0.0.1:0", "textfile": str(textfile)}})
    config = load_config(path)
    from borgtunnel.scheduling.daemon import Daemon  # noqa: PLC0415 - keeps the test's imports short
    from borgtunnel.systemd import Notifier  # noqa: PLC0415

    daemon = Daemon(config, now=shifted_now(clock_offset(FIRE_AT, 2.0)), notifier=Notifier(""))
    async with serving(daemon):
        assert daemon.reporter is not None
        port = daemon.reporter.metrics_port
        assert port is not None
        await eventually(
            lambda: finished_runs(config.server.state_dir, "web1"), within=90, what="the pull"
        )
        (run,) = finished_runs(config.server.state_dir, "web1")
        assert run.result is RunResult.OK, run.error
        assert run.archive is not None
        figures = borg_stats(server_env(tmp_path), repo, run.archive)

        def scrape() -> str:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                return str(response.read().decode())

        served = samples(await asyncio.to_thread(scrape))
        check_client_samples(served, borg=figures, started=run.started.timestamp())
        assert served[("borgtunnel_queue_length", ())] == 0
        assert served[("borgtunnel_running_pulls", ())] == 0
        written = samples(textfile.read_text())
        check_client_samples(written, borg=figures, started=run.started.timestamp())
    assert list(textfile.parent.iterdir()) == [textfile]  # no temporary file left behind


def test_one_shot_pull_writes_the_textfile(tmp_path: Path, sshd: SshdServer):
    textfile = tmp_path / "borgtunnel.prom"
    _, repo, config = setup_client(
        tmp_path, sshd, name="web1", tables={"metrics": {"textfile": str(textfile)}}
    )
    result = pullkit.run_cli(config, "pull", "web1")
    assert result.returncode == 0, result.stderr
    (archive,) = pullkit.archives(tmp_path, repo)
    with History.open(load_config(config).server.state_dir) as history:
        run = history.last_run("web1")
    assert run is not None
    got = samples(textfile.read_text())
    env = pullkit.borg_env(tmp_path)
    check_client_samples(got, borg=borg_stats(env, repo, archive), started=run.started.timestamp())
    assert ("borgtunnel_queue_length", ()) not in got  # only the daemon has a queue
