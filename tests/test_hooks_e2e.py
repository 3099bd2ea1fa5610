"""Hooks around real pulls: argv lists without a shell, values as single literal words and
environment variables, exit 75 skips quietly, a failing ``before`` stops the pull, a failing
``after`` changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from borgtunnel.config import load_config
from borgtunnel.history import History, RunResult
from tests import pullkit
from tests.reporting_kit import recorded_calls, recorder_hook, setup_client
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

# Everything a shell would act on; borg allows all of it in an archive name except '/'.
HOSTILE = "evil $(touch PWNED) ; `touch PWNED` 'q\" & | > x {now}"


def test_hooks_get_a_hostile_archive_name_as_one_literal_word(
    tmp_path: Path, sshd: SshdServer
) -> None:
    hooks = tmp_path / "hooks"
    before = recorder_hook(hooks, "before")
    after = recorder_hook(hooks, "after")
    failing_after = recorder_hook(hooks, "after-fails", exit_code=3, stderr="after broke\n")
    on_failure = recorder_hook(hooks, "on-failure")
    _, repo, config = setup_client(
        tmp_path,
        sshd,
        client={
            "archive": HOSTILE,
            "before": [[str(before), "{archive}", "{client}"]],
            "after": [
                [str(after), "{archive}", "--client={client}", "{result}", "{repository}"],
                [str(failing_after)],
            ],
            "on_failure": [[str(on_failure)]],
        },
    )

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 0, result.stderr  # a failing after hook changes nothing
    (archive,) = pullkit.archives(tmp_path, repo)
    assert archive.startswith("evil $(touch PWNED) ; `touch PWNED` 'q\" & | > x 20")
    (before_call,) = recorded_calls(before)
    assert before_call["argv"] == [HOSTILE, "c1"]  # before the pull: the template
    assert before_call["env"]["BORGTUNNEL_ARCHIVE"] == HOSTILE
    (after_call,) = recorded_calls(after)
    assert after_call["argv"] == [archive, "--client=c1", "ok", str(repo)]
    assert after_call["env"] == {
        "BORGTUNNEL_CLIENT": "c1",
        "BORGTUNNEL_ARCHIVE": archive,
        "BORGTUNNEL_RESULT": "ok",
        "BORGTUNNEL_ERROR": "",
        "BORGTUNNEL_REPOSITORY": str(repo),
    }
    assert len(recorded_calls(failing_after)) == 1
    assert recorded_calls(on_failure) == []
    for root in (tmp_path, sshd.workdir):
        assert pullkit.files_named(root, "PWNED") == []
        assert pullkit.files_named(root, "x") == []  # no "> x" redirection happened
    assert not (Path.cwd() / "PWNED").exists()  # the hooks' working directory
    assert not (Path.cwd() / "x").exists()
    assert '"hook_failed"' in result.stderr
    assert "after broke" in result.stderr


def test_before_exit_75_skips_quietly_and_a_failing_before_stops_the_pull(
    tmp_path: Path, sshd: SshdServer
) -> None:
    hooks = tmp_path / "hooks"
    skip = recorder_hook(hooks, "skip", exit_code=75, stderr="on battery\n")
    refuse = recorder_hook(hooks, "refuse", exit_code=1, stderr="database is busy\n")
    after = recorder_hook(hooks, "after")
    on_failure = recorder_hook(hooks, "on-failure")
    _, repo, config = setup_client(
        tmp_path,
        sshd,
        client={"before": [[str(skip)]], "after": [[str(after)]]},
        tables={"defaults": {"on_failure": [[str(on_failure), "{error}"]], "max_age": "1d"}},
    )
    state_dir = load_config(config).server.state_dir

    skipped = pullkit.run_cli(config, "pull", "c1")
    assert skipped.returncode == 75, skipped.stderr
    assert skipped.stdout.startswith("c1: skipped")
    assert pullkit.archives(tmp_path, repo) == []
    assert recorded_calls(after) == recorded_calls(on_failure) == []
    status = pullkit.run_cli(config, "status", "--json")
    (row,) = json.loads(status.stdout)
    # A skip is not a success; a client first seen now is stale only after max_age
    # (docs/catch-up-and-alerts.md), and a skip is not a failure either.
    assert (row["last_success"], row["stale"], status.returncode) == (None, False, 0), row

    config.write_text(config.read_text().replace(str(skip), str(refuse)))
    refused = pullkit.run_cli(config, "pull", "c1")
    assert refused.returncode == 2, refused.stderr
    assert pullkit.archives(tmp_path, repo) == []
    assert recorded_calls(after) == []  # before failed: no pull, so no after
    (failure_call,) = recorded_calls(on_failure)
    assert "database is busy" in failure_call["argv"][0]
    assert failure_call["env"]["BORGTUNNEL_RESULT"] == "failed"

    with History.open(state_dir) as history:
        runs = history.last_runs("c1", 10)[::-1]
    assert [r.result for r in runs] == [RunResult.SKIPPED, RunResult.FAILED]
    assert runs[0].error is not None
    assert "on battery" in runs[0].error
    assert runs[1].error is not None
    assert "database is busy" in runs[1].error
    history_out = pullkit.run_cli(config, "history", "c1", "--json")
    assert history_out.returncode == 0
    assert '"skipped"' in history_out.stdout
