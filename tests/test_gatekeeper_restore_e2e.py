"""A compromised server restores a hostile archive through the gatekeeper (issue 16, item 2).

The server holds the repository and the key, so it can put anything into an archive: here the
server's own borg imports a tar the test writes (``borg import-tar``; for names borg's importer
would clean up, the same borg with its path sanitising switched off, as a compromised server
could run it). The restore request is what `borgtunnel restore` sends, through a real sshd whose
forced command is the gatekeeper, with the client's borg chosen by the policy. borg <= 1.4's own
extract follows a symlink an earlier item made; the gatekeeper must keep every write inside the
target whatever the client's borg, refuse what it does not write, and say so.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import borgs, pullkit, test_gatekeeper_e2e
from tests.test_gatekeeper_e2e import Client
from tests.test_restore_e2e import make_hostile_tree, snapshot

pytestmark = pytest.mark.sshd
# test_gatekeeper_e2e's fixture ``client``: the gatekeeper installed as a real sshd's forced command
gatekeeper_client = test_gatekeeper_e2e.client

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's borg 1.2.4 lives in its dist-packages
# borg 1.2.4 import-tar with make_path_safe switched off: absolute and '..' names stay.
UNSANITISED_IMPORT = (
    "import sys, borg.archive; borg.archive.make_path_safe = lambda path: path; "
    "from borg.archiver import main; main()"
)


@dataclass
class Hostile:
    """Where a restore must not write, and the target it may write into."""

    client: Client
    victim: Path
    target: Path
    members: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)

    def add(
        self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object
    ) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mtime = 1_700_000_000
        info.mode = 0o644 if kind == tarfile.REGTYPE else 0o755
        for key, value in attrs.items():
            setattr(info, key, value)
        content = data if kind == tarfile.REGTYPE else None
        if content is not None:
            info.size = len(content)
        self.members.append((info, content))

    def archive(self, *, sanitised: bool = True) -> str:
        """The members as archive ``hostile``, made by the server's own borg 1.2.4."""
        tar_path = self.client.tmp / "hostile.tar"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for info, content in self.members:
                tar.addfile(info, io.BytesIO(content) if content is not None else None)
        tar_path.write_bytes(buffer.getvalue())
        pullkit.init_repo(self.client.tmp, self.client.repo)
        where = [f"{self.client.repo}::hostile", str(tar_path)]
        if sanitised:
            pullkit.borg(self.client.tmp, "import-tar", *where)
        else:
            subprocess.run(
                [SYSTEM_PYTHON, "-c", UNSANITISED_IMPORT, "import-tar", *where],
                env=pullkit.borg_env(self.client.tmp),
                capture_output=True,
                check=True,
            )
        return "hostile"

    def restore(self, archive: str = "hostile") -> subprocess.CompletedProcess[str]:
        return pullkit.run_cli(
            self.client.config, "restore", "c1", archive, "--target", str(self.target)
        )

    def assert_victim_untouched(self) -> None:
        assert sorted(p.name for p in self.victim.iterdir()) == ["secret"]
        assert (self.victim / "secret").read_text() == "the client's own file\n"

    def assert_refused(self, result: subprocess.CompletedProcess[str], *items: str) -> None:
        """Failed, with the gatekeeper's reason; each item named in its log."""
        assert result.returncode == 2, result.stdout + result.stderr
        assert "refused on the client: " in result.stdout
        assert "unsafe item(s) in the archive not restored" in result.stdout
        logged = self.client.logged()
        for item in items:
            assert f"restore: refused item {item!r}: " in logged, logged
        assert list((self.client.sshd.workdir / "rsock").iterdir()) == []


def _policy(client: Client, *, borg: str = borgs.DEBIAN_BORG, extra: str = "") -> Path:
    """Restores allowed into ``restores/``; the target ``restores/today`` exists and is empty."""
    allowed = client.tmp / "restores"
    target = allowed / "today"
    target.mkdir(parents=True)
    text = client.policy.read_text().replace(f"borg = {shutil.which('borg')}", f"borg = {borg}")
    client.policy.write_text(f"{text}restore = yes\nrestore_targets = {allowed}\n{extra}")
    return target


def _victim(client: Client) -> Path:
    victim = client.tmp / "victim"
    victim.mkdir()
    (victim / "secret").write_text("the client's own file\n")
    return victim


def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("the archives carry owners, device nodes and setuid files: root only")


@pytest.fixture
def hostile(gatekeeper_client: Client) -> Hostile:
    _root_only()
    return Hostile(gatekeeper_client, _victim(gatekeeper_client), _policy(gatekeeper_client))


