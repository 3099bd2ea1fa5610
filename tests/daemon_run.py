"""``python -m tests.daemon_run CONFIG SECONDS``: the real ``run_daemon`` with a shifted clock.

The same entry point ``borgtunnel daemon`` calls (asyncio.run, SIGTERM/SIGINT/SIGHUP handlers),
only with a clock that reaches ``FIRE_AT`` (02:00 UTC) SECONDS after start-up, so a test can
signal a real daemon process in the middle of a real scheduled pull. The offset is computed here,
after the imports, so a slow interpreter start does not eat into SECONDS.
"""

from __future__ import annotations

import sys
from pathlib import Path

from borgtunnel import logs
from borgtunnel.config import load_config
from borgtunnel.scheduling.daemon import run_daemon
from tests.daemon_support import FIRE_AT, clock_offset, shifted_now


def main() -> int:
    config_path, fire_in = Path(sys.argv[1]), float(sys.argv[2])
    logs.configure("json", level="debug")
    config = load_config(config_path)
    return run_daemon(config_path, config, now=shifted_now(clock_offset(FIRE_AT, fire_in)))


if __name__ == "__main__":
    sys.exit(main())
