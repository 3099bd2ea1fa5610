"""`borgtunnel enroll NAME` against a real sshd and the real borg.

From a config entry to a verified first archive (read back and compared), and the resumable
parts: a re-run that changes nothing, a refused fingerprint that pins nothing, a key not yet
installed (stop, install, resume; or --wait), a gatekeeper installed from the printed steps,
and the confirmation on a terminal.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from borgtunnel.arguments import build_parser
from borgtunnel.client import gatekeeper
from borgtunnel.config import load_config
from borgtunnel.ssh.enrol import gatekeeper_policy
from tests import pullkit
from tests.conftest import Spawn
from tests.sshd import (
    SshdFactory,
    SshdServer,
    generate_key,
    install_authorized_key,
    public_key,
)

PASSPHRASE = "enrol passphrase, never shown"
SYSTEM_PYTHON = "/usr/bin/python3"
LOCKED_DOWN = [  # as in tests/test_gatekeeper_e2e.py
    "AllowStreamLocalForwarding remote",
    "AllowTcpForwarding remote",
    "PermitListen none",
    "PermitOpen none",
]
POLICY_START = "cat > /etc/borgtunnel/gatekeeper.conf <<'CONF'"


class Setup:
    """One client's config: an encrypted repository that does not exist yet, an empty
    known_hosts location, the client data to back up."""

    def __init__(self, tmp_path: Path, sshd: SshdServer, **extra: Any) -> None:
        self.tmp = tmp_path
        self.sshd = sshd
        self.data = pullkit.make_client_data(tmp_path / "client-data")
        self.repo = tmp_path / "repos" / "c1"
        self.known_hosts = tmp_path / "server-etc" / "known_hosts"
        secret = tmp_path / "c1.passphrase"
        secret.write_text(PASSPHRASE)
        secret.chmod(0o600)
        conf = pullkit.base_config(tmp_path, sshd)
        conf["ssh"]["known_hosts"] = str(self.known_hosts)
        table = pullkit.client_table(
            sshd,
            "c1",
            self.repo,
            [self.data],
            encryption="repokey",
            passphrase_file=str(secret),
            **extra,
        )
        self.config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)

    def enroll(self, *args: str) -> subprocess.CompletedProcess[str]:
        return pullkit.run_cli(self.config, "enroll", "c1", *args, timeout=110)

    def archives(self) -> list[str]:
        return pullkit.archives(self.tmp, self.repo, BORG_PASSPHRASE=PASSPHRASE)

    def assert_read_back(self) -> None:
        [name] = self.archives()
        restored = self.tmp / "restored"
        pullkit.extract(self.tmp, self.repo, name, restored, BORG_PASSPHRASE=PASSPHRASE)
        pullkit.assert_same_tree(self.data, restored)

    def pinned_line(self) -> str:
        return f"[{self.sshd.host}]:{self.sshd.port} {public_key(self.sshd.host_key)}\n"

    def runs(self) -> list[dict[str, Any]]:
        shown = pullkit.run_cli(self.config, "history", "c1", "--json")
        assert shown.returncode == 0, shown.stderr
        runs: list[dict[str, Any]] = json.loads(shown.stdout)
        return runs


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def _revoke_key(sshd: SshdServer) -> None:
    """The client has not installed the server's key yet."""
    (sshd.workdir / "authorized_keys").write_text("")


def _install_plain_key(sshd: SshdServer) -> None:
    install_authorized_key(sshd, f"restrict,port-forwarding {public_key(sshd.client_key)}")


