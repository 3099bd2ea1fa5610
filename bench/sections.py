"""The experiments. Each one alternates its variants (the order rotates every round) so slow drift
on a shared machine (other work, page cache, disk writeback) spreads over all of them."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench import probe
from bench.dataset import Dataset
from bench.env import BORGTUNNEL, BenchError, Workspace
from bench.methods import Methods, Site, sync_disks

T = TypeVar("T")
MIB = 1024 * 1024


@dataclass
class Results:
    samples: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        values = self.samples.get(key)
        return statistics.median(values) if values else None


def rotated(items: Sequence[T], round_number: int) -> list[T]:
    shift = round_number % len(items)
    return [*items[shift:], *items[:shift]]


def progress(text: str) -> None:
    print(f"  {text}", flush=True)


# --- (a)/(b)/(c): full and unchanged-data backups ---------------------------------------


def backups(
    m: Methods, results: Results, *, site: Site, runs: int, names: Sequence[str], prefix: str
) -> None:
    """Per round and method: fresh repository, full backup, then the same data again."""
    methods = {name: m.runner(name, site) for name in names}
    nfiles: set[int | None] = set()
    for round_number in range(runs):
        for name in rotated(list(methods), round_number):
            repo, run = methods[name]
            m.fresh_repo(repo)
            sync_disks()
            full = run()
            sync_disks()
            incremental = run()
            m.drop_repo(repo)
            nfiles.update({full.nfiles, incremental.nfiles})
            results.add(f"{prefix}.full.{name}", full.seconds)
            results.add(f"{prefix}.incr.{name}", incremental.seconds)
            progress(
                f"{prefix} round {round_number + 1} {name}: full {full.seconds:.2f}s, "
                f"unchanged {incremental.seconds:.2f}s"
            )
    if len(nfiles) != 1:
        raise BenchError(f"methods disagree on the number of files backed up: {nfiles}")
    results.info[f"{prefix}.nfiles"] = nfiles.pop()


# --- the daemon's own cost during one pull, and the fd check ------------------------------


def instrumented_pull(ws: Workspace, m: Methods, results: Results, *, runs: int) -> None:
    """``bench.instrumented`` = the CLI + a rusage report; watch serve's fds meanwhile."""
    for round_number in range(runs):
        m.fresh_repo("probe")
        for kind in ("full", "incr"):
            sync_disks()
            report_path = ws.root / f"instrumented-{kind}.json"
            argv = [sys.executable, "-m", "bench.instrumented", str(report_path), "--"]
            argv += ["--config", str(m.config), "pull", "probe"]
            with (ws.root / "instrumented.log").open("ab") as log:
                process = ws.spawn(argv, stdout=log, stderr=subprocess.STDOUT)
                seen = probe.watch_serve(process)
                process.wait()
                ws.stop(process)
            report = json.loads(report_path.read_text())
            if report["exit"] != 0:
                raise BenchError(f"instrumented pull failed: {report}")
            results.add(f"probe.{kind}.cpu", report["cpu_user"] + report["cpu_system"])
            results.add(f"probe.{kind}.cpu_user", report["cpu_user"])
            results.add(f"probe.{kind}.cpu_system", report["cpu_system"])
            results.add(f"probe.{kind}.peak_rss_mib", report["peak_rss_kb"] / 1024)
            results.add(f"probe.{kind}.seconds", report["seconds"])
            results.add(f"probe.{kind}.rchar_mb", report["rchar"] / 1e6)
            results.add(f"probe.{kind}.wchar_mb", report["wchar"] / 1e6)
            if kind == "full" and round_number == 0:
                results.info["probe.serve"] = [vars(s) for s in seen]
            results.info.setdefault("probe.direct_socket", []).extend(
                s.direct_socket and not s.parent_holds_socket for s in seen
            )
            progress(
                f"instrumented {kind} round {round_number + 1}: cpu "
                f"{report['cpu_user'] + report['cpu_system']:.2f}s, peak RSS "
                f"{report['peak_rss_kb'] / 1024:.1f} MiB, serve children {len(seen)}"
            )
        m.drop_repo("probe")


# --- 16 concurrent pulls ------------------------------------------------------------------


def concurrent_pulls(
    ws: Workspace, m: Methods, results: Results, *, runs: int, clients: Sequence[str]
) -> None:
    for round_number in range(runs):
        inits = [m.start_fresh_repo(name) for name in clients]
        for init in inits:
            if init.wait() != 0:
                raise BenchError(f"borg init failed: {init.args!r}")
            ws.stop(init)
        sync_disks()
        argv = [sys.executable, "-m", "bench.concurrent", "--config", str(m.config), *clients]
        done = ws.run(argv)
        report = json.loads(done.stdout)
        for name in clients:
            m.drop_repo(name)
        if set(report["results"]) != {"ok"}:
            raise BenchError(f"concurrent pulls failed: {report['errors']}")
        results.add("concurrent.wall", report["wall"])
        results.add("concurrent.peak_rss_mib", report["peak_rss_kb"] / 1024)
        results.add("concurrent.cpu", report["cpu"])
        results.add("concurrent.slowest", max(report["durations"]))
        progress(
            f"concurrent round {round_number + 1}: {len(clients)} pulls in {report['wall']:.1f}s, "
            f"peak RSS {report['peak_rss_kb'] / 1024:.1f} MiB, cpu {report['cpu']:.1f}s"
        )


# --- fixed costs: interpreter, imports, an OpenSSH round trip -------------------------------


def startup_costs(ws: Workspace, results: Results, *, port: int, runs: int) -> None:
    """What a one-shot pull pays before any work, next to what the recipe's ``ssh`` pays."""
    commands = {
        "startup.python": [sys.executable, "-c", "pass"],
        "startup.third_party_imports": [
            sys.executable,
            "-c",
            "import asyncio, asyncssh, pydantic, structlog, sqlite3",
        ],
        "startup.borgtunnel_version": [BORGTUNNEL, "--version"],
        "startup.openssh_exec_true": [*ws.ssh_argv(port), "true"],
        # sshd runs every command through the user's shell, and bash reads ~/.bashrc then:
        # the client's rc files are paid once per exec (same user and machine here).
        "startup.bash_with_bashrc": ["bash", "-c", '. "$HOME/.bashrc"'],
        "startup.bash": ["bash", "-c", "true"],
    }
    for round_number in range(max(runs, 5)):
        for key in rotated(list(commands), round_number):
            results.add(key, ws.run(commands[key]).seconds)
    for key in commands:
        progress(f"{key}: {results.median(key):.3f}s")


def describe_dataset(results: Results, key: str, dataset: Dataset) -> None:
    results.info[key] = dataset.describe()
    results.info[f"{key}.bytes"] = dataset.total_bytes
