"""`borgtunnel trust`: the key it pins is the one a later pull accepts; a changed key is never
replaced silently. Real sshd servers, real pulls; the known_hosts edits are also unit tested."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from borgtunnel.ssh.trust import host_pattern, with_key, without_host
from borgtunnel.ssh.tunnel import HostKey
from tests import pullkit
from tests.sshd import SshdFactory, SshdServer, generate_key, public_key

KEY = HostKey("ssh-ed25519", "SHA256:new", "ssh-ed25519 AAAANEW")


def _hashed(name: str) -> str:
    salt = os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def test_known_hosts_edit_drops_only_this_hosts_entries():
    name = host_pattern("10.0.0.5", 2222)
    assert name == "[10.0.0.5]:2222"
    assert host_pattern("web1", 22) == "web1"
    text = (
        "# comment [10.0.0.5]:2222\n"
        "[10.0.0.5]:2222 ssh-ed25519 AAAAOLD\n"
        f"{_hashed(name)} ssh-rsa AAAAHASHED\n"
        f"{_hashed('other')} ssh-rsa AAAAOTHERHASH\n"
        "10.0.0.5 ssh-ed25519 AAAAPORT22\n"
        "web1,[10.0.0.5]:2222 ssh-ed25519 AAAAMULTI\n"
        "@revoked [10.0.0.5]:2222 ssh-ed25519 AAAAREVOKED\n"
        "[10.0.0.5]:22220 ssh-ed25519 AAAAOTHERPORT"
    )
    kept = without_host(text, name)
    assert "AAAAOLD" not in kept
    assert "AAAAHASHED" not in kept
    assert "AAAAMULTI" not in kept
    for survivor in ("# comment", "AAAAOTHERHASH", "AAAAPORT22", "AAAAREVOKED", "AAAAOTHERPORT"):
        assert survivor in kept
    added = with_key(kept, name, KEY)
    assert added.endswith("\n[10.0.0.5]:2222 ssh-ed25519 AAAANEW\n")


def _config(tmp_path: Path, sshd: SshdServer, known_hosts: Path) -> tuple[Path, Path]:
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    if not repo.exists():
        pullkit.init_repo(tmp_path, repo)
    conf = pullkit.base_config(tmp_path, sshd)
    conf["ssh"]["known_hosts"] = str(known_hosts)
    table = pullkit.client_table(sshd, "c1", repo, [data])
    return pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf), repo


@pytest.mark.sshd
def test_trust_pins_the_key_a_later_pull_accepts(tmp_path: Path, sshd: SshdServer) -> None:
    known_hosts = tmp_path / "server-etc" / "known_hosts"
    config, repo = _config(tmp_path, sshd, known_hosts)

    untrusted = pullkit.run_cli(config, "pull", "c1")
    assert untrusted.returncode == 2
    assert "enrol the client's host key" in untrusted.stdout

    unconfirmed = pullkit.run_cli(config, "trust", "c1")  # no TTY, no --yes: not trusted
    assert unconfirmed.returncode == 2
    assert sshd.host_key_fingerprint in unconfirmed.stdout
    assert "ssh-ed25519" in unconfirmed.stdout
    assert not known_hosts.exists()

    wrong = pullkit.run_cli(config, "trust", "c1", "--fingerprint", "SHA256:" + "A" * 43)
    assert wrong.returncode == 2
    assert "refused" in wrong.stdout
    assert not known_hosts.exists()

    pinned = pullkit.run_cli(config, "trust", "c1", "--fingerprint", sshd.host_key_fingerprint)
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    assert known_hosts.read_text() == f"[{sshd.host}]:{sshd.port} {public_key(sshd.host_key)}\n"
    assert oct(known_hosts.stat().st_mode & 0o777) == "0o600"
    again = pullkit.run_cli(config, "trust", "c1", "--yes")
    assert again.returncode == 0
    assert "already trusted" in again.stdout

    pulled = pullkit.run_cli(config, "pull", "c1")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert len(pullkit.archives(tmp_path, repo)) == 1


@pytest.mark.sshd
def test_trust_never_replaces_a_changed_key_without_replace(
    tmp_path: Path, sshd_factory: SshdFactory
) -> None:
    impostor_key = generate_key(tmp_path / "impostor_host_key", "impostor")
    sshd = sshd_factory(host_key=impostor_key)
    known_hosts = tmp_path / "known_hosts"
    # The server trusted another key for this host:port before (the real client's).
    real_key = generate_key(tmp_path / "real_host_key", "real")
    old_line = f"[{sshd.host}]:{sshd.port} {public_key(real_key)}\n"
    known_hosts.write_text("# managed by hand\n" + old_line)
    config, repo = _config(tmp_path, sshd, known_hosts)

    refused = pullkit.run_cli(config, "trust", "c1", "--yes")
    assert refused.returncode == 2
    assert "DIFFERENT key" in refused.stdout
    old_fingerprint = pullkit_fingerprint(real_key)
    assert old_fingerprint in refused.stdout
    assert sshd.host_key_fingerprint in refused.stdout
    assert known_hosts.read_text() == "# managed by hand\n" + old_line
    changed = pullkit.run_cli(config, "pull", "c1")
    assert changed.returncode == 2
    assert "host key CHANGED" in changed.stdout

    replaced = pullkit.run_cli(config, "trust", "c1", "--replace", "--yes")
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert old_fingerprint in replaced.stdout
    assert sshd.host_key_fingerprint in replaced.stdout
    text = known_hosts.read_text()
    assert text == f"# managed by hand\n[{sshd.host}]:{sshd.port} {public_key(impostor_key)}\n"
    pulled = pullkit.run_cli(config, "pull", "c1")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert len(pullkit.archives(tmp_path, repo)) == 1


def pullkit_fingerprint(private_key: Path) -> str:
    from tests.sshd import fingerprint  # noqa: PLC0415 - same helper the fixture uses

    return fingerprint(private_key)


@pytest.mark.sshd
@pytest.mark.parametrize(("answer", "code"), [("y", 0), ("n", 2)])
def test_trust_asks_on_a_terminal(tmp_path: Path, sshd: SshdServer, answer: str, code: int) -> None:
    script = shutil.which("script")
    if script is None:
        pytest.skip("script(1) (util-linux) is needed for a terminal")
    known_hosts = tmp_path / "known_hosts"
    config, _ = _config(tmp_path, sshd, known_hosts)
    command = shlex.join([*pullkit.cli_argv(config), "trust", "c1"])
    result = subprocess.run(
        [script, "-qec", command, "/dev/null"],
        input=f"{answer}\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == code, result.stdout
    assert (
        f"Trust {sshd.host_key_fingerprint} for [{sshd.host}]:{sshd.port}? [y/N]" in result.stdout
    )
    assert known_hosts.exists() == (code == 0)
