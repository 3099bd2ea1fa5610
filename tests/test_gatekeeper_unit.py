"""The gatekeeper's pure parts: splitting, recognising the server's requests, policy checks.

The requests are built with the server's own builders (borgtunnel/client/remote.py, borg.py), so a
change of the server's command shape that the gatekeeper no longer understands fails here.
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from borgtunnel import borg
from borgtunnel.client import gatekeeper as gk
from borgtunnel.client.remote import (
    REQUEST_RESTORE,
    cleanup_command,
    remove_command,
    run_command,
)

HOME = "/home/u"


def server_run_command(
    *,
    socket: str = "~/.cache/borgtunnel/web1.sock",
    paths: tuple[str, ...] = ("/etc", "/home/u/data"),
    exclude: tuple[str, ...] = ("/home/*/.cache",),
    extra: tuple[str, ...] = ("--compression", "zstd,3"),
    archive: str = "{hostname}-{now}",
    remote_borg: str = "borg",
    env: dict[str, str] | None = None,
    borg_major: int = 1,
) -> str:
    """Exactly what pull.py sends (pull._remote_command)."""
    argv = borg.create_argv(
        borg2=borg_major == 2,
        remote_borg=remote_borg,
        repository=Path("/srv/borg/web1"),
        archive=archive,
        paths=paths,
        exclude=exclude,
        extra=extra,
    )
    return run_command(
        socket,
        borg.RSH_BY_TOOL["nc"],
        borg.RSH_BY_TOOL["socat"],
        borg.with_env(argv, env if env is not None else borg.client_env(encrypted=True)),
    )


def restore_command(target: Path, mode: str) -> str:
    """The shape restore.py sends: the run envelope around the target script and borg extract."""
    wrapped = [
        *("env", "LANG=C.UTF-8"),
        *("sh", "-c", "any script", "borgtunnel-restore", str(target), mode),
        *("borg", "extract", "--list", "--"),
        *("ssh://borgtunnel/srv/borg/web1::web1-2026", "etc/hosts"),
    ]
    return run_command(
        "~/.cache/borgtunnel/web1.sock", "nc-rsh", "socat-rsh", wrapped, kind=REQUEST_RESTORE
    )


def policy(**overrides: object) -> gk.Policy:
    values: dict[str, object] = {"paths": ("/etc", "/home/u"), "socket_dir": "~/.cache/borgtunnel"}
    values.update(overrides)
    return gk.Policy(**values)  # type: ignore[arg-type]


def parse_and_check(command: str, pol: gk.Policy) -> None:
    request = gk.parse_request(command)
    if isinstance(request, gk.RunRequest):
        gk.check_run(request, pol, HOME)
    elif isinstance(request, gk.RestoreRequest):
        gk.check_restore(request, pol, HOME)
    elif isinstance(request, gk.CleanupRequest):
        gk.check_cleanup(request, pol, HOME)


def refusal(command: str, pol: gk.Policy | None = None) -> str:
    """The reason the gatekeeper gives for ``command`` (parse and check, nothing runs)."""
    with pytest.raises(gk.RefusedError) as caught:
        parse_and_check(command, pol or policy())
    return caught.value.reason


# --- the server's real commands are understood ---------------------------------------------


def test_a_borg2_run_command_is_understood_and_rebuilt_in_borg2s_form() -> None:
    request = gk.parse_request(server_run_command(archive="{hostname}", borg_major=2))
    assert isinstance(request, gk.RunRequest)
    call = request.call
    assert call.borg2
    assert call.repository == "/srv/borg/web1"
    assert call.archive == "{hostname}"
    assert call.paths == ("/etc", "/home/u/data")
    assert "--repo=ssh://borgtunnel/srv/borg/web1" not in call.options  # kept apart, rebuilt
    gk.check_run(request, policy(), HOME)

    argv = gk.borg_argv(policy(borg="/opt/borg2/bin/borg"), "create", call, call.paths)

    end = argv.index("--")
    assert argv[:2] == ["/opt/borg2/bin/borg", "create"]
    assert argv[end - 1] == "--repo=ssh://borgtunnel/srv/borg/web1"
    assert argv[end + 1 :] == ["{hostname}", "/etc", "/home/u/data"]


@pytest.mark.parametrize(
    ("repo_words", "reason"),
    [
        (["--repo=ssh://borgtunnel/a", "--repo=ssh://borgtunnel/b"], "more than one --repo"),
        (["--repo=/srv/borg/web1"], "repository must be ssh://borgtunnel/PATH"),
        (["--repo=ssh://borgtunnel/srv/r::x"], "repository must be ssh://borgtunnel/PATH"),
        (["--repo", "ssh://borgtunnel/srv/r"], "not allowed"),
    ],
)
def test_a_borg2_repository_other_than_ours_is_refused(repo_words: list[str], reason: str) -> None:
    argv = ["borg", "create", "--log-json", *repo_words, "--", "web1", "/etc"]
    command = run_command("~/.cache/borgtunnel/web1.sock", "nc-rsh", "socat-rsh", argv)
    assert reason in refusal(command)


def test_the_servers_run_command_becomes_a_checked_run_request() -> None:
    request = gk.parse_request(server_run_command())

    assert isinstance(request, gk.RunRequest)
    assert request.socket == "~/.cache/borgtunnel/web1.sock"
    call = request.call
    assert call.env == borg.client_env(encrypted=True)
    assert call.program == ("borg",)
    assert call.options == (
        "--log-json",
        "--progress",
        "--json",
        "--show-version",
        "--exclude=/home/*/.cache",
        "--compression=zstd,3",
    )
    assert call.repository == "/srv/borg/web1"
    assert call.archive == "{hostname}-{now}"
    assert call.paths == ("/etc", "/home/u/data")
    assert gk.check_run(request, policy(), HOME) == "/home/u/.cache/borgtunnel/web1.sock"


def test_borg_argv_is_built_from_the_policys_borg_not_the_servers_remote_borg() -> None:
    request = gk.parse_request(server_run_command(remote_borg="sudo -n /tmp/evil-borg"))
    assert isinstance(request, gk.RunRequest)

    argv = gk.borg_argv(policy(borg="/usr/bin/borg"), "create", request.call, request.call.paths)

    assert argv == [
        "/usr/bin/borg",
        "create",
        "--log-json",
        "--progress",
        "--json",
        "--show-version",
        "--exclude=/home/*/.cache",
        "--compression=zstd,3",
        "--",
        "ssh://borgtunnel/srv/borg/web1::{hostname}-{now}",
        "/etc",
        "/home/u/data",
    ]


def test_the_servers_cleanup_commands_are_understood(tmp_path: Path) -> None:
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    sock = f"{sock_dir}/web1.sock"
    (sock_dir / "web1.sock.pid").write_text("100 4242\n")
    pol = policy(socket_dir=str(sock_dir))

    with_pid = gk.parse_request(cleanup_command(4242, sock))
    without = gk.parse_request(cleanup_command(None, sock))
    retry = gk.parse_request(remove_command(sock))

    assert with_pid == gk.CleanupRequest(pid=4242, paths=(sock, sock + ".pid"))
    assert without == gk.CleanupRequest(pid=None, paths=(sock, sock + ".pid"))
    assert retry == gk.CleanupRequest(pid=None, paths=(sock,))
    assert isinstance(with_pid, gk.CleanupRequest)
    assert gk.check_cleanup(with_pid, pol, HOME) == 4242


# --- refusals --------------------------------------------------------------------------------


def forged(kind: str, set_line: str) -> str:
    """A command in the server's envelope whose ``set --`` line is raw text of our choosing."""
    program = f"# {kind}\nset -- {set_line}\nexit 0\n".encode()
    return gk.DECODER_HEAD + base64.b64encode(program).decode() + gk.DECODER_TAIL


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ("touch /tmp/PWNED", "not a borgtunnel request"),
        ("bash -i", "not a borgtunnel request"),
        ("sh -c 'id' borgtunnel-run", "not a borgtunnel request"),
        ("rm -rf /", "not a borgtunnel request"),
        ("true; touch /tmp/PWNED", "not a borgtunnel request"),
        ("", "not a borgtunnel request"),
        (gk.DECODER_HEAD + "$(id)" + gk.DECODER_TAIL, "the payload is not base64"),
        (gk.DECODER_HEAD + "!!!!" + gk.DECODER_TAIL, "the payload is not base64"),
        (forged("borgtunnel-remove", "$(id)"), "shell syntax '$'"),
        (forged("borgtunnel-remove", "a | nc evil 1"), "shell syntax '|'"),
        (forged("borgtunnel-remove", '"$HOME"'), "shell expansion '$'"),
        (forged("borgtunnel-remove", "`id`"), "shell syntax '`'"),
        (forged("borgtunnel-remove", "a; touch /tmp/PWNED"), "shell syntax ';'"),
        (forged("borgtunnel-remove", "'unterminated"), "unterminated single quote"),
        (forged("borgtunnel-evil", "/x.sock"), "not a borgtunnel request"),
        (forged("borgtunnel-cleanup", "12x /a.sock /a.sock.pid"), "not a borgtunnel request"),
    ],
)
def test_anything_but_a_request_is_refused(command: str, reason: str) -> None:
    assert reason in refusal(command)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (("--rsh", "sh -c 'id'"), "option '--rsh' is not allowed"),
        (("--remote-path=/tmp/evil",), "option '--remote-path' is not allowed"),
        (("--paths-from-command",), "option '--paths-from-command' is not allowed"),
        (("--content-from-command",), "option '--content-from-command' is not allowed"),
        (("--paths-from-stdin",), "option '--paths-from-stdin' is not allowed"),
        (("--read-special",), "option '--read-special' is not allowed"),
        (("--exclude-from", "/root/patterns"), "exclude file '/root/patterns' is outside"),
        (("--patterns-from=/tmp/p",), "patterns file '/tmp/p' is outside"),
        (("--pattern=R /root",), "pattern root '/root' is outside"),
        (("--json=1",), "takes no value"),
        (("--compression",), "needs a value"),
    ],
)
def test_options_outside_the_allowlist_are_refused(extra: tuple[str, ...], reason: str) -> None:
    assert reason in refusal(server_run_command(extra=extra))