@pytest.mark.sshd
def test_enroll_from_scratch_then_already_enrolled(tmp_path: Path, sshd: SshdServer) -> None:
    setup = Setup(tmp_path, sshd)

    result = setup.enroll("--fingerprint", sshd.host_key_fingerprint)

    assert result.returncode == 0, _output(result)
    lines = result.stdout.splitlines()
    fingerprint = sshd.host_key_fingerprint
    assert lines[0] == f"c1: host key ssh-ed25519 {fingerprint} pinned in {setup.known_hosts}"
    assert lines[1].startswith("c1: client ready: key accepted as root, borg ")
    assert "NO gatekeeper" in lines[1]
    assert lines[2] == f"c1: repository {setup.repo} created (repokey)"
    assert lines[3].startswith("c1: ok archive=")
    assert lines[4] == "c1: enrolled: the first archive is verified"
    assert len(lines) == 5
    assert setup.known_hosts.read_text() == setup.pinned_line()
    assert (tmp_path / "state" / "keys" / "c1.key").exists()  # the key guard's copy, as init
    setup.assert_read_back()
    assert [run["result"] for run in setup.runs()] == ["ok"]
    assert PASSPHRASE not in _output(result)

    pinned_before = setup.known_hosts.stat()
    again = setup.enroll()  # no --fingerprint needed: the key is pinned already

    assert again.returncode == 0, _output(again)
    assert again.stdout.splitlines() == [
        f"c1: host key ssh-ed25519 {fingerprint} already pinned in {setup.known_hosts}",
        lines[1],
        f"c1: repository {setup.repo} exists",
        again.stdout.splitlines()[3],
    ]
    assert again.stdout.splitlines()[3].startswith("c1: already enrolled: verified archive ")
    assert setup.known_hosts.stat().st_mtime_ns == pinned_before.st_mtime_ns
    assert len(setup.archives()) == 1
    assert len(setup.runs()) == 1


@pytest.mark.sshd
def test_a_wrong_fingerprint_refuses_and_pins_nothing(tmp_path: Path, sshd: SshdServer) -> None:
    setup = Setup(tmp_path, sshd)

    result = setup.enroll("--fingerprint", "SHA256:" + "A" * 43)

    assert result.returncode == 2, _output(result)
    assert f"refused: the offered key is {sshd.host_key_fingerprint}" in result.stdout
    assert "nothing pinned" in result.stdout
    assert not setup.known_hosts.exists()
    assert not setup.repo.exists()

    unconfirmed = setup.enroll()  # no terminal, no --fingerprint: nothing to confirm with
    assert unconfirmed.returncode == 2, _output(unconfirmed)
    assert "pass --fingerprint" in unconfirmed.stdout
    assert not setup.known_hosts.exists()

    # Another key pinned for this host before (the real client's?): never replaced here.
    other = generate_key(tmp_path / "other_host_key", "other")
    setup.known_hosts.parent.mkdir()
    before = f"[{sshd.host}]:{sshd.port} {public_key(other)}\n"
    setup.known_hosts.write_text(before)
    conflict = setup.enroll("--fingerprint", sshd.host_key_fingerprint)
    assert conflict.returncode == 2, _output(conflict)
    assert "DIFFERENT key" in conflict.stdout
    assert "borgtunnel trust c1 --replace" in conflict.stdout
    assert setup.known_hosts.read_text() == before
    assert not setup.repo.exists()


@pytest.mark.sshd
def test_a_key_not_installed_stops_there_and_a_rerun_resumes(
    tmp_path: Path, sshd: SshdServer
) -> None:
    setup = Setup(tmp_path, sshd)
    _revoke_key(sshd)

    stopped = setup.enroll("--fingerprint", sshd.host_key_fingerprint)

    assert stopped.returncode == 75, _output(stopped)
    out = stopped.stdout
    assert "pinned in" in out  # step 1 is done and stays done
    assert "c1: the server's key is not accepted yet" in out
    line = 'restrict,port-forwarding,command="/usr/local/bin/borgtunnel-gatekeeper" '
    assert f"    {line}{public_key(sshd.client_key)} " in out
    assert f"paths =\n        {setup.data}\n" in out
    assert "run `borgtunnel enroll c1` again" in out
    assert setup.known_hosts.read_text() == setup.pinned_line()
    assert not setup.repo.exists()
    assert setup.runs() == []

    _install_plain_key(sshd)
    resumed = setup.enroll()

    assert resumed.returncode == 0, _output(resumed)
    assert "already pinned" in resumed.stdout
    assert "created (repokey)" in resumed.stdout
    assert "enrolled: the first archive is verified" in resumed.stdout
    setup.assert_read_back()


