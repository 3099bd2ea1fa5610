"""Unit tests of the pure maintenance rules: durations, argv, due logic, tamper, sanity; history."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from borgtunnel.config import (
    CheckSettings,
    ConfigError,
    RetentionSettings,
    parse_config,
)
from borgtunnel.durations import parse_borg_interval
from borgtunnel.history import SCHEMA_VERSION, History, Operation, RunResult
from borgtunnel.maintenance import retention
from borgtunnel.maintenance.run import UNVERIFIED, MaintainOutcome, Step, news_of_unverified
from borgtunnel.maintenance.tamper import missing_archives, tamper_report, unverified_message
from borgtunnel.runs.sanity import sanity_warning

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def client() -> dict[str, object]:
    return {"host": "h", "repository": "/srv/borg/web1", "paths": ["/etc"], "encryption": "none"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30d", timedelta(days=30)), ("12H", timedelta(hours=12)), ("2w", timedelta(weeks=2))],
)
def test_durations(text, expected):
    assert parse_borg_interval(text) == expected


@pytest.mark.parametrize("text", ["", "5", "0d", "3x", "-1d", "1.5d", "d", "30 d"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_borg_interval(text)


def test_config_errors_name_the_dotted_key():
    data = {
        "clients": {
            "web1": {
                **client(),
                "retention": {"keep_within": "2x", "keep_daily": -1},
                "check": {"every": "soon", "verify_data": "maybe"},
                "max_shrink": 0,
            },
            "db1": {**client(), "retention": {"compact": True}},
        }
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    keys = {key for key, _ in caught.value.problems}
    assert keys == {
        "clients.web1.retention.keep_within",
        "clients.web1.retention.keep_daily",
        "clients.web1.check.every",
        "clients.web1.check.verify_data",
        "clients.web1.max_shrink",
        "clients.db1.retention",
    }


def test_delete_argv_names_exactly_the_archives_after_the_options_end():
    argv = retention.delete_argv("borg", Path("/srv/borg/-odd"), ["-a", "b *"], borg2=False)
    assert argv == ["borg", "delete", "--log-json", "--", "/srv/borg/-odd", "-a", "b *"]


def test_check_argv_verify_data():
    repo = Path("/r")
    assert "--verify-data" not in retention.check_argv("borg", repo, CheckSettings())
    assert "--verify-data" in retention.check_argv("borg", repo, CheckSettings(verify_data=True))


def test_parse_archives_from_info_and_list_json():
    text = json.dumps(
        {
            "archives": [
                {
                    "name": "a",
                    "id": "f" * 64,
                    "start": "2026-11-01T10:00:00.000000",
                    "stats": {"nfiles": 3, "original_size": 10, "deduplicated_size": 5},
                },
                {"name": "b", "id": "e" * 64, "time": "2026-11-02T10:00:00.000000"},
            ]
        }
    )
    a, b = retention.parse_archives(text)
    assert (a.name, a.nfiles, a.original_size, a.deduplicated_size) == ("a", 3, 10, 5)
    assert (b.time, b.nfiles) == ("2026-11-02T10:00:00.000000", None)
    with pytest.raises(ValueError, match="unreadable"):
        retention.parse_archives("not json")


def test_check_due_and_compact_pending():
    every = CheckSettings(every="30d")
    assert retention.check_due(None, None, NOW) is False
    assert retention.check_due(every, None, NOW) is True
    assert retention.check_due(every, NOW - timedelta(days=29), NOW) is False
    assert retention.check_due(every, NOW - timedelta(days=30), NOW) is True
    rules = RetentionSettings(keep_daily=1)
    assert retention.compact_pending(rules, None, None) is False
    assert retention.compact_pending(rules, NOW, None) is True
    assert retention.compact_pending(rules, NOW, NOW - timedelta(seconds=1)) is True
    assert retention.compact_pending(rules, NOW, NOW + timedelta(seconds=1)) is False
    no_compact = RetentionSettings(keep_daily=1, compact=False)
    assert retention.compact_pending(no_compact, NOW, None) is False


def test_requested_plan():
    assert retention.requested_plan(prune=False, compact=False, check=False) is None
    plan = retention.requested_plan(prune=False, compact=True, check=True)
    assert plan is not None
    assert plan.names() == ["compact", "check"]


def test_tamper_report_names_missing_archives_and_the_way_back():
    assert missing_archives({"a", "b"}, {"a", "b", "new"}) == ()
    assert tamper_report("web1", Path("/srv/borg/web1"), {"a"}, {"a": "1", "z": "2"}) is None
    report = tamper_report("web1", Path("/srv/borg/web1"), {"b", "a", "c"}, {"a": "1"})
    assert report is not None
    assert report.missing == ("b", "c")
    text = report.message()
    for needle in (
        "'b'",
        "'c'",
        "/srv/borg/web1/transactions",
        "manifest-timestamp",
        "borgtunnel maintain web1 --accept-missing",
    ):
        assert needle in text
    assert "replaced" not in text


def test_an_archive_made_again_under_a_known_name_is_reported_as_replaced():
    known = {"a": "1", "b": "2", "gone": "3"}
    present = {"a": "1", "b": "9", "new": "4"}
    report = tamper_report("web1", Path("/r"), {"a", "b"}, present, known)
    assert report is not None
    assert (report.missing, report.replaced) == ((), ("b",))
    assert "1 archive(s) in /r were replaced by another archive of the same name" in (
        report.message()
    )
    assert tamper_report("web1", Path("/r"), {"a"}, present, {"a": "1"}) is None


@pytest.mark.parametrize(
    ("now", "before", "warned"),
    [
        ((0, 0), (10, 100), "0 files"),
        ((0, 0), (None, None), "0 files"),
        ((4, 100), (10, 100), "file count fell by 60 %"),
        ((10, 40), (10, 100), "original size fell by 60 %"),
        ((5, 50), (10, 100), None),  # exactly 50 %: not more than max_shrink
        ((10, 100), (None, None), None),  # the first archive
        ((20, 300), (10, 100), None),  # growth
    ],
)
def test_sanity_warning(now, before, warned):
    reason = sanity_warning(now[0], now[1], before[0], before[1], 50.0)
    if warned is None:
        assert reason is None
    else:
        assert reason is not None
        assert warned in reason


# --- history -------------------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, client TEXT NOT NULL, trigger TEXT NOT NULL,
    started TEXT NOT NULL, finished TEXT, result TEXT NOT NULL, exit_code INTEGER, archive TEXT,
    original_size INTEGER, compressed_size INTEGER, deduplicated_size INTEGER, nfiles INTEGER,
    duration REAL, error TEXT, pid INTEGER NOT NULL, pid_start INTEGER, boot_id TEXT
);
CREATE INDEX runs_by_client ON runs (client, started DESC, id DESC);
CREATE INDEX runs_running ON runs (result) WHERE result = 'running';
INSERT INTO runs (client, trigger, started, finished, result, archive, pid)
VALUES ('web1', 'daemon', '2026-11-01T02:00:00.000000+00:00',
        '2026-11-01T02:01:00.000000+00:00', 'ok', 'web1-old', 1);
PRAGMA user_version = 1;
"""