def test_a_patterns_file_inside_the_policy_is_checked_line_by_line(tmp_path: Path) -> None:
    patterns = tmp_path / "patterns"
    patterns.write_text("- *.tmp\nR /etc\nR /root\n")
    pol = policy(paths=(str(tmp_path), "/etc"))

    command = server_run_command(paths=("/etc",), extra=("--patterns-from", str(patterns)))
    reason = refusal(command, pol)

    assert "pattern root in" in reason
    assert "'/root' is outside" in reason
    patterns.write_text("- *.tmp\nR /etc\n")
    request = gk.parse_request(command)
    assert isinstance(request, gk.RunRequest)
    gk.check_run(request, pol, HOME)


@pytest.mark.parametrize(
    "name", ["BORG_RSH", "BORG_REMOTE_PATH", "BORG_PASSCOMMAND", "BORG_PASSPHRASE", "LD_PRELOAD"]
)
def test_environment_overrides_from_the_server_are_refused(name: str) -> None:
    env = {**borg.client_env(encrypted=False), name: "sh -c id"}
    assert f"{name} may not be set" in refusal(server_run_command(env=env))


def test_allowed_variables_with_odd_values_are_refused() -> None:
    env = {**borg.client_env(encrypted=True), "BORG_PASSPHRASE_FD": "3"}
    assert "BORG_PASSPHRASE_FD='3' is not allowed" in refusal(server_run_command(env=env))