@pytest.mark.sshd
def test_wait_polls_until_the_key_works(tmp_path: Path, sshd: SshdServer, spawn: Spawn) -> None:
    setup = Setup(tmp_path, sshd)
    _revoke_key(sshd)
    gave_up = setup.enroll("--fingerprint", sshd.host_key_fingerprint, "--wait-timeout", "0.5")
    assert gave_up.returncode == 75, _output(gave_up)  # without --wait: the step to do
    timed_out = setup.enroll("--wait", "--wait-timeout", "0.5")
    assert timed_out.returncode == 75, _output(timed_out)
    assert "still not ready after 0.5s: " in timed_out.stdout
    assert "authentication failed" in timed_out.stdout

    child = spawn(
        *pullkit.cli_argv(setup.config), "enroll", "c1", "--wait", "--wait-timeout", "100"
    )
    assert child.stdout is not None
    seen: list[str] = []
    while not (seen and seen[-1].startswith("c1: waiting up to 100s")):
        line = child.stdout.readline()
        assert line, "".join(seen)  # it ended without waiting
        seen.append(line)
    _install_plain_key(sshd)
    rest = child.stdout.read()

    assert child.wait(timeout=100) == 0, "".join(seen) + rest
    assert "c1: client ready" in rest
    assert "enrolled: the first archive is verified" in rest
    setup.assert_read_back()


@pytest.mark.sshd
def test_a_client_doctor_finds_wanting_is_a_pending_step(tmp_path: Path, sshd: SshdServer) -> None:
    setup = Setup(tmp_path, sshd, remote_borg="/nonexistent/borg")

    result = setup.enroll("--fingerprint", sshd.host_key_fingerprint)

    assert result.returncode == 75, _output(result)
    assert "c1: the client is not ready:" in result.stdout
    assert "PROBLEM: remote_borg '/nonexistent/borg' does not run on the client" in result.stdout
    assert not setup.repo.exists()


def _fake_bin(tmp_path: Path) -> Path:
    """PATH for the gatekeeper: what BORG_RSH and its checks run, and a logger that records."""
    directory = tmp_path / "gk-bin"
    directory.mkdir()
    for tool in ("sh", "nc", "socat", "id"):
        real = shutil.which(tool)
        assert real is not None
        (directory / tool).symlink_to(real)
    logger = directory / "logger"
    logger.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path / "logger.out"}\n')
    logger.chmod(0o755)
    return directory


def _printed_steps(out: str) -> tuple[str, str]:
    """The authorized_keys line and the policy, as enroll printed them (indented by 4)."""
    lines = [line.removeprefix("    ") for line in out.splitlines()]
    start = lines.index(POLICY_START) + 1
    policy = "\n".join(lines[start : lines.index("CONF", start)]) + "\n"
    [key_line] = [line for line in lines if line.startswith("restrict,port-forwarding,command=")]
    return key_line, policy


