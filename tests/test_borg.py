"""borg command building and output parsing, with the quoting proven through real shells.

The remote command line is parsed by the client user's login shell. Instead of comparing strings
we hand the command to a real ``sh -c`` (dash, and bash when present) whose "borg" is a script
that reports the argv and environment it received: what arrives must be exactly what we meant,
and no shell syntax inside a value may run.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from borgtunnel import borg
from borgtunnel.client.remote import GO, parse_pid_line, parse_ready_line, run_command

SHELLS = [s for s in ("/bin/sh", "/bin/bash", "/usr/bin/zsh") if Path(s).exists()]

# Reports argv (without argv[0]), environment, pid and what it read on stdin as JSON on stdout.
ARGV_DUMPER = """\
import json, os, sys
stdin = sys.stdin.read()
json.dump(
    {"argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid(), "stdin": stdin},
    sys.stdout,
)
"""


def nasty_values(marker: Path) -> list[str]:
    """Strings that would run ``touch MARKER`` (or break words apart) if any shell parsed them."""
    m = shlex.quote(str(marker))
    return [
        "with space",
        "ünïcødé ☃",
        "single'quote",
        'double"quote',
        f"$(touch {m})",
        f"`touch {m}`",
        f"'; touch {m}; '",
        f'"; touch {m}; "',
        f"a\ntouch {m}\n",
        "-leading-dash",
        "--json",
        "*",
        f"; touch {m}",
        f"&& touch {m}",
        f"| touch {m}",
        "back\\slash\\",
        "$HOME ${HOME} ~",
        "tab\there",
        "#not a comment",
        "",
    ]


@pytest.fixture
def dumper(tmp_path: Path) -> str:
    """A ``remote_borg`` value: this Python running the argv dumper (two words, shell-quoted)."""
    script = tmp_path / "fake borg.py"  # a space in the program path, too
    script.write_text(ARGV_DUMPER)
    return shlex.join([sys.executable, str(script)])


def run_in_shell(
    shell: str, command: str, cwd: Path, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """What sshd does with an exec request: ``$SHELL -c COMMAND``, in a plain environment."""
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd)}
    return subprocess.run(
        [shell, "-c", command],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=20,
        check=False,
    )


def remote(argv: list[str], env: dict[str, str], socket: str = "~/run/s.sock") -> str:
    return run_command(
        socket, borg.RSH_BY_TOOL["nc"], borg.RSH_BY_TOOL["socat"], borg.with_env(argv, env)
    )


# --- argv builders ----------------------------------------------------------------------------


def test_serve_argv_is_the_policy() -> None:
    assert borg.serve_argv("/usr/bin/borg", Path("/srv/borg/web1")) == [
        "/usr/bin/borg",
        "serve",
        "--append-only",
        "--restrict-to-repository",
        "/srv/borg/web1",
    ]


def test_repository_url_is_constant_form() -> None:
    assert borg.repository_url(Path("/srv/borg/web1")) == "ssh://borgtunnel/srv/borg/web1"
    assert borg.repository_url(Path("/srv/borg dir/x")) == "ssh://borgtunnel/srv/borg dir/x"


def test_init_argv() -> None:
    assert borg.init_argv("borg", Path("/srv/r"), "repokey-blake2") == [
        "borg",
        "init",
        "--encryption=repokey-blake2",
        "--make-parent-dirs",
        "--",
        "/srv/r",
    ]


def test_create_argv_layout() -> None:
    argv = borg.create_argv(
        remote_borg="sudo -n borg",
        repository=Path("/srv/borg/web1"),
        archive="{hostname}-{now}",
        paths=["/etc", "/home/-odd"],
        exclude=["-starts-with-dash", "*.tmp"],
        extra=["--compression=zstd,3", "--one-file-system"],
    )
    assert argv == [
        "sudo",
        "-n",
        "borg",
        "create",
        "--log-json",
        "--progress",
        "--json",
        "--show-version",
        "--exclude=-starts-with-dash",
        "--exclude=*.tmp",
        "--compression=zstd,3",
        "--one-file-system",
        "--",
        "ssh://borgtunnel/srv/borg/web1::{hostname}-{now}",
        "/etc",
        "/home/-odd",
    ]


def test_create_argv_remote_borg_honours_quotes() -> None:
    argv = borg.create_argv(
        remote_borg="'/opt/my borg/borg' --lock-wait 5",
        repository=Path("/r"),
        archive="a",
        paths=["/"],
    )
    assert argv[:4] == ["/opt/my borg/borg", "--lock-wait", "5", "create"]


def test_client_env() -> None:
    plain = borg.client_env(encrypted=False)
    assert plain["PYTHONUTF8"] == "1"
    assert "BORG_PASSPHRASE_FD" not in plain
    assert not any("PASSPHRASE" in key for key in plain)
    # Set by the remote run script from what it found on the client, never by the server.
    assert "BORG_RSH" not in plain
    assert borg.SOCKET_VAR not in plain
    assert borg.client_env(encrypted=True)["BORG_PASSPHRASE_FD"] == "0"
    # Specific exit codes only when asked (a client known to run borg >= 1.4).
    assert "BORG_EXIT_CODES" not in plain
    assert borg.client_env(encrypted=False, modern_exit_codes=True)["BORG_EXIT_CODES"] == "modern"


# --- the remote command line through real shells ----------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_remote_command_round_trips_through_shell(shell: str, tmp_path: Path, dumper: str) -> None:
    marker = tmp_path / "PWNED"
    values = nasty_values(marker)
    argv = borg.create_argv(
        remote_borg=dumper,
        repository=Path("/srv/borg/web 1"),
        archive="|".join(values),  # one archive name holding every value at once
        paths=values,
        exclude=values,
        extra=values,
    )
    env = borg.client_env(encrypted=True)
    # A short home: the resolved socket path must stay under the unix socket limit.
    with tempfile.TemporaryDirectory(prefix="bt-") as short:
        home = Path(short)
        socket = "~/d $(touch PWNED) '\"/s `x`.sock"
        command = remote(argv, env, socket)

        result = run_in_shell(shell, command, home, stdin=GO + b"secret\npass")

        assert result.returncode == 0, result.stderr
        resolved = f"{home}/d $(touch PWNED) '\"/s `x`.sock"
        assert not (home / "PWNED").exists()
    received: dict[str, Any] = json.loads(result.stdout)
    assert received["argv"] == argv[2:]  # argv[:2] is "python fake-borg.py"
    assert {k: received["env"].get(k) for k in env} == env
    assert received["env"]["BORGTUNNEL_SOCKET"] == resolved
    assert received["env"]["BORG_RSH"] == borg.RSH_BY_TOOL["nc"]
    assert received["stdin"] == "secret\npass"  # everything after the go line, for borg
    assert not marker.exists()
    lines = result.stderr.decode().splitlines()
    ready = parse_ready_line(lines[0])
    assert ready is not None
    assert ready.path == resolved
    # The pid line names borg itself (env execs it): killing that pid kills borg.
    assert parse_pid_line(lines[1]) == received["pid"]


def test_remote_command_without_go_runs_nothing(tmp_path: Path, dumper: str) -> None:
    argv = borg.create_argv(remote_borg=dumper, repository=Path("/r"), archive="a", paths=["/"])

    result = run_in_shell("/bin/sh", remote(argv, {}), tmp_path, stdin=b"")

    assert result.returncode == 72
    assert result.stdout == b""  # the dumper never ran
    assert parse_ready_line(result.stderr.decode().splitlines()[0]) is not None


def test_remote_command_removes_its_socket_and_keeps_borgs_status(tmp_path: Path) -> None:
    sock_dir = tmp_path / "run"
    argv = ["sh", "-c", 'touch "$BORGTUNNEL_SOCKET"; exit 3']  # stands in for borg + sshd's socket

    result = run_in_shell("/bin/sh", remote(argv, {}), tmp_path, stdin=GO)

    assert result.returncode == 3
    assert list(sock_dir.iterdir()) == []


def test_remote_command_missing_borg_is_status_127(tmp_path: Path) -> None:
    argv = borg.create_argv(
        remote_borg="/nonexistent/borg", repository=Path("/r"), archive="a", paths=["/"]
    )
    assert run_in_shell("/bin/sh", remote(argv, {"A": "1"}), tmp_path, stdin=GO).returncode == 127


# --- BORG_RSH: borg's appended words are ignored ----------------------------------------------

# What borg 1.2 appends to shlex.split(BORG_RSH) for ssh://borgtunnel/path.
BORG_APPENDS = ["borgtunnel", "borg", "serve", "--umask=077", "--debug"]


def rsh_argv(tool: str) -> list[str]:
    return [*shlex.split(borg.RSH_BY_TOOL[tool]), *BORG_APPENDS]


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        ("nc", ["-N", "-U", "{path}"]),
        ("socat", ["STDIO", "UNIX-CONNECT:{path}"]),
    ],
)
def test_borg_rsh_ignores_appended_words(tool: str, expected: list[str], tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / tool
    fake.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    fake.chmod(0o755)
    (fake_bin / "sh").symlink_to("/bin/sh")
    path = f"{tmp_path}/a b $(touch {tmp_path}/PWNED) `x` 'q\".sock"
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", borg.SOCKET_VAR: path}

    result = subprocess.run(rsh_argv(tool), env=env, capture_output=True, timeout=10, check=True)

    assert result.stdout.split(b"\0")[:-1] == [w.format(path=path).encode() for w in expected]
    assert not (tmp_path / "PWNED").exists()


@contextmanager
def eof_echo_server(path: Path) -> Iterator[None]:
    """Answers ``got:<everything read until EOF>``: only a relay that passes EOF gets a reply."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(b"got:" + data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.close()
        thread.join(timeout=10)


@pytest.mark.parametrize("tool", ["nc", "socat"])
def test_borg_rsh_passes_data_and_eof_with_the_real_tool(tool: str, tmp_path: Path) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    path = tmp_path / "dir with space" / "s.sock"
    path.parent.mkdir()
    env = {"PATH": os.environ["PATH"], borg.SOCKET_VAR: str(path)}
    with eof_echo_server(path):
        result = subprocess.run(
            rsh_argv(tool),
            input=b"hello borg",
            env=env,
            capture_output=True,
            timeout=10,
            check=False,
        )
    assert result.stdout == b"got:hello borg", result.stderr


# --- exit codes and output ----------------------------------------------------------------------


# Shape of `borg create --json` from borg 1.2.4 (captured from a real run, ids shortened).
ARCHIVE_ID = "c4c10dec5de3f14b2038e7b3cf0284a1f4a424050deeff6acb9cc0b48e1ec625"

BORG_12_CREATE_JSON = """\
{
    "archive": {
        "command_line": ["/usr/bin/borg", "create", "--json", "--log-json", "repo::t 1", "data"],
        "duration": 0.00363,
        "end": "2026-11-25T15:59:09.000000",
        "id": "c4c10dec5de3f14b2038e7b3cf0284a1f4a424050deeff6acb9cc0b48e1ec625",
        "limits": {"max_archive_size": 2.226833882340869e-05},
        "name": "web1-2026-11-25T15:59:09",
        "start": "2026-11-25T15:59:09.000000",
        "stats": {
            "compressed_size": 473,
            "deduplicated_size": 12,
            "nfiles": 1,
            "original_size": 504
        }
    },
    "cache": {"path": "/root/.cache/borg/3896", "stats": {"total_chunks": 3, "unique_size": 735}},
    "encryption": {"mode": "none"},
    "repository": {"id": "3896", "last_modified": "2026-11-25T15:59:09.000000",
                   "location": "ssh://borgtunnel/srv/borg/web1"}
}
"""


def test_parse_create_claim_real_shape() -> None:
    assert borg.parse_create_claim(BORG_12_CREATE_JSON) == borg.ArchiveClaim(
        name="web1-2026-11-25T15:59:09", id=ARCHIVE_ID
    )


def _claim_json(name: object = "a", archive_id: object = ARCHIVE_ID) -> str:
    return json.dumps({"archive": {"name": name, "id": archive_id}})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n",
        "not json at all",
        "[1, 2]",
        '{"archive": {}}',
        BORG_12_CREATE_JSON[:200],
        _claim_json(archive_id="d166"),  # not a 64-hex id
        _claim_json(archive_id=12),
        _claim_json(name=""),
        _claim_json(name="x" * 256),
        _claim_json(name="a/b"),
        _claim_json(name="new\nline: forged summary"),
        _claim_json(name="\x1b]0;title\x07"),
        '{"archive": {"name": "\\ud800", "id": "' + ARCHIVE_ID + '"}}',  # lone surrogate
        '{"archive": {"name": 5, "id": "' + ARCHIVE_ID + '"}}',
    ],
    ids=[
        "empty",
        "blank",
        "garbage",
        "list",
        "no-fields",
        "truncated",
        "short-id",
        "numeric-id",
        "empty-name",
        "long-name",
        "slash",
        "newline",
        "escape",
        "surrogate",
        "numeric-name",
    ],
)
def test_parse_create_claim_rejects_anything_else(text: str) -> None:
    assert borg.parse_create_claim(text) is None