@pytest.mark.parametrize(
    ("paths", "shown"),
    [
        (("/root",), "'/root'"),
        (("/etc", "/var/lib/secret"), "'/var/lib/secret'"),
        (("/etcetera",), "'/etcetera'"),
        (("/etc/../root",), "contains '..'"),
        (("relative",), "not an absolute path"),
    ],
)
def test_paths_outside_the_policy_are_refused(paths: tuple[str, ...], shown: str) -> None:
    assert shown in refusal(server_run_command(paths=paths))


def test_a_policy_path_that_is_itself_a_symlink_still_works(tmp_path: Path) -> None:
    real = tmp_path / "usr-home"
    (real / "u").mkdir(parents=True)
    (tmp_path / "home").symlink_to(real)
    request = gk.parse_request(server_run_command(paths=(f"{tmp_path}/home/u",)))
    assert isinstance(request, gk.RunRequest)
    gk.check_run(request, policy(paths=(f"{tmp_path}/home",)), HOME)


def test_a_symlink_inside_the_policy_pointing_outside_is_refused(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link").symlink_to("/root")
    reason = refusal(server_run_command(paths=(f"{allowed}/link",)), policy(paths=(str(allowed),)))
    assert "is outside the policy's paths" in reason


@pytest.mark.parametrize(
    "socket",
    [
        "/run/docker.sock",
        "~/.cache/other/web1.sock",
        "~/.cache/borgtunnel/sub/web1.sock",
        "~/.cache/borgtunnel/web1.pid",
        "~/.cache/borgtunnel/.hidden.sock",
        "/home/u/.cache/borgtunnel/../../.ssh/x.sock",
        # normpath would fold these into the socket_dir; the kernel follows "link/.." instead.
        "~/.cache/borgtunnel/link/../web1.sock",
        "~/.cache/borgtunnel/./web1.sock",
    ],
)
def test_other_socket_paths_are_refused(socket: str) -> None:
    assert "not a *.sock in the policy's socket_dir" in refusal(server_run_command(socket=socket))


def test_cleanup_never_signals_a_pid_no_run_recorded(tmp_path: Path) -> None:
    sock = f"{tmp_path}/web1.sock"
    pol = policy(socket_dir=str(tmp_path))
    request = gk.parse_request(cleanup_command(1, sock))
    assert isinstance(request, gk.CleanupRequest)
    assert gk.check_cleanup(request, pol, HOME) is None  # pid 1 is not signalled
    (tmp_path / "web1.sock.pid").write_text("100 1\n")
    assert gk.check_cleanup(request, pol, HOME) == 1  # recorded by a run: it may be signalled
    assert "not a *.sock" in refusal(remove_command("/etc/passwd"), pol)
    assert "not a *.sock" in refusal(cleanup_command(1, "/run/docker.sock"), pol)


def test_restore_is_refused_unless_the_policy_allows_it_into_that_target(
    tmp_path: Path,
) -> None:
    target = tmp_path / "restore" / "today"
    command = restore_command(target, "extract")
    assert "restore is not allowed" in refusal(command)
    assert f"restore target '{target}' is outside" in refusal(
        command, policy(restore=True, restore_targets=("/srv/elsewhere",))
    )
    request = gk.parse_request(command)
    assert isinstance(request, gk.RestoreRequest)
    allowed = policy(restore=True, restore_targets=(str(tmp_path / "restore"),))
    assert "is not a directory" in refusal(command, allowed)
    target.mkdir(parents=True)
    assert gk.check_restore(request, allowed, HOME) == "/home/u/.cache/borgtunnel/web1.sock"
    assert request.call.paths == ("etc/hosts",)


# --- the policy file -------------------------------------------------------------------------


def test_policy_file_is_read_with_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "gatekeeper.conf"
    conf.write_text("[gatekeeper]\npaths =\n    /etc\n    /home/\nborg = /usr/bin/borg\n")

    loaded = gk.load_policy(str(conf))

    assert loaded.paths == ("/etc", "/home")
    assert loaded.socket_dir == "~/.cache/borgtunnel"
    assert loaded.borg == "/usr/bin/borg"
    assert loaded.restore is False


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "No such file"),
        ("paths = /etc\n", "File contains no section headers"),
        ("[gatekeeper]\n", "at least one path"),
        ("[gatekeeper]\npaths = etc\n", "'etc' is not absolute"),
        ("[gatekeeper]\npaths = /etc\nrestore = maybe\n", "restore: must be yes or no"),
        ("[gatekeeper]\npaths = /etc\nrestor = yes\n", "unknown key(s) restor"),
    ],
)
def test_a_broken_policy_refuses_everything(tmp_path: Path, text: str | None, reason: str) -> None:
    conf = tmp_path / "gatekeeper.conf"
    if text is not None:
        conf.write_text(text)
    with pytest.raises(gk.RefusedError) as caught:
        gk.load_policy(str(conf))
    assert reason in caught.value.reason
    assert caught.value.code == gk.EXIT_POLICY


