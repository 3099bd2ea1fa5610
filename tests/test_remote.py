"""The client-side run script's prepare part, run for real by dash on this machine.

``run_command`` is what the pull sends over SSH; here it runs under ``/bin/sh -c`` locally with
HOME and PATH pointing into tmp_path and ``true`` standing in for borg, which exercises the same
shell text as on a client.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from borgtunnel import borg
from borgtunnel.client.remote import (
    COMMAND_CHARSET,
    GO,
    RemoteSocket,
    RunExit,
    cleanup_command,
    encoded_command,
    parse_ready_line,
    remove_command,
    run_command,
)

# What the script needs besides a tool: dash itself (the command says `sh -c`) and coreutils.
BASICS = ("sh", "mkdir", "rm", "id", "grep", "ls", "base64")


def run_prepare(
    configured: str, home: Path, path_dirs: list[Path] | None = None
) -> subprocess.CompletedProcess[bytes]:
    path = ":".join(str(d) for d in path_dirs) if path_dirs is not None else os.environ["PATH"]
    return subprocess.run(
        [
            "/bin/sh",
            "-c",
            run_command(configured, borg.RSH_BY_TOOL["nc"], borg.RSH_BY_TOOL["socat"], ["true"]),
        ],
        input=GO,
        env={"HOME": str(home), "PATH": path},
        cwd=home,
        capture_output=True,
        timeout=20,
        check=False,
    )


def prepared(result: subprocess.CompletedProcess[bytes]) -> RemoteSocket:
    """The ``borgtunnel-ready`` line the script printed before running borg."""
    first = result.stderr.decode("utf-8", "surrogateescape").splitlines()[0]
    ready = parse_ready_line(first)
    assert ready is not None, result.stderr
    return ready


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on: what sshd leaves behind after a forward."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def bin_dir(tmp_path: Path, *tools: str) -> Path:
    """A PATH directory holding only BASICS and ``tools`` (symlinks to the real programs)."""
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    for name in (*BASICS, *tools):
        real = shutil.which(name)
        assert real is not None, f"{name} is needed for this test"
        (directory / name).symlink_to(real)
    return directory


@pytest.fixture
def home(tmp_path: Path) -> Path:
    directory = tmp_path / "home"
    directory.mkdir()
    return directory


def test_creates_private_dir_under_home(home: Path) -> None:
    result = run_prepare("~/.cache/borgtunnel/web1.sock", home)
    assert result.returncode == 0, result.stderr
    socket_dir = home / ".cache" / "borgtunnel"
    assert socket_dir.is_dir()
    assert mode(socket_dir) == 0o700
    assert prepared(result) == RemoteSocket(path=f"{home}/.cache/borgtunnel/web1.sock", tool="nc")


def test_removes_a_stale_socket(home: Path) -> None:
    sock = home / "s.sock"
    stale_socket(sock)
    assert sock.is_socket()
    result = run_prepare(str(sock), home)
    assert result.returncode == 0, result.stderr
    assert not sock.exists()


def test_refuses_a_regular_file_at_the_path(home: Path) -> None:
    victim = home / "important.sock"
    victim.write_text("not a socket")
    result = run_prepare(str(victim), home)
    assert result.returncode == RunExit.NOT_A_SOCKET
    assert b"not a socket" in result.stderr
    assert victim.read_text() == "not a socket"


def test_refuses_a_symlink_at_the_path(home: Path) -> None:
    target = home / "target"
    target.write_text("keep")
    (home / "s.sock").symlink_to(target)
    result = run_prepare(str(home / "s.sock"), home)
    assert result.returncode == RunExit.NOT_A_SOCKET
    assert target.read_text() == "keep"


def test_refuses_a_symlinked_directory(home: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (home / "sockets").symlink_to(real)
    result = run_prepare("~/sockets/s.sock", home)
    assert result.returncode == RunExit.SYMLINK
    assert b"symlink" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a directory to nobody")
def test_refuses_a_directory_owned_by_someone_else(home: Path) -> None:
    foreign = home / "sockets"
    foreign.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(foreign, nobody.pw_uid, nobody.pw_gid)
    result = run_prepare(str(foreign / "s.sock"), home)
    assert result.returncode == RunExit.NOT_OWNER
    assert b"not owned by" in result.stderr


def test_leaves_an_own_0755_directory_as_it_is(home: Path) -> None:
    # Readable by others is safe (sshd makes the forwarded socket 0600); not ours to change.
    directory = home / "sockets"
    directory.mkdir()
    directory.chmod(0o755)
    result = run_prepare(str(directory / "s.sock"), home)
    assert result.returncode == 0, result.stderr
    assert mode(directory) == 0o755


def test_socket_directly_in_home_leaves_home_alone(home: Path) -> None:
    # "~/x.sock" once made the user's home 0700 (and, as root, "/run/x.sock" made /run 0700).
    home.chmod(0o751)
    result = run_prepare("~/x.sock", home)
    assert result.returncode == 0, result.stderr
    assert mode(home) == 0o751


def test_missing_parents_are_created_0700(home: Path) -> None:
    result = run_prepare("~/a/b/c/s.sock", home)
    assert result.returncode == 0, result.stderr
    assert [mode(home / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3


@pytest.mark.parametrize("dir_mode", [0o775, 0o757, 0o777])
def test_refuses_a_group_or_world_writable_directory(home: Path, dir_mode: int) -> None:
    directory = home / "sockets"
    directory.mkdir()
    directory.chmod(dir_mode)
    result = run_prepare(str(directory / "s.sock"), home)
    assert result.returncode == RunExit.SHARED_DIR, result.stderr
    assert b"writable by group or others" in result.stderr
    assert mode(directory) == dir_mode
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize("shared_mode", [0o775, 0o757, 0o777])
def test_refuses_a_writable_ancestor_and_creates_nothing(home: Path, shared_mode: int) -> None:
    shared = home / "shared"
    shared.mkdir()
    shared.chmod(shared_mode)
    (shared / "mine").mkdir(mode=0o700)
    result = run_prepare(str(shared / "mine" / "new" / "s.sock"), home)
    assert result.returncode == RunExit.UNSAFE_ANCESTOR, result.stderr
    assert f"{shared} (on the way to".encode() in result.stderr
    assert not (shared / "mine" / "new").exists()
    assert mode(shared) == shared_mode
    assert mode(shared / "mine") == 0o700
    # An existing socket directory below it is refused the same way.
    (shared / "mine" / "new").mkdir(mode=0o700)
    result = run_prepare(str(shared / "mine" / "new" / "s.sock"), home)
    assert result.returncode == RunExit.UNSAFE_ANCESTOR, result.stderr


def test_accepts_a_sticky_ancestor_with_our_entry_below(home: Path) -> None:
    sticky = home / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    result = run_prepare(str(sticky / "mine" / "s.sock"), home)
    assert result.returncode == 0, result.stderr
    assert mode(sticky) == 0o1777
    assert mode(sticky / "mine") == 0o700


def test_refuses_a_symlinked_ancestor_leading_to_a_shared_directory(
    home: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "mine").mkdir(mode=0o700)
    (home / "link").symlink_to(shared / "mine")
    result = run_prepare("~/link/sockets/s.sock", home)
    assert result.returncode == RunExit.UNSAFE_ANCESTOR, result.stderr
    assert not (shared / "mine" / "sockets").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a directory to nobody")
def test_refuses_an_ancestor_owned_by_someone_else(home: Path) -> None:
    foreign = home / "foreign"
    foreign.mkdir(mode=0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(foreign, nobody.pw_uid, nobody.pw_gid)
    (foreign / "mine").mkdir(mode=0o700)
    result = run_prepare(str(foreign / "mine" / "s.sock"), home)
    assert result.returncode == RunExit.UNSAFE_ANCESTOR, result.stderr
    assert f"owned by uid {nobody.pw_uid}".encode() in result.stderr


def test_refuses_a_sticky_shared_directory(home: Path) -> None:
    shared = home / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    result = run_prepare(str(shared / "s.sock"), home)
    assert result.returncode == RunExit.SHARED_DIR
    assert mode(shared) == 0o1777  # left alone: it is not ours to tighten


def test_path_with_shell_syntax_is_taken_literally() -> None:
    odd = "dir with space 'q' \"d\" $(touch PWNED) `touch PWNED2` ; && \\ ünï"
    # A short home: pytest's tmp_path plus this name would exceed the socket path limit.
    with tempfile.TemporaryDirectory(prefix="bt-") as short:
        _literal_path_check(Path(short), odd)


def _literal_path_check(home: Path, odd: str) -> None:
    result = run_prepare(f"~/{odd}/s $(x).sock", home)
    assert result.returncode == 0, result.stderr
    assert (home / odd).is_dir()
    assert mode(home / odd) == 0o700
    assert prepared(result).path == f"{home}/{odd}/s $(x).sock"
    assert not (home / "PWNED").exists()
    assert not (home / "PWNED2").exists()


# --- which relay tool ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nc") is None, reason="netcat-openbsd not installed")
def test_picks_nc_when_it_supports_dash_n(home: Path, tmp_path: Path) -> None:
    result = run_prepare("~/s.sock", home, [bin_dir(tmp_path, "nc", "socat")])
    assert result.returncode == 0, result.stderr
    assert prepared(result).tool == "nc"


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_picks_socat_without_nc(home: Path, tmp_path: Path) -> None:
    result = run_prepare("~/s.sock", home, [bin_dir(tmp_path, "socat")])
    assert result.returncode == 0, result.stderr
    assert prepared(result).tool == "socat"


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_an_nc_without_dash_n_is_not_used(home: Path, tmp_path: Path) -> None:
    """Traditional netcat has no -N: borg's EOF would never reach serve, so prefer socat."""
    directory = bin_dir(tmp_path, "socat")
    fake_nc = directory / "nc"
    fake_nc.write_text("#!/bin/sh\necho 'usage: nc [-lnuvz] [-p port] host port' >&2\nexit 1\n")
    fake_nc.chmod(0o755)
    result = run_prepare("~/s.sock", home, [directory])
    assert result.returncode == 0, result.stderr
    assert prepared(result).tool == "socat"