def _info_json(**stats: object) -> str:
    base: dict[str, object] = {
        "compressed_size": 473,
        "deduplicated_size": 12,
        "nfiles": 1,
        "original_size": 504,
    }
    base.update(stats)
    archive = {"name": "a1", "id": ARCHIVE_ID, "duration": 1.5, "stats": base}
    return json.dumps({"archives": [archive]})


def test_parse_info_json_reads_the_servers_numbers() -> None:
    assert borg.parse_info_json(_info_json()) == borg.ArchiveStats(
        archive="a1",
        archive_id=ARCHIVE_ID,
        original_size=504,
        compressed_size=473,
        deduplicated_size=12,
        nfiles=1,
        duration=1.5,
    )


@pytest.mark.parametrize(
    "text",
    [
        _info_json(nfiles=float("inf")).replace("Infinity", "Infinity"),
        _info_json(nfiles=10**19),  # beyond SQLite's INTEGER
        _info_json(nfiles=-1),
        _info_json(nfiles=True),
        _info_json(original_size="504"),
        _info_json().replace('"duration": 1.5', '"duration": NaN'),
        '{"archives": []}',
        '{"archives": [{}, {}]}',
    ],
    ids=["infinity", "overflow", "negative", "bool", "string", "nan", "none", "two"],
)
def test_parse_info_json_rejects_what_borg_never_writes(text: str) -> None:
    assert borg.parse_info_json(text) is None


