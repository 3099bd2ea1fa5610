"""Pulls in an already running process, as the daemon runs them (no interpreter start, no imports).

``python -m bench.warm CONFIG`` loads the config, then for every client name read from stdin runs
``borgtunnel.runs.jobs.run_recorded`` and answers one JSON line with its own timing and the
result. The harness times from writing the name to reading the answer.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from borgtunnel import logs
from borgtunnel.config import load_config
from borgtunnel.runs.jobs import run_recorded


async def _serve(config_path: Path) -> None:
    config = load_config(config_path)
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while name := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        started = time.perf_counter()
        outcome = await run_recorded(config, config.client(name), trigger="bench")
        print(
            json.dumps(
                {
                    "seconds": time.perf_counter() - started,
                    "result": str(outcome.result),
                    "error": outcome.error,
                    "nfiles": outcome.stats.nfiles if outcome.stats else None,
                }
            ),
            flush=True,
        )


def main() -> None:
    logs.configure("json", level="info", stream=sys.stderr)  # what the CLI logs, too
    asyncio.run(_serve(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
