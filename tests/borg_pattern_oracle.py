"""What a real borg makes of pattern options: run by THAT borg's python, not imported.

Reads one JSON request per line on stdin and answers one JSON line on stdout:

- ``{"options": [...]}``: ``borg create OPTIONS -- REPO::a /data`` through borg's own
  argument parser (argparse for 1.x, jsonargparse for 2);
- ``{"file": TEXT}``: what ``--patterns-from=F`` reads from F holding TEXT (UTF-8 bytes):
  borg's own ArgparsePatternFileAction steps (``open(F)``, ``load_pattern_file``) without
  building the whole parser for each file (fast), or with ``"parser": true`` the whole way.

The answer is ``{"roots": [...]}`` (the backup roots borg would walk, the positional /data
last) or ``{"error": "..."}`` when borg refuses the command line. tests/test_gatekeeper_patterns.py
holds the gatekeeper's reading to these answers.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path

import borg  # type: ignore[import-not-found]  # the python running us has it
from borg.archiver import Archiver  # type: ignore[import-not-found]
from borg.patterns import load_pattern_file  # type: ignore[import-not-found]

MAJOR = int(borg.__version__.split(".")[0])


def roots_of(archiver: Archiver, options: list[str]) -> dict[str, object]:
    if MAJOR >= 2:
        argv = ["create", *options, "--repo=ssh://borgtunnel/r", "--", "a", "/data"]
    else:
        argv = ["create", *options, "--", "ssh://borgtunnel/r::a", "/data"]
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # borg 2: "root path ... does not exist"
            args = archiver.parse_args(argv)
    except SystemExit as exc:
        return {"error": f"exit {exc.code}"}
    except Exception as exc:  # noqa: BLE001 - any refusal of borg's is an answer
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"roots": [*getattr(args, "pattern_roots", []), *args.paths]}


def file_roots(path: Path) -> dict[str, object]:
    roots: list[str] = []
    try:
        with warnings.catch_warnings(), path.open() as handle:  # the locale's encoding, as borg
            warnings.simplefilter("ignore")
            load_pattern_file(handle, roots, [])
    except Exception as exc:  # noqa: BLE001 - any refusal of borg's is an answer
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"roots": [*roots, "/data"]}


def main() -> None:
    archiver = Archiver()
    with tempfile.TemporaryDirectory() as directory:
        patterns = Path(directory) / "patterns"
        for request_line in sys.stdin:
            request = json.loads(request_line)
            if "file" in request:
                patterns.write_bytes(request["file"].encode("utf-8", "surrogateescape"))
                if request.get("parser"):  # the whole way, through --patterns-from
                    answer = roots_of(archiver, [f"--patterns-from={patterns}"])
                else:
                    answer = file_roots(patterns)
            else:
                answer = roots_of(archiver, request["options"])
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
