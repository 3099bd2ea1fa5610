"""The gatekeeper as the forced command of a real sshd, with the real borgtunnel server side.

The client key's authorized_keys line is what `borgtunnel authorized-key` prints, pointing at
the program `borgtunnel gatekeeper` prints, run by the system python3 (standard library only).
``logger`` is a fake on the gatekeeper's PATH that appends its arguments to a file, so each
refusal's log line can be checked. The sshd allows only remote (-R) unix forwards, no local
(-L) TCP forwards and no TCP listens: the lock-down docs/clients.md recommends next to the
gatekeeper.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from borgtunnel import borg
from borgtunnel.client.remote import GO, parse_ready_line, run_command
from borgtunnel.config import load_config
from borgtunnel.runs.pull import pull
from borgtunnel.runs.restore import restore_command
from borgtunnel.server.serve import pull_socket
from borgtunnel.ssh.tunnel import Target, Tunnel
from tests import borgs, pullkit
from tests.sshd import SshdFactory, SshdServer, install_authorized_key

pytestmark = pytest.mark.sshd

SYSTEM_PYTHON = "/usr/bin/python3"
# OpenSSH 9.2 applies AllowTcpForwarding to stream-local *remote* forwards too (with "no" the
# pull's forward is denied), so it stays "remote"; PermitListen none still refuses TCP -R.
LOCKED_DOWN = [
    "AllowStreamLocalForwarding remote",
    "AllowTcpForwarding remote",
    "PermitListen none",
    "PermitOpen none",
]


@dataclass
class Client:
    sshd: SshdServer
    data: Path
    repo: Path
    config: Path
    table: dict[str, object]
    conf: dict[str, object]
    policy: Path
    log: Path
    tmp: Path

    def write(self, **changes: object) -> None:
        self.table.update(changes)
        pullkit.write_config(self.config, clients={"c1": self.table}, **self.conf)  # type: ignore[arg-type]

    def add_tools(self, *names: str) -> None:
        """Put these programs on the gatekeeper's PATH too (what dumps and scripts run)."""
        for name in names:
            real = shutil.which(name)
            assert real is not None, name
            link = self.tmp / "gk-bin" / name
            if not link.exists():
                link.symlink_to(real)

    def logged(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def ssh(self, command: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.sshd.ssh_command(command),
            input=stdin,
            capture_output=True,
            timeout=60,
            check=False,
        )


def _fake_bin(tmp_path: Path, *, with_logger: bool) -> Path:
    """PATH for the gatekeeper: sh, nc, socat (BORG_RSH) and maybe a fake logger."""
    directory = tmp_path / "gk-bin"
    directory.mkdir()
    for tool in ("sh", "nc", "socat", "id"):
        real = shutil.which(tool)
        assert real is not None
        (directory / tool).symlink_to(real)
    if with_logger:
        logger = directory / "logger"
        logger.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path / "logger.out"}\n')
        logger.chmod(0o755)
    return directory


def _install(sshd: SshdServer, tmp_path: Path, config: Path, *, with_logger: bool = True) -> Path:
    """`borgtunnel gatekeeper` into a file, `borgtunnel authorized-key` into authorized_keys."""
    program = tmp_path / "borgtunnel-gatekeeper"
    printed = pullkit.run_cli(config, "gatekeeper")
    assert printed.returncode == 0, printed.stderr
    program.write_text(printed.stdout)
    program.chmod(0o755)
    policy = tmp_path / "gatekeeper.conf"
    forced = (
        f"env PATH={_fake_bin(tmp_path, with_logger=with_logger)} "
        f"{SYSTEM_PYTHON} {program} --policy {policy}"
    )
    line = pullkit.run_cli(config, "authorized-key", "c1", "--command", forced)
    assert line.returncode == 0, line.stderr
    assert line.stdout.startswith(f'restrict,port-forwarding,command="{forced}" ssh-ed25519 ')
    install_authorized_key(sshd, line.stdout)
    return policy


@pytest.fixture
def client(tmp_path: Path, sshd_factory: SshdFactory) -> Client:
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"{SYSTEM_PYTHON} (the client's python3) is not installed")
    sshd = sshd_factory(extra_config=LOCKED_DOWN)
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(sshd, "c1", repo, [data])
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    policy = _install(sshd, tmp_path, config)
    policy.write_text(
        f"[gatekeeper]\npaths =\n    {data}\nsocket_dir = {sshd.workdir / 'rsock'}\n"
        f"borg = {shutil.which('borg')}\n"
    )
    return Client(sshd, data, repo, config, table, conf, policy, tmp_path / "logger.out", tmp_path)


