"""What ``borgtunnel doctor`` keeps of a client's answer stays bounded and cannot crash it."""

from __future__ import annotations

import json

from borgtunnel.ssh.doctor import MAX_FACTS, MAX_OTHER_LINES, DoctorReport


def test_a_flood_of_lines_and_invented_keys_is_kept_bounded() -> None:
    report = DoctorReport("c1", "u@h:22")
    for index in range(100_000):
        report.said(f"noise {index}\n")
        report.learn(f"key{index}", "x")
    report.learn("key0", "updated")

    assert report.other_output == [f"noise {i}" for i in range(100_000 - MAX_OTHER_LINES, 100_000)]
    assert len(report.facts) == MAX_FACTS
    assert report.facts["key0"] == "updated"


def test_a_hostile_policy_line_cannot_crash_the_report() -> None:
    for policy in (
        "[" * 5000,
        "[1, 2]",
        json.dumps({"paths": [1, None], "restore": True, "restore_targets": {"a": 1}}),
    ):
        report = DoctorReport("c1", "u@h:22", facts={"gatekeeper": "1", "policy": policy})
        assert report.gatekeeper_text().startswith("version 1, policy ")