@pytest.mark.sshd
def test_enroll_through_the_gatekeeper_installed_from_the_printed_steps(
    tmp_path: Path, sshd_factory: SshdFactory
) -> None:
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"{SYSTEM_PYTHON} (the client's python3) is not installed")
    sshd = sshd_factory(extra_config=LOCKED_DOWN)
    borg = shutil.which("borg")
    assert borg is not None
    setup = Setup(tmp_path, sshd, remote_borg=borg)  # the policy's borg: the one it names
    _revoke_key(sshd)
    program = tmp_path / "borgtunnel-gatekeeper"
    policy = tmp_path / "gatekeeper.conf"
    forced = f"env PATH={_fake_bin(tmp_path)} {SYSTEM_PYTHON} {program} --policy {policy}"

    stopped = setup.enroll("--fingerprint", sshd.host_key_fingerprint, "--command", forced)

    assert stopped.returncode == 75, _output(stopped)
    key_line, policy_text = _printed_steps(stopped.stdout)
    # The administrator follows the printed steps (paths adapted to this test).
    printed = pullkit.run_cli(setup.config, "gatekeeper")
    program.write_text(printed.stdout)
    program.chmod(0o755)
    policy.write_text(policy_text)
    install_authorized_key(sshd, key_line)

    resumed = setup.enroll()

    assert resumed.returncode == 0, _output(resumed)
    assert "client ready: key accepted as root" in resumed.stdout
    assert "; gatekeeper version " in resumed.stdout
    setup.assert_read_back()
    assert "run: borg create" in (tmp_path / "logger.out").read_text()


@pytest.mark.sshd
@pytest.mark.parametrize(("answer", "code"), [("n", 2), ("y", 0)])
def test_enroll_asks_on_a_terminal(
    tmp_path: Path, sshd: SshdServer, answer: str, code: int
) -> None:
    script = shutil.which("script")
    if script is None:
        pytest.skip("script(1) (util-linux) is needed for a terminal")
    setup = Setup(tmp_path, sshd)
    command = shlex.join([*pullkit.cli_argv(setup.config), "enroll", "c1"])
    result = subprocess.run(
        [script, "-qec", command, "/dev/null"],
        input=f"{answer}\n",
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == code, result.stdout
    name = f"[{sshd.host}]:{sshd.port}"
    assert f"c1: host key: {name} offers ssh-ed25519 {sshd.host_key_fingerprint}" in result.stdout
    assert f"Pin {sshd.host_key_fingerprint} for {name}? [y/N]" in result.stdout
    assert setup.known_hosts.exists() == (code == 0)
    if code == 0:
        setup.assert_read_back()
    else:
        assert "host key not pinned" in result.stdout
        assert not setup.repo.exists()


def test_the_printed_policy_is_one_the_gatekeeper_loads(tmp_path: Path) -> None:
    config = tmp_path / "bt.toml"
    config.write_text(
        '[clients.web1]\nhost = "web1.example.org"\nrepository = "/srv/borg/web1"\n'
        'paths = ["/etc", "/srv/data dir"]\nremote_borg = "sudo -n borg"\n'
        'encryption = "none"\n'
    )
    client = load_config(config).client("web1")
    path = tmp_path / "gatekeeper.conf"
    path.write_text(gatekeeper_policy(client))

    policy = gatekeeper.load_policy(str(path))

    assert policy.paths == ("/etc", "/srv/data dir")
    assert policy.socket_dir == "~/.cache/borgtunnel"
    assert policy.borg == "borg"  # a command is the server's choice; the gatekeeper runs borg
    assert not policy.restore


@pytest.mark.sshd
def test_a_missing_public_key_is_a_failure_naming_the_file(
    tmp_path: Path, sshd: SshdServer
) -> None:
    setup = Setup(tmp_path, sshd)
    identity = tmp_path / "id_no_pub"
    shutil.copy(sshd.client_key, identity)
    text = setup.config.read_text().replace(str(sshd.client_key), str(identity))
    setup.config.write_text(text)
    _revoke_key(sshd)

    result = setup.enroll("--fingerprint", sshd.host_key_fingerprint)

    assert result.returncode == 2, _output(result)
    assert f"cannot read the public key {identity}.pub" in result.stderr
    assert not setup.repo.exists()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_wait_timeout_must_be_seconds(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["enroll", "c1", "--wait-timeout", value])
    assert exited.value.code == 2
    assert f"--wait-timeout: must be a number of seconds (0 or more), got {value!r}" in (
        capsys.readouterr().err
    )
