"""A compromised client against the server while it pulls: log records shaped to collide with
the server's own log fields, floods answering the cleanup command, a reconnect loop on the
forwarded socket. Real sshd, real borg on the server, hostile scripts or a hostile ForceCommand
as the client (tests/hostile.py).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from borgtunnel.server.serve import RUN_CONNECTION_LIMIT
from tests import hostile, pullkit
from tests.sshd import SshdFactory, SshdServer

pytestmark = pytest.mark.sshd

# Every key structlog, its processors or our own bound fields give a meaning to.
_LOG_KEYS = [
    "event",
    "level",
    "source",
    "client",
    "timestamp",
    "logger",
    "logger_name",
    "_record",
    "_from_structlog",
    "exc_info",
    "exception",
    "stack_info",
    "positional_args",
    "stack",
]
_COLLIDING = json.dumps(
    {"type": "archive_progress", **{key: f"forged-{key}" for key in _LOG_KEYS}, "nfiles": 1}
)
_COLLIDING_EXC = json.dumps({"type": "progress_message", "exc_info": True, "stack_info": True})
_HUGE_KEY = json.dumps({"type": "file_status", "k" * 7000: 1, "": 2, "\u001b]0;x": 3})
_DEEP = json.dumps({"type": "progress_percent", "x": 1})[:-1] + ', "d": ' + "[" * 3000


def _json_logs(stderr: str) -> list[dict[str, Any]]:
    records = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def test_colliding_log_keys_neither_crash_the_run_nor_hide_a_key_change(
    tmp_path: Path, sshd: SshdServer
) -> None:
    """The client re-keys the repository, then prints progress records whose keys are the
    server's own log fields (plus an over-long key and a nesting deeper than json allows), then
    backs up. No line ends the run: it is failed as tampering (the key guard ran), the server's
    key is back, and the client's fields are logged apart from the server's."""
    _, repo, config, conf, table = hostile.encrypted_setup(tmp_path, sshd)
    assert pullkit.run_cli(config, "init", "c1").returncode == 0
    lines = "".join(
        f"printf '%s\\n' {json.dumps(line)} >&2\n"
        for line in (_COLLIDING, _COLLIDING_EXC, _HUGE_KEY, _DEEP)
    )
    body = (
        "pw=$(cat)\n"
        "unset BORG_PASSPHRASE_FD\n"
        f'BORG_PASSPHRASE="$pw" BORG_NEW_PASSPHRASE=evil borg key change-passphrase'
        f" ssh://borgtunnel{repo} >/dev/null 2>&1 || exit 99\n"
        f"{lines}"
        'BORG_PASSPHRASE=evil exec borg "$@"\n'
    )
    table["remote_borg"] = str(hostile.script(tmp_path, "collide", body))
    pullkit.write_config(config, clients={"c1": table}, **conf)

    result = pullkit.run_cli(config, "--log-level=debug", "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "internal error" not in result.stdout + result.stderr
    assert "tampering: the repository key was changed" in result.stdout, result.stdout
    assert "was put back" in result.stdout
    assert hostile.runs(tmp_path)[-1]["result"] == "failed"
    assert len(pullkit.archives(tmp_path, repo, BORG_PASSPHRASE=hostile.PASSPHRASE)) == 1
    records = _json_logs(result.stderr)
    forged = [r for r in records if "forged-source" in json.dumps(r)]
    assert forged, result.stderr[-3000:]
    assert any(r.get("borg", {}).get("source") == "forged-source" for r in forged), forged
    for record in forged:
        assert record["client"] == "c1"
        assert record["source"] == "borg create"
        assert record["event"] != "forged-event"
        assert record["level"] != "forged-level"
        assert not str(record.get("timestamp", "")).startswith("forged")
    # Every record the run logged names the real client: none was re-labelled.
    assert {r.get("client") for r in records if "client" in r} == {"c1"}


def test_a_key_change_before_a_stall_is_still_caught(tmp_path: Path, sshd: SshdServer) -> None:
    """The run fails by an exception (the stall timeout) after the client re-keyed: the key
    guard runs anyway (it runs in a ``finally``) and reports and undoes the change."""
    _, repo, config, conf, table = hostile.encrypted_setup(tmp_path, sshd)
    assert pullkit.run_cli(config, "init", "c1").returncode == 0
    body = (
        "pw=$(cat)\n"
        "unset BORG_PASSPHRASE_FD\n"
        f'BORG_PASSPHRASE="$pw" BORG_NEW_PASSPHRASE=evil borg key change-passphrase'
        f" ssh://borgtunnel{repo} >/dev/null 2>&1 || exit 99\n"
        "while :; do sleep 1; done\n"
    )
    table.update(remote_borg=str(hostile.script(tmp_path, "rekey-stall", body)), stall_timeout=2)
    pullkit.write_config(config, clients={"c1": table}, **conf)

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "stalled" in result.stdout, result.stdout
    assert "tampering: the repository key was changed" in result.stdout, result.stdout
    assert "was put back" in result.stdout
    assert pullkit.archives(tmp_path, repo, BORG_PASSPHRASE=hostile.PASSPHRASE) == []


# Runs the real CLI and reports the process's own peak RSS (VmHWM, kB) on its last stderr line.
_RSS_PROBE = """
import sys
from borgtunnel.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as status:
    peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
