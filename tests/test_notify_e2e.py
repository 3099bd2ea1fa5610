"""Notifications and healthchecks pings end to end: real sshd, real borg, the real CLI and daemon
processes, and an HTTP receiver on 127.0.0.1 standing in for the notification service.

The client's borg is a wrapper that fails while a flag file exists, so the same client goes
ok -> failed -> failed -> ok -> stale without touching the configuration.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from borgtunnel.config import load_config
from borgtunnel.history import History, RunResult
from tests import hostile, pullkit
from tests.daemon_support import daemon_process, has_event, wait_until
from tests.reporting_kit import (
    Receiver,
    append_tables,
    closed_port,
    flaky_borg,
    kinds,
    setup_client,
)
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

MAX_AGE = 30  # seconds: long enough that a few pulls in a row stay fresh on a loaded machine


def _finished(state_dir: Path) -> list[RunResult]:
    with History.open(state_dir) as history:
        return [r.result for r in history.last_runs("c1", 100)[::-1]]


def test_failure_recovery_and_stale_are_sent_once_each_and_survive_restarts(
    tmp_path: Path, sshd: SshdServer, receiver: Receiver
) -> None:
    script, flag = flaky_borg(tmp_path / "client-bin")
    _, repo, config = setup_client(
        tmp_path,
        sshd,
        client={
            "remote_borg": str(script),
            "max_age": f"{MAX_AGE}s",
            "healthchecks": receiver.ping_base(),
        },
        tables={"notify": {"urls": [receiver.json_url], "timeout": 10, "retry_wait": 1}},
    )
    state_dir = load_config(config).server.state_dir

    first = pullkit.run_cli(config, "pull", "c1")
    assert first.returncode == 0, first.stderr
    assert receiver.titles() == []  # fresh and fine: nothing to say

    flag.touch()
    for _ in range(2):  # two failures in a row, each in a new process: one message
        failed = pullkit.run_cli(config, "pull", "c1")
        assert failed.returncode == 2, failed.stderr
    assert kinds(receiver.titles()) == ["failure"]

    flag.unlink()
    recovered = pullkit.run_cli(config, "pull", "c1")
    assert recovered.returncode == 0, recovered.stderr
    assert kinds(receiver.titles()) == ["failure", "recovery"]
    names = pullkit.archives(tmp_path, repo)
    assert len(names) == 2  # the two verified runs, read back from the repository

    # Wait (on the history's own timestamps) until the newest archive is older than max_age.
    with History.open(state_dir) as history:
        success = history.last_success("c1")
    assert success is not None
    wait_until(
        lambda: (datetime.now(UTC) - success.started).total_seconds() > MAX_AGE + 1,
        within=MAX_AGE + 30,
        what="the client to become stale",
        interval=0.5,
    )
    for attempt in range(2):  # the second daemon start must not repeat the stale notice
        log = tmp_path / f"daemon-{attempt}.log"
        with daemon_process(config, log) as daemon:
            wait_until(partial(has_event, log, "daemon_ready"), within=30, what="ready")
            if attempt == 0:
                # 2 messages and 8 pings so far; the stale notice makes it 11.
                receiver.wait_for(11, what="the stale notice")
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
    assert kinds(receiver.titles()) == ["failure", "recovery", "stale"]

    messages = receiver.messages()
    assert "client: c1" in messages[0]["message"]
    assert "result: failed" in messages[0]["message"]
    assert messages[0]["type"] == "failure"
    assert f"archive: {names[1]}" in messages[1]["message"]  # recovery names the new archive
    assert "last good backup: " in messages[2]["message"]
    with History.open(state_dir) as history:
        notes = history.notifications("c1")
    assert [(n.kind, n.state) for n in reversed(notes)] == [
        ("failure", "sent"),
        ("recovery", "sent"),
        ("stale", "sent"),
    ]
    assert _finished(state_dir) == [
        RunResult.OK,
        RunResult.FAILED,
        RunResult.FAILED,
        RunResult.OK,
    ]

    # healthchecks: /start for every run, success with the summary, /fail with the error.
    pings = receiver.pings()
    assert [path for path, _ in pings] == [
        "/ping/abc-123/start",
        "/ping/abc-123",
        "/ping/abc-123/start",
        "/ping/abc-123/fail",
        "/ping/abc-123/start",
        "/ping/abc-123/fail",
        "/ping/abc-123/start",
        "/ping/abc-123",
    ]
    assert pings[1][1].startswith("c1: ok archive=")
    assert "borg create failed" in pings[3][1]


def test_a_dead_notifier_changes_nothing_and_delays_by_at_most_its_timeout(
    tmp_path: Path, sshd: SshdServer
) -> None:
    script, flag = flaky_borg(tmp_path / "client-bin")
    dead = closed_port()
    timeout = 5
    _, repo, config = setup_client(
        tmp_path,
        sshd,
        client={"remote_borg": str(script), "healthchecks": f"http://127.0.0.1:{dead}/ping/x"},
        tables={
            # With every retry waited for, a run would take 3 x 30 s longer.
            "notify": {
                "urls": [f"json://127.0.0.1:{dead}/hook"],
                "timeout": timeout,
                "retries": 3,
                "retry_wait": 30,
            }
        },
    )
    started = time.monotonic()
    baseline = pullkit.run_cli(config, "pull", "c1")
    baseline_took = time.monotonic() - started
    assert baseline.returncode == 0, baseline.stderr

    flag.touch()
    failed = pullkit.run_cli(config, "pull", "c1")
    assert failed.returncode == 2, failed.stderr
    flag.unlink()
    started = time.monotonic()
    recovered = pullkit.run_cli(config, "pull", "c1")  # sends a recovery to the dead endpoint
    took = time.monotonic() - started
    assert recovered.returncode == 0, recovered.stderr
    assert recovered.stdout.startswith("c1: ok archive=")
    assert took < baseline_took + timeout + 30, (took, baseline_took)
    assert len(pullkit.archives(tmp_path, repo)) == 2

    events = [e for e in log_events_text(failed.stderr) if e.get("event") == "notification_failed"]
    assert events
    assert events[0]["level"] == "warning"
    assert events[0]["url"] == "#1 json://…"  # its place in the list, nothing of the URL
    assert f":{dead}" not in failed.stderr
    with History.open(load_config(config).server.state_dir) as history:
        results = [r.result for r in history.last_runs("c1", 10)]
        notes = history.notifications("c1")
    assert results == [RunResult.OK, RunResult.FAILED, RunResult.OK]
    # Not delivered, not forgotten: the daemon sends pending notices when it starts.
    assert [(n.kind, n.state) for n in reversed(notes)] == [
        ("failure", "pending"),
        ("recovery", "pending"),
    ]


def log_events_text(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a CLI run's stderr."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_notify_test_reports_each_url(tmp_path: Path, sshd: SshdServer, receiver: Receiver):
    dead = closed_port()
    _, _, config = setup_client(
        tmp_path,
        sshd,
        client={"notify": [f"json://127.0.0.1:{dead}/nobody"]},
        tables={"notify": {"urls": [receiver.json_url], "timeout": 5}},
    )
    result = pullkit.run_cli(config, "notify-test", "c1")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ok      #1 json://…"
    assert lines[1].startswith("FAILED  #2 json://…: ")
    assert f":{dead}" not in result.stdout
    assert f":{receiver.port}" not in result.stdout
    assert receiver.titles() == ["borgtunnel: test notification for c1"]


def test_a_key_change_through_the_tunnel_is_notified_as_tampering(
    tmp_path: Path, sshd: SshdServer, receiver: Receiver
) -> None:
    """The key guard's finding (issue 8) reaches the administrator as a tampering message, not
    as a plain failure, and the next honest pull as a recovery."""
    _, repo, config, conf, table = hostile.encrypted_setup(tmp_path, sshd)
    notify = {"notify": {"urls": [receiver.json_url], "timeout": 10}}
    append_tables(config, notify)
    assert pullkit.run_cli(config, "init", "c1").returncode == 0
    rekey = hostile.rekey_script(tmp_path, repo)
    pullkit.write_config(config, clients={"c1": {**table, "remote_borg": str(rekey)}}, **conf)
    append_tables(config, notify)

    tampered = pullkit.run_cli(config, "pull", "c1")
    assert tampered.returncode == 2, tampered.stdout + tampered.stderr
    assert kinds(receiver.titles()) == ["tampering"]  # not also a failure message
    message = receiver.messages()[0]
    assert message["type"] == "failure"
    assert "tampering: the repository key was changed" in message["message"]

    pullkit.write_config(config, clients={"c1": table}, **conf)
    append_tables(config, notify)
    honest = pullkit.run_cli(config, "pull", "c1")
    assert honest.returncode == 0, honest.stderr
    assert kinds(receiver.titles()) == ["tampering", "recovery"]
    assert len(pullkit.archives(tmp_path, repo, BORG_PASSPHRASE="right horse battery")) == 2
