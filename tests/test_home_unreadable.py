"""A pull with the service user's home unreadable, as under the shipped systemd units.

``ProtectHome=yes`` plus an empty ``CapabilityBoundingSet=`` makes root unable even to ``stat``
a path under ``/root``. The same conditions without systemd: a private mount namespace with a
mode-000 tmpfs over the home, and ``capsh`` dropping the two capabilities that let root ignore
file modes. borgtunnel must pull through (real sshd, real borg, archive read back) and read
nothing there, since no setting names a path in it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

import borgtunnel
from tests import pullkit
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

_DROPPED = "cap_dac_override,cap_dac_read_search"
# Mount the tmpfs over each home given as an argument, then run the command after "--" without
# the capabilities. unshare -m makes mount propagation private: nothing leaks out, and the
# namespace with its mounts ends with the command.
_HIDE_SCRIPT = f"""set -e
while [ "$1" != -- ]; do mount -t tmpfs -o mode=000 tmpfs "$1"; shift; done
shift
exec capsh --drop={_DROPPED} -- -c 'exec "$@"' bash "$@"
"""


def _under(path: Path, home: Path) -> bool:
    return path.resolve().is_relative_to(home.resolve())


@dataclasses.dataclass(frozen=True)
class HiddenHome:
    """How to run a borgtunnel command with ``homes`` covered: ``python`` and ``env``."""

    homes: list[Path]
    python: str
    env: dict[str, str]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        homes = [str(h) for h in self.homes]
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", _HIDE_SCRIPT, "sh", *homes, "--", self.python, *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def _hidden_home(tmp_path: Path) -> HiddenHome:
    """The service user's home is root's passwd entry (systemd sets no $HOME for root), and
    $HOME if set. The interpreter must not live there (a pyenv Python under /root does): then
    Debian's /usr/bin/python3 runs this checkout and its installed packages instead. A home that
    still holds something the pull needs cannot be covered; then $HOME points at an empty
    directory that is, which is what asyncssh and Python's expanduser read."""
    env = dict(os.environ)
    passwd_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    candidates = {passwd_home, Path(env.get("HOME", passwd_home))}
    python = sys.executable
    debian = Path("/usr/bin/python3")
    same_version = debian.resolve().name == "python{}.{}".format(*sys.version_info[:2])
    if any(_under(Path(python), h) for h in candidates) and same_version:
        python = str(debian)
        checkout = Path(borgtunnel.__file__).parent.parent
        packages = Path(asyncssh.__file__).parent.parent
        env["PYTHONPATH"] = os.pathsep.join((str(checkout), str(packages)))
    needed = [
        Path(python),
        Path(borgtunnel.__file__),
        Path(asyncssh.__file__),
        Path(shutil.which("borg") or "/usr/bin/borg"),
        tmp_path,
    ]
    homes = [h for h in candidates if h.is_dir() and not any(_under(n, h) for n in needed)]
    if Path(env.get("HOME", passwd_home)) not in homes:
        stand_in = tmp_path / "home"
        stand_in.mkdir()
        homes.append(stand_in)
        env["HOME"] = str(stand_in)
    # systemd's PATH has no home in it either; a test runner's may (pyenv, cargo).
    path = env.get("PATH", os.defpath).split(os.pathsep)
    env["PATH"] = os.pathsep.join(p for p in path if not any(_under(Path(p), h) for h in homes))
    return HiddenHome(sorted(homes), python, env)


