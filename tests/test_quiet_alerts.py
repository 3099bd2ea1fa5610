"""Quiet at scale: first-slot staleness, one message per state change, digests per URL, and log
lines that do not grow with the fleet.

The delivery tests use real apprise posting ``json://`` messages to an HTTP receiver on
127.0.0.1 (``tests/reporting_kit.py``); only the pure composition is tested with plain values.
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from borgtunnel.config import ConfigError, load_config, parse_config
from borgtunnel.history import History, RunResult
from borgtunnel.reporting import metrics
from borgtunnel.reporting.notify import Decided, Message, digest, per_url
from borgtunnel.reporting.reporter import Reporter
from borgtunnel.reporting.status import client_status
from borgtunnel.scheduling.daemon import Daemon
from borgtunnel.systemd import Notifier
from tests.daemon_support import eventually, offline_client, serving, write_config
from tests.reporting_kit import Receiver, kinds
from tests.test_reporting_unit import client_table, config_for, outcome, recorded

FIRST_SEEN = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
FIRST_SLOT = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)  # "0 2 * * *" after FIRST_SEEN


@pytest.fixture
def receivers() -> Any:
    pair = (Receiver(), Receiver())
    try:
        yield pair
    finally:
        for receiver in pair:
            receiver.close()


# --- composition ----------------------------------------------------------------------------


def test_a_digest_counts_by_kind_lists_each_client_and_takes_the_worst_colour():
    messages = [
        Message(
            "a", "stale", "borgtunnel: a has no recent backup", "client: a\nlast good backup: never"
        ),
        Message(
            "b", "failure", "borgtunnel: backup of b FAILED", "client: b\nerror: refused\nx: y"
        ),
        Message("c", "stale", "borgtunnel: c has no recent backup", "client: c"),
    ]
    said = digest(messages)
    assert said.title == "borgtunnel: 3 changes: 2 stale, 1 failed"
    assert said.kind == "failure"
    assert said.body.splitlines() == [
        "- a has no recent backup",
        "  last good backup: never",
        "- backup of b FAILED",
        "  error: refused",
        "- c has no recent backup",
    ]


def test_each_url_gets_its_own_messages_only_and_a_single_one_unchanged():
    a = Message("a", "stale", "borgtunnel: a has no recent backup", "client: a")
    b = Message("b", "failure", "borgtunnel: backup of b FAILED", "client: b")
    batch = [
        Decided(1, a, ("json://shared", "json://a-only")),
        Decided(2, b, ("json://shared",)),
    ]
    sent = per_url(batch)
    assert sent["json://a-only"] == a  # one message: as it is, not a digest of one
    assert sent["json://shared"].title == "borgtunnel: 2 changes: 1 stale, 1 failed"
    assert set(sent) == {"json://shared", "json://a-only"}


@pytest.mark.parametrize("value", ['"-1s"', "3601", '"soon"', "true"])
def test_digest_window_is_validated_and_named(tmp_path, value):
    path = write_config(tmp_path / "bt.toml", tmp_path, clients={"c": offline_client(tmp_path)})
    path.write_text(path.read_text() + f"\n[notify]\ndigest_window = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [key for key, _ in caught.value.problems] == ["notify.digest_window"]


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ('"0"', 0.0), ('"2m"', 120.0)])
def test_digest_window_accepts_zero_and_durations(tmp_path, value, seconds):
    path = write_config(tmp_path / "bt.toml", tmp_path, clients={"c": offline_client(tmp_path)})
    path.write_text(path.read_text() + f"\n[notify]\ndigest_window = {value}\n")
    assert load_config(path).notify.digest_window == seconds


# --- first-slot staleness -------------------------------------------------------------------


class _Sent:
    def __init__(self) -> None:
        self.titles: list[str] = []

    async def __call__(self, url: str, title: str, *_: object) -> None:
        self.titles.append(title)


@pytest.mark.parametrize(
    ("now", "stale"),
    [
        (FIRST_SLOT + timedelta(hours=1) - timedelta(seconds=1), False),
        (FIRST_SLOT + timedelta(hours=1, seconds=1), True),
    ],
)
async def test_a_never_backed_up_client_is_not_stale_before_its_first_slot_plus_max_age(
    tmp_path, now, stale
):
    config = config_for(
        tmp_path,
        clients={"web1": client_table(schedule="0 2 * * *", max_age="1h")},
        notify={"urls": ["json://127.0.0.1:1/x"], "digest_window": 0},
        daemon={"timezone": "UTC"},
    )
    sender = _Sent()
    with History.open(config.server.state_dir) as history:
        history.record_first_seen(["web1"], FIRST_SEEN)
        reporter = Reporter(config, history, in_daemon=True, sender=sender, now=lambda: now)
        reporter.check_staleness(force=True)
        await reporter.aclose(5)
        row = client_status(config, history, config.clients["web1"], now)
        snapshot = metrics.build_snapshot(config, history)
    assert row.stale is stale
    assert snapshot.clients[0].stale(now.timestamp()) is stale
    assert kinds(sender.titles) == (["stale"] if stale else [])


def test_without_any_sighting_a_never_backed_up_client_is_stale_as_before(tmp_path):
    config = config_for(tmp_path, clients={"web1": client_table(max_age="1h")})
    with History.open(config.server.state_dir) as history:
        row = client_status(config, history, config.clients["web1"], datetime.now(UTC))
    assert row.stale is True  # nothing known: no daemon saw it, it never ran


# --- real apprise to a local HTTP receiver ---------------------------------------------------


def _fleet_config(tmp_path: Path, urls: list[str], *, stale: int, new: int) -> Path:
    clients = {
        f"old{n:02d}": offline_client(tmp_path / f"o{n}", max_age="1h") for n in range(stale)
    }
    clients |= {
        f"new{n:02d}": offline_client(tmp_path / f"n{n}", max_age="1h", schedule="0 2 * * *")
        for n in range(new)
    }
    path = write_config(tmp_path / "bt.toml", tmp_path, clients=clients)
    notify = {"urls": urls, "digest_window": 1, "retry_wait": 1}
    path.write_text(
        path.read_text()
        + "\n[notify]\n"
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in notify.items())
    )
    return path


async def test_fifty_clients_turning_stale_at_once_send_one_digest_per_url(tmp_path, receivers):
    urls = [receiver.json_url for receiver in receivers]
    config = load_config(_fleet_config(tmp_path, urls, stale=50, new=5))
    with History.open(config.server.state_dir) as history:
        # Seen by a daemon two days ago, never backed up since: stale (on demand, max_age 1h).
        history.record_first_seen(
            [f"old{n:02d}" for n in range(50)], datetime.now(UTC) - timedelta(days=2)
        )
    for start in range(2):  # a restart must not say it again
        daemon = Daemon(config, notifier=Notifier(""))
        with capture_logs() as logs:
            async with serving(daemon):
                if start == 0:
                    await eventually(
                        lambda: all(r.messages() for r in receivers), within=30, what="digests"
                    )
                await asyncio.sleep(2.5)  # more than the window: a second message would be here
        ready = [e for e in logs if e["event"] == "daemon_ready"]
        assert ready == [
            {
                "event": "daemon_ready",
                "log_level": "info",
                "clients": 55,
                "scheduled": 5,
                "catching_up": 0,
                "next_run": ready[0]["next_run"],
            }
        ]
    for receiver in receivers:
        (message,) = receiver.messages()
        assert message["title"] == "borgtunnel: 50 changes: 50 stale"
        assert message["type"] == "warning"
        listed = [line for line in message["message"].splitlines() if line.startswith("- ")]
        assert listed == [f"- old{n:02d} has no recent backup" for n in range(50)]
        assert "new" not in message["message"]  # first seen now: not stale before slot + 1h
    with History.open(config.server.state_dir) as history:
        states = {history.notifications(f"old{n:02d}")[0].state for n in range(50)}
        assert not any(history.notifications(f"new{n:02d}") for n in range(5))
    assert states == {"sent"}
    stale_lines = [e for e in logs if e["event"] == "clients_turned_stale"]
    assert stale_lines == []  # the second start found them already notified


async def test_a_failure_then_a_recovery_send_one_message_each(tmp_path, receivers):
    receiver = receivers[0]
    config = config_for(
        tmp_path, notify={"urls": [receiver.json_url], "digest_window": 0.5, "retry_wait": 1}
    )
    web1 = config.clients["web1"]
    with History.open(config.server.state_dir) as history:
        reporter = Reporter(config, history, in_daemon=True)
        for _ in range(2):  # a failure streak: said once
            reporter.after_run(
                web1, outcome(RunResult.FAILED, run_id=recorded(history, RunResult.FAILED))
            )
        await eventually(lambda: len(receiver.messages()) == 1, within=30, what="the failure")
        for _ in range(2):  # two good runs: one recovery
            reporter.after_run(web1, outcome(RunResult.OK, run_id=recorded(history, RunResult.OK)))
        await eventually(lambda: len(receiver.messages()) == 2, within=30, what="the recovery")
        await asyncio.sleep(1)
        await reporter.aclose(5)
    assert kinds(receiver.titles()) == ["failure", "recovery"]
    assert [m["type"] for m in receiver.messages()] == ["failure", "success"]


# --- the documentation's example ------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "catch-up-and-alerts.md"


def test_the_documented_example_loads_with_the_values_it_describes():
    match = re.search(
        r"```toml\n# example: catch-up and alerts[^\n]*\n(.*?)```", DOC.read_text(), re.DOTALL
    )
    assert match, "the example block is gone from docs/catch-up-and-alerts.md"
    config = parse_config(tomllib.loads(match.group(1)))
    assert config.notify.digest_window == 60
    assert config.clients["web1"].catch_up is True
    assert config.clients["laptop"].catch_up is False
    assert config.daemon.max_parallel == 4
    assert config.max_age_for(config.clients["web1"]) == 36 * 3600
