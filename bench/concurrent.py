"""N pulls at once in one process, the way the daemon runs them: ``asyncio.gather`` of
``borgtunnel.runs.jobs.run_recorded`` sharing one History.

``python -m bench.concurrent --config C CLIENT...`` prints JSON: wall seconds, each outcome,
this process's CPU seconds and peak RSS (VmHWM; ``borg serve`` children are separate processes
and not included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

from bench import patches
from borgtunnel import logs
from borgtunnel.config import load_config
from borgtunnel.history import History
from borgtunnel.runs.jobs import run_recorded


async def _pull_all(config_path: Path, names: list[str]) -> dict[str, object]:
    config = load_config(config_path)
    clients = [config.client(name) for name in names]
    with History.open(config.server.state_dir) as history:
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(run_recorded(config, client, trigger="bench", history=history) for client in clients)
        )
        wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": wall,
        "results": [str(o.result) for o in outcomes],
        "errors": [o.error for o in outcomes if o.error],
        "durations": [o.duration for o in outcomes],
        "cpu": usage.ru_utime + usage.ru_stime,
        "peak_rss_kb": _vm_hwm_kb(),
    }


def _vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("clients", nargs="+")
    parser.add_argument(
        "--patch", action="append", default=[], help="bench.patches option (prototype)"
    )
    args = parser.parse_args()
    patches.apply(args.patch)
    logs.configure("json", level="warning", stream=sys.stderr)
    print(json.dumps(asyncio.run(_pull_all(args.config, args.clients))), flush=True)


if __name__ == "__main__":
    main()
