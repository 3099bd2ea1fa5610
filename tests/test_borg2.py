"""borg 2 end to end: pull, read back, maintain, restore, and what the client cannot do.

Real sshd, the real borg 2 beta on both ends (``.borg/VERSION``, built by scripts/setup), and
every claim checked by the test's own borg 2 on the server: ``repo-list``, ``extract`` and a byte
comparison, ``check``. Hostile clients are scripts run in place of the client's borg: they get
the same BORG_RSH, environment and passphrase as the real one and try what a compromised client
would through its tunnel (``--permissions write-only``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from borgtunnel import borg
from borgtunnel.config import load_config
from borgtunnel.history import RunResult
from borgtunnel.runs import keyguard
from borgtunnel.scheduling.daemon import Daemon
from borgtunnel.systemd import Notifier
from tests import borgs, hostile, pullkit, socketserve_kit
from tests.daemon_support import FIRE_AT, clock_offset, eventually, serving, shifted_now
from tests.daemon_support import runs as daemon_runs
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

SECRET = "borg2 $(touch PWNED) 'pass' phrase"


class Borg2:
    """One borg 2 client c1 on the test sshd, encrypted (aes256-ocb), with a spy in front of
    its borg that records the environment it got."""

    def __init__(self, tmp_path: Path, sshd: SshdServer) -> None:
        self.tmp = tmp_path
        self.sshd = sshd
        self.exe = borgs.executable(borgs.BORG2)
        self.data = pullkit.make_client_data(tmp_path / "client-data")
        self.repo = tmp_path / "repos" / "c1"
        self.config = tmp_path / "bt.toml"
        self.state = tmp_path / "state"
        self.secret = tmp_path / "secret"
        self.secret.write_text(SECRET + "\n")
        self.secret.chmod(0o600)
        self.spy_log = tmp_path / "spy.env"
        self.spy_argv = tmp_path / "spy.argv"
        body = (
            f'env > {self.spy_log}\nprintf "%s\\n" "$@" > {self.spy_argv}\nexec {self.exe} "$@"\n'
        )
        self.spy = hostile.script(tmp_path, "spy", body)

    def write(self, **client: Any) -> None:
        conf = pullkit.base_config(self.tmp, self.sshd)
        conf["server"]["borg2"] = self.exe
        table = pullkit.client_table(
            self.sshd,
            "c1",
            self.repo,
            client.pop("paths", [self.data]),
            borg_version=2,
            encryption="aes256-ocb",
            passphrase_file=str(self.secret),
            remote_borg=str(client.pop("remote_borg", self.spy)),
            **client,
        )
        pullkit.write_config(self.config, clients={"c1": table}, **conf)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return pullkit.run_cli(self.config, *args)

    def borg(self, *args: str, cwd: Path | None = None) -> str:
        env = pullkit.borg_env(self.tmp, BORG_PASSPHRASE=SECRET)
        result = subprocess.run(
            [self.exe, *args, f"--repo={self.repo}"],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, f"borg {args} failed ({result.returncode}): {result.stderr}"
        return result.stdout

    def archives(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = json.loads(self.borg("repo-list", "--json"))["archives"]
        return listed

    def assert_restores(self, archive_id: str, dest: str) -> None:
        target = self.tmp / dest
        target.mkdir()
        self.borg("extract", f"aid:{archive_id}", cwd=target)
        pullkit.assert_same_tree(self.data, target)


def _events(stderr: str, event: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if f'"{event}"' in line]


@pytest.fixture
def b2(tmp_path: Path, sshd: SshdServer) -> Borg2:
    return Borg2(tmp_path, sshd)


def test_init_pull_twice_read_back_and_list(b2: Borg2) -> None:
    b2.write()
    init = b2.cli("init", "c1")
    assert init.returncode == 0, init.stderr
    assert (b2.repo / "archives").is_dir()  # borg 2's layout: repo-create made it
    assert (b2.state / "keys" / "c1.key").read_text().startswith("BORG_KEY ")

    first = b2.cli("pull", "c1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("c1: ok archive="), first.stdout
    second = b2.cli("pull", "c1")  # unchanged data: a second archive of the same series
    assert second.returncode == 0, second.stderr

    listed = b2.archives()
    assert len(listed) == 2
    assert len({a["name"] for a in listed}) == 1  # a series: one name, two ids
    finished = _events(second.stderr, "pull_finished")[0]
    assert finished["archive_id"] == listed[-1]["id"]
    assert finished["client_borg"] == borgs.BORG2
    assert finished["modern_exit_codes"] is True
    b2.assert_restores(listed[0]["id"], "first")
    b2.assert_restores(listed[1]["id"], "second")

    runs = hostile.runs(b2.tmp)
    assert [r["archive_id"] for r in runs] == [a["id"] for a in listed]
    assert runs[-1]["nfiles"] == len([p for p in b2.data.rglob("*") if p.is_file()])
    assert runs[-1]["deduplicated_size"] is None  # borg 2's info does not say: not made up

    shown = b2.cli("list", "c1", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [a["id"] for a in json.loads(shown.stdout)] == [a["id"] for a in listed]

    seen = b2.spy_log.read_text()
    assert "BORG_PASSPHRASE_FD=0" in seen
    rsh = [line for line in seen.splitlines() if line.startswith(("BORG_RSH=", "BORGSTORE_RSH="))]
    assert sorted(line.partition("=")[2] for line in rsh) == [borg.RSH_BY_TOOL["nc"]] * 2
    argv = b2.spy_argv.read_text()
    assert "create" in argv.splitlines()
    for text in (init.stdout, init.stderr, first.stdout, first.stderr, second.stderr, seen, argv):
        assert SECRET not in text
    assert pullkit.processes_mentioning(f"--backend=FILE:{b2.repo}") == []
    assert list((b2.tmp / "run").glob("*.sock")) == []


def test_the_server_policy_is_write_only_on_one_backend(b2: Borg2) -> None:
    """What serve ran with, as the serve itself saw it: a wrapper in front of the server's
    borg 2 records its argv."""
    argv_log = b2.tmp / "serve.argv"
    wrapper = hostile.script(
        b2.tmp, "server-wrapper", f'printf "%s\\n" "$@" >> {argv_log}\nexec {b2.exe} "$@"\n'
    )
    b2.write()
    assert b2.cli("init", "c1").returncode == 0
    conf = b2.config.read_text().replace(f'borg2 = "{b2.exe}"', f'borg2 = "{wrapper}"')
    b2.config.write_text(conf)

    result = b2.cli("pull", "c1")

    assert result.returncode == 0, result.stderr
    words = argv_log.read_text().splitlines()
    serve = words[words.index("serve") :][:6]
    assert serve == [
        "serve",
        "--rest",
        f"--backend=FILE:{b2.repo}",
        "--restrict-to-repository",
        str(b2.repo),
        "--permissions=write-only",
    ]


ATTACKS = {
    # name: borg 2 arguments, run by the hostile client through its own tunnel
    "delete": ["delete", "-a", "sh:*"],
    "rename": ["rename", "aid:{first}", "renamed"],
    "prune": ["prune", "--keep=1"],
    "compact": ["compact"],
    "repo-delete": ["repo-delete"],
    "change-passphrase": ["key", "change-passphrase"],
    "extract": ["extract", "--dry-run", "aid:{first}"],
    # Rewriting what exists: metadata, content, chunks, a "repair".
    "tag": ["tag", "--set", "evil", "aid:{first}"],
    "recreate": ["recreate", "--exclude", "*", "-a", "aid:{first}"],
    "repo-compress": ["repo-compress", "--compression", "zlib,1"],
    "check-repair": ["check", "--repair"],
}


def _attack_script(b2: Borg2, first_id: str) -> Path:
    lines = [
        "pw=$(cat)",  # the passphrase, on stdin as for the real borg
        "unset BORG_PASSPHRASE_FD",
        'export BORG_PASSPHRASE="$pw" BORG_NEW_PASSPHRASE=evil',
        "export BORG_DELETE_I_KNOW_WHAT_I_AM_DOING=YES BORG_CHECK_I_KNOW_WHAT_I_AM_DOING=YES",
    ]
    url = f"--repo=ssh://borgtunnel{b2.repo}"
    for name, args in ATTACKS.items():
        words = " ".join(f"'{a.format(first=first_id[:16])}'" for a in args)
        lines.append(f"{b2.exe} {words} {url} </dev/null >/dev/null 2>&1")
        lines.append(f'echo "{name} $?" >> {b2.tmp / "attacks.log"}')
    # Then a real backup, so the run is one a compromised client would make look normal.
    lines.append(f'printf "%s" "$pw" | env -u BORG_PASSPHRASE BORG_PASSPHRASE_FD=0 {b2.exe} "$@"')
    return hostile.script(b2.tmp, "attacks", "\n".join(lines) + "\n")


def test_a_compromised_client_cannot_delete_rewrite_read_or_rekey(b2: Borg2) -> None:
    """Each of ATTACKS through the client's own write-only tunnel fails, and afterwards the
    server's borg 2 finds the earlier archive as it was (id, name, content), the same key and a
    clean check."""
    b2.write()
    assert b2.cli("init", "c1").returncode == 0
    assert b2.cli("pull", "c1").returncode == 0
    [first] = b2.archives()
    key_before = sorted((b2.repo / "keys").iterdir())[0].read_bytes()
    b2.write(remote_borg=_attack_script(b2, first["id"]))

    result = b2.cli("pull", "c1")

    codes = dict(line.split() for line in (b2.tmp / "attacks.log").read_text().splitlines())
    assert set(codes) == set(ATTACKS)
    assert all(code != "0" for code in codes.values()), codes  # every attack refused
    assert result.returncode == 0, result.stderr  # and the backup itself verified
    listed = b2.archives()
    assert [a["id"] for a in listed][:1] == [first["id"]]
    assert len(listed) == 2
    assert {a["name"] for a in listed} == {first["name"]}  # nothing renamed
    assert sorted((b2.repo / "keys").iterdir())[0].read_bytes() == key_before
    b2.borg("check")
    b2.assert_restores(first["id"], "first")


def test_another_repository_path_reaches_only_its_own(b2: Borg2) -> None:
    """The backend is the server's choice: a client naming another path is given its own
    repository (borg 2 then sees a relocated repository and, told not to accept that, stops);
    it never sees the other repository's archives."""
    other = b2.tmp / "repos" / "other"
    env = pullkit.borg_env(b2.tmp, BORG_PASSPHRASE="other secret")
    subprocess.run(
        [b2.exe, "repo-create", f"--repo={other}", "--encryption=aes256-ocb"],
        env=env,
        check=True,
        capture_output=True,
    )
    out = b2.tmp / "other.out"
    probe = hostile.script(
        b2.tmp,
        "other-path",
        f'export BORG_PASSPHRASE="other secret"\nunset BORG_PASSPHRASE_FD\n'
        f"{b2.exe} repo-list --json --repo=ssh://borgtunnel{other} > {out} 2>&1 </dev/null\n"
        f'echo "rc $?" >> {out}\nexit 2\n',
    )
    b2.write(remote_borg=probe)
    assert b2.cli("init", "c1").returncode == 0

    result = b2.cli("pull", "c1")

    assert result.returncode == 2, result.stderr
    said = out.read_text()
    assert "rc 0" not in said, said
    assert str(other) not in said.replace(f"ssh://borgtunnel{other}", "")


