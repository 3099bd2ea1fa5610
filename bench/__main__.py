"""``python -m bench``: borgtunnel vs the socat recipe vs local borg, on one machine.

Starts a throwaway sshd on 127.0.0.1 (tests/sshd.py) and a delay proxy in front of it, generates
the dataset, runs every experiment with its variants alternating, and prints Markdown tables
(medians, ratios, targets) for BENCHMARKS.md. Everything lives in one /tmp directory that is
removed at the end, also on failure or Ctrl-C. See BENCHMARKS.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from bench import raw, report, sections
from bench.dataset import generate
from bench.env import BenchError, Workspace, workspace
from bench.methods import Methods, Site
from bench.sections import Results

SECTIONS = ("startup", "lan", "wan", "raw", "probe", "concurrent")
# recipe (a), pull (b: the CLI), warm (b': inside a running process, like the daemon),
# proto (b with bench/prototype.py's proposed change), local (c: the floor).
METHODS = ("recipe", "pull", "warm", "proto", "local")
# Opt-in (--methods): the same backup with borg 2 on both ends, through borgtunnel and locally.
BORG2_METHODS = ("pull2", "local2")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--size-mb", type=float, default=400, help="random data (default 400)")
    parser.add_argument("--small-files", type=int, default=2000, help="text files (default 2000)")
    parser.add_argument("--runs", type=int, default=3, help="rounds per experiment (default 3)")
    parser.add_argument("--rtt-ms", type=float, default=40, help="delay proxy RTT (default 40)")
    parser.add_argument("--raw-mib", type=int, default=1024, help="raw tunnel, loopback")
    parser.add_argument("--wan-raw-mib", type=int, default=128, help="raw tunnel, through proxy")
    parser.add_argument("--concurrent", type=int, default=16, help="parallel pulls (default 16)")
    parser.add_argument("--concurrent-mb", type=float, default=20, help="random MB per client")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {METHODS + BORG2_METHODS} for the backup experiments",
    )
    parser.add_argument(
        "--proto",
        default="pidfd",
        help="bench.patches options for the (b*) prototype column, comma-separated",
    )
    parser.add_argument("--report", type=Path, help="also write the Markdown here")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.methods = [s.strip() for s in args.methods.split(",") if s.strip()]
    if unknown := set(args.methods) - set(METHODS) - set(BORG2_METHODS):
        parser.error(f"unknown methods {sorted(unknown)}")
    if unknown := set(args.only) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}")
    return args


def _openssh_cipher(ws: Workspace, port: int) -> str:
    done = ws.run([*ws.ssh_argv(port, "-v"), "true"])
    match = re.search(r"kex: server->client cipher: (\S+)", done.stderr)
    return match[1] if match else "?"


def _start_proxy(ws: Workspace, port: int, rtt_ms: float) -> int:
    proxy = ws.spawn(
        [
            sys.executable,
            "-m",
            "bench.delayproxy",
            "--target",
            f"127.0.0.1:{port}",
            "--delay",
            str(rtt_ms / 2000),
        ]
    )
    assert proxy.stdout is not None
    line = proxy.stdout.readline().strip()
    if not line.isdigit():
        raise BenchError(
            f"delay proxy did not start: {proxy.stderr.read() if proxy.stderr else ''!r}"
        )
    return int(line)


def _run(args: argparse.Namespace, ws: Workspace, results: Results) -> None:
    sshd = ws.start_sshd()
    proxy_port = _start_proxy(ws, sshd.port, args.rtt_ms)
    ws.trust_port(proxy_port)
    # The same proxy without delay: shows what the proxy itself can carry.
    proxy0_port = _start_proxy(ws, sshd.port, 0)
    ws.trust_port(proxy0_port)
    lan, wan = Site("lan", sshd.port), Site("wan", proxy_port)
    print(f"sshd on 127.0.0.1:{sshd.port}, delay proxy ({args.rtt_ms:.0f} ms RTT) on {proxy_port}")

    dataset = generate(ws.root / "data", random_mb=args.size_mb, text_files=args.small_files)
    small = generate(ws.root / "data-small", random_mb=args.concurrent_mb, text_files=200)
    sections.describe_dataset(results, "dataset", dataset)
    sections.describe_dataset(results, "concurrent.dataset", small)
    print(f"dataset: {dataset.describe()}; per concurrent client: {small.describe()}")

    m = Methods(ws, dataset)
    m.proto_options = [o for o in args.proto.split(",") if o]
    results.info["proto"] = args.proto
    clients = [f"c{n:02d}" for n in range(1, args.concurrent + 1)]
    m.write_config(
        {
            **{
                f"{site.name}{variant}": {"port": site.port}
                for site in (lan, wan)
                for variant in ("", "warm", "proto")
            },
            **{f"{site.name}pull2": m.borg2_client(site.port) for site in (lan, wan)},
            "rawlan": {},
            "rawwan": {"port": wan.port},
            "rawproxy0": {"port": proxy0_port},
            "probe": {},
            **{name: {"paths": [str(small.path)]} for name in clients},
        }
    )
    results.info["openssh.cipher"] = _openssh_cipher(ws, lan.port)
    results.info["concurrent.clients"] = len(clients)
    results.info["rtt_ms"] = args.rtt_ms

    steps = {
        "startup": lambda: sections.startup_costs(ws, results, port=lan.port, runs=args.runs),
        "lan": lambda: sections.backups(
            m, results, site=lan, runs=args.runs, names=args.methods, prefix="lan"
        ),
        "wan": lambda: sections.backups(
            m,
            results,
            site=wan,
            runs=args.runs,
            names=[name for name in args.methods if not name.startswith("local")],
            prefix="wan",
        ),
        "raw": lambda: raw.raw_tunnel(
            ws,
            m,
            results,
            runs=args.runs,
            lan=lan,
            wan=wan,
            lan_bytes=args.raw_mib * 1024 * 1024,
            wan_bytes=args.wan_raw_mib * 1024 * 1024,
        ),
        "probe": lambda: sections.instrumented_pull(ws, m, results, runs=args.runs),
        "concurrent": lambda: sections.concurrent_pulls(
            ws, m, results, runs=args.runs, clients=clients
        ),
    }
    for name in SECTIONS:
        if name in args.only:
            started = time.monotonic()
            print(f"{name}:", flush=True)
            steps[name]()
            results.info[f"section.{name}.seconds"] = round(time.monotonic() - started, 1)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    meta = report.machine()
    load_before = os.getloadavg()
    started = time.monotonic()
    results = Results()
    try:
        with workspace() as ws:
            print(f"workspace {ws.root}")
            _run(args, ws, results)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    load_after = os.getloadavg()
    meta.update(
        {
            "dataset": results.info.get("dataset", "?"),
            "per concurrent client": results.info.get("concurrent.dataset", "?"),
            "runs per experiment": str(args.runs),
            "OpenSSH negotiated cipher (recipe)": results.info.get("openssh.cipher", "?"),
            "load average before / after (1, 5, 15 min)": (
                f"{' '.join(f'{x:.2f}' for x in load_before)} / "
                f"{' '.join(f'{x:.2f}' for x in load_after)}"
            ),
            "bench wall time": f"{time.monotonic() - started:.0f} s",
        }
    )
    text = report.render(results, meta)
    print()
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    if args.json:
        args.json.write_text(
            json.dumps({"meta": meta, "samples": results.samples, "info": results.info}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
