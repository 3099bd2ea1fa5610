"""The three ways to get the same backup into a repository on "the server", timed the same way.

(a) ``recipe``: the pull recipe from the borg docs (deployment/pull-backup, "socat"): a socat
    listener forks ``borg serve --append-only --restrict-to-path REPO`` per connection, OpenSSH's
    ``ssh -R`` forwards a socket on the client to it and runs ``borg create`` with
    ``BORG_RSH="sh -c 'exec nc -N -U SOCK'"``. Timed from ``ssh`` start to exit; socat, a
    long-running listener in the recipe, is started before the clock and stopped after.
(b) ``pull``: the real CLI, ``borgtunnel --config X pull NAME``, timed from spawn to exit: Python
    start, imports, config, SSH handshake, the remote prepare/remove steps are all included.
(c) ``local``: ``borg create`` straight into a local repository: the floor, no tunnel.
Two variants of (b) show where its time goes: ``warm`` (b') runs the same pull inside an already
running process, as the daemon does (bench/warm.py), and ``proto`` (b*) runs the CLI with a
proposed change patched in (bench/prototype.py, bench/patches.py).

All of them run the same ``borg create --log-json --json`` with borg's default compression (lz4)
into an unencrypted repository (``borg init -e none``), with a unique archive name per run.

Opt-in: ``pull2`` and ``local2`` are (b) and (c) with borg 2 on both ends (``.borg/VERSION``).
borg 2.0.0b25 has no unencrypted mode: they use ``authenticated-sha256`` (HMAC-SHA256 chunk ids,
no encryption), the nearest to 1.x's ``none`` (plain SHA256 ids).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.dataset import Dataset
from bench.env import BORG, BORG2, BORGTUNNEL, BenchError, Workspace, wait_for_path

# Microseconds: a full and the following incremental run can start within the same second.
ARCHIVE = "{hostname}-{now:%Y-%m-%dT%H:%M:%S.%f}"
CREATE_OPTIONS = ("--log-json", "--json")
URL_HOST = "borgtunnel"  # the same fake host borgtunnel uses; any constant would do


@dataclass(frozen=True)
class Timed:
    seconds: float
    nfiles: int | None
    original_size: int | None


@dataclass(frozen=True)
class Site:
    """A network path to the client's sshd: loopback directly, or through the delay proxy."""

    name: str  # "lan" or "wan"
    port: int


def _stats_from_json(stdout: str) -> tuple[int | None, int | None]:
    try:
        stats = json.loads(stdout)["archive"]["stats"]
        return int(stats["nfiles"]), int(stats["original_size"])
    except (ValueError, KeyError, TypeError):
        return None, None