def test_a_forged_claim_is_not_ok(b2: Borg2) -> None:
    forged = hostile.script(
        b2.tmp, "forged", f"cat >/dev/null\necho '{hostile.create_json()}'\nexit 0\n"
    )
    b2.write(remote_borg=forged)
    assert b2.cli("init", "c1").returncode == 0

    result = b2.cli("pull", "c1")

    assert result.returncode == 2, result.stderr
    assert "unverified" in result.stdout
    assert b2.archives() == []
    assert hostile.runs(b2.tmp)[-1]["result"] == "failed"


def test_a_client_running_borg_1_is_told_which_version_to_set(b2: Borg2) -> None:
    b2.write(remote_borg="/usr/bin/borg")
    assert b2.cli("init", "c1").returncode == 0

    result = b2.cli("pull", "c1")

    assert result.returncode == 2, result.stderr
    assert "did not understand a borg 2 command line" in result.stdout
    assert "clients.c1.borg_version" in result.stdout


def test_maintain_prunes_compacts_and_checks(b2: Borg2) -> None:
    b2.write()
    assert b2.cli("init", "c1").returncode == 0
    for _ in range(3):
        assert b2.cli("pull", "c1").returncode == 0
    conf = b2.config.read_text() + "\n[clients.c1.retention]\nkeep_daily = 1\n"
    b2.config.write_text(conf)
    before = b2.archives()

    dry = b2.cli("maintain", "c1", "--prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert len(b2.archives()) == 3
    result = b2.cli("maintain", "c1", "--prune", "--compact", "--check")

    assert result.returncode == 0, result.stderr + result.stdout
    [kept] = b2.archives()
    assert kept["id"] == before[-1]["id"]  # the newest of today's stays
    b2.assert_restores(kept["id"], "kept")
    # The pruned ones were recorded as pruned by id, so the next run sees no tampering.
    again = b2.cli("maintain", "c1", "--prune")
    assert again.returncode == 0, again.stderr + again.stdout
    assert "tampering" not in again.stdout


def test_an_archive_gone_behind_our_back_stops_compact(b2: Borg2) -> None:
    b2.write()
    assert b2.cli("init", "c1").returncode == 0
    assert b2.cli("pull", "c1").returncode == 0
    [gone] = b2.archives()
    b2.borg("delete", f"aid:{gone['id']}")  # someone on the server, not borgtunnel

    result = b2.cli("maintain", "c1", "--compact")

    assert result.returncode == 2, result.stdout
    assert "tampering suspected" in result.stdout
    assert "borg undelete" in result.stdout
    b2.borg("undelete", "-a", f"aid:{gone['id']}")  # what the message says still works
    assert [a["id"] for a in b2.archives()] == [gone["id"]]


def test_restore_through_a_read_only_tunnel(b2: Borg2) -> None:
    b2.write()
    assert b2.cli("init", "c1").returncode == 0
    assert b2.cli("pull", "c1").returncode == 0
    [archive] = b2.archives()
    target = b2.tmp / "restored"

    result = b2.cli("restore", "c1", f"aid:{archive['id']}", "--target", str(target))

    assert result.returncode == 0, result.stderr + result.stdout
    pullkit.assert_same_tree(b2.data, target)


def test_a_killed_client_borg_leaves_no_process_socket_or_lock(b2: Borg2) -> None:
    """A client whose borg dies mid-run (SIGKILL) on another host: borg 2 keeps the lock in the
    repository under the client's host and pid, where the server's own borg would time out on
    it. The run fails, and nothing of it is left: no serve, no socket, no lock."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the client's borg runs under another hostname (unshare --uts)")
    big = b2.data / "big.bin"
    big.write_bytes(os.urandom(64 * 1024 * 1024))
    seen = b2.tmp / "lock-seen"
    dying = hostile.script(
        b2.tmp,
        "dying",
        # A background job's stdin is /dev/null before its own redirections: keep the
        # passphrase on fd 3 and hand that over.
        "exec 3<&0\n"
        f'unshare --uts sh -c \'hostname elsewhere; exec "$0" "$@"\' {b2.exe} "$@" <&3 &\n'
        f'while kill -0 $! && [ -z "$(ls {b2.repo / "locks"})" ]; do sleep 0.05; done\n'
        f"touch {seen}\nkill -9 $!\nexit 137\n",
    )
    b2.write(remote_borg=dying)
    assert b2.cli("init", "c1").returncode == 0

    result = b2.cli("pull", "c1")

    assert result.returncode == 2, result.stderr
    assert seen.exists()  # the client's borg held the lock when it was killed
    assert _events(result.stderr, "client_lock_removed"), result.stdout + result.stderr[-2500:]
    assert list((b2.repo / "locks").iterdir()) == []
    assert pullkit.processes_mentioning(f"--backend=FILE:{b2.repo}") == []
    assert list((b2.tmp / "run").glob("*.sock")) == []
    assert list((b2.repo / "archives").iterdir()) == []
    # The server's own borg gets in at once (it timed out on the lock before), and so does
    # the client's next pull.
    maintained = b2.cli("maintain", "c1", "--check")
    assert maintained.returncode == 0, maintained.stderr + maintained.stdout
    b2.write()
    again = b2.cli("pull", "c1")
    assert again.returncode == 0, again.stderr


def test_no_delete_permissions_pull_and_still_refuse_deletes(b2: Borg2) -> None:
    b2.write(permissions="no-delete")
    assert b2.cli("init", "c1").returncode == 0
    assert b2.cli("pull", "c1").returncode == 0
    [first] = b2.archives()
    deleter = hostile.script(
        b2.tmp,
        "deleter",
        'pw=$(cat)\nunset BORG_PASSPHRASE_FD\nexport BORG_PASSPHRASE="$pw"\n'
        f"{b2.exe} delete -a 'sh:*' --repo=ssh://borgtunnel{b2.repo} </dev/null >/dev/null 2>&1\n"
        f'echo "delete $?" > {b2.tmp / "deleter.log"}\nexit 2\n',
    )
    b2.write(permissions="no-delete", remote_borg=deleter)

    assert b2.cli("pull", "c1").returncode == 2
    assert (b2.tmp / "deleter.log").read_text().split() != ["delete", "0"]
    assert [a["id"] for a in b2.archives()] == [first["id"]]


def test_a_key_changed_on_the_server_is_put_back_and_reported(b2: Borg2) -> None:
    """keys/ is read-only for every permission a pull uses, so only someone on the server can
    change it; the guard still compares after every run and puts the saved copy back."""
    b2.write()
    assert b2.cli("init", "c1").returncode == 0
    original = keyguard.repository_key_blob(b2.repo)
    assert original is not None
    env = pullkit.borg_env(b2.tmp, BORG_PASSPHRASE=SECRET, BORG_NEW_PASSPHRASE="changed")
    subprocess.run(
        [b2.exe, "key", "change-passphrase", f"--repo={b2.repo}"],
        env=env,
        check=True,
        capture_output=True,
    )
    assert keyguard.repository_key_blob(b2.repo) != original

    result = b2.cli("pull", "c1")

    assert result.returncode == 2, result.stderr
    assert "tampering: the repository key (keys/) differs" in result.stdout
    [event] = _events(result.stderr, "key_tampering")
    assert event["restored"] is True, event
    assert keyguard.repository_key_blob(b2.repo) == original  # the same key text, re-wrapped
    assert b2.cli("pull", "c1").returncode == 0  # the server's passphrase opens it again
    changed = subprocess.run(
        [b2.exe, "repo-list", f"--repo={b2.repo}"],
        env=pullkit.borg_env(b2.tmp, BORG_PASSPHRASE="changed"),
        capture_output=True,
        check=False,
    )
    assert changed.returncode != 0  # and the changed key is gone, not kept next to it


def test_socket_activated_serve_serves_a_borg2_client_write_only(b2: Borg2) -> None:
    """``borgtunnel serve`` (the socket unit's way) with a borg 2 client: a create through the
    activated socket lands and reads back; a delete through it is refused."""
    b2.write()
    assert b2.cli("init", "c1").returncode == 0
    socks = Path(tempfile.mkdtemp(prefix="bt2-", dir="/tmp"))  # short: unix socket path limit
    sock = socks / "c1.sock"
    serve = socketserve_kit.start_serve(config=b2.config, workdir=b2.tmp, activate=[(sock, "c1")])
    try:
        socketserve_kit.wait_for_socket(sock)
        env = socketserve_kit.client_env(sock, b2.tmp / "client-base")
        env.update(BORG_PASSPHRASE=SECRET)
        url = f"--repo=ssh://borgtunnel{b2.repo}"
        created = subprocess.run(
            [b2.exe, "create", url, "--", "web1", str(b2.data)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert created.returncode == 0, created.stderr
        deleted = subprocess.run(
            [b2.exe, "delete", url, "-a", "sh:*"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert deleted.returncode != 0
        assert "PermissionDenied" in deleted.stderr
    finally:
        socketserve_kit.stop_serve(serve)
        shutil.rmtree(socks, ignore_errors=True)
    [archive] = b2.archives()
    b2.assert_restores(archive["id"], "served")


async def test_the_daemon_pulls_and_maintains_a_borg2_client(b2: Borg2) -> None:
    """The scheduled path: the daemon pulls a borg 2 client at its time, then prunes by the
    retention (series and ids) and checks, under the client lock."""
    b2.write(schedule="0 2 * * *")
    b2.config.write_text(
        b2.config.read_text()
        + '\n[clients.c1.retention]\nkeep_daily = 1\n\n[clients.c1.check]\nevery = "30d"\n'
    )
    assert b2.cli("init", "c1").returncode == 0
    assert b2.cli("pull", "c1").returncode == 0  # an earlier archive of today, pruned later
    config = load_config(b2.config)
    daemon = Daemon(config, now=shifted_now(clock_offset(FIRE_AT, 1.0)), notifier=Notifier(""))
    state = config.server.state_dir

    async with serving(daemon):
        await eventually(
            lambda: (
                [(r.kind, r.result) for r in daemon_runs(state, "c1")[1:]]
                == [("pull", RunResult.OK), ("maintain", RunResult.OK)]
            ),
            within=120,
            what="a scheduled borg 2 pull and its maintenance",
        )

    pull, maintain = daemon_runs(state, "c1")[1:]
    assert pull.trigger == maintain.trigger == "daemon"
    [kept] = b2.archives()
    assert kept["id"] == hostile.runs(b2.tmp)[1]["archive_id"]  # the daemon's pull is kept
    b2.assert_restores(kept["id"], "scheduled")


def test_a_repository_created_again_by_hand_is_named_not_overwritten(b2: Borg2) -> None:
    """The saved key belongs to the repository that was there: a new one at the same path is
    reported (nothing imported into it); `borgtunnel init` of a new repository replaces it."""
    b2.write()
    assert b2.cli("init", "c1").returncode == 0
    assert b2.cli("pull", "c1").returncode == 0
    shutil.rmtree(b2.repo)
    subprocess.run(
        [b2.exe, "repo-create", f"--repo={b2.repo}", "--encryption=aes256-ocb"],
        env=pullkit.borg_env(b2.tmp, BORG_PASSPHRASE=SECRET),
        check=True,
        capture_output=True,
    )
    keys_before = sorted(p.read_bytes() for p in (b2.repo / "keys").iterdir())

    result = b2.cli("pull", "c1")

    assert result.returncode == 2, result.stderr
    assert "created again outside `borgtunnel init`" in result.stdout
    assert sorted(p.read_bytes() for p in (b2.repo / "keys").iterdir()) == keys_before
    shutil.rmtree(b2.repo)
    assert b2.cli("init", "c1").returncode == 0  # the administrator's way: a new saved key
    again = b2.cli("pull", "c1")
    assert again.returncode == 0, again.stdout + again.stderr


def _future_dated_script(b2: Borg2) -> Path:
    """A compromised borg 2 client: one more archive of its own series, dated 2099, through its
    write-only tunnel; then its real backup."""
    src = b2.tmp / "forged"
    src.mkdir()
    (src / "note").write_text("pay\n")
    body = (
        "pw=$(cat)\n"
        'series=""; take=0\n'
        'for arg in "$@"; do [ "$take" = 1 ] && { series=$arg; break; }; '
        '[ "$arg" = "--" ] && take=1; done\n'
        f'printf "%s" "$pw" | BORG_PASSPHRASE_FD=0 {b2.exe} create --timestamp '
        f'2099-01-01T00:00:00 --repo=ssh://borgtunnel{b2.repo} -- "$series" {src} >&2 || exit 9\n'
        f'printf "%s" "$pw" | BORG_PASSPHRASE_FD=0 exec {b2.exe} "$@"\n'
    )
    return hostile.script(b2.tmp, "future", body)


def test_a_future_dated_archive_of_the_series_never_makes_the_server_prune_real_ones(
    b2: Borg2,
) -> None:
    """borg prune groups by series and host, both the client's to choose, and keeps by the date
    in the archive: one archive dated 2099 of the client's series was the only one kept. Now
    only verified archives count, by the server's time, and the forged one is reported."""
    b2.write()
    assert b2.cli("init", "c1").returncode == 0
    assert b2.cli("pull", "c1").returncode == 0
    b2.write(remote_borg=_future_dated_script(b2))
    assert b2.cli("pull", "c1").returncode == 0
    runs = hostile.runs(b2.tmp)
    first, newest = (run["archive_id"] for run in runs)
    forged = {a["id"] for a in b2.archives()} - {first, newest}
    assert len(forged) == 1
    b2.config.write_text(b2.config.read_text() + "\n[clients.c1.retention]\nkeep_daily = 1\n")

    result = b2.cli("maintain", "c1")

    assert result.returncode == 1, result.stdout + result.stderr  # tampering reported
    assert "unverified warning: tampering suspected: 1 archive(s)" in result.stdout
    assert f"prune ok: removed 1: {first}" in result.stdout  # keep_daily = 1, by the server
    assert {a["id"] for a in b2.archives()} == {newest, *forged}
    b2.assert_restores(newest, "newest")