print("VmHWM", peak, file=sys.stderr)
sys.exit(code)
"""


def _pull_measuring_rss(config: Path) -> tuple[subprocess.CompletedProcess[str], int, float]:
    """(result, peak RSS in kB, seconds) of one ``borgtunnel pull c1``."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, "--config", str(config), "pull", "c1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    took = time.monotonic() - started
    found = re.search(r"^VmHWM (\d+)$", result.stderr, re.MULTILINE)
    assert found, result.stderr[-2000:]
    return result, int(found.group(1)), took


def _kind_marker(kind: str) -> str:
    """What every encoded command of ``kind`` contains: the base64 of its first 18 bytes."""
    return base64.b64encode(f"# {kind}\n".encode()[:18]).decode()


_FLOOD_BYTES = 400 * 1024 * 1024


def test_a_flood_answering_the_cleanup_leaves_server_memory_bounded(
    tmp_path: Path, sshd_factory: SshdFactory
) -> None:
    """The client's sshd runs the real cleanup, then answers it with 400 MiB (half on stdout,
    half on stderr). The server stops reading after a few kB: its peak RSS stays within a few
    MiB of the same stalled run without the flood (it grew by ~800 MiB when it kept it all)."""
    flag = tmp_path / "flood-on"
    half = _FLOOD_BYTES // 2
    forcer = tmp_path / "forced-command"
    forcer.write_text(
        "#!/bin/sh\n"
        'case "$SSH_ORIGINAL_COMMAND" in\n'
        f"  *{_kind_marker('borgtunnel-cleanup')}*|*{_kind_marker('borgtunnel-remove')}*)\n"
        f"    if [ -e {flag} ]; then\n"
        '      /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n'
        f"      head -c {half} /dev/zero >&2 &\n"
        f"      head -c {half} /dev/zero\n"
        "      wait; exit 0\n"
        "    fi ;;\n"
        "esac\n"
        'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n'
    )
    forcer.chmod(0o755)
    sshd = sshd_factory(extra_config=[f"ForceCommand {forcer}"])
    silent = hostile.script(tmp_path, "silent", "while :; do sleep 1; done\n")
    _, repo, config = hostile.setup(tmp_path, sshd, remote_borg=str(silent), stall_timeout=2)

    plain, plain_rss, plain_took = _pull_measuring_rss(config)
    flag.touch()
    flooded, flood_rss, flood_took = _pull_measuring_rss(config)

    for result in (plain, flooded):
        assert result.returncode == 2, result.stdout + result.stderr[-2000:]
        assert "stalled" in result.stdout
    print(f"peak RSS {plain_rss} kB without, {flood_rss} kB with the flood;", end=" ")
    print(f"{plain_took:.1f} s / {flood_took:.1f} s")
    assert flood_rss - plain_rss < 16 * 1024, (plain_rss, flood_rss)
    assert "more than 65536 bytes" in flooded.stderr, flooded.stderr[-2000:]
    assert flood_took < plain_took + 10
    deadline = time.monotonic() + 20
    while pullkit.processes_mentioning(str(silent)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pullkit.processes_mentioning(str(silent)) == []
    assert pullkit.processes_mentioning(f"--restrict-to-repository {repo}") == []


_LOOP_SECONDS = 30
# What serve answers goes nowhere: output from the client's side is life by design (a talking
# client is not stalled); these loops only connect.
_RECONNECT_LOOPS = {
    # Ten connections a second, each closed at once, not waiting for serve: past the limit
    # within two seconds.
    "fast": 'nc -N -U "$BORGTUNNEL_SOCKET" </dev/null >/dev/null 2>&1 & sleep 0.1',
    # Slower than the stall watch samples, each connection held half a second: under the
    # connection limit before stall_timeout, so the stall watch alone must end it.
    "slow": '(sleep 0.5) | nc -N -U "$BORGTUNNEL_SOCKET" >/dev/null; sleep 0.5',
}


@pytest.mark.parametrize("pace", list(_RECONNECT_LOOPS))
def test_a_reconnect_loop_neither_defeats_the_stall_timeout_nor_spawns_unbounded_serves(
    tmp_path: Path, sshd: SshdServer, pace: str
) -> None:
    """The client's "borg" connects to the forwarded socket and disconnects, over and over,
    for 30 s, moving no repository data. The run is stopped within stall_timeout (4 s) plus
    slack, having started at most RUN_CONNECTION_LIMIT borg serve (it used to last the whole
    loop, a serve per connection): the fast loop by the connection limit, the slow one by the
    stall watch, where connecting is no longer activity."""
    body = (
        f"end=$(($(date +%s) + {_LOOP_SECONDS}))\n"
        f'while [ "$(date +%s)" -lt "$end" ]; do {_RECONNECT_LOOPS[pace]}; done\n'
    )
    looping = hostile.script(tmp_path, f"reconnect-{pace}", body)
    _, repo, config = hostile.setup(tmp_path, sshd, remote_borg=str(looping), stall_timeout=4)
    started = time.monotonic()

    result = pullkit.run_cli(config, "pull", "c1", timeout=120)

    took = time.monotonic() - started
    serves = sum('"serve_started"' in line for line in result.stderr.splitlines())
    print(f"{pace} reconnect loop: {took:.1f} s, {serves} borg serve started")
    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    assert took < 4 + 8, (took, serves)
    assert 1 <= serves <= RUN_CONNECTION_LIMIT, serves
    reason = "too many connections" if pace == "fast" else "stalled"
    assert reason in result.stdout, result.stdout
    assert hostile.runs(tmp_path)[-1]["result"] == "failed"
    deadline = time.monotonic() + 20
    while pullkit.processes_mentioning(str(looping)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pullkit.processes_mentioning(str(looping)) == []
    assert pullkit.processes_mentioning(f"--restrict-to-repository {repo}") == []