@pytest.mark.parametrize("version", [borgs.DEBIAN_VERSION, borgs.BUILT[0]])
def test_a_symlink_then_a_file_below_it_stays_in_the_target(
    gatekeeper_client: Client, version: str
) -> None:
    """The attack as filed: ``evil -> /victim``, then ``evil/authorized_keys``, restored by
    the client's borg 1.2.4 (which follows the symlink) or 1.4.5."""
    _root_only()
    client = gatekeeper_client
    attack = Hostile(client, _victim(client), _policy(client, borg=borgs.executable(version)))
    attack.add("evil", tarfile.SYMTYPE, linkname=str(attack.victim))
    attack.add("evil/authorized_keys", data=b"ssh-ed25519 AAAA attacker\n")
    attack.add("harmless.txt", data=b"restored\n")

    result = attack.restore(attack.archive())

    attack.assert_victim_untouched()
    attack.assert_refused(result, "evil/authorized_keys")
    assert (attack.target / "evil").readlink() == attack.victim  # restored, never followed
    assert (attack.target / "harmless.txt").read_text() == "restored\n"  # the rest still is


def test_relative_symlinks_and_chains_of_them_are_not_followed(hostile: Hostile) -> None:
    """Also a symlink that a later directory item of the same name replaces: the directory
    replaces it (never follows it), and what is below lands in it, inside the target."""
    hostile.add("up", tarfile.SYMTYPE, linkname="../../victim")
    hostile.add("second", tarfile.SYMTYPE, linkname=str(hostile.victim))
    hostile.add("first", tarfile.SYMTYPE, linkname="second")
    hostile.add("d", tarfile.DIRTYPE)
    hostile.add("d/via", tarfile.SYMTYPE, linkname="../first")
    hostile.add("up/a", data=b"attacker\n")
    hostile.add("first/b", data=b"attacker\n")
    hostile.add("d/via/c", data=b"attacker\n")
    hostile.add("d/via/deeper/d", data=b"attacker\n")
    hostile.add("swapped", tarfile.SYMTYPE, linkname=str(hostile.victim))
    hostile.add("swapped", tarfile.DIRTYPE, mode=0o750)
    hostile.add("swapped/authorized_keys", data=b"inside\n")

    result = hostile.restore(hostile.archive())

    hostile.assert_victim_untouched()
    swapped = hostile.target / "swapped"
    assert stat.S_ISDIR(swapped.lstat().st_mode)
    assert stat.S_IMODE(swapped.lstat().st_mode) == 0o750
    assert (swapped / "authorized_keys").read_text() == "inside\n"
    hostile.assert_refused(result, "up/a", "first/b", "d/via/c", "d/via/deeper/d")
    assert "swapped" not in hostile.client.logged()


def test_absolute_and_dotdot_names_are_refused(hostile: Hostile) -> None:
    """Names borg's own importer would clean up: the server's borg with that switched off."""
    names = [
        f"{hostile.victim}/absolute",
        "../../victim/dotdot",
        "a/../../../victim/dotdot-inside",
        f"/{hostile.victim}/./slashes",
    ]
    for name in names:
        hostile.add(name, data=b"attacker\n")

    result = hostile.restore(hostile.archive(sanitised=False))

    hostile.assert_victim_untouched()
    assert list(hostile.target.iterdir()) == []
    hostile.assert_refused(result, *names)


def test_hard_links_out_of_the_target_or_to_a_symlink_are_refused(hostile: Hostile) -> None:
    secret = hostile.victim / "secret"
    hostile.add("evil", tarfile.SYMTYPE, linkname=str(secret))
    hostile.add("absolute", tarfile.LNKTYPE, linkname=str(secret))
    hostile.add("relative", tarfile.LNKTYPE, linkname="../../victim/secret")
    hostile.add("to-symlink", tarfile.LNKTYPE, linkname="evil")
    hostile.add("through-symlink", tarfile.LNKTYPE, linkname="evil/x")

    result = hostile.restore(hostile.archive())

    hostile.assert_victim_untouched()
    assert secret.stat().st_nlink == 1  # no new name for the client's file anywhere
    assert sorted(p.name for p in hostile.target.iterdir()) == ["evil"]
    hostile.assert_refused(result, "absolute", "relative", "to-symlink", "through-symlink")


def test_device_nodes_fifos_and_setuid_files_need_the_policys_opt_in(hostile: Hostile) -> None:
    hostile.add("mem", tarfile.CHRTYPE, devmajor=1, devminor=1, mode=0o666)
    hostile.add("disk", tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o666)
    hostile.add("pipe", tarfile.FIFOTYPE, mode=0o666)
    hostile.add("rootshell", data=b"#!/bin/sh\n", mode=0o4755)
    hostile.add("groupshell", data=b"#!/bin/sh\n", mode=0o2755)
    hostile.add("plain", data=b"ok\n", mode=0o755)

    result = hostile.restore(hostile.archive())

    assert sorted(p.name for p in hostile.target.iterdir()) == ["plain"]
    assert stat.S_IMODE((hostile.target / "plain").stat().st_mode) == 0o755
    hostile.assert_refused(result, "mem", "disk", "pipe", "rootshell", "groupshell")