def test_neither_tool_is_a_clear_error(home: Path, tmp_path: Path) -> None:
    result = run_prepare("~/s.sock", home, [bin_dir(tmp_path)])
    assert result.returncode == RunExit.NO_TOOL
    assert b"nc" in result.stderr
    assert b"socat" in result.stderr
    assert result.stdout == b""


# --- remove_command -----------------------------------------------------------------------------


def test_remove_command_removes_only_the_literal_path(home: Path) -> None:
    sock = home / "-rf $(touch PWNED) *.sock"
    stale_socket(sock)
    bystander = home / "other.sock"
    stale_socket(bystander)
    result = subprocess.run(
        ["/bin/sh", "-c", remove_command(str(sock))], cwd=home, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert not sock.exists()
    assert bystander.exists()
    assert not (home / "PWNED").exists()


# --- parse_ready_line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "borgtunnel-ready nc /home/u/.cache/borgtunnel/w.sock\n",
            RemoteSocket("/home/u/.cache/borgtunnel/w.sock", "nc"),
        ),
        ("borgtunnel-ready socat /tmp/a b c.sock", RemoteSocket("/tmp/a b c.sock", "socat")),
    ],
    ids=["nc", "socat-path-with-spaces"],
)
def test_parse_ready_line_good(line: str, expected: RemoteSocket) -> None:
    assert parse_ready_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "borgtunnel-ready nc",
        "borgtunnel-ready telnet /p",
        "borgtunnel-ready nc relative.sock",
        "motd banner borgtunnel-ready nc /p",
        "borgtunnel-pid 12",
    ],
    ids=["empty", "no-path", "unknown-tool", "relative", "banner", "pid-line"],
)
def test_parse_ready_line_bad(line: str) -> None:
    assert parse_ready_line(line) is None


