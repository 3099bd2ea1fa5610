"""``python -m bench.fleetconfig``: how long ``check-config`` takes on a 1000-client fleet.

Generates a main file with ``[defaults]`` and three ``[groups.*]`` (each client: host, repository,
paths, exclude, schedule, max_age, retention, all inherited with ``{client}``) and one included
file per group holding its clients in two lines each (``[clients.NAME]`` and ``group = …``);
then times the real command line, ``borgtunnel check-config --quiet`` (whole file) and
``check-config --client NAME --json``, plus ``load_config`` alone inside this process. Target
(issue 18): check-config ≤ 1 s. No SSH, nothing written outside one temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from borgtunnel.config import load_config

GROUPS = {
    "web": ('paths = ["/etc", "/var/www"]', 'exclude = ["/var/www/*/cache"]', '"0 2 * * *"'),
    "db": ('paths = ["/etc", "/var/lib/postgresql"]', 'exclude = ["*.tmp"]', '"0 3 * * *"'),
    "office": ('paths = ["/etc", "/home"]', 'exclude = ["/home/*/.cache"]', '"0 1 * * *"'),
}

MAIN = """\
include = ["clients.d/*.toml"]

[server]
socket_dir = "{root}/run"
state_dir = "{root}/state"

[defaults]
encryption = "repokey-blake2"
passphrase_file = "/etc/borgtunnel/{{client}}.passphrase"
host = "{{client}}.example.org"
repository = "/srv/borg/{{client}}"
max_age = "2d"
retention = {{ keep_daily = 7, keep_weekly = 4, keep_monthly = 6 }}
"""


def generate_flat(root: Path, clients: int) -> tuple[Path, int, int]:
    """The same fleet as before issue 18: every client repeats every setting, one file."""
    names = list(GROUPS)
    tables = []
    for index in range(clients):
        group = names[index % len(names)]
        name = f"{group}{index:04d}"
        paths, exclude, schedule = GROUPS[group]
        tables.append(
            f"[clients.{name}]\n"
            f'host = "{name}.example.org"\n'
            f'repository = "/srv/borg/{name}"\n'
            f'encryption = "repokey-blake2"\n'
            f'passphrase_file = "/etc/borgtunnel/{name}.passphrase"\n'
            f"{paths}\n{exclude}\nschedule = {schedule}\n"
            'max_age = "2d"\n'
            "retention = { keep_daily = 7, keep_weekly = 4, keep_monthly = 6 }\n"
        )
    main = root / "borgtunnel.toml"
    main.write_text(
        f'[server]\nsocket_dir = "{root}/run"\nstate_dir = "{root}/state"\n\n' + "".join(tables)
    )
    return main, len(main.read_text().splitlines()), 10


def generate(root: Path, clients: int) -> tuple[Path, int, int]:
    """The fleet's files; returns the main file, total lines, and lines per client."""
    groups = "".join(
        f"\n[groups.{name}]\n{paths}\n{exclude}\nschedule = {schedule}\n"
        for name, (paths, exclude, schedule) in GROUPS.items()
    )
    main = root / "borgtunnel.toml"
    main.write_text(MAIN.format(root=root) + groups)
    (root / "clients.d").mkdir()
    per_group: dict[str, list[str]] = {name: [] for name in GROUPS}
    names = list(GROUPS)
    for index in range(clients):
        group = names[index % len(names)]
        per_group[group].append(f'[clients.{group}{index:04d}]\ngroup = "{group}"\n')
    for group, tables in per_group.items():
        (root / "clients.d" / f"{group}.toml").write_text("".join(tables))
    files = [main, *(root / "clients.d").iterdir()]
    lines = sum(len(f.read_text().splitlines()) for f in files)
    return main, lines, 2


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleetconfig", description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--flat", action="store_true", help="the same fleet written out client by client"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        root = Path(tmp)
        config, lines, per_client = (generate_flat if args.flat else generate)(root, args.clients)
        cli = [sys.executable, "-m", "borgtunnel", "--config", str(config), "check-config"]
        whole = [timed([*cli, "--quiet"]) for _ in range(args.runs)]
        one = [timed([*cli, "--client", "web0000", "--json"]) for _ in range(args.runs)]
        loads = []
        for _ in range(args.runs):
            start = time.perf_counter()
            loaded = load_config(config)
            loads.append(time.perf_counter() - start)
        assert len(loaded.clients) == args.clients
        layout = "written out" if args.flat else f"in {len(GROUPS)} groups"
        print(f"| {args.clients} clients {layout} | value |")
        print("| --- | --- |")
        print(f"| lines in all files | {lines} ({per_client} per client) |")
        print(
            f"| `check-config --quiet`, median of {args.runs} | {statistics.median(whole):.2f} s |"
        )
        print(f"| `check-config --client web0000 --json` | {statistics.median(one):.2f} s |")
        print(f"| `load_config` in process | {statistics.median(loads):.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