class Methods:
    """Runs (a), (b), (c) against one workspace and dataset."""

    def __init__(self, ws: Workspace, dataset: Dataset) -> None:
        self.ws = ws
        self.dataset = dataset
        self.repos = ws.mkdir("repos")
        self.server_sockets = ws.mkdir("server-sockets")
        # The forwarded sockets "on the client" (same machine here), like ~/.cache/borgtunnel.
        self.client_sockets = ws.mkdir("client-sockets")
        self.state = ws.mkdir("state")
        self.config = ws.root / "borgtunnel.toml"
        self._runs = 0
        self._warm: subprocess.Popen[bytes] | None = None
        self.proto_options: Sequence[str] = ("pidfd",)

    # --- repositories -----------------------------------------------------------------

    def repo(self, name: str) -> Path:
        return self.repos / name

    def fresh_repo(self, name: str) -> Path:
        """An empty unencrypted repository (outside the clock); borg 2's for a borg 2 method."""
        path = self.repo(name)
        shutil.rmtree(path, ignore_errors=True)
        if name.endswith("2"):
            # A new repository made by hand: the key copy of the previous one must go (the
            # key guard would rightly report another repository at this path).
            (self.state / "keys" / f"{name}.key").unlink(missing_ok=True)
            argv = [BORG2, "repo-create", f"--repo={path}", f"--encryption={BORG2_MODE}"]
            self.ws.run(argv, env=self.ws.env({"BORG_PASSPHRASE": BORG2_PASSPHRASE}))
        else:
            self.ws.run([BORG, "init", "--encryption=none", str(path)])
        return path

    def borg2_client(self, port: int) -> dict[str, object]:
        """The config of a borg 2 pull client (its passphrase file made here)."""
        secret = self.ws.root / "borg2.passphrase"
        secret.write_text(BORG2_PASSPHRASE)
        secret.chmod(0o600)
        return {
            "port": port,
            "borg_version": 2,
            "encryption": BORG2_MODE,
            "passphrase_file": str(secret),
            "remote_borg": BORG2,
            "archive": "bench",
        }

    def start_fresh_repo(self, name: str) -> subprocess.Popen[bytes]:
        """Like fresh_repo, in the background: many repositories are initialised at once."""
        path = self.repo(name)
        shutil.rmtree(path, ignore_errors=True)
        return self.ws.spawn([BORG, "init", "--encryption=none", str(path)])

    def drop_repo(self, name: str) -> None:
        shutil.rmtree(self.repo(name), ignore_errors=True)

    def runner(self, method: str, site: Site) -> tuple[str, Callable[[], Timed]]:
        """(repository name, timed call) of one method on one site."""
        if method == "recipe":
            repo = f"recipe-{site.name}"
            return repo, lambda: self.recipe(repo, site)
        if method == "local":
            return "local", lambda: self.local("local")
        if method == "local2":
            return "local2", lambda: self.local2("local2")
        # borgtunnel variants: one client each (own repository, own remote socket).
        client = site.name if method == "pull" else f"{site.name}{method}"
        call = {"pull": self.pull, "pull2": self.pull, "warm": self.warm, "proto": self.proto}[
            method
        ]
        return client, lambda: call(client)

    # --- borgtunnel config --------------------------------------------------------------

    def write_config(self, clients: dict[str, dict[str, object]]) -> Path:
        """One TOML file with every client the bench uses (name -> overrides)."""
        sshd = self.ws.sshd
        assert sshd is not None
        parts = [
            textwrap.dedent(f"""\
            [server]
            socket_dir = "{self.ws.root / "sockets"}"
            state_dir = "{self.state}"
            borg = "{BORG}"
            borg2 = "{BORG2}"

            [ssh]
            identity = "{sshd.client_key}"
            known_hosts = "{self.ws.known_hosts}"
            """)
        ]
        for name, table in clients.items():
            entry: dict[str, object] = {
                "host": sshd.host,
                "port": sshd.port,
                "user": sshd.user,
                "repository": str(self.repo(name)),
                "paths": [str(self.dataset.path)],
                "archive": ARCHIVE,
                "encryption": "none",
                "remote_borg": BORG,
                "remote_socket": str(self.client_sockets / f"{name}.sock"),
                **table,
            }
            lines = [f"\n[clients.{name}]"]
            for key, value in entry.items():
                if isinstance(value, dict):
                    continue
                lines.append(f"{key} = {json.dumps(value)}")
            for key, value in entry.items():
                if isinstance(value, dict):
                    lines.append(f"\n[clients.{name}.{key}]")
                    lines.extend(f"{k} = {json.dumps(v)}" for k, v in value.items())
            parts.append("\n".join(lines) + "\n")
        self.config.write_text("".join(parts))
        return self.config

    # --- (a) the recipe ---------------------------------------------------------------

    def recipe(self, repo_name: str, site: Site, paths: tuple[str, ...] = ()) -> Timed:
        repo = self.repo(repo_name)
        self._runs += 1
        server_sock = self.server_sockets / f"recipe-{self._runs}.sock"
        client_sock = self.client_sockets / f"recipe-{self._runs}.sock"
        socat = self.ws.spawn(
            [
                "socat",
                f"UNIX-LISTEN:{server_sock},fork",
                f"EXEC:{BORG} serve --append-only --restrict-to-path {repo}",
            ]
        )
        try:
            wait_for_path(server_sock, socat)
            rsh = f"sh -c 'exec nc -N -U {client_sock}'"
            remote = shlex.join(
                [
                    "env",
                    f"BORG_RSH={rsh}",
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes",
                    "LANG=C.UTF-8",
                    BORG,
                    "create",
                    *CREATE_OPTIONS,
                    f"ssh://{URL_HOST}{repo}::{ARCHIVE}",
                    *(paths or (str(self.dataset.path),)),
                ]
            )
            argv = [*self.ws.ssh_argv(site.port, "-R", f"{client_sock}:{server_sock}"), remote]
            done = self.ws.run(argv)
        finally:
            self.ws.stop(socat)
            for path in (server_sock, client_sock):
                path.unlink(missing_ok=True)
        return Timed(done.seconds, *_stats_from_json(done.stdout))

    # --- (b) borgtunnel pull ----------------------------------------------------------

    def pull(self, client: str) -> Timed:
        done = self.ws.run([BORGTUNNEL, "--config", str(self.config), "pull", client])
        return Timed(done.seconds, *_pull_stats(done.stdout, client))

    # --- (b') the same pull inside a running process, as the daemon does it ----------------

    def warm(self, client: str) -> Timed:
        process = self._warm_process()
        assert process.stdin is not None
        assert process.stdout is not None
        started = time.perf_counter()
        process.stdin.write(f"{client}\n".encode())
        process.stdin.flush()
        line = process.stdout.readline()
        seconds = time.perf_counter() - started
        try:
            answer = json.loads(line)
        except ValueError:
            raise BenchError(f"warm pull process died: {line!r}") from None
        if answer["result"] != "ok":
            raise BenchError(f"warm pull {client} failed: {answer}")
        return Timed(seconds, answer["nfiles"], None)

    def _warm_process(self) -> subprocess.Popen[bytes]:
        if self._warm is None or self._warm.poll() is not None:
            log = (self.ws.root / "warm.log").open("ab")
            self._warm = self.ws.spawn(
                [sys.executable, "-m", "bench.warm", str(self.config)],
                stdin=subprocess.PIPE,
                stderr=log,
            )
            log.close()
            assert self._warm.stdout is not None
            if self._warm.stdout.readline().strip() != b"ready":
                raise BenchError("warm pull process did not start (see warm.log)")
        return self._warm

    # --- (b) with a proposed change applied (bench/prototype.py) -------------------------

    def proto(self, client: str, options: Sequence[str] | None = None) -> Timed:
        chosen = self.proto_options if options is None else options
        argv = [sys.executable, "-m", "bench.prototype", *chosen, "--"]
        done = self.ws.run([*argv, "--config", str(self.config), "pull", client])
        return Timed(done.seconds, *_pull_stats(done.stdout, client))

    # --- (c) local borg create ----------------------------------------------------------

    def local(self, repo_name: str) -> Timed:
        repo = self.repo(repo_name)
        done = self.ws.run(
            [BORG, "create", *CREATE_OPTIONS, f"{repo}::{ARCHIVE}", str(self.dataset.path)]
        )
        return Timed(done.seconds, *_stats_from_json(done.stdout))

    def local2(self, repo_name: str) -> Timed:
        repo = self.repo(repo_name)
        done = self.ws.run(
            [
                BORG2,
                "create",
                *CREATE_OPTIONS,
                f"--repo={repo}",
                "--",
                "bench",
                str(self.dataset.path),
            ],
            env=self.ws.env({"BORG_PASSPHRASE": BORG2_PASSPHRASE}),
        )
        return Timed(done.seconds, *_stats_from_json(done.stdout))


BORG2_MODE = "authenticated-sha256"
BORG2_PASSPHRASE = "bench"  # noqa: S105 - a throwaway repository of the bench


_SUMMARY = re.compile(
    r"^(?P<client>\S+): ok archive=\S+ files=(?P<files>\d+) original=(?P<orig>\S+)"
)


def _pull_stats(stdout: str, client: str) -> tuple[int | None, int | None]:
    for line in stdout.splitlines():
        match = _SUMMARY.match(line)
        if match and match["client"] == client:
            return int(match["files"]), None
    raise BenchError(f"borgtunnel pull {client} did not report ok: {stdout!r}")


def sync_disks() -> None:
    """Flush the previous run's repository writes so they do not land in the next timing."""
    os.sync()