# --- splitting agrees with sh ----------------------------------------------------------------

words = st.lists(st.text(st.characters(exclude_characters="\0"), max_size=12), max_size=6)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(words)
def test_split_command_reads_back_exactly_what_shlex_join_wrote(argv: list[str]) -> None:
    if not argv:
        return
    assert gk.split_command(shlex.join(argv)) == [argv]


def test_split_command_separates_commands_only_on_a_bare_semicolon() -> None:
    assert gk.split_command("a ';' b; c\\ d \"e;f\"") == [["a", ";", "b"], ["c d", "e;f"]]


# --- the program itself, run as sshd would run it (no sshd needed for these) ----------------


def _run_gatekeeper(
    tmp_path: Path, command: str, stdin: bytes, borg_path: str
) -> subprocess.CompletedProcess[bytes]:
    sock_dir = tmp_path / "socks"
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    conf = tmp_path / "gatekeeper.conf"
    conf.write_text(f"[gatekeeper]\npaths = {data}\nsocket_dir = {sock_dir}\nborg = {borg_path}\n")
    return subprocess.run(
        [sys.executable, gk.__file__, "--policy", str(conf)],
        input=stdin,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SSH_ORIGINAL_COMMAND": command},
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_without_go_nothing_runs_and_the_pid_file_is_removed(tmp_path: Path) -> None:
    marker = tmp_path / "borg-ran"
    fake = tmp_path / "borg"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    command = server_run_command(socket=f"{tmp_path}/socks/c1.sock", paths=(f"{tmp_path}/data",))

    result = _run_gatekeeper(tmp_path, command, b"", str(fake))

    assert result.returncode == gk.EXIT_NO_GO
    assert result.stderr.decode().startswith(f"borgtunnel-ready nc {tmp_path}/socks/c1.sock\n")
    assert not marker.exists()
    assert list((tmp_path / "socks").iterdir()) == []


def test_a_missing_borg_is_named_and_leaves_nothing(tmp_path: Path) -> None:
    command = server_run_command(socket=f"{tmp_path}/socks/c1.sock", paths=(f"{tmp_path}/data",))

    result = _run_gatekeeper(tmp_path, command, b"go\n", "/nonexistent/borg")

    assert result.returncode == 127
    assert b"cannot run /nonexistent/borg: No such file or directory" in result.stderr
    assert list((tmp_path / "socks").iterdir()) == []


def test_the_passphrase_after_go_reaches_borg_on_stdin(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    fake = tmp_path / "borg"
    fake.write_text(f'#!/bin/sh\ncat > {seen}\nprintf "%s\\n" "$@" "$BORG_RSH" >> {seen}\n')
    fake.chmod(0o755)
    command = server_run_command(socket=f"{tmp_path}/socks/c1.sock", paths=(f"{tmp_path}/data",))

    result = _run_gatekeeper(tmp_path, command, b"go\nsecret words", str(fake))

    assert result.returncode == 0, result.stderr
    lines = seen.read_text().splitlines()
    assert lines[0] == "secret words" + "create"  # cat saw the passphrase (no newline), then argv
    assert lines[-1] == gk.RSH_BY_TOOL["nc"]
    assert "borgtunnel-pid " in result.stderr.decode()
    assert list((tmp_path / "socks").iterdir()) == []


def test_the_gatekeepers_borg_rsh_is_the_servers() -> None:
    """Kept in sync by this test: the gatekeeper cannot import borgtunnel on the client."""
    assert dict(borg.RSH_BY_TOOL) == gk.RSH_BY_TOOL
    assert frozenset(gk.SOCAT_UNSAFE) == borg.SOCAT_UNSAFE


# No lone surrogates: a TOML file cannot hold one, so no configured value ever has one.
hostile = st.text(
    st.one_of(
        st.sampled_from(list("$`'\"\\;&|<>(){}[]*?~#!\n\t -=:ü")),
        st.characters(codec="utf-8"),
    ),
    min_size=1,
    max_size=10,
).filter(lambda v: "\0" not in v)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    paths=st.lists(hostile, min_size=1, max_size=3),
    exclude=st.lists(hostile, max_size=3),
    archive=hostile.filter(lambda v: "/" not in v),
    socket=hostile.filter(lambda v: "/" not in v),
)
def test_the_gatekeeper_reads_back_exactly_the_servers_values(
    paths: list[str], exclude: list[str], archive: str, socket: str
) -> None:
    absolute = tuple(f"/srv/{p}" for p in paths)
    command = server_run_command(
        socket=f"~/.cache/borgtunnel/{socket}",
        paths=absolute,
        exclude=tuple(exclude),
        extra=(),
        archive=archive,
    )

    request = gk.parse_request(command)

    assert isinstance(request, gk.RunRequest)
    assert request.socket == f"~/.cache/borgtunnel/{socket}"
    assert request.call.paths == absolute
    assert request.call.archive == archive
    assert request.call.options == (
        "--log-json",
        "--progress",
        "--json",
        "--show-version",
        *(f"--exclude={pattern}" for pattern in exclude),
    )


def test_the_gatekeepers_envelope_is_the_servers() -> None:
    """The gatekeeper keeps its own copy of remote.py's decoder (it imports nothing)."""
    for command in (remove_command("/x.sock"), cleanup_command(1, "/x.sock"), server_run_command()):
        assert command.startswith(gk.DECODER_HEAD)
        assert command.endswith(gk.DECODER_TAIL)