@pytest.mark.parametrize(
    ("levelname", "level"),
    [
        ("DEBUG", "debug"),
        ("INFO", "info"),
        ("WARNING", "warning"),
        ("ERROR", "error"),
        ("CRITICAL", "error"),
    ],
)
def test_parse_log_line_log_message_levels(levelname: str, level: str) -> None:
    line = json.dumps(
        {
            "type": "log_message",
            "time": 1795622349.79,
            "message": "Archive t 1 already exists",
            "levelname": levelname,
            "name": "borg.archiver",
            "msgid": "Archive.AlreadyExists",
        }
    )
    parsed = borg.parse_log_line(line + "\n")
    assert parsed is not None
    assert parsed.level == level
    assert parsed.message == "Archive t 1 already exists"
    assert parsed.fields == {"msgid": "Archive.AlreadyExists", "name": "borg.archiver"}


def test_parse_log_line_archive_progress() -> None:
    line = (
        '{"original_size": 1000, "compressed_size": 800, "deduplicated_size": 10, "nfiles": 3, '
        '"path": "data/a", "time": 1795622349.51, "type": "archive_progress", "finished": false}'
    )
    parsed = borg.parse_log_line(line)
    assert parsed is not None
    assert parsed.level == "debug"
    assert parsed.message == "archive_progress"
    assert parsed.fields["nfiles"] == 3
    assert parsed.fields["path"] == "data/a"
    assert "type" not in parsed.fields


