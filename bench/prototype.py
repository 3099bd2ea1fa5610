"""``python -m bench.prototype [OPTION...] -- ARGS``: the CLI with proposed changes patched in.

Runs ``borgtunnel.cli.main(ARGS)`` after ``bench.patches.apply(OPTIONS)`` (``pidfd``,
``max-pktsize=N``, ``sndbuf=N``; see bench/patches.py). Measures an idea before anyone edits
borgtunnel/*.
"""

from __future__ import annotations

import sys

from bench import patches
from borgtunnel.cli import main as cli_main


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else 0
    patches.apply(argv[:split])
    sys.exit(cli_main(argv[split + 1 :] if split or argv[:1] == ["--"] else argv))


if __name__ == "__main__":
    main()