def _assert_refused_pull(client: Client, reason: str) -> None:
    """The pull fails with the gatekeeper's reason, it was logged, nothing was written."""
    pullkit.init_repo(client.tmp, client.repo)
    result = pullkit.run_cli(client.config, "pull", "c1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "borgtunnel-gatekeeper: " in result.stdout
    assert reason in result.stdout
    assert f"refused: {reason}" in client.logged()
    assert pullkit.archives(client.tmp, client.repo) == []
    assert pullkit.processes_mentioning(f"--restrict-to-repository {client.repo}") == []


def test_pull_through_the_gatekeeper_works_and_is_verified(client: Client) -> None:
    secret = client.tmp / "pass"
    secret.write_text("gate passphrase")
    secret.chmod(0o600)
    client.write(encryption="repokey", passphrase_file=str(secret))
    assert pullkit.run_cli(client.config, "init", "c1").returncode == 0

    result = pullkit.run_cli(client.config, "pull", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    names = pullkit.archives(client.tmp, client.repo, BORG_PASSPHRASE="gate passphrase")
    assert len(names) == 1
    restored = client.tmp / "restored"
    pullkit.extract(client.tmp, client.repo, names[0], restored, BORG_PASSPHRASE="gate passphrase")
    pullkit.assert_same_tree(client.data, client.tmp / "restored")
    assert "run: borg create" in client.logged()
    assert list((client.sshd.workdir / "rsock").iterdir()) == []  # socket and pid file removed
    assert pullkit.processes_mentioning(f"--restrict-to-repository {client.repo}") == []


def test_a_borg2_pull_through_the_gatekeeper_runs_the_policys_borg2(client: Client) -> None:
    borg2 = borgs.executable(borgs.BORG2)
    client.policy.write_text(
        client.policy.read_text().replace(f"borg = {shutil.which('borg')}", f"borg = {borg2}")
    )
    secret = client.tmp / "pass"
    secret.write_text("gate passphrase 2")
    secret.chmod(0o600)
    client.conf["server"]["borg2"] = borg2  # type: ignore[index]
    client.write(
        borg_version=2,
        encryption="aes256-ocb",
        passphrase_file=str(secret),
        remote_borg="/nonexistent/the-policy-decides",
    )
    assert pullkit.run_cli(client.config, "init", "c1").returncode == 0

    result = pullkit.run_cli(client.config, "pull", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    env = pullkit.borg_env(client.tmp, BORG_PASSPHRASE="gate passphrase 2")
    listed = subprocess.run(
        [borg2, "repo-list", "--json", f"--repo={client.repo}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    [archive] = json.loads(listed.stdout)["archives"]
    restored = client.tmp / "restored"
    restored.mkdir()
    subprocess.run(
        [borg2, "extract", f"--repo={client.repo}", f"aid:{archive['id']}"],
        env=env,
        cwd=restored,
        capture_output=True,
        check=True,
    )
    pullkit.assert_same_tree(client.data, restored)
    assert "run: borg create" in client.logged()


async def test_the_locked_down_key_cannot_reach_the_clients_own_sockets(client: Client) -> None:
    """With AllowStreamLocalForwarding remote, the server's key cannot connect to a unix socket
    on the client (e.g. /run/docker.sock): only the reverse forward a pull needs is allowed."""
    async with asyncssh.connect(**client.sshd.asyncssh_options()) as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_unix_connection(str(client.sshd.workdir / "sshd.pid"))
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", client.sshd.port)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)


def test_an_arbitrary_command_is_refused_and_logged(client: Client) -> None:
    target = client.tmp / "PWNED"

    result = client.ssh(shlex.join(["touch", str(target)]))

    assert result.returncode == 77
    reason = "not a borgtunnel request: 'touch "
    assert reason in result.stderr.decode()
    assert f"refused: {reason}" in client.logged()
    assert not target.exists()


def test_an_interactive_login_is_refused(client: Client) -> None:
    result = subprocess.run(
        [*client.sshd.ssh_command(), "-T"],
        input=b"id\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 77
    assert b"no command" in result.stderr
    assert "refused: no command" in client.logged()


def test_a_forbidden_option_is_refused_and_logged(client: Client) -> None:
    client.write(create_args=["--remote-path=/tmp/evil-borg"])
    _assert_refused_pull(client, "borg option '--remote-path' is not allowed")


def test_another_socket_path_is_refused_and_logged(client: Client) -> None:
    elsewhere = client.tmp / "elsewhere"
    client.write(remote_socket=f"{elsewhere}/c1.sock")
    _assert_refused_pull(client, f"socket '{elsewhere}/c1.sock' is not a *.sock")
    assert not elsewhere.exists()  # not even the directory was made


def test_a_path_outside_the_policy_is_refused_and_logged(client: Client) -> None:
    client.write(paths=[str(client.data), "/etc"])
    _assert_refused_pull(client, "path '/etc' is outside the policy's paths")


def test_an_environment_override_is_refused_and_logged(client: Client) -> None:
    """A compromised server writes its own command: BORG_RSH would run anything."""
    spy = client.tmp / "EVIL-RAN"
    argv = borg.create_argv(
        remote_borg="borg",
        repository=client.repo,
        archive="a",
        paths=[str(client.data)],
    )
    env = {**borg.client_env(encrypted=False), "BORG_RSH": f"touch {spy}"}
    command = run_command(
        str(client.sshd.workdir / "rsock" / "c1.sock"), "x", "y", borg.with_env(argv, env)
    )

    result = client.ssh(command, stdin=b"go\n")

    assert result.returncode == 77
    reason = "environment variable BORG_RSH may not be set by the server"
    assert reason in result.stderr.decode()
    assert f"refused: {reason}" in client.logged()
    assert not spy.exists()
    assert not (client.sshd.workdir / "rsock").exists()


def _restore_command(client: Client, target: Path, archive: str = "a") -> str:
    """What `borgtunnel restore` sends (restore.restore_command), for this client."""
    c1 = load_config(client.config).client("c1")
    return restore_command(c1, archive, [], str(target), mode="extract")


def test_a_restore_is_refused_when_the_policy_forbids_it(client: Client) -> None:
    target = client.tmp / "restore-here"
    target.mkdir()

    result = client.ssh(_restore_command(client, target), stdin=b"go\n")

    assert result.returncode == 77
    reason = "restore is not allowed by this client's policy"
    assert reason in result.stderr.decode()
    assert f"refused: {reason}" in client.logged()
    assert list(target.iterdir()) == []


def test_a_refusal_without_logger_is_still_a_refusal(
    tmp_path: Path, sshd_factory: SshdFactory
) -> None:
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"{SYSTEM_PYTHON} (the client's python3) is not installed")
    sshd = sshd_factory()
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(sshd, "c1", tmp_path / "repo", ["/nonexistent"])
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    policy = _install(sshd, tmp_path, config, with_logger=False)
    policy.write_text("[gatekeeper]\npaths = /nonexistent\n")
    target = tmp_path / "PWNED"

    result = subprocess.run(
        sshd.ssh_command(f"touch {target}"), capture_output=True, timeout=60, check=False
    )

    assert result.returncode == 77
    assert b"not a borgtunnel request" in result.stderr
    assert not target.exists()


def test_a_missing_policy_refuses_everything(client: Client) -> None:
    client.policy.unlink()
    _assert_refused_pull(client, f"policy {client.policy}: No such file or directory")


def test_authorized_key_names_a_missing_public_key(tmp_path: Path, sshd: SshdServer) -> None:
    key = tmp_path / "nokey"
    conf = pullkit.base_config(tmp_path, sshd)
    conf["ssh"] = {**conf["ssh"], "identity": str(key)}
    table = pullkit.client_table(sshd, "c1", tmp_path / "repo", ["/x"])
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)

    result = pullkit.run_cli(config, "authorized-key", "c1")

    assert result.returncode == 2
    assert f"cannot read the public key {key}.pub" in result.stderr
    assert result.stdout == ""


def test_doctor_reports_the_gatekeeper_and_its_policy(client: Client) -> None:
    result = pullkit.run_cli(client.config, "doctor", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "\n  borg        borg 1." in out
    assert "\n  nc          yes" in out
    assert "\n  socat       socat version " in out
    assert "forwarding  allowed (reverse unix-socket forward at " in out
    assert f"gatekeeper  version 1, policy {client.policy}: paths {client.data}" in out
    assert "restore refused" in out
    assert "\n  local fwd   refused (good" in out  # the locked-down sshd
    assert list((client.sshd.workdir / "rsock").iterdir()) == []  # probe socket removed


def test_doctor_without_a_gatekeeper_says_so(tmp_path: Path, sshd: SshdServer) -> None:
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(sshd, "c1", tmp_path / "repo", ["/x"])
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)

    result = pullkit.run_cli(config, "doctor", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "gatekeeper  none: the server's key can run any command" in result.stdout
    assert "forwarding  allowed" in result.stdout
    assert "local fwd   ALLOWED: this key can connect to unix sockets" in result.stdout
    assert list((sshd.workdir / "rsock").iterdir()) == []


def test_doctor_reports_refused_forwarding(tmp_path: Path, sshd_factory: SshdFactory) -> None:
    sshd = sshd_factory(extra_config=["AllowStreamLocalForwarding no"])
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(sshd, "c1", tmp_path / "repo", ["/x"])
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)

    result = pullkit.run_cli(config, "doctor", "c1")

    assert result.returncode == 2
    assert "forwarding  refused: the client's sshd refused to listen" in result.stdout
    assert "PROBLEM: reverse unix-socket forwarding: refused" in result.stdout


async def test_a_cancelled_pull_is_cleaned_up_through_the_gatekeeper(client: Client) -> None:
    """The server's unchanged cleanup (SIGTERM by pid, remove socket and pid file) passes the
    gatekeeper: the pid is one its own pid file recorded."""
    (client.data / "big.bin").write_bytes(os.urandom(4_000_000))
    pullkit.init_repo(client.tmp, client.repo)
    client.write(create_args=["--upload-ratelimit", "100"])
    config = load_config(client.config)
    create = f"ssh://borgtunnel{client.repo}::"

    task = asyncio.create_task(pull(config, config.client("c1")))
    try:
        for _ in range(400):
            await asyncio.sleep(0.05)
            if pullkit.processes_mentioning(create):
                break
        assert pullkit.processes_mentioning(create), "borg create never started"
        await asyncio.sleep(0.5)
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    for _ in range(100):
        if not pullkit.processes_mentioning(create):
            break
        await asyncio.sleep(0.1)
    assert pullkit.processes_mentioning(create) == []
    assert pullkit.processes_mentioning(f"--restrict-to-repository {client.repo}") == []
    assert list((client.sshd.workdir / "rsock").iterdir()) == []
    assert "refused" not in client.logged()
    assert "cleanup: pid " in client.logged()  # signalled, or "not ours" if it ended first
    assert pullkit.archives(client.tmp, client.repo) == []  # usable, not locked


async def test_an_allowed_restore_works_into_the_allowed_target(client: Client) -> None:
    """The policy allows restores into one directory: borg extract runs there, through the same
    ready/go/forward protocol as a pull (driven here with the server's own building blocks)."""
    pullkit.init_repo(client.tmp, client.repo)
    assert pullkit.run_cli(client.config, "pull", "c1").returncode == 0
    (archive,) = pullkit.archives(client.tmp, client.repo)
    allowed = client.tmp / "restores"
    target = allowed / "today"
    target.mkdir(parents=True)
    with client.policy.open("a") as policy:
        policy.write(f"restore = yes\nrestore_targets = {allowed}\n")
    command = _restore_command(client, target, archive)
    config = load_config(client.config)
    c1 = config.client("c1")
    tunnel_target = Target(c1.host, c1.port, c1.user, config.ssh_for(c1))
    said: list[str] = []
    serve = borg.serve_argv("borg", client.repo)
    async with (
        pull_socket(client.tmp / "run", "c1", serve, stop_timeout=5) as (local, _listener),
        Tunnel.connect(tunnel_target) as tunnel,
        tunnel.start(command) as run,
    ):
        ready = None
        while ready is None and (line := await run.next_line()) is not None:
            ready = parse_ready_line(line)
            said.append(line)
        assert ready is not None, said
        async with tunnel.forward(ready.path, local):
            run.send_and_close(GO)
            status, _ = await run.finish(on_stderr=said.append)

    assert status == 0, said
    assert pullkit.tree(target / str(client.data).lstrip("/")) == pullkit.tree(client.data)
    assert "restore: borg export-tar" in client.logged()
    assert list((client.sshd.workdir / "rsock").iterdir()) == []


def _outside_secret(client: Client) -> Path:
    """A directory outside the policy's paths that a compromised server wants backed up."""
    secret = client.tmp / "outside-secret"
    secret.mkdir()
    (secret / "id_ed25519").write_text("PRIVATE KEY\n")
    return secret


@pytest.mark.parametrize("spelling", ["R/PATH", "split r/PATH", "patterns file R\\vPATH"])
def test_a_pattern_root_outside_the_policy_is_refused(client: Client, spelling: str) -> None:
    """borg reads ``--pattern=R/PATH`` (no blank), ``r``, ``R\\v/PATH`` as a backup root: the
    server's own builders send them, the gatekeeper must refuse them all (on the old gatekeeper
    each of these pulls succeeded, with the outside directory in the archive)."""
    secret = _outside_secret(client)
    if spelling == "R/PATH":
        client.write(create_args=[f"--pattern=R{secret}"])
    elif spelling == "split r/PATH":
        client.write(create_args=["--pattern", f"r{secret}"])
    else:
        patterns = client.data / "patterns.lst"  # inside the policy's paths
        patterns.write_text(f"- *.tmp\nR\v{secret}\n")
        client.write(create_args=[f"--patterns-from={patterns}"])

    pullkit.init_repo(client.tmp, client.repo)
    result = pullkit.run_cli(client.config, "pull", "c1")

    archived = [
        path
        for name in pullkit.archives(client.tmp, client.repo)
        for path in pullkit.borg(client.tmp, "list", "--short", f"{client.repo}::{name}").split()
    ]
    assert [path for path in archived if "outside-secret" in path] == []
    assert archived == []
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"'{secret}' is outside the policy's paths" in result.stdout
    assert "refused: pattern root" in client.logged()


@pytest.mark.parametrize("tag", ["absolute file", "relative ../dir"])
def test_an_exclude_tag_outside_the_roots_is_refused(client: Client, tag: str) -> None:
    """``--exclude-if-present=TAG --keep-exclude-tags``: borg backs up the tag it found, joined
    to the directory: an absolute tag or one with ../ reads outside every root (on the old
    gatekeeper these pulls archived the outside file or directory)."""
    secret = _outside_secret(client)
    if tag == "absolute file":
        value = str(secret / "id_ed25519")
    else:
        value = os.path.relpath(secret, client.data)  # ../outside-secret, joined to the root
    client.write(create_args=[f"--exclude-if-present={value}", "--keep-exclude-tags"])

    pullkit.init_repo(client.tmp, client.repo)
    result = pullkit.run_cli(client.config, "pull", "c1")

    archived = [
        path
        for name in pullkit.archives(client.tmp, client.repo)
        for path in pullkit.borg(client.tmp, "list", "--short", f"{client.repo}::{name}").split()
    ]
    assert [path for path in archived if "outside-secret" in path] == []
    assert archived == []
    assert result.returncode == 2, result.stdout + result.stderr
    assert "must be a plain file name" in result.stdout
    assert "refused: --exclude-if-present " in client.logged()


def test_patterns_and_exclude_files_inside_the_policy_work(client: Client) -> None:
    """Roots and excludes from files the policy allows reach the real borg (as private copies
    of what the gatekeeper checked) and shape the archive as they say."""
    first, second = client.data / "first", client.data / "second"
    for part in (first, second):
        part.mkdir()
        (part / "keep.txt").write_text(f"keep {part.name}\n")
        (part / "junk.tmp").write_text("junk\n")
        (part / "junk.bak").write_text("junk\n")
    patterns = client.data / "patterns.lst"
    patterns.write_text(f"# roots and excludes\nR {second}\n- **/*.tmp\n")
    excludes = client.data / "excludes.lst"
    excludes.write_text("*.bak\n")
    client.write(
        paths=[str(first)],
        create_args=[f"--patterns-from={patterns}", "--exclude-from", str(excludes)],
    )
    pullkit.init_repo(client.tmp, client.repo)

    result = pullkit.run_cli(client.config, "pull", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    (archive,) = pullkit.archives(client.tmp, client.repo)
    restored = client.tmp / "restored"
    pullkit.extract(client.tmp, client.repo, archive, restored)
    inside = restored / str(client.data).lstrip("/")
    assert sorted(p.relative_to(inside).as_posix() for p in inside.rglob("*.*")) == [
        "first/keep.txt",
        "second/keep.txt",
    ]
