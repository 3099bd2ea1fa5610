"""Reporting without SSH: durations, config keys, placeholder substitution, the notification
decisions against a real history database, metric families, and the guarantee that a broken or
hanging notifier never raises into (or holds up) the caller."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from borgtunnel.borg import ArchiveStats, parse_progress
from borgtunnel.config import Config, ConfigError, load_config, parse_config
from borgtunnel.durations import format_duration, parse_duration
from borgtunnel.history import History, RunResult, RunStats
from borgtunnel.reporting import metrics
from borgtunnel.reporting.notify import apprise_send, open_problems, redact_url
from borgtunnel.reporting.reporter import Reporter
from borgtunnel.reporting.staleness import is_stale
from borgtunnel.runs.hooks import hook_env, substitute
from borgtunnel.runs.pull import PullOutcome
from tests.reporting_kit import closed_port

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


_REPOSITORIES = itertools.count()


def client_table(**extra: Any) -> dict[str, Any]:
    """A client of its own repository (two may not share one)."""
    repository = f"/r{next(_REPOSITORIES)}"
    return {"host": "h", "repository": repository, "paths": ["/x"], "encryption": "none", **extra}


def config_for(tmp_path: Path, **tables: Any) -> Config:
    clients = tables.pop("clients", {"web1": client_table()})
    return parse_config(
        {"server": {"state_dir": str(tmp_path / "state")}, "clients": clients, **tables}
    )


# --- durations, staleness, config ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("36h", 129600), ("1d12h", 129600), ("90m", 5400), ("45s", 45), ("1w", 604800), (30, 30)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "36", "h", "12h1d", "1h1h", "-3h", "1.5x", "0s", "3 h"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match=r"."):
        parse_duration(text)


def test_format_and_staleness():
    assert format_duration(93784) == "1d 2h"
    assert is_stale(None, 3600, NOW) is True
    assert is_stale(NOW - timedelta(seconds=3601), 3600, NOW) is True
    assert is_stale(NOW - timedelta(seconds=3599), 3600, NOW) is False
    assert is_stale(None, None, NOW) is False


def test_config_keys_and_their_errors(tmp_path):
    config = config_for(
        tmp_path,
        defaults={"max_age": "2d", "after": [["/bin/true", "{client}"]], "hook_timeout": 5},
        notify={"urls": ["json://127.0.0.1:1/x"], "on": ["failure"]},
        metrics={"listen": "127.0.0.1:9468", "textfile": "/tmp/x.prom"},
        clients={
            "web1": client_table(max_age="36h", before=[["/bin/false"]], notify=["json://h/y"]),
            "db1": client_table(),
        },
    )
    web1, db1 = config.clients["web1"], config.clients["db1"]
    assert (config.max_age_for(web1), config.max_age_for(db1)) == (129600, 172800)
    assert config.hooks_for(web1).before == (("/bin/false",),)
    assert config.hooks_for(web1).after == (("/bin/true", "{client}"),)  # default kept
    assert config.hooks_for(db1).timeout == 5
    assert config.notify_urls_for(web1) == ("json://127.0.0.1:1/x", "json://h/y")
    redacted = config.redacted()
    assert redacted["notify"]["urls"] == ["<hidden>"]
    assert redacted["clients"]["web1"]["notify"] == ["<hidden>"]

    with pytest.raises(ConfigError) as caught:
        config_for(
            tmp_path,
            notify={"urls": ["nosuchscheme://x"], "on": ["sometimes"]},
            metrics={"listen": "9468", "textfile": "relative.prom"},
            clients={
                "web1": client_table(
                    max_age="soon",
                    after=[[], ["/bin/echo", "{archiv}"]],
                    healthchecks="ftp://x",
                )
            },
        )
    keys = {key for key, _ in caught.value.problems}
    assert {
        "notify.urls",
        "notify.on[0]",
        "metrics.listen",
        "metrics.textfile",
        "clients.web1.max_age",
        "clients.web1.after",
        "clients.web1.healthchecks",
    } <= keys, caught.value.problems


# --- hooks: substitution stays inside one word ------------------------------------------


def test_placeholders_never_make_a_second_word():
    hostile = "x; rm -rf / $(id) `id` 'q\" {client}\n--evil"
    values = {"client": "web1", "archive": hostile}
    assert substitute("--name={archive}", values) == f"--name={hostile}"
    assert substitute("{archive}", values) == hostile  # the value's own braces stay literal
    assert substitute("{{client}}={client}", values) == "{client}=web1"
    env = hook_env(values, base={"PATH": "/bin", "BORGTUNNEL_STALE": "x"})
    assert env == {"PATH": "/bin", "BORGTUNNEL_CLIENT": "web1", "BORGTUNNEL_ARCHIVE": hostile}


# --- progress parsing (the live rows: test_live_rows.py) -----------------------------------


def test_progress_lines():
    line = (
        '{"type": "archive_progress", "original_size": 5000000, "compressed_size": 1,'
        ' "deduplicated_size": 2, "nfiles": 42, "path": "/srv/a", "time": 1.0}'
    )
    figures = parse_progress(line)
    assert figures is not None
    assert (figures.nfiles, figures.original_size, figures.path) == (42, 5000000, "/srv/a")
    assert parse_progress('{"type": "log_message", "message": "archive_progress"}') is None
    assert parse_progress("not json archive_progress") is None


# --- notification decisions ---------------------------------------------------------------


class FakeSender:
    """Records sends; ``fail``/``hang``/``explode`` make it misbehave."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.sent: list[tuple[str, str]] = []

    async def __call__(self, url: str, title: str, body: str, kind: str, limit: float):
        self.sent.append((url, title))
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "explode":
            raise RuntimeError("notifier bug")
        return "refused" if self.mode == "fail" else None