@pytest.fixture
def hidden_home(tmp_path: Path) -> HiddenHome:
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a tmpfs in a private mount namespace")
    missing = [p for p in ("unshare", "capsh") if shutil.which(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian util-linux, libcap2-bin)")
    hidden = _hidden_home(tmp_path)
    # The conditions hold: inside, even root gets EACCES on a stat under each covered home, and
    # the interpreter still imports what the pull needs.
    probe = "import os,sys\nprint('in')\nimport asyncssh,borgtunnel\nos.stat(sys.argv[1] + '/.ssh')"
    for home in hidden.homes:
        result = hidden.run(["-c", probe, str(home)])
        if not result.stdout.startswith("in"):  # the namespace, mount or capsh failed
            pytest.skip(
                f"cannot hide the home here (container without CAP_SYS_ADMIN?): {result.stderr}"
            )
        assert "PermissionError" in result.stderr, result.stderr
    return hidden


def test_pull_works_with_the_home_unreadable(
    tmp_path: Path, sshd: SshdServer, hidden_home: HiddenHome
) -> None:
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    table = pullkit.client_table(sshd, "c1", repo, [data])
    config = pullkit.write_config(
        tmp_path / "bt.toml", clients={"c1": table}, **pullkit.base_config(tmp_path, sshd)
    )
    result = hidden_home.run([*pullkit.cli_argv(config)[1:], "pull", "c1"])

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("c1: ok archive="), result.stdout
    names = pullkit.archives(tmp_path, repo)
    assert len(names) == 1
    pullkit.extract(tmp_path, repo, names[0], tmp_path / "restored")
    pullkit.assert_same_tree(data, tmp_path / "restored")


def _home_paths_touched(strace_log: Path, homes: list[Path]) -> list[str]:
    """Paths under ``homes`` that a file system call named, except the interpreter's own
    check of its user site-packages (Python does that at start-up, before any of our code)."""

    def in_home(path: str) -> bool:
        return any(Path(path).is_relative_to(h) for h in homes)

    return [
        line
        for line in strace_log.read_text().splitlines()
        if any(
            in_home(p) and "/.local/lib/python" not in p for p in re.findall(r'"(/[^"]*)"', line)
        )
    ]


@pytest.mark.parametrize(
    ("command", "reached"),
    [("pull", "c1: ok archive="), ("trust", "SHA256:"), ("doctor", "login user")],
)
def test_nothing_reads_the_home(
    tmp_path: Path, sshd: SshdServer, hidden_home: HiddenHome, command: str, reached: str
) -> None:
    """A pull (with its borg serve), trust fetching the host key, doctor connecting and trying
    the forward: every system call that names a path is traced, in every process, and none may
    name one in the home (asyncssh swallows some of these errors, so the outcome alone would
    not show it)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("needs strace (Debian strace) to see which paths are read")
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    table = pullkit.client_table(sshd, "c1", repo, [pullkit.make_client_data(tmp_path / "data")])
    config = pullkit.write_config(
        tmp_path / "bt.toml", clients={"c1": table}, **pullkit.base_config(tmp_path, sshd)
    )
    log = tmp_path / "strace.log"
    traced = ["-f", "-qq", "-e", "trace=%file", "-o", str(log), hidden_home.python]
    tracing = dataclasses.replace(hidden_home, python=strace)

    result = tracing.run([*traced, *pullkit.cli_argv(config)[1:], command, "c1"])

    assert reached in result.stdout, result.stdout + result.stderr  # it got through to sshd
    assert _home_paths_touched(log, hidden_home.homes) == []


def test_an_identity_in_the_unreadable_home_is_named_not_retried(
    tmp_path: Path, sshd: SshdServer, hidden_home: HiddenHome
) -> None:
    """A setting that does name a path in the home: the pull fails at once, saying which file,
    what was done with it and that it is this server's, at error level (not a lost link)."""
    identity = hidden_home.homes[0] / ".ssh" / "borgtunnel_id"
    conf = pullkit.base_config(tmp_path, sshd)
    conf["ssh"]["identity"] = str(identity)
    table = pullkit.client_table(sshd, "c1", tmp_path / "repos" / "c1", ["/nonexistent"])
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)

    result = hidden_home.run([*pullkit.cli_argv(config)[1:], "pull", "c1"])

    assert result.returncode == 2, result.stderr
    expected = f"identity {identity}: Permission denied (this server could not open it)"
    assert expected in result.stdout, result.stdout
    [failed] = [json.loads(line) for line in result.stderr.splitlines() if "pull_failed" in line]
    assert failed["level"] == "error"  # a lost link is a warning, retried by the daemon
