"""The sshd fixture is what every end-to-end test stands on: prove it with real clients.

Each test checks one promise of tests/sshd.py against OpenSSH's ``ssh`` or asyncssh, so a broken
fixture shows up here and not as a puzzling failure in a borgtunnel test.
"""

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncssh
import pytest

from tests import sshd as sshd_module
from tests.sshd import (
    MARKER_VAR,
    SshdError,
    SshdServer,
    build_config,
    descendants,
    is_alive,
    marked_processes,
    skip_unless_usable,
    start_sshd,
    stop_sshd,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _connect(server: SshdServer, known_hosts: Path | None = None):
    """asyncssh.connect spelled out, as borgtunnel will do it (no user config, no agent)."""
    return asyncssh.connect(
        server.host,
        server.port,
        username=server.user,
        known_hosts=str(known_hosts or server.known_hosts),
        client_keys=[str(server.client_key)],
        config=None,
        agent_path=None,
    )


def _port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def _processes_mentioning(text: str) -> set[int]:
    """Live processes whose command line contains ``text`` (e.g. the config path)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if text in cmdline and is_alive(int(entry.name)):
            found.add(int(entry.name))
    return found


# --- against real clients ----------------------------------------------------------------


@pytest.mark.sshd
def test_openssh_client_logs_in_with_key_and_known_hosts(sshd):
    if shutil.which("ssh") is None:
        pytest.skip("OpenSSH client ssh not installed")
    result = subprocess.run(
        [
            "ssh",
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
            str(sshd.client_key),
            "-o",
            f"UserKnownHostsFile={sshd.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-p",
            str(sshd.port),
            f"{sshd.user}@127.0.0.1",
            "echo ok",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr
    assert (
        result.stdout
        == subprocess.run(
            [*sshd.ssh_command("echo ok")], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    )


@pytest.mark.sshd
def test_server_fields_describe_the_files(sshd):
    assert sshd.host == "127.0.0.1"
    assert sshd.workdir.is_dir()
    assert sshd.client_key.stat().st_mode & 0o777 == 0o600
    assert sshd.host_key.stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", sshd.host_key_fingerprint)
    assert re.fullmatch(
        rf"\[127\.0\.0\.1\]:{sshd.port} ssh-ed25519 AAAA\S+\n", sshd.known_hosts.read_text()
    )
    # OpenSSH's own lookup finds the entry under the bracketed host:port name.
    found = subprocess.run(
        ["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", str(sshd.known_hosts)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode == 0, found.stderr
    assert int((sshd.workdir / "sshd.pid").read_text()) == sshd.pid
    assert f"Server listening on 127.0.0.1 port {sshd.port}." in sshd.log_text()


@pytest.mark.sshd
async def test_asyncssh_session_gets_setenv_and_pinned_host_key(sshd):
    async with _connect(sshd) as conn:
        result = await conn.run("echo $BORG_BASE_DIR; whoami", check=True)
        host_key = conn.get_server_host_key()
    assert result.stdout == f"{sshd.workdir / 'borg-base'}\n{sshd.user}\n"
    assert host_key is not None
    assert host_key.get_fingerprint() == sshd.host_key_fingerprint


@pytest.mark.sshd
async def test_asyncssh_options_helper_connects(sshd):
    async with asyncssh.connect(**sshd.asyncssh_options()) as conn:
        result = await conn.run(f"echo ${MARKER_VAR}", check=True)
    assert result.stdout == f"{sshd.workdir}\n"


@pytest.mark.sshd
async def test_asyncssh_refuses_the_other_servers_known_hosts(sshd_factory):
    first, second = sshd_factory(), sshd_factory()
    assert first.host_key_fingerprint != second.host_key_fingerprint
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        async with _connect(first, known_hosts=second.known_hosts):
            pass
    # Same host:port, wrong key (a "changed" host key): asyncssh refuses with the same error.
    changed = first.workdir / "changed_known_hosts"
    key = second.known_hosts.read_text().split(" ", 1)[1]
    changed.write_text(f"[127.0.0.1]:{first.port} {key}")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        async with _connect(first, known_hosts=changed):
            pass
    async with _connect(first) as conn:  # and the right file still works
        assert (await conn.run("echo ok", check=True)).stdout == "ok\n"


@pytest.mark.sshd
def test_openssh_refuses_the_other_servers_known_hosts(sshd_factory):
    if shutil.which("ssh") is None:
        pytest.skip("OpenSSH client ssh not installed")
    first, second = sshd_factory(), sshd_factory()
    argv = first.ssh_command("echo ok")
    argv[argv.index(f"UserKnownHostsFile={first.known_hosts}")] = (
        f"UserKnownHostsFile={second.known_hosts}"
    )
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 255
    assert "Host key verification failed" in result.stderr


@pytest.mark.sshd
async def test_reused_host_key_keeps_identity_but_known_hosts_is_per_port(sshd_factory):
    first = sshd_factory()
    second = sshd_factory(host_key=first.host_key)
    assert second.host_key_fingerprint == first.host_key_fingerprint
    async with _connect(second) as conn:
        assert (await conn.run("echo ok", check=True)).stdout == "ok\n"
    # The first file names [127.0.0.1]:first.port only, so the same key on another port is
    # unknown to asyncssh (it would fall back to a port-less "127.0.0.1 key" line, if present).
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        async with _connect(second, known_hosts=first.known_hosts):
            pass


@pytest.mark.sshd
async def test_start_on_a_stopped_servers_workdir_restarts_the_same_identity(sshd):
    stop_sshd(sshd)
    again = start_sshd(sshd.workdir)
    try:
        assert again.host_key_fingerprint == sshd.host_key_fingerprint
        assert again.client_key == sshd.client_key
        async with _connect(again) as conn:
            assert (await conn.run("echo ok", check=True)).stdout == "ok\n"
    finally:
        stop_sshd(again)
    assert not is_alive(again.pid)


# --- configuration overrides -------------------------------------------------------------


EXTRA = ["AllowStreamLocalForwarding no", 'SetEnv EXTRA="two words"']


@pytest.mark.sshd
def test_extra_config_override_wins_in_sshds_effective_config(sshd_factory):
    server = sshd_factory(extra_config=EXTRA)
    effective = subprocess.run(
        [str(sshd_module.find_sshd()), "-T", "-f", str(server.config_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "allowstreamlocalforwarding no" in effective
    assert "allowtcpforwarding yes" in effective
    assert "streamlocalbindunlink no" in effective


@pytest.mark.sshd
async def test_extra_config_override_wins_for_clients(sshd_factory, tmp_path):
    server = sshd_factory(extra_config=EXTRA)
    async with _connect(server) as conn:
        result = await conn.run('echo "$EXTRA|$BORG_BASE_DIR"', check=True)
        assert result.stdout == f"two words|{server.workdir / 'borg-base'}\n"
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_path(
                str(server.workdir / "remote.sock"), str(tmp_path / "local.sock")
            )


def test_build_config_override_rules(tmp_path):
    host_key = tmp_path / "key"
    config = build_config(
        workdir=tmp_path,
        port=2222,
        host_key=host_key,
        extra_config=[
            "allowtcpforwarding=no",
            "SetEnv BORG_BASE_DIR=/elsewhere PATH=/opt/bin:/usr/bin",
            "Match User nobody",
            "    PrintMotd yes",
        ],
    )
    lines = config.splitlines()
    assert "AllowTcpForwarding yes" not in lines  # overridden, even spelled differently
    assert "allowtcpforwarding=no" in lines
    assert "PrintMotd no" in lines  # only set inside Match: the global default stays
    assert lines[-2:] == ["Match User nobody", "    PrintMotd yes"]
    setenv = [line for line in lines if line.startswith("SetEnv")]
    assert setenv == [
        f"SetEnv BORG_BASE_DIR=/elsewhere {MARKER_VAR}={tmp_path} PATH=/opt/bin:/usr/bin"
    ]
    for keyword in ("Port 1", "ListenAddress 0.0.0.0", "PidFile /x", "HostKey /k"):
        with pytest.raises(ValueError, match="may not set"):
            build_config(workdir=tmp_path, port=1, host_key=host_key, extra_config=[keyword])


# --- start failures ----------------------------------------------------------------------


@pytest.mark.sshd
def test_config_error_is_reported_with_sshds_words(tmp_path):
    skip_unless_usable()
    with pytest.raises(SshdError, match=r"Bad configuration option: NoSuchOption"):
        start_sshd(tmp_path / "bad", extra_config=["NoSuchOption yes"])
    assert not _processes_mentioning(str(tmp_path / "bad"))


@pytest.mark.sshd
def test_port_lost_to_another_process_is_retried(sshd_factory, monkeypatch):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        real_pick = sshd_module._pick_port
        monkeypatch.setattr(sshd_module, "_pick_port", lambda: next(picks, None) or real_pick())
        server = sshd_factory()
    assert server.port != taken
    log = server.log_text()
    assert f"Bind to port {taken} on 127.0.0.1 failed: Address already in use" in log
    assert f"Server listening on 127.0.0.1 port {server.port}." in log


# --- stopping ----------------------------------------------------------------------------


@pytest.mark.sshd
async def test_stop_ends_listener_sessions_and_stray_remote_commands(sshd):
    pid_from_file = int((sshd.workdir / "sshd.pid").read_text())
    async with _connect(sshd) as conn:
        # A remote command that outlives its closed channel (sshd does not kill it).
        stray = await conn.run("nohup sleep 301 >/dev/null 2>&1 </dev/null & echo $!", check=True)
        stray_pid = int(stray.stdout)
        # A session that is still running when the server stops.
        proc = await conn.create_process("echo $$; exec sleep 300")
        shell_pid = int(await proc.stdout.readline())
        session_pids = descendants(sshd.pid)
        assert shell_pid in session_pids
        assert stray_pid not in session_pids  # orphaned: only the marker variable finds it
        assert stray_pid in marked_processes(sshd.workdir)
        assert is_alive(stray_pid)

        await asyncio.to_thread(stop_sshd, sshd)

        assert sshd.process.returncode is not None
        assert pid_from_file == sshd.pid
        assert not is_alive(sshd.pid)
        assert not (sshd.workdir / "sshd.pid").exists()
        assert _port_is_closed(sshd.port)
        assert [pid for pid in session_pids | {stray_pid} if is_alive(pid)] == []
        assert marked_processes(sshd.workdir) == set()
        assert _processes_mentioning(str(sshd.config_path)) == set()
        await asyncio.wait_for(proc.wait_closed(), timeout=10)
    stop_sshd(sshd)  # idempotent: the fixture will call it again


@pytest.mark.sshd
def test_fixture_cleans_up_after_a_failing_test(tmp_path):
    """Run a failing test in a child pytest and check that its sshd and sessions are gone."""
    skip_unless_usable()
    if shutil.which("ssh") is None:
        pytest.skip("OpenSSH client ssh not installed")
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pytest.ini").write_text("[pytest]\n")
    (inner / "conftest.py").write_text('pytest_plugins = ["tests.sshd"]\n')
    report = tmp_path / "pids"
    (inner / "test_inner.py").write_text(
        textwrap.dedent(f"""
            import subprocess
            from pathlib import Path

            def test_fails_while_a_session_runs(sshd):
                ssh = subprocess.Popen(
                    sshd.ssh_command("echo $$; exec sleep 300"), stdout=subprocess.PIPE, text=True
                )
                shell = ssh.stdout.readline().strip()
                Path({str(report)!r}).write_text(f"{{sshd.pid}} {{shell}} {{ssh.pid}}")
                assert False, "deliberate failure"
        """)
    )
    result = subprocess.run(
        # --basetemp: the inner test fails on purpose, so pytest would keep its directory;
        # inside ours it goes with ours instead of staying in /tmp/pytest-of-USER.
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *(f"--basetemp={tmp_path / 'inner-tmp'}", "test_inner.py"),
        ],
        cwd=inner,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout
    listener, shell, client = (int(pid) for pid in report.read_text().split())
    assert not is_alive(listener)
    assert not is_alive(shell)
    assert not is_alive(client)  # the ssh client saw the server go away and exited


def test_skip_reasons_name_what_is_missing(monkeypatch):
    monkeypatch.setattr(sshd_module, "missing_tools", lambda: ["sshd"])
    with pytest.raises(pytest.skip.Exception, match="needs OpenSSH: sshd not installed"):
        skip_unless_usable()
    monkeypatch.setattr(sshd_module, "missing_tools", list)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # the same os module tests.sshd uses
    with pytest.raises(pytest.skip.Exception, match="sshd fixture needs root"):
        skip_unless_usable()