def outcome(result: RunResult, *, run_id: int | None = None, **kw: Any) -> PullOutcome:
    return PullOutcome(client="web1", result=result, run_id=run_id, **kw)


def recorded(history: History, result: RunResult, started: datetime | None = None) -> int:
    run_id = history.start_run("web1", "daemon", started=started)
    history.finish_run(run_id, result, archive="a1" if result is RunResult.OK else None)
    return run_id


async def test_failure_once_per_streak_recovery_once_and_retries_not_reported(tmp_path):
    config = config_for(
        tmp_path, notify={"urls": ["json://127.0.0.1:1/x"], "retries": 0, "digest_window": 0}
    )
    web1 = config.clients["web1"]
    sender = FakeSender()
    with History.open(config.server.state_dir) as history:
        reporter = Reporter(config, history, in_daemon=True, sender=sender)
        reporter.start()
        for final in (False, True, True):  # a retried failure, then two final ones
            run_id = recorded(history, RunResult.FAILED)
            reporter.after_run(
                web1, outcome(RunResult.FAILED, run_id=run_id, error="boom"), final=final
            )
        reporter.after_run(web1, outcome(RunResult.FAILED, busy=True))  # nothing ran
        ok_id = recorded(history, RunResult.OK)
        reporter.after_run(web1, outcome(RunResult.OK, run_id=ok_id))
        reporter.after_run(web1, outcome(RunResult.OK, run_id=recorded(history, RunResult.OK)))
        reporter.report_tampering(web1, "repository key changed")
        await reporter.aclose(5)
        notes = history.notifications("web1")
    assert [title.split(" ")[-1] for _, title in sender.sent] == ["FAILED", "again", "web1"]
    assert [n.kind for n in reversed(notes)] == ["failure", "recovery", "tampering"]
    assert all(n.state == "sent" for n in notes)
    assert "error: boom" in notes[-1].body  # the failure names the error
    assert open_problems(notes) == {"tampering"}


async def test_stale_once_and_recovery_closes_it(tmp_path):
    config = config_for(
        tmp_path,
        notify={"urls": ["json://127.0.0.1:1/x"], "on": ["stale"]},
        defaults={"max_age": "1h"},
    )
    web1 = config.clients["web1"]
    sender = FakeSender()
    with History.open(config.server.state_dir) as history:
        recorded(history, RunResult.OK, started=datetime.now(UTC) - timedelta(hours=2))
        first = Reporter(config, history, in_daemon=True, sender=sender)
        first.start()  # stale now: one notice
        first.check_staleness(force=True)  # still stale: nothing new
        await first.aclose(5)
        reporter = Reporter(config, history, in_daemon=True, sender=sender)
        reporter.start()  # a restarted daemon: nothing new either
        run_id = recorded(history, RunResult.OK)
        reporter.after_run(web1, outcome(RunResult.OK, run_id=run_id))
        await reporter.aclose(5)
        kinds = [(n.kind, n.state) for n in reversed(history.notifications("web1"))]
    assert kinds == [("stale", "sent"), ("recovery", "muted")]  # 'on' mutes recovery
    assert len(sender.sent) == 1