def test_refuses_a_socket_path_too_long_after_expanding_home(tmp_path: Path) -> None:
    # The configured text is short enough; $HOME makes it exceed the unix socket limit.
    deep_home = tmp_path / ("h" * 90)
    deep_home.mkdir()

    result = run_prepare("~/.cache/borgtunnel/web1.sock", deep_home)

    assert result.returncode == RunExit.TOO_LONG
    assert b"longer than 100 bytes" in result.stderr
    assert not (deep_home / ".cache").exists()


# --- the command line under every login shell ---------------------------------------------------

LOGIN_SHELLS = ["bash", "dash", "zsh", "fish", "tcsh"]
HOSTILE = "-q'uote \"dq\" back\\slash \\' \\\\ !bang !! $(touch PWNED) `touch PWNED` ünï\nnl"


def login_shell(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/setup installs it)")
    return found


@pytest.mark.parametrize("shell", LOGIN_SHELLS)
def test_values_reach_sh_exactly_under_each_login_shell(shell: str, tmp_path: Path) -> None:
    values = [HOSTILE, "", "*", "--", "-n", "a\\\\'b"]
    command = encoded_command('for a in "$@"; do printf "[%s]" "$a"; done', values)
    result = subprocess.run(
        [login_shell(shell), "-c", command], cwd=tmp_path, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "".join(f"[{v}]" for v in values)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("shell", LOGIN_SHELLS)
def test_cleanup_command_removes_only_its_files_under_each_login_shell(shell: str) -> None:
    program = login_shell(shell)
    # A short directory: pytest's tmp_path plus this name would exceed the socket path limit.
    with tempfile.TemporaryDirectory(prefix="bt-") as short:
        directory = Path(short)
        sock = directory / f"{HOSTILE}.sock"
        stale_socket(sock)
        Path(f"{sock}.pid").write_text("1 2\n")
        gone = directory / "gone.sock"
        stale_socket(gone)
        stale_socket(directory / "bystander.sock")
        for command in (cleanup_command(None, str(sock)), remove_command(str(gone))):
            result = subprocess.run(
                [program, "-c", command], cwd=directory, capture_output=True, check=False
            )
            assert result.returncode == 0, result.stderr
        assert [p.name for p in directory.iterdir()] == ["bystander.sock"]


def test_command_line_has_no_character_a_login_shell_reads() -> None:
    # No quote inside the quoted word, no backslash, "!" or newline: whatever the values are.
    command = run_command(HOSTILE, HOSTILE, HOSTILE, [HOSTILE, "☃"])
    assert set(command) <= COMMAND_CHARSET
    assert command.count("'") == 2
    assert not set("\\!\n`") & set(command)


def test_missing_base64_is_a_clear_error(home: Path, tmp_path: Path) -> None:
    directory = tmp_path / "only-sh"
    directory.mkdir()
    (directory / "sh").symlink_to(shutil.which("sh") or "/bin/sh")
    result = run_prepare("~/s.sock", home, [directory])
    assert result.returncode == RunExit.NO_BASE64
    assert b"no base64" in result.stderr
    assert list(home.iterdir()) == []  # nothing ran
