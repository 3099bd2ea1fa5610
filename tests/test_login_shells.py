"""A real pull as a user whose login shell is bash, dash, zsh, fish or tcsh.

sshd runs the remote command as ``$SHELL -c COMMAND``, so the login shell parses it first; fish
reads backslashes inside single quotes, tcsh refuses newlines in quotes and expands ``!``. Each
test makes a throwaway user with that shell (home in a directory the test made; user, group and
home removed at the end), pulls through the sshd fixture with hostile values in the paths,
excludes, archive name and remote_socket, reads the archive back with the server's borg and
checks that the client's borg received exactly those values (a recording wrapper that then
execs the real borg). A second pull uses the default remote_socket under ``~/.cache``.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from borgtunnel import borg
from tests import pullkit
from tests.loginusers import throwaway_user
from tests.sshd import SshdFactory, write_authorized_keys

pytestmark = [
    pytest.mark.sshd,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create throwaway login users"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd (passwd package)"),
]

SHELLS = ["bash", "dash", "zsh", "fish", "tcsh"]

# Everything some shell reads inside or outside quotes: quotes, backslashes (fish's \\ and \'),
# history "!" (tcsh), command substitution, unicode, a leading dash.
HOSTILE = "-q'uote \"dq\" back\\slash \\' \\\\ !bang !! $(touch PWNED) `touch PWNED` ünï ☃"
# remote_socket must stay under the 100-byte socket limit once ~ is expanded.
HOSTILE_SHORT = "-q' \"d\" \\' !! $(x) ü"

RECORDING_BORG = """#!/bin/sh
# Stands in for the client's borg: records its argv (NUL-separated) and runs the real one.
printf '%s\\000' "$@" > "$HOME/borg-argv"
BORG_BASE_DIR=$HOME/borg-base
export BORG_BASE_DIR
exec {borg} "$@"
"""


@pytest.fixture
def shell_root() -> Iterator[Path]:
    """A directory for the login user's home, data and tools, outside pytest's root-only tree.

    Its ancestors are / and /tmp (root-owned, /tmp sticky): they pass the client's directory
    rule, and the user can reach its home. Made (and chmodded) by this test only.
    """
    root = Path(tempfile.mkdtemp(prefix="btsh-", dir="/tmp"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def recorded_argv(home: Path) -> list[str]:
    raw = (home / "borg-argv").read_bytes()
    return [item.decode("utf-8", "surrogateescape") for item in raw.split(b"\0")[:-1]]


@pytest.mark.parametrize("shell", SHELLS)
def test_pull_as_a_user_with_this_login_shell(
    shell: str, tmp_path: Path, sshd_factory: SshdFactory, shell_root: Path
) -> None:
    shell_path = shutil.which(shell)
    if shell_path is None:
        pytest.skip(f"{shell} is not installed (scripts/setup installs it)")
    real_borg = shutil.which("borg")
    assert real_borg is not None
    keys = shell_root / "authorized_keys"
    server = sshd_factory(extra_config=[f"AuthorizedKeysFile {keys}"])
    write_authorized_keys(server, keys)

    first = pullkit.make_client_data(shell_root / f"data {HOSTILE}")
    (first / f"skip {HOSTILE}.txt").write_text("must be excluded\n")
    second = pullkit.make_client_data(shell_root / "new\nline", random_bytes=1000)
    fake = shell_root / "recording-borg"
    fake.write_text(RECORDING_BORG.format(borg=real_borg))
    fake.chmod(0o755)
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    # An archive name may not start with "-" (refused at load: hooks would read it as an option).
    archive = f"a{HOSTILE} end"
    exclude = [f"*/skip {HOSTILE}.txt", "-leading-dash-pattern"]
    home = shell_root / "home"

    name = f"bt{shell}{os.getpid() % 100000}"
    with throwaway_user(name, shell_path, home):
        login = server.login_as(name)
        conf = pullkit.base_config(tmp_path, login)
        table = pullkit.client_table(
            login,
            "c1",
            repo,
            [first, second],
            remote_borg=str(fake),
            archive=archive,
            exclude=exclude,
            remote_socket=f"~/{HOSTILE_SHORT}/c1.sock",
        )
        config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)

        result = pullkit.run_cli(config, "pull", "c1")

        assert result.returncode == 0, result.stdout + result.stderr
        assert pullkit.archives(tmp_path, repo) == [archive]
        pullkit.extract(tmp_path, repo, archive, tmp_path / "restored")
        (first / f"skip {HOSTILE}.txt").unlink()  # excluded: the archive must not have it
        pullkit.assert_same_tree(first, tmp_path / "restored")
        pullkit.assert_same_tree(second, tmp_path / "restored")
        expected = borg.create_argv(
            remote_borg=str(fake),
            repository=repo,
            archive=archive,
            paths=[str(first), str(second)],
            exclude=exclude,
        )[1:]
        received = recorded_argv(home)
        assert received == expected
        assert f"{borg.repository_url(repo)}::{archive}" in received
        assert [f"--exclude={pattern}" for pattern in exclude] == [
            arg for arg in received if arg.startswith("--exclude=")
        ]
        assert received[-2:] == [str(first), str(second)]
        assert (home / HOSTILE_SHORT).is_dir()
        assert stat.S_IMODE((home / HOSTILE_SHORT).lstat().st_mode) == 0o700
        assert list((home / HOSTILE_SHORT).iterdir()) == []  # socket and pid file removed
        for root in (shell_root, tmp_path):
            assert [p for p in pullkit.files_named(root, "PWNED") if p.parent not in {first}] == []

        # The default remote_socket, ~/.cache/borgtunnel/c1.sock, with the real borg on PATH.
        # A different, much smaller tree on purpose: not a shrink worth a warning here.
        table = pullkit.client_table(
            login, "c1", repo, [second], archive="plain-{now}", max_shrink=100
        )
        del table["remote_socket"]
        table["remote_borg"] = str(fake)
        config = pullkit.write_config(tmp_path / "bt2.toml", clients={"c1": table}, **conf)
        result = pullkit.run_cli(config, "pull", "c1")
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(pullkit.archives(tmp_path, repo)) == 2
        assert stat.S_IMODE((home / ".cache" / "borgtunnel").stat().st_mode) == 0o700
        assert stat.S_IMODE(home.stat().st_mode) == 0o700  # as useradd's caller made it