def _seconds(found: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    """borg 1.x exports tar (GNU format) with whole-second mtimes."""
    return {
        rel: (*entry[:-1], entry[-1] // 10**9 if isinstance(entry[-1], int) else None)
        for rel, entry in found.items()
    }


def test_a_real_tree_restores_exactly_through_the_gatekeeper(gatekeeper_client: Client) -> None:
    """Owners without a name, modes (setuid, sticky, 0000), symlinks (relative, absolute,
    dangling), hard links, a FIFO, nasty names, pulled for real: without the opt-in everything
    but the FIFO and the setuid file comes back (and the restore says so); with
    ``restore_special = yes`` all of it, as borg extract restored it (mtimes to the second)."""
    _root_only()
    client = gatekeeper_client
    tree = make_hostile_tree(client.tmp / "tree")
    client.write(paths=[str(tree)])
    client.policy.write_text(client.policy.read_text().replace(str(client.data), str(tree)))
    pullkit.init_repo(client.tmp, client.repo)
    pulled = pullkit.run_cli(client.config, "pull", "c1")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    (archive,) = pullkit.archives(client.tmp, client.repo)
    target = _policy(client)
    expected = snapshot(tree)

    dry = pullkit.run_cli(
        client.config, "restore", "c1", archive, "--dry-run", "--target", str(target)
    )
    assert dry.returncode == 2, dry.stdout + dry.stderr
    assert "refused on the client: 2 unsafe item(s)" in dry.stdout
    assert list(target.iterdir()) == []  # a dry run writes nothing
    refused = pullkit.run_cli(client.config, "restore", "c1", archive, "--target", str(target))

    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "refused on the client: 2 unsafe item(s)" in refused.stdout
    restored = snapshot(target / str(tree).lstrip("/"))
    without = {k: v for k, v in expected.items() if k not in {"fifo", "setuid-file"}}
    assert _seconds(restored) == _seconds(without)

    with client.policy.open("a") as policy:
        policy.write("restore_special = yes\n")
    again = target.parent / "again"
    again.mkdir()
    result = pullkit.run_cli(client.config, "restore", "c1", archive, "--target", str(again))

    assert result.returncode == 0, result.stdout + result.stderr
    assert _seconds(snapshot(again / str(tree).lstrip("/"))) == _seconds(expected)
    assert "restore: borg export-tar" in client.logged()
    assert list((client.sshd.workdir / "rsock").iterdir()) == []


def test_a_borg2_client_restores_through_the_gatekeeper_too(gatekeeper_client: Client) -> None:
    """borg 2 exports PAX: the same refusals, nanosecond-exact mtimes and user xattrs."""
    _root_only()
    client = gatekeeper_client
    borg2 = borgs.executable(borgs.BORG2)
    secret = client.tmp / "pass"
    secret.write_text("gate passphrase 2")
    secret.chmod(0o600)
    client.conf["server"]["borg2"] = borg2  # type: ignore[index]
    client.write(borg_version=2, encryption="aes256-ocb", passphrase_file=str(secret))
    assert pullkit.run_cli(client.config, "init", "c1").returncode == 0
    attack = Hostile(client, _victim(client), _policy(client, borg=borg2))
    tar_path = client.tmp / "hostile.tar"
    members = [
        ("evil", tarfile.SYMTYPE, str(attack.victim), None),
        ("evil/authorized_keys", tarfile.REGTYPE, "", b"attacker\n"),
        ("kept", tarfile.REGTYPE, "", b"restored\n"),
    ]
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, link, content in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime, info.mode = kind, link, 1_700_000_000, 0o640
            info.size = len(content or b"")
            if name == "kept":
                info.pax_headers = {"mtime": "1700000000.123456789", "SCHILY.xattr.user.k": "v"}
            tar.addfile(info, io.BytesIO(content) if content else None)
    env = pullkit.borg_env(client.tmp, BORG_PASSPHRASE="gate passphrase 2")
    subprocess.run(
        [borg2, "import-tar", f"--repo={client.repo}", "hostile", str(tar_path)],
        env=env,
        capture_output=True,
        check=True,
    )

    result = attack.restore()

    attack.assert_victim_untouched()
    attack.assert_refused(result, "evil/authorized_keys")
    kept = attack.target / "kept"
    assert kept.read_text() == "restored\n"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert os.getxattr(kept, "user.k") == b"v"
    assert kept.stat().st_mtime_ns // 1000 == 1_700_000_000_123_456  # borg keeps ns; PAX to ~us
