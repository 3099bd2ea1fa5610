"""Archive names and error texts a compromised client chooses (issue 16, items 9 and 10).

Item 9: a name such as ``--output=x`` reaches hooks as ``{archive}``: borgtunnel refuses names
that start with '-' (or with whitespace) at verification, so after-hooks never see one.
Item 10: escape sequences in archive names and in the client's messages reach an
administrator's terminal through ``list``, ``maintain`` and ``history``: each is shown escaped.
Real sshd, real borg, the real command line (in a pseudo-terminal where output differs on one).
"""

from __future__ import annotations

import os
import pty
import select
import shlex
import subprocess
from pathlib import Path

import pytest

from tests import hostile, pullkit
from tests.reporting_kit import append_tables, recorded_calls, recorder_hook
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

# Sets the terminal's title, then clears the screen: what must never reach a terminal raw.
TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J"


def renaming_borg(tmp_path: Path, name: str) -> Path:
    """The real borg, with the archive name of ``REPO::NAME`` replaced by ``name``."""
    return hostile.script(
        tmp_path,
        "rename",
        "for a; do\n"
        "  shift\n"
        f'  case $a in ssh://borgtunnel*::*) a="${{a%%::*}}::"{shlex.quote(name)} ;; esac\n'
        '  set -- "$@" "$a"\n'
        "done\n"
        'exec borg "$@"\n',
    )


@pytest.mark.parametrize("name", ["--output=x", " -rf"])
def test_an_archive_named_like_an_option_is_refused(
    tmp_path: Path, sshd: SshdServer, name: str
) -> None:
    after = recorder_hook(tmp_path / "hooks", "after")
    _, repo, config = hostile.setup(
        tmp_path,
        sshd,
        remote_borg=str(renaming_borg(tmp_path, name)),
        after=[[str(after), "{archive}", "{result}"]],
    )

    result = pullkit.run_cli(config, "pull", "c1")

    assert pullkit.archives(tmp_path, repo) == [name]  # borg itself took the name
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unverified: the client named its archive" in result.stdout
    (call,) = recorded_calls(after)
    assert call["argv"] == ["", "failed"]
    assert call["env"]["BORGTUNNEL_ARCHIVE"] == ""
    assert hostile.runs(tmp_path)[-1]["archive"] is None


def test_a_configured_template_like_an_option_is_a_config_error(
    tmp_path: Path, sshd: SshdServer
) -> None:
    _, _, config = hostile.setup(tmp_path, sshd, init=False, archive="-{now}")
    result = pullkit.run_cli(config, "check-config")
    assert result.returncode == 78
    assert "starts with '-'" in result.stderr


def run_in_terminal(argv: list[str], timeout: float = 90) -> str:
    """Run ``argv`` with stdin, stdout and stderr on a pseudo-terminal; everything it wrote."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                raise AssertionError(f"no output for {timeout} s from {argv}")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        process.kill()
        process.wait()
    return b"".join(chunks).decode("utf-8", "replace")


def _assert_escaped(output: str) -> None:
    assert TITLE not in output, output
    assert CLEAR not in output, output
    assert "\x1b]0;" not in output, output
    assert "\\x1b]0;pwned\\x07" in output, output


def test_list_and_maintain_show_a_hostile_archive_name_escaped(
    tmp_path: Path, sshd: SshdServer
) -> None:
    data, repo, config = hostile.setup(tmp_path, sshd)
    append_tables(config, {"clients.c1.retention": {"keep_daily": 1}})
    assert pullkit.run_cli(config, "pull", "c1").returncode == 0
    # What the client can write through its append-only tunnel: any name without '/'.
    evil = f"old{TITLE}{CLEAR}\u009b2J"
    pullkit.borg(
        tmp_path, "create", "--timestamp", "2020-01-01T00:00:00", f"{repo}::{evil}", str(data)
    )
    cli = pullkit.cli_argv(config)

    listed = run_in_terminal([*cli, "list", "c1"])
    _assert_escaped(listed)
    assert "\u009b" not in listed
    as_json = pullkit.run_cli(config, "list", "c1", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert TITLE not in as_json.stdout
    assert "\u009b" not in as_json.stdout

    maintained = run_in_terminal([*cli, "maintain", "c1", "--prune", "--dry-run"])
    _assert_escaped(maintained)
    piped = pullkit.run_cli(config, "maintain", "c1", "--prune", "--dry-run")
    _assert_escaped(piped.stdout)


def test_history_shows_the_clients_error_text_escaped(tmp_path: Path, sshd: SshdServer) -> None:
    noisy = hostile.script(
        tmp_path, "noisy", f"printf '%s boom\\n' {shlex.quote(TITLE + CLEAR)} >&2\nexit 2\n"
    )
    _, _, config = hostile.setup(tmp_path, sshd, remote_borg=str(noisy))
    pulled = pullkit.run_cli(config, "pull", "c1")
    assert pulled.returncode == 2
    assert TITLE in (hostile.runs(tmp_path)[-1]["error"] or "")  # stored as the client sent it

    shown = run_in_terminal([*pullkit.cli_argv(config), "history", "c1"])

    _assert_escaped(shown)