def test_parse_log_line_question_prompt() -> None:
    line = json.dumps(
        {
            "type": "question_prompt",
            "msgid": "BORG_RELOCATED_REPO_ACCESS_IS_OK",
            "message": "Warning: The repository at location ... was previously located at ...",
        }
    )
    parsed = borg.parse_log_line(line)
    assert parsed is not None
    assert parsed.level == "debug"
    assert parsed.message.startswith("Warning: The repository")
    assert parsed.fields["msgid"] == "BORG_RELOCATED_REPO_ACCESS_IS_OK"


@pytest.mark.parametrize(
    "line", ["nc: unix connect failed: No such file or directory", "sh: 1: borg: not found", "[1]"]
)
def test_parse_log_line_plain_text_is_a_warning(line: str) -> None:
    parsed = borg.parse_log_line(line + "\r\n")
    assert parsed == borg.LogLine("warning", line, {})


@pytest.mark.parametrize("line", ["", "\n", "   \r\n"])
def test_parse_log_line_blank(line: str) -> None:
    assert borg.parse_log_line(line) is None


def test_serve_argv_with_storage_quota() -> None:
    assert borg.serve_argv("borg", Path("/srv/r"), storage_quota="500G")[-2:] == [
        "--storage-quota",
        "500G",
    ]
