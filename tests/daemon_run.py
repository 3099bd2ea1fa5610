"""``python -m tests.daemon_run CONFIG OFFSET``: the real ``run_daemon`` with a shifted clock.

The same entry point ``borgtunnel daemon`` calls (asyncio.run, SIGTERM/SIGINT/SIGHUP handlers),
only with ``now`` running OFFSET seconds ahead, so a test can place a cron time a few seconds
away and then signal a real daemon process in the middle of a real pull.
"""

from __future__ import annotations

import sys
from pathlib import Path

from borgtunnel import logs
from borgtunnel.config import load_config
from borgtunnel.daemon import run_daemon
from tests.daemon_support import shifted_now


def main() -> int:
    config_path, offset = Path(sys.argv[1]), float(sys.argv[2])
    logs.configure("json", level="debug")
    return run_daemon(config_path, load_config(config_path), now=shifted_now(offset))


if __name__ == "__main__":
    sys.exit(main())
