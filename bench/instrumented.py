"""``borgtunnel`` CLI with a resource report: ``python -m bench.instrumented REPORT -- ARGS``.

Runs exactly ``borgtunnel.cli.main(ARGS)`` (what the console script runs) and, at exit, writes
this process's own usage to REPORT as JSON: CPU seconds (user, system), peak RSS (VmHWM) and the
bytes it moved through read/write syscalls (/proc/self/io rchar/wchar). ``RUSAGE_SELF`` excludes
the ``borg serve`` children, which is the point: the daemon's own cost, not borg's.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from borgtunnel.cli import main as cli_main


def _proc_io() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = int(value)
    return {"rchar": fields["rchar"], "wchar": fields["wchar"]}


def _vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    report = Path(sys.argv[1])
    args = sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:]
    started = time.perf_counter()
    code = 2
    try:
        code = cli_main(args)
    finally:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        report.write_text(
            json.dumps(
                {
                    "exit": code,
                    "seconds": time.perf_counter() - started,
                    "cpu_user": usage.ru_utime,
                    "cpu_system": usage.ru_stime,
                    "peak_rss_kb": _vm_hwm_kb(),
                    **_proc_io(),
                }
            )
        )
    sys.exit(code)


if __name__ == "__main__":
    main()
