"""``python -m bench.sources``: what a source costs on top of a files-only pull (issue 19).

One throwaway sshd on 127.0.0.1 (tests/sshd.py), real borg on both ends, the real command line
(``borgtunnel pull``). For each variant, a fresh repository and two pulls: the first (everything
is new) and a second with nothing changed (what deduplication leaves). Reported: wall time of
each pull and the bytes it added to the repository (``du`` of the repository directory), medians
of ``--runs`` rounds, variants alternating. Variants:

* ``files``: the client's small tree only (the baseline every other variant includes);
* ``sqlite-file``: the same plus the SQLite database file backed up as a file (what a user
  without sources does: fast, but not a consistent copy of a database being written);
* ``sqlite``: the same database as a ``sqlite`` source (``.dump`` SQL through a FIFO);
* ``command``: a ``command`` source streaming a fixed file of the same size (``cat``);
* ``postgresql``: a database of about the same size as a ``postgresql`` source (custom format,
  uncompressed), only when PostgreSQL is installed (a private server, started and stopped here).

Everything lives in one temporary directory, removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests import pullkit, sourcekit
from tests.sshd import SshdServer, start_sshd, stop_sshd

VARIANTS = ("files", "sqlite-file", "sqlite", "command", "postgresql")


def _sqlite_db(path: Path, megabytes: int) -> None:
    """Rows of random-looking text (not compressible), about ``megabytes`` MB."""
    rows = megabytes * 1024 * 1024 // 1100
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.executemany(
            "INSERT INTO notes (body) VALUES (?)",
            ((os.urandom(512).hex(),) for _ in range(rows)),
        )


@contextlib.contextmanager
def _postgres(root: Path, megabytes: int) -> Iterator[dict[str, str] | None]:
    """A private PostgreSQL with database ``bench`` of about ``megabytes`` MB, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found or shutil.which("runuser") is None or os.geteuid() != 0:
        yield None
        return
    bindir = found[-1].parent
    root.chmod(0o755)  # the postgres user reaches its directory through it
    base = root / "pg"
    base.mkdir()
    shutil.chown(base, "postgres")
    data, sock = base / "data", base / "sock"
    as_postgres = ["runuser", "-u", "postgres", "--"]
    ctl = [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data)]
    run = subprocess.run
    try:
        run([*as_postgres, "mkdir", "-m", "0700", str(sock)], check=True)
        initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
        run([*as_postgres, *initdb, "--no-sync"], check=True, capture_output=True)
        options = f"-k {sock} -c listen_addresses='' -c fsync=off"
        run([*ctl, "-o", options, "-w", "-l", str(base / "log"), "start"], check=True,
            capture_output=True)  # fmt: skip
        base.chmod(0o755)
        psql = [str(bindir / "psql"), "-X", "-q", "-h", str(sock), "-U", "postgres"]
        run([*psql, "-c", "CREATE DATABASE bench"], check=True)
        rows = megabytes * 1024 * 1024 // 1100
        # psql fills :rows in from -v when it reads the script (stdin; -c does not).
        fill = (
            "CREATE EXTENSION pgcrypto;\n"
            "CREATE TABLE notes (id int PRIMARY KEY, body text);\n"
            "INSERT INTO notes SELECT i, encode(gen_random_bytes(512), 'hex') "
            "FROM generate_series(1, :rows) i;\n"
        )
        run([*psql, "-d", "bench", "-v", f"rows={rows}"], input=fill, text=True, check=True)
        yield {"host": str(sock), "user": "postgres"}
    finally:
        run([*ctl, "-m", "immediate", "stop"], capture_output=True, check=False)


def _variant_sources(
    variant: str, db: Path, blob: Path, pg: Mapping[str, str] | None
) -> tuple[list[dict[str, Any]], list[Path]]:
    """(sources, extra paths) of a variant."""
    if variant == "sqlite-file":
        return [], [db]
    if variant == "sqlite":
        return [{"type": "sqlite", "name": "db", "path": str(db)}], []
    if variant == "command":
        return [{"type": "command", "name": "blob", "command": ["cat", str(blob)]}], []
    if variant == "postgresql" and pg is not None:
        return [{"type": "postgresql", "name": "db", "database": "bench", **pg}], []
    return [], []


def _du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _round(
    root: Path, sshd: SshdServer, tree: Path, variant: str, extra: tuple[list[Any], list[Path]]
) -> tuple[float, int, float, int]:
    """Two pulls into a fresh repository: (seconds, bytes added) of each."""
    work = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=root))
    sources, paths = extra
    repo = work / "repo"
    pullkit.init_repo(work, repo)
    conf = pullkit.base_config(work, sshd)
    table = pullkit.client_table(sshd, "c1", repo, [tree, *paths])
    config = pullkit.write_config(work / "bt.toml", clients={"c1": table}, **conf)
    with config.open("a") as file:
        file.write("\n" + sourcekit.sources_toml("c1", sources))
    figures: list[float] = []
    for _ in range(2):
        size = _du(repo)
        started = time.monotonic()
        done = pullkit.run_cli(config, "pull", "c1", timeout=900)
        took = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"{variant}: pull failed: {done.stdout}{done.stderr}")
        figures += [took, _du(repo) - size]
    shutil.rmtree(work)
    return figures[0], int(figures[1]), figures[2], int(figures[3])


def _table(results: Mapping[str, list[tuple[float, int, float, int]]], mb: int) -> str:
    lines = [
        f"| variant ({mb} MB database or stream) | first pull | added | unchanged pull | added |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant, rounds in results.items():
        first = statistics.median(r[0] for r in rounds)
        first_bytes = statistics.median(r[1] for r in rounds)
        second = statistics.median(r[2] for r in rounds)
        second_bytes = statistics.median(r[3] for r in rounds)
        lines.append(
            f"| `{variant}` | {first:.2f} s | {first_bytes / 1e6:.1f} MB | {second:.2f} s "
            f"| {second_bytes / 1e6:.2f} MB |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sources", description=__doc__)
    parser.add_argument("--mb", type=int, default=64, help="database/stream size (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="rounds per variant (default 3)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="borgtunnel-bench-sources-"))
    sshd = None
    try:
        sshd = start_sshd(root / "sshd")
        tree = pullkit.make_client_data(root / "tree", random_bytes=2_000_000)
        db, blob = root / "client.db", root / "blob"
        _sqlite_db(db, args.mb)
        blob.write_bytes(os.urandom(db.stat().st_size))
        with _postgres(root, args.mb) as pg:
            variants = [v for v in VARIANTS if v != "postgresql" or pg is not None]
            results: dict[str, list[tuple[float, int, float, int]]] = {v: [] for v in variants}
            for _ in range(args.runs):
                for variant in variants:
                    extra = _variant_sources(variant, db, blob, pg)
                    results[variant].append(_round(root, sshd, tree, variant, extra))
        print(f"database file {db.stat().st_size / 1e6:.1f} MB; medians of {args.runs} rounds\n")
        print(_table(results, args.mb))
    finally:
        if sshd is not None:
            stop_sshd(sshd)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
