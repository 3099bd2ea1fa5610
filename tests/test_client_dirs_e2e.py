"""The client's socket directory rule through a real sshd and borg: never chmod, refuse shared.

Every directory is made by the test inside its own tmp_path (the sshd's work dir is there).
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests import pullkit
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _config(tmp_path: Path, sshd: SshdServer, remote_socket: Path) -> tuple[Path, Path, Path]:
    data = pullkit.make_client_data(tmp_path / "data", random_bytes=1000)
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    table = pullkit.client_table(sshd, "c1", repo, [data], remote_socket=str(remote_socket))
    conf = pullkit.base_config(tmp_path, sshd)
    return data, repo, pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)


def test_existing_socket_directory_keeps_its_mode(tmp_path: Path, sshd: SshdServer) -> None:
    # Like "~/x.sock" in a 0751 home, or "/run/x.sock" as root: the directory is not ours.
    directory = sshd.workdir / "home"
    directory.mkdir()
    directory.chmod(0o751)
    data, repo, config = _config(tmp_path, sshd, directory / "x.sock")

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 0, result.stdout + result.stderr
    assert mode(directory) == 0o751
    (archive,) = pullkit.archives(tmp_path, repo)
    pullkit.extract(tmp_path, repo, archive, tmp_path / "restored")
    pullkit.assert_same_tree(data, tmp_path / "restored")
    assert list(directory.iterdir()) == []


def test_group_writable_ancestor_is_refused_and_nothing_changes(
    tmp_path: Path, sshd: SshdServer
) -> None:
    shared = sshd.workdir / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    mine = shared / "mine"
    mine.mkdir(mode=0o700)
    _, repo, config = _config(tmp_path, sshd, mine / "sockets" / "c1.sock")

    result = pullkit.run_cli(config, "pull", "c1")

    assert result.returncode == 2
    assert f"{shared} (on the way to" in result.stdout
    assert "writable by group or others" in result.stdout
    assert not (mine / "sockets").exists()
    assert (mode(shared), mode(mine)) == (0o775, 0o700)
    assert pullkit.archives(tmp_path, repo) == []
