"""The retention's keep rules (maintenance/keeprules.py) against borg's own prune selection.

Each borg install's own functions run in a child process of its Python
(tests/borg_prune_reference.py): Debian's 1.2.4, the 1.4 build and the borg 2 beta in .borg/.
Hypothesis draws archive times, rules, "now" and the time zone; the selection must be borg's,
plus the newest verified archive, which borgtunnel always keeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from borgtunnel.config import RetentionSettings
from borgtunnel.maintenance.keeprules import NEWEST, Dated, keep
from tests import borgs

ZONES = ("UTC", "Europe/Berlin")
SCRIPT = Path(__file__).with_name("borg_prune_reference.py")


class Reference:
    """One borg's prune selection, answering requests over a pipe."""

    def __init__(self, python: str, zone: str) -> None:
        env = {"PATH": os.environ["PATH"], "TZ": zone, "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen(
            [python, str(SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def keep(
        self, archives: list[Dated], rules: RetentionSettings, now: datetime
    ) -> dict[str, str]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        request = {
            "archives": [[a.key, a.time.isoformat()] for a in archives],
            "rules": {
                "within": rules.keep_within,
                **{
                    n: getattr(rules, f"keep_{n}")
                    for n in ("hourly", "daily", "weekly", "monthly", "yearly")
                },
            },
            "now": now.isoformat(),
        }
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the reference borg process ended"
        answer: dict[str, str] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _python(version: str) -> str:
    borgs.executable(version)  # fails (never skips) when that borg is not installed
    if version == borgs.DEBIAN_VERSION:
        return "/usr/bin/python3"
    return str(borgs.ROOT / ".borg" / version / "bin" / "python")


@pytest.fixture(scope="module", params=ZONES)
def zone(request: pytest.FixtureRequest) -> Iterator[str]:
    """The process's local time zone (borg's periods are local), put back afterwards."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    try:
        yield request.param
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.fixture(scope="module", params=[borgs.DEBIAN_VERSION, borgs.BUILT[0], borgs.BORG2])
def reference(request: pytest.FixtureRequest, zone: str) -> Iterator[tuple[Reference, bool]]:
    ref = Reference(_python(request.param), zone)
    try:
        yield ref, request.param.startswith("2.")
    finally:
        ref.close()


START = datetime(2024, 1, 1)  # noqa: DTZ001 - hypothesis wants naive bounds; UTC is added
END = datetime(2027, 12, 31)  # noqa: DTZ001

times = st.datetimes(min_value=START, max_value=END).map(lambda d: d.replace(tzinfo=UTC))
rules_strategy = (
    st.fixed_dictionaries(
        {
            "keep_within": st.none() | st.sampled_from(["1H", "6H", "1d", "3d", "1w", "1m", "1y"]),
            "keep_hourly": st.integers(0, 4),
            "keep_daily": st.integers(0, 4),
            "keep_weekly": st.integers(0, 4),
            "keep_monthly": st.integers(0, 4),
            "keep_yearly": st.integers(0, 3),
        }
    )
    .filter(lambda r: r["keep_within"] is not None or any(v for v in r.values() if v))
    .map(RetentionSettings.model_validate)
)


def _dense(base: datetime, offsets: list[int]) -> list[datetime]:
    """Archives a few hours apart, so that periods collide as in real use."""
    return [base + timedelta(minutes=m) for m in offsets]


archive_times = st.lists(times, min_size=1, max_size=25, unique=True) | st.builds(
    _dense, times, st.lists(st.integers(0, 60 * 24 * 90), min_size=1, max_size=30, unique=True)
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(when=archive_times, rules=rules_strategy, now_offset=st.integers(-3, 400))
def test_the_selection_is_borgs_plus_the_newest(
    reference: tuple[Reference, bool],
    when: list[datetime],
    rules: RetentionSettings,
    now_offset: int,
) -> None:
    ref, borg2 = reference
    archives = [Dated(f"k{i}", t) for i, t in enumerate(when)]
    now = max(when) + timedelta(days=now_offset)
    expected = ref.keep(archives, rules, now)
    newest = max(archives, key=lambda a: a.time)
    expected.setdefault(newest.key, NEWEST)
    assert keep(archives, rules, now, borg2=borg2) == expected


def test_the_newest_survives_a_keep_within_that_nothing_is_inside() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    archives = [Dated("old", now - timedelta(days=9)), Dated("older", now - timedelta(days=10))]
    rules = RetentionSettings(keep_within="2d")
    for borg2 in (False, True):
        assert keep(archives, rules, now, borg2=borg2) == {"old": NEWEST}


def test_nothing_to_keep_from_nothing() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert keep([], RetentionSettings(keep_daily=7), now, borg2=False) == {}