@pytest.mark.parametrize("mode", ["fail", "hang", "explode"])
async def test_a_broken_notifier_never_raises_nor_holds_up_the_caller(tmp_path, mode):
    config = config_for(
        tmp_path,
        notify={"urls": ["json://127.0.0.1:1/x"], "timeout": 1, "retries": 2, "retry_wait": 30},
        metrics={"textfile": str(tmp_path / "no-such-dir" / "m.prom")},  # cannot be written
        clients={"web1": client_table(healthchecks="http://127.0.0.1:1/ping")},
    )
    web1 = config.clients["web1"]

    async def broken_pinger(*_args: object) -> str:
        raise RuntimeError("pinger bug")

    with History.open(config.server.state_dir) as history:
        reporter = Reporter(
            config, history, in_daemon=False, sender=FakeSender(mode), pinger=broken_pinger
        )
        reporter.start()
        started = time.monotonic()
        reporter.run_started(web1)
        reporter.after_run(
            web1, outcome(RunResult.FAILED, run_id=recorded(history, RunResult.FAILED))
        )
        assert time.monotonic() - started < 5  # sends run in the background
        await reporter.aclose(2)  # bounded: the retries (30 s apart) are abandoned
        assert time.monotonic() - started < 20
        (note,) = history.notifications("web1")
    # Abandoned mid-retry: still pending, so the next daemon start sends it.
    assert note.state == "pending"


async def test_reporter_survives_a_broken_history(tmp_path):
    config = config_for(tmp_path, notify={"urls": ["json://127.0.0.1:1/x"]})
    history = History.open(config.server.state_dir)
    reporter = Reporter(config, history, in_daemon=True, sender=FakeSender())
    history.close()  # every query now raises
    reporter.start()
    reporter.after_run(config.clients["web1"], outcome(RunResult.FAILED))
    reporter.check_staleness(force=True)
    await reporter.aclose(1)


async def test_apprise_to_a_closed_port_fails_fast_and_says_so():
    started = time.monotonic()
    error = await apprise_send(f"json://127.0.0.1:{closed_port()}/x", "t", "b", "failure", 10)
    assert error is not None
    assert time.monotonic() - started < 10
    assert redact_url("json://user:secret@host:8080/path?token=x") == "json://…"


# --- metrics ------------------------------------------------------------------------------


def test_metric_families_from_the_history(tmp_path):
    config = config_for(
        tmp_path,
        defaults={"max_age": "1h"},
        clients={"web1": client_table(), "db1": client_table()},
    )
    with History.open(config.server.state_dir) as history:
        started = datetime.now(UTC) - timedelta(minutes=10)
        run_id = history.start_run("web1", "daemon", started=started)
        history.finish_run(
            run_id,
            RunResult.OK,
            archive="a",
            finished=started + timedelta(seconds=42),
            stats=RunStats(original_size=1000, deduplicated_size=10, nfiles=7),
        )
        recorded(history, RunResult.SKIPPED)
        snapshot = metrics.build_snapshot(
            config, history, running=frozenset({"db1"}), queue_length=3, running_pulls=1
        )
    collector = metrics.SnapshotCollector(snapshot)
    text = generate_latest(metrics.new_registry(collector)).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    web1 = (("client", "web1"),)
    assert samples[("borgtunnel_last_success_timestamp_seconds", web1)] == pytest.approx(
        started.timestamp()
    )
    assert samples[("borgtunnel_last_files", web1)] == 7
    assert samples[("borgtunnel_last_original_bytes", web1)] == 1000
    assert samples[("borgtunnel_last_deduplicated_bytes", web1)] == 10
    assert samples[("borgtunnel_last_result", (("client", "web1"), ("result", "skipped")))] == 1
    assert samples[("borgtunnel_last_result", (("client", "web1"), ("result", "ok")))] == 0
    assert samples[("borgtunnel_runs_total", (("client", "web1"), ("result", "ok")))] == 1
    assert samples[("borgtunnel_runs_total", (("client", "web1"), ("result", "skipped")))] == 1
    assert samples[("borgtunnel_stale", web1)] == 0
    assert samples[("borgtunnel_stale", (("client", "db1"),))] == 1  # never had one
    assert samples[("borgtunnel_running", (("client", "db1"),))] == 1
    assert samples[("borgtunnel_queue_length", ())] == 3
    assert samples[("borgtunnel_running_pulls", ())] == 1
    assert ("borgtunnel_last_files", (("client", "db1"),)) not in samples  # unknown, not 0


def test_outcome_summary_of_a_skipped_run_and_exit_code():
    skipped = outcome(RunResult.SKIPPED, error="skipped by before hook /x")
    assert skipped.exit_code == 75
    assert "skipped" in skipped.summary()
    ok = outcome(RunResult.OK, stats=ArchiveStats("a", "0" * 64, 1, 1, 1, 1, 0.1))
    assert ok.exit_code == 0


# --- hooks: timeouts, and the daemon with a hanging notifier -------------------------------


