"""Machine description and the Markdown tables that go into BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from bench.env import BORG
from bench.sections import Results


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except OSError as exc:
        return f"? ({exc})"
    return (done.stdout or done.stderr).strip().splitlines()[0]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_total() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "?"


def machine() -> dict[str, str]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} x {_cpu_model()}",
        "memory": _mem_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "openssh": _first_line(["ssh", "-V"]),
        "borg": _first_line([BORG, "--version"]),
        "python": platform.python_version(),
        "asyncssh": version("asyncssh"),
        "cryptography": version("cryptography"),
    }


def _fmt(value: float | None, unit: str = "s", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}".rstrip()


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _samples(results: Results, key: str, digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in results.samples.get(key, []))


COLUMNS = (
    ("recipe", "(a) recipe"),
    ("pull", "(b) `borgtunnel pull`"),
    ("warm", "(b') pull in a running process"),
    ("proto", "(b*) pull, prototype change"),
    ("local", "(c) local borg"),
    ("pull2", "(b2) pull, borg 2"),
    ("local2", "(c2) local borg 2"),
)
RATIOS = (
    ("pull", "recipe"),
    ("warm", "recipe"),
    ("proto", "recipe"),
    ("pull", "local"),
    ("pull2", "pull"),
    ("pull2", "local2"),
)
_SHORT = {
    "recipe": "a",
    "pull": "b",
    "warm": "b'",
    "proto": "b*",
    "local": "c",
    "pull2": "b2",
    "local2": "c2",
}


def backup_table(results: Results) -> str:
    size_mb = results.info.get("dataset.bytes", 0) / 1e6
    present = [
        (key, label)
        for key, label in COLUMNS
        if any(f".{key}" in sample and sample.endswith(f".{key}") for sample in results.samples)
    ]
    ratios = [
        (x, y)
        for x, y in RATIOS
        if any(k == x for k, _ in present) and any(k == y for k, _ in present)
    ]
    header = [
        "",
        *(label for _, label in present),
        *(f"{_SHORT[x]} / {_SHORT[y]}" for x, y in ratios),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for prefix, where in (
        ("lan", "loopback"),
        ("wan", f"{results.info.get('rtt_ms', 40):.0f} ms RTT"),
    ):
        for kind, kind_label in (("full", "full backup"), ("incr", "unchanged data")):
            if results.median(f"{prefix}.{kind}.recipe") is None:
                continue
            cells = [f"{where}, {kind_label}"]
            for key, _ in present:
                value = results.median(f"{prefix}.{kind}.{key}")
                text = _fmt(value)
                if kind == "full" and value:
                    text += f" ({size_mb / value:.0f} MB/s)"
                cells.append(text)
            for x, y in ratios:
                ratio = _ratio(
                    results.median(f"{prefix}.{kind}.{x}"), results.median(f"{prefix}.{kind}.{y}")
                )
                cells.append(_fmt(ratio, ""))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def raw_table(results: Results) -> str:
    lines = [
        "| tunnel | cipher, window | MB/s (median) | samples | CPU s of the SSH client process |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "raw.lan.borgtunnel": "borgtunnel forward, loopback",
        "raw.lan.openssh": "`ssh -R`, loopback",
        "raw.lan.openssh-aes128gcm": "`ssh -R -c aes128-gcm`, loopback",
        "raw.wan.borgtunnel": "borgtunnel forward, 40 ms RTT",
        "raw.wan.borgtunnel-2MiB": "borgtunnel forward, 40 ms RTT, window 2 MiB",
        "raw.wan.openssh": "`ssh -R`, 40 ms RTT",
        "raw.proxy0.borgtunnel": "borgtunnel forward through the proxy at 0 ms (proxy check)",
    }
    for key, label in labels.items():
        if key not in results.samples:
            continue
        cipher = results.info.get(f"{key}.cipher") or results.info.get("openssh.cipher", "?")
        if key.endswith("aes128gcm"):
            cipher = "aes128-gcm@openssh.com"
        window = results.info.get(f"{key}.window")
        detail = f"{cipher}, {window / 1024 / 1024:.0f} MiB" if window else f"{cipher}, OpenSSH"
        lines.append(
            f"| {label} | {detail} | {_fmt(results.median(key), '', 0)} | "
            f"{_samples(results, key, 0)} | {_fmt(results.median(f'{key}.cpu'))} |"
        )
    return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _le(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _ge(value: float | None, limit: float) -> bool | None:
    return None if value is None else value >= limit


def targets_table(results: Results) -> str:
    med = results.median
    full_ratio = _ratio(med("lan.full.pull"), med("lan.full.recipe"))
    incr_ratio = _ratio(med("lan.incr.pull"), med("lan.incr.recipe"))
    wan_speedup = _ratio(med("wan.full.recipe"), med("wan.full.pull"))
    floor_ratio = _ratio(med("lan.full.pull"), med("lan.full.local"))
    raw_ratio = _ratio(med("raw.lan.borgtunnel"), med("raw.lan.openssh"))
    incr_a, incr_b = med("lan.incr.recipe"), med("lan.incr.pull")
    added = None if incr_a is None or incr_b is None else (incr_b - incr_a) * 1000
    rss = med("concurrent.peak_rss_mib")
    direct = results.info.get("probe.direct_socket")
    rows = [
        ("pull / recipe, full, loopback", "<= 0.95", _fmt(full_ratio, ""), _le(full_ratio, 0.95)),
        (
            "pull / recipe, unchanged, loopback",
            "<= 0.95",
            _fmt(incr_ratio, ""),
            _le(incr_ratio, 0.95),
        ),
        (
            "throughput pull / recipe, full, 40 ms RTT",
            ">= 2",
            _fmt(wan_speedup, "x"),
            _ge(wan_speedup, 2.0),
        ),
        ("pull / local floor, full", "<= 1.6", _fmt(floor_ratio, ""), _le(floor_ratio, 1.6)),
        ("raw tunnel borgtunnel / `ssh -R`", ">= 0.75", _fmt(raw_ratio, ""), _ge(raw_ratio, 0.75)),
        (
            "unchanged pull: added over recipe",
            "<= 150 ms",
            _fmt(added, "ms", 0),
            _le(added, 150),
        ),
        (
            f"peak RSS, {results.info.get('concurrent.clients', '?')} parallel pulls, one process",
            "<= 80 MB",
            "n/a" if rss is None else f"{rss:.1f} MiB ({rss * 1.048576:.1f} MB)",
            None if rss is None else rss * 1.048576 <= 80,
        ),
        (
            "no repository byte through Python server-side",
            "borg serve fd 0/1 = accepted socket",
            "n/a" if not direct else f"{sum(direct)}/{len(direct)} serve children",
            None if not direct else all(direct),
        ),
    ]
    lines = ["| target | goal | measured (medians) | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {_verdict(d)} |" for a, b, c, d in rows]
    return "\n".join(lines)


def other_table(results: Results) -> str:
    med = results.median
    rows = []
    for kind, label in (("full", "full"), ("incr", "unchanged")):
        if med(f"probe.{kind}.cpu") is None:
            continue
        rows.append(
            f"| one `borgtunnel pull`, {label} | {_fmt(med(f'probe.{kind}.seconds'))} | "
            f"{_fmt(med(f'probe.{kind}.cpu'))} (user {_fmt(med(f'probe.{kind}.cpu_user'))}, "
            f"sys {_fmt(med(f'probe.{kind}.cpu_system'))}) | "
            f"{_fmt(med(f'probe.{kind}.peak_rss_mib'), 'MiB', 1)}"
            f" | read {_fmt(med(f'probe.{kind}.rchar_mb'), 'MB', 0)}, "
            f"written {_fmt(med(f'probe.{kind}.wchar_mb'), 'MB', 0)} |"
        )
    if med("concurrent.wall") is not None:
        rows.append(
            f"| {results.info.get('concurrent.clients')} concurrent pulls, one process | "
            f"{_fmt(med('concurrent.wall'))} (slowest pull {_fmt(med('concurrent.slowest'))}) | "
            f"{_fmt(med('concurrent.cpu'))} | {_fmt(med('concurrent.peak_rss_mib'), 'MiB', 1)} | |"
        )
    header = [
        "| daemon process | wall | CPU (user+sys) | peak RSS (VmHWM) | bytes through read/write |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + rows)


def startup_table(results: Results) -> str:
    labels = {
        "startup.python": "`python -c pass` (interpreter)",
        "startup.third_party_imports": "`import asyncio, asyncssh, pydantic, structlog, sqlite3`",
        "startup.borgtunnel_version": "`borgtunnel --version` (all of borgtunnel's imports)",
        "startup.openssh_exec_true": "`ssh client true` (OpenSSH connect, auth, one exec)",
        "startup.bash_with_bashrc": "`bash -c '. ~/.bashrc'` (the client's rc, paid per exec)",
        "startup.bash": "`bash -c true`",
    }
    lines = ["| fixed cost | median | samples |", "|---|---|---|"]
    lines += [
        f"| {label} | {_fmt(results.median(key), 's', 3)} | {_samples(results, key, 3)} |"
        for key, label in labels.items()
        if key in results.samples
    ]
    return "\n".join(lines)


def samples_section(results: Results) -> str:
    lines = ["| measurement | samples (run order) |", "|---|---|"]
    lines += [f"| {key} | {_samples(results, key)} |" for key in sorted(results.samples)]
    return "\n".join(lines)


def serve_fds_section(results: Results) -> str:
    serves = results.info.get("probe.serve") or []
    out = []
    for serve in serves:
        out.append(
            f"- `borg serve` pid {serve['pid']}: fd 0 -> `{serve['fd0']}`, "
            f"fd 1 -> `{serve['fd1']}`; borgtunnel still holds it: "
            f"{serve['parent_holds_socket']}"
        )
        out.extend(f"  - `ss -xp`: `{line}`" for line in serve["ss_lines"])
    return "\n".join(out) or "(no serve child observed)"


def render(results: Results, meta: dict[str, str]) -> str:
    head = "\n".join(f"- {key}: {value}" for key, value in meta.items())
    return "\n\n".join(
        [
            "## Machine and run\n\n" + head,
            "## Targets\n\n" + targets_table(results),
            "## Backups (medians)\n\n" + backup_table(results),
            "## Raw tunnel throughput\n\n" + raw_table(results),
            "## Daemon cost\n\n" + other_table(results),
            "## Fixed costs\n\n" + startup_table(results),
            "## borg serve descriptors during a pull\n\n" + serve_fds_section(results),
            "## All samples\n\n" + samples_section(results),
        ]
    )
