"""``borgtunnel pull a b`` as a person sees it, under a real pseudo-terminal with a set window
size, against a real sshd and borg: one live row per client (state, files, bytes, rate, path)
no wider than the window, then one summary line per client; no info-level event lines on the
terminal unless ``--log-level`` asks; the two pulls run at the same time (history timestamps).
Not on a terminal, output is what it always was: JSON log lines on stderr, summaries on stdout.
borg always runs with ``--progress`` (the stall detection needs its lines)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from rich.cells import cell_len

from borgtunnel.history import History
from tests import pullkit
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
COLUMNS = 72
# Events a person running `pull` by hand does not need on the terminal (info level).
EVENT_LINES = ("remote_prepared", "serve_started", "serve_exited", "archive_verified")


def pull_on_a_pty(
    config: Path, *args: str, log: Path | None = None, columns: int = COLUMNS
) -> tuple[int, str]:
    """``borgtunnel pull ARGS`` with stdout on a pty of ``columns`` x 24; stderr into ``log``,
    or (no ``log``) on the same pty, as in an administrator's shell. The screen's text, with
    each cursor movement read as a line break."""
    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in {"COLUMNS", "LINES"}}
    with (log or Path(os.devnull)).open("wb") as err:
        process = subprocess.Popen(
            [*pullkit.cli_argv(config), *args],
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            stderr=err if log is not None else secondary,
            env={**env, "TERM": "xterm"},
        )
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        code = process.wait(timeout=30)
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    return code, ANSI.sub("\n", output.decode("utf-8", "replace"))


def remote_argv(log: Path) -> list[str]:
    for line in log.read_text().splitlines():
        if '"remote_command"' in line:
            return list(json.loads(line)["argv"])
    raise AssertionError("no remote_command line in the log")


def summaries(screen: str, client: str) -> list[str]:
    return [line for line in screen.splitlines() if line.startswith(f"{client}: ok archive=")]


def rows(screen: str, client: str) -> list[str]:
    return [line for line in screen.splitlines() if re.match(rf"{client}  \w", line)]


@pytest.fixture
def two_clients(tmp_path: Path, sshd: SshdServer) -> tuple[Path, Path, dict[str, Path]]:
    """(config, client data, repositories) for clients ``a`` and ``b`` on the test sshd; each
    pull spends ~3 s in borg create (upload capped at 1000 KiB/s): several progress lines."""
    data = pullkit.make_client_data(tmp_path / "client-data", random_bytes=3_000_000)
    repos = {name: tmp_path / "repos" / name for name in ("a", "b")}
    for repo in repos.values():
        pullkit.init_repo(tmp_path, repo)
    clients = {
        name: pullkit.client_table(
            sshd, name, repo, [data], create_args=["--upload-ratelimit", "1000"]
        )
        for name, repo in repos.items()
    }
    config = pullkit.write_config(
        tmp_path / "bt.toml", clients=clients, **pullkit.base_config(tmp_path, sshd)
    )
    return config, data, repos


def test_two_clients_on_a_terminal_then_in_a_pipe(
    tmp_path: Path, two_clients: tuple[Path, Path, dict[str, Path]]
):
    config, data, repos = two_clients

    # A person's terminal: stdout and stderr on the pty, no --log-level.
    code, screen = pull_on_a_pty(config, "pull", "a", "b")
    assert code == 0, screen
    for name in ("a", "b"):
        assert len(summaries(screen, name)) == 1, screen
        live = rows(screen, name)
        assert any(re.match(rf"{name}  queued|{name}  connecting", row) for row in live), live
        backing_up = [r for r in live if re.match(rf"{name}  backing up  \d+ files  ", r)]
        assert backing_up, screen
        assert re.search(r" [\d.]+[kMG]?B/s", "\n".join(backing_up)), backing_up
        assert all(cell_len(row) <= COLUMNS for row in live), live
    for event in (*EVENT_LINES, "pull_finished", "pull_started"):
        assert event not in screen, screen
    assert "\x1b" not in screen

    # Both archives verified, and read back by the server's own borg.
    for name, repo in repos.items():
        (archive,) = pullkit.archives(tmp_path, repo)
        assert archive in summaries(screen, name)[0]
        target = tmp_path / "extract" / name
        pullkit.extract(tmp_path, repo, archive, target)
        pullkit.assert_same_tree(data, target)

    # The two pulls ran at the same time: each started before the other finished.
    with History.open(tmp_path / "state") as history:
        a, b = (history.last_run(name) for name in ("a", "b"))
    assert a is not None
    assert b is not None
    assert a.finished is not None
    assert b.finished is not None
    assert a.started < b.finished
    assert b.started < a.finished

    # --no-progress: only the summary lines; borg still sends progress (the stall detection).
    log = tmp_path / "quiet.log"
    code, screen = pull_on_a_pty(
        config, "--log-format=json", "--log-level=debug", "pull", "--no-progress", "a", log=log
    )
    assert code == 0, log.read_text()[-3000:]
    assert [line for line in screen.splitlines() if line.strip()] == summaries(screen, "a")
    assert "--progress" in remote_argv(log)

    # --log-level says otherwise: the event lines show, above the live rows, not across them.
    code, screen = pull_on_a_pty(config, "--log-level", "info", "pull", "b")
    assert code == 0, screen
    assert any("pull_finished" in line for line in screen.splitlines()), screen
    assert rows(screen, "b"), screen
    assert len(summaries(screen, "b")) == 1, screen

    # Not a terminal (a pipe, journald): JSON log lines with the events, one summary line each.
    piped = pullkit.run_cli(config, "pull", "a", "b")
    assert piped.returncode == 0, piped.stderr
    assert sorted(line.split(":")[0] for line in piped.stdout.splitlines()) == ["a", "b"]
    assert all(re.match(r"[ab]: ok archive=", line) for line in piped.stdout.splitlines())
    logged = [json.loads(line) for line in piped.stderr.splitlines()]
    for event in (*EVENT_LINES, "pull_finished"):
        assert {r["client"] for r in logged if r["event"] == event} == {"a", "b"}, event
    for repo in repos.values():
        assert len(pullkit.archives(tmp_path, repo)) == 3


def test_the_worst_exit_code_wins_and_every_client_gets_its_line(
    tmp_path: Path, two_clients: tuple[Path, Path, dict[str, Path]]
):
    """One client failing (its repository is gone) does not stop the other; exit 2, and the
    failure's error line still reaches the terminal (errors pass the warning threshold)."""
    config, _, repos = two_clients
    shutil.rmtree(repos["a"])
    code, screen = pull_on_a_pty(config, "pull", "a", "b")
    assert code == 2, screen
    assert len(summaries(screen, "b")) == 1, screen
    assert len([line for line in screen.splitlines() if line.startswith("a: failed")]) == 1
    assert "pull_failed" in screen
    assert "serve_started" not in screen
    assert len(pullkit.archives(tmp_path, repos["b"])) == 1