async def test_a_hook_over_its_timeout_is_killed_with_its_children(tmp_path):
    from borgtunnel.runs.hooks import run_hook  # noqa: PLC0415 - only this test

    marker = tmp_path / "child-survived"
    script = f"sleep 30 & wait; touch {marker}"
    started = time.monotonic()
    result = await run_hook(["/bin/sh", "-c", script], {}, limit=0.5)
    assert result.returncode is None
    assert result.error is not None
    assert "timed out" in result.error
    assert time.monotonic() - started < 10
    assert not marker.exists()
    missing = await run_hook(["/nonexistent/hook"], {}, limit=5)
    assert missing.error is not None
    assert "cannot start" in missing.error


async def test_daemon_run_is_not_held_up_by_a_hanging_notifier(tmp_path):
    from borgtunnel.scheduling.daemon import Daemon  # noqa: PLC0415 - only this test
    from borgtunnel.systemd import Notifier  # noqa: PLC0415
    from tests.daemon_support import (  # noqa: PLC0415
        FIRE_AT,
        clock_offset,
        eventually,
        finished_runs,
        offline_client,
        serving,
        shifted_now,
        write_config,
    )

    path = write_config(
        tmp_path / "bt.toml",
        tmp_path,
        clients={
            "web1": offline_client(tmp_path / "r", schedule="0 2 * * *", retries=0, catch_up=False)
        },
    )
    path.write_text(
        path.read_text()
        + '[notify]\nurls = ["json://127.0.0.1:1/x"]\ntimeout = 2\ndigest_window = 0\n'
    )
    config = load_config(path)
    sender = FakeSender("hang")
    daemon = Daemon(
        config,
        now=shifted_now(clock_offset(FIRE_AT, 1.0)),
        notifier=Notifier(""),
        notify_sender=sender,
    )
    async with serving(daemon):
        await eventually(
            lambda: finished_runs(config.server.state_dir, "web1"), within=30, what="the run"
        )
        await eventually(lambda: sender.sent, within=10, what="the send to start")
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 30  # stop waited at most ~timeout for the send
    (run,) = finished_runs(config.server.state_dir, "web1")
    assert run.result is RunResult.FAILED  # the client's own failure, nothing else
    assert run.error is not None
    assert "127.0.0.1:9" in run.error


async def test_tampering_fed_with_a_run_is_sent_and_is_no_recovery(tmp_path):
    config = config_for(tmp_path, notify={"urls": ["json://127.0.0.1:1/x"]})
    web1 = config.clients["web1"]
    sender = FakeSender()
    with History.open(config.server.state_dir) as history:
        reporter = Reporter(config, history, in_daemon=False, sender=sender)
        reporter.start()
        run_id = recorded(history, RunResult.FAILED)
        reporter.after_run(web1, outcome(RunResult.FAILED, run_id=run_id))
        run_id = recorded(history, RunResult.OK)
        reporter.after_run(
            web1, outcome(RunResult.OK, run_id=run_id), tampering="repository key changed"
        )
        await reporter.aclose(5)
        notes = list(reversed(history.notifications("web1")))
    assert [n.kind for n in notes] == ["failure", "tampering"]
    assert notes[1].run_id == run_id
    assert "error: repository key changed" in notes[1].body


async def test_daemon_notifies_a_failure_only_after_its_retries(tmp_path):
    from borgtunnel.scheduling.daemon import Daemon  # noqa: PLC0415 - only these tests
    from borgtunnel.systemd import Notifier  # noqa: PLC0415
    from tests.daemon_support import (  # noqa: PLC0415
        FIRE_AT,
        clock_offset,
        eventually,
        finished_runs,
        offline_client,
        serving,
        shifted_now,
        write_config,
    )

    client = offline_client(
        tmp_path / "r", schedule="0 2 * * *", retries=1, retry_wait=0.5, catch_up=False
    )
    path = write_config(tmp_path / "bt.toml", tmp_path, clients={"web1": client})
    # write_config's trust files are real and empty: the connection itself is refused (port 9),
    # a retryable failure.
    path.write_text(
        path.read_text() + '[notify]\nurls = ["json://127.0.0.1:1/x"]\ndigest_window = 0\n'
    )
    config = load_config(path)
    sender = FakeSender()
    daemon = Daemon(
        config,
        now=shifted_now(clock_offset(FIRE_AT, 1.0)),
        notifier=Notifier(""),
        notify_sender=sender,
    )
    async with serving(daemon):
        await eventually(
            lambda: len(finished_runs(config.server.state_dir, "web1")) == 2,
            within=60,
            what="the run and its retry",
        )
        await eventually(lambda: sender.sent, within=10, what="the failure message")
    runs = finished_runs(config.server.state_dir, "web1")
    assert [r.result for r in runs] == [RunResult.FAILED, RunResult.FAILED]
    with History.open(config.server.state_dir) as history:
        notes = history.notifications("web1")
    assert [n.kind for n in notes] == ["failure"]  # one, after the retry, not one per attempt
    assert notes[0].run_id == runs[1].id
    assert len(sender.sent) == 1