def test_a_version_1_database_is_migrated_and_its_runs_are_pulls(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    conn = sqlite3.connect(state / "history.sqlite3")
    conn.executescript(V1_SCHEMA)
    conn.close()
    with History.open(state) as history:
        (run,) = history.last_runs("web1")
        assert (run.kind, run.archive, run.result) == ("pull", "web1-old", RunResult.OK)
        assert history.expected_archives("web1") == {"web1-old"}
        assert history.last_success("web1") is not None
    conn = sqlite3.connect(state / "history.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_expected_archives_subtract_our_removals_and_count_a_recreated_name(tmp_path):
    with History.open(tmp_path) as history:
        for name in ("a", "b", "c"):
            run = history.start_run("web1", "pull")
            history.finish_run(run, RunResult.OK, archive=name)
        failed = history.start_run("web1", "pull")
        history.finish_run(failed, RunResult.FAILED, archive="never-made")
        other = history.start_run("db1", "pull")
        history.finish_run(other, RunResult.OK, archive="x")
        maintain = history.start_run("web1", "maintain", kind="maintain")
        history.finish_run(maintain, RunResult.OK, archive="not-an-archive-we-made")
        assert history.expected_archives("web1") == {"a", "b", "c"}
        history.remember_archive_ids("web1", {"a": "id-a", "c": "id-c"})
        history.remember_archive_ids("web1", {"a": "other", "b": "id-b"})  # known ones stay
        assert history.archive_ids("web1") == {"a": "id-a", "b": "id-b", "c": "id-c"}
        history.remember_archive_ids("web1", {"c": "id-c2"}, replace=True)
        assert history.archive_ids("web1")["c"] == "id-c2"
        history.record_removals("web1", ["a", "b"], "pruned", maintain)
        assert history.archive_ids("web1") == {"c": "id-c2"}  # removed names are forgotten
        assert history.expected_archives("web1") == {"c"}
        again = history.start_run("web1", "pull", started=NOW + timedelta(days=3650))
        history.finish_run(again, RunResult.OK, archive="a", finished=NOW + timedelta(days=3650))
        assert history.expected_archives("web1") == {"a", "c"}
        assert history.last_removal("web1", "pruned") is not None
        assert history.last_removal("web1", "accepted") is None
        # The maintain run is no "last success" of the client: only pulls make archives.
        last = history.last_success("web1")
        assert last is not None
        assert last.kind == "pull"


def test_verified_archives_carry_the_servers_start_time_and_id(tmp_path):
    with History.open(tmp_path) as history:
        for day, name in ((1, "a"), (2, "b")):
            when = NOW + timedelta(days=day)
            run = history.start_run("web1", "pull", started=when)
            history.finish_run(
                run,
                RunResult.WARNING if name == "b" else RunResult.OK,
                archive=name,
                archive_id=name * 64,
                finished=when + timedelta(hours=5),  # a slow pull: its start is the time
            )
        failed = history.start_run("web1", "pull", started=NOW)
        history.finish_run(failed, RunResult.FAILED, archive="c", archive_id="c" * 64)
        verified = history.verified_archives("web1")
        assert set(verified) == {"a", "b"}
        assert verified["a"].time == NOW + timedelta(days=1)
        assert verified["b"].id == "b" * 64
        by_id = history.verified_archives("web1", by_id=True)
        assert set(by_id) == {"a" * 64, "b" * 64}
        assert by_id["b" * 64].name == "b"
        maintain = history.start_run("web1", "maintain", kind="maintain")
        history.record_removals("web1", ["a" * 64], "pruned", maintain)
        assert set(history.verified_archives("web1", by_id=True)) == {"b" * 64}
        assert set(history.verified_archives("web1")) == {"a", "b"}  # 1.x removals go by name


def _unverified(*ids: str) -> str:
    web1 = parse_config({"clients": {"web1": client()}}).clients["web1"]
    archives = [retention.Archive(name=f"n-{i}", id=i * 64, time="2099-01-01") for i in ids]
    return unverified_message(web1, archives)


def test_an_unverified_report_is_news_once_per_set_of_archives():
    one, same, two = _unverified("a"), _unverified("a"), _unverified("b", "a")
    assert one == same
    assert one != two
    assert "tampering suspected: 1 archive(s)" in one
    assert "'n-a'" in one
    assert "not made by a verified pull" in one
    assert "2 unverified, fingerprint" in two
    assert _unverified("a", "b") == two  # the order of the listing does not matter

    def outcome(detail: str | None) -> MaintainOutcome:
        steps = [] if detail is None else [Step(UNVERIFIED, RunResult.WARNING, detail)]
        return MaintainOutcome(client="web1", steps=steps)

    def last(detail: str) -> Operation:
        return Operation(UNVERIFIED, NOW, NOW, RunResult.WARNING, None, detail)

    assert news_of_unverified(outcome(None), last(one)) is None
    assert news_of_unverified(outcome(one), None) == one
    assert news_of_unverified(outcome(one), last(same)) is None
    assert news_of_unverified(outcome(two), last(one)) == two


def test_operations_are_recorded_and_the_newest_is_found(tmp_path):
    with History.open(tmp_path) as history:
        run = history.start_run("web1", "maintain", kind="maintain")
        for offset, result in ((0, RunResult.OK), (60, RunResult.FAILED)):
            when = NOW + timedelta(seconds=offset)
            history.record_operation(
                run, "web1", Operation("check", when, when, result, 1, f"at {offset}")
            )
        newest = history.last_operation("web1", "check")
        assert newest is not None
        assert (newest.result, newest.detail) == (RunResult.FAILED, "at 60")
        ok = history.last_operation("web1", "check", succeeded=True)
        assert ok is not None
        assert ok.detail == "at 0"
        assert history.last_operation("web1", "compact") is None


async def test_a_cancelled_local_borg_is_stopped_and_the_run_recorded_interrupted(tmp_path):
    import asyncio  # noqa: PLC0415 - only this test is async

    from borgtunnel.maintenance.run import maintain_locked  # noqa: PLC0415
    from tests.daemon_support import eventually  # noqa: PLC0415
    from tests.sshd import is_alive  # noqa: PLC0415

    fake = tmp_path / "fake-borg"
    # Stands in for a long borg check: records its pid, answers `list`, hangs on `check`.
    fake.write_text(
        "#!/bin/sh\n"
        f'echo $$ > "{tmp_path}/$1.pid"\n'
        "case $1 in list) echo '{\"archives\": []}'; exit 0 ;; esac\n"
        "exec sleep 60\n"
    )
    fake.chmod(0o755)
    config = parse_config(
        {
            "server": {"state_dir": str(tmp_path / "state"), "borg": str(fake)},
            "clients": {"web1": {**client(), "check": {"every": "1d"}}},
        }
    )
    check_pid = tmp_path / "check.pid"
    with History.open(tmp_path / "state") as history:
        task = asyncio.create_task(maintain_locked(config, config.clients["web1"], history))
        try:
            await eventually(
                lambda: check_pid.exists() and check_pid.read_text().strip() != "",
                within=30,
                what="the check to start",
            )
        finally:
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not is_alive(int(check_pid.read_text()))
        (run,) = history.last_runs("web1")
        assert (run.kind, run.result) == ("maintain", RunResult.INTERRUPTED)
