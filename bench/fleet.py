"""``python -m bench.fleet``: the daemon with a large generated fleet (issue 18's targets).

One real ``borgtunnel daemon`` process, a generated config of ``--clients`` scheduled clients
(default 1000) on 127.0.0.1 port 9, which refuses at once, so no data moves: what is measured is
the daemon itself. Every client has ``max_age = "1h"`` and the history says a daemon first saw
them two days ago and none was ever backed up, so all turn stale at start; ``catch_up = false``
keeps the missed slots from being pulled (the point here is the idle daemon). Two HTTP receivers
on 127.0.0.1 stand in for two notification URLs (real apprise ``json://``). One client is
scheduled every minute: its next slot measures how late a due pull starts.

Printed (Markdown, for BENCHMARKS.md):

* messages each URL received for the fleet turning stale at once (target: one digest per URL);
* RSS of the daemon once the digests are out (target: <= 100 MB);
* CPU seconds the daemon used over ``--idle`` seconds with nothing due (target: ~0);
* how long after its slot the every-minute client's pull started (target: <= 1 s), from the
  daemon's own JSON log timestamps;
* the length of the ``daemon_ready`` line, the longest log line, and the startup time.

Everything lives in a temporary directory removed at the end; the daemon is stopped with SIGTERM
(killed if it does not stop).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from borgtunnel.history import History
from tests.reporting_kit import Receiver

REPO_ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--clients", type=int, default=1000, help="fleet size (default 1000)")
    parser.add_argument("--idle", type=float, default=30, help="idle window, s (default 30)")
    parser.add_argument("--window", default="5s", help="[notify] digest_window (default 5s)")
    return parser.parse_args(argv)


def write_fleet(root: Path, clients: int, urls: list[str], window: str) -> Path:
    """The generated config: ``[server]``, ``[notify]`` and one table per client."""
    # A nightly slot far from now, so nothing but the every-minute client is due during the run.
    hour = (datetime.now(UTC).hour + 12) % 24
    lines = [
        "[server]",
        f'socket_dir = "{root / "sock"}"',
        f'state_dir = "{root / "state"}"',
        "[daemon]",
        'timezone = "UTC"',
        "[notify]",
        f"urls = {json.dumps(urls)}",
        f'digest_window = "{window}"',
        "retry_wait = 1",
        "[ssh]",
        f'known_hosts = "{root / "known_hosts"}"',
        f'identity = "{root / "id"}"',
    ]
    for n in range(clients):
        schedule = "* * * * *" if n == 0 else f"{n % 60} {hour} * * *"
        lines += [
            f"[clients.c{n:04d}]",
            'host = "127.0.0.1"',
            "port = 9",
            f'repository = "/srv/borg/c{n:04d}"',
            'paths = ["/etc"]',
            'encryption = "none"',
            f'schedule = "{schedule}"',
            'max_age = "1h"',
            "retries = 0",
            "catch_up = false",
        ]
    (root / "known_hosts").write_text("")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "id")], check=True
    )
    path = root / "fleet.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _events(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            found.append(event)
    return found


def _wait(
    predicate: Callable[[], bool],
    within: float,
    what: str,
    process: subprocess.Popen[bytes],
) -> float:
    started = time.monotonic()
    while not predicate():
        if process.poll() is not None:
            raise RuntimeError(f"the daemon exited ({process.returncode}) before {what}")
        if time.monotonic() - started > within:
            raise RuntimeError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def measure(args: argparse.Namespace, root: Path, receivers: list[Receiver]) -> dict[str, Any]:
    config = write_fleet(root, args.clients, [r.json_url for r in receivers], args.window)
    names = [f"c{n:04d}" for n in range(args.clients)]
    with History.open(root / "state") as history:
        history.record_first_seen(names, datetime.now(UTC) - timedelta(days=2))
    log = root / "daemon.log"
    argv = [sys.executable, "-m", "borgtunnel", "--config", str(config)]
    argv += ["--log-format", "json", "daemon"]
    started = time.monotonic()
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        ready = _wait(
            lambda: any(e["event"] == "daemon_ready" for e in _events(log)),
            120,
            "daemon_ready",
            daemon,
        )
        _wait(lambda: all(r.messages() for r in receivers), 120, "the digests", daemon)
        digests_after = time.monotonic() - started
        rss = _rss_mb(daemon.pid)
        startup_cpu = _cpu_seconds(daemon.pid)
        # The every-minute client's next slot: the pull must start within a second of it.
        _wait(
            lambda: any(e["event"] == "run_starting" for e in _events(log)),
            75,
            "a due pull",
            daemon,
        )
        _wait(
            lambda: any(
                e["event"] == "run_finished" or e["event"] == "client_unreachable"
                for e in _events(log)
            ),
            30,
            "the pull's end",
            daemon,
        )
        time.sleep(1)
        cpu_before = _cpu_seconds(daemon.pid)
        time.sleep(args.idle)
        idle_cpu = _cpu_seconds(daemon.pid) - cpu_before
        rss_end = _rss_mb(daemon.pid)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=30)
    events = _events(log)
    start = next(e for e in events if e["event"] == "run_starting")
    when = datetime.fromisoformat(start["timestamp"])
    slot = when.replace(second=0, microsecond=0)
    lines = log.read_text(errors="replace").splitlines()
    ready_line = next(line for line in lines if '"daemon_ready"' in line)
    return {
        "clients": args.clients,
        "messages_per_url": [len(r.messages()) for r in receivers],
        # The every-minute client's failure at its slot is a message of its own, later.
        "stale_messages_per_url": [
            sum("stale" in title for title in r.titles()) for r in receivers
        ],
        "digest_lines": [
            sum(line.startswith("- ") for line in r.messages()[0]["message"].splitlines())
            for r in receivers
        ],
        "digest_titles": [r.messages()[0]["title"] for r in receivers],
        "daemon_ready": ready_line,
        "ready_s": round(ready, 2),
        "digests_after_s": round(digests_after, 2),
        "rss_mb": round(rss, 1),
        "startup_cpu_s": round(startup_cpu, 2),
        "rss_end_mb": round(rss_end, 1),
        "idle_s": args.idle,
        "idle_cpu_s": round(idle_cpu, 3),
        "start_late_s": round((when - slot).total_seconds(), 3),
        "daemon_ready_bytes": len(ready_line),
        "longest_line_bytes": max(len(line) for line in lines),
        "log_lines": len(lines),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    receivers = [Receiver(), Receiver()]
    try:
        with tempfile.TemporaryDirectory(prefix="borgtunnel-fleet-") as tmp:
            result = measure(args, Path(tmp), receivers)
    finally:
        for receiver in receivers:
            receiver.close()
    print(json.dumps(result, indent=2))
    print()
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| clients | {result['clients']} | |")
    print(
        f"| stale messages per URL, all stale at once | {result['stale_messages_per_url']} "
        "| 1 each |"
    )
    print(f"| messages per URL in all | {result['messages_per_url']} | |")
    print(f"| clients listed in each digest | {result['digest_lines']} | all |")
    print(f"| digest title | {result['digest_titles'][0]} | |")
    print(f"| daemon RSS after the digests | {result['rss_mb']} MB | <= 100 MB |")
    print(f"| CPU while idle ({result['idle_s']:g} s) | {result['idle_cpu_s']} s | ~0 |")
    print(f"| due pull started after its slot | {result['start_late_s']} s | <= 1 s |")
    print(f"| CPU from start to digests out | {result['startup_cpu_s']} s | |")
    print(f"| `daemon_ready` line | {result['daemon_ready_bytes']} bytes | constant |")
    print(f"| longest log line | {result['longest_line_bytes']} bytes | constant |")
    print(
        f"| start to ready / to digests out | {result['ready_s']} s / "
        f"{result['digests_after_s']} s | |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
