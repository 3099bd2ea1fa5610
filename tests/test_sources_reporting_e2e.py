"""Which source failed, where an administrator looks (issue 19, item 6): ``status``, the
notification and the per-source Prometheus metrics, after real pulls (real sshd and borg) of a
client whose ``broken`` source fails while a flag file exists. Read from the history's per-run
source rows, never from the error text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import pullkit, sourcekit
from tests.reporting_kit import Receiver, append_tables
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd


def _source_samples(textfile: Path) -> dict[tuple[str, str], float]:
    """(metric, source) -> value of the borgtunnel_source_* samples of client c1."""
    found = {}
    for family in text_string_to_metric_families(textfile.read_text()):
        for sample in family.samples:
            if sample.name.startswith("borgtunnel_source_"):
                assert sample.labels["client"] == "c1"
                found[(sample.name, sample.labels["source"])] = sample.value
    return found


def test_a_failing_source_is_named_in_status_notification_and_metrics(
    tmp_path: Path, sshd: SshdServer, receiver: Receiver
) -> None:
    flag = tmp_path / "break-now"
    broken = f"if [ -e '{flag}' ]; then echo partial; exit 3; fi; echo complete"
    _repo, config = sourcekit.setup(
        tmp_path,
        sshd,
        [
            {"type": "command", "name": "fine", "command": ["echo", "fine"]},
            {"type": "command", "name": "broken", "command": ["sh", "-c", broken]},
        ],
    )
    textfile = tmp_path / "borgtunnel.prom"
    append_tables(
        config,
        {
            "notify": {"urls": [receiver.json_url], "timeout": 10, "retry_wait": 1},
            "metrics": {"textfile": str(textfile)},
        },
    )

    first = pullkit.run_cli(config, "pull", "c1")
    assert first.returncode == 0, first.stdout + first.stderr
    after_ok = _source_samples(textfile)
    ok_time = after_ok[("borgtunnel_source_last_success_timestamp_seconds", "broken")]
    assert after_ok[("borgtunnel_source_failing", "broken")] == 0
    assert after_ok[("borgtunnel_source_failures_total", "broken")] == 0

    flag.touch()
    failed = pullkit.run_cli(config, "pull", "c1")

    assert failed.returncode == 2, failed.stdout + failed.stderr
    [row] = json.loads(pullkit.run_cli(config, "status", "--json").stdout)
    assert row["failed_sources"] == ["broken"]
    assert "source 'broken' (command): sh exited with status 3" in row["last_error"]
    receiver.wait_for(1)
    [message] = receiver.messages()
    assert "FAILED" in message["title"]
    assert "failed sources: broken\n" in message["message"]
    samples = _source_samples(textfile)
    assert samples[("borgtunnel_source_failing", "broken")] == 1
    assert samples[("borgtunnel_source_failures_total", "broken")] == 1
    assert samples[("borgtunnel_source_failing", "fine")] == 0  # the run says nothing of it
    assert samples[("borgtunnel_source_last_success_timestamp_seconds", "broken")] == ok_time

    flag.unlink()
    again = pullkit.run_cli(config, "pull", "c1")
    assert again.returncode == 0, again.stdout + again.stderr
    samples = _source_samples(textfile)
    assert samples[("borgtunnel_source_failing", "broken")] == 0
    assert samples[("borgtunnel_source_failures_total", "broken")] == 1  # a counter
    assert samples[("borgtunnel_source_last_success_timestamp_seconds", "broken")] > ok_time
    [row] = json.loads(pullkit.run_cli(config, "status", "--json").stdout)
    assert (row["failed_sources"], row["last_error"]) == ([], None)
