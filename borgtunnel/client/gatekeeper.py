#!/usr/bin/python3
"""borgtunnel-gatekeeper: the forced command a borgtunnel client puts on the server's key.

Without it, the backup server's SSH key can run any command on the client (often as root): a
compromised server owns every client. With it (``command="/usr/local/bin/borgtunnel-gatekeeper"``
in ``authorized_keys``), the key can only do what a pull needs:

- ``run``: prepare the socket directory, report ``borgtunnel-ready TOOL PATH``, wait for ``go``,
  run ``borg create`` to the forwarded socket (passphrase from stdin), remove its socket; with
  sources, only those the policy lists, each dump built and run here into a FIFO borg reads;
- ``cleanup``: stop a borg create left by an abandoned run (only a pid recorded in one of our
  pid files) and remove our own socket and pid file;
- ``doctor``: print versions and this policy, probe the reverse forward;
- ``restore``: only if the policy says so, into an allowed directory: ``borg export-tar`` streams
  the archive and the gatekeeper writes the files itself, refusing any that would land outside
  the target (see the restore block below).

The server's command is NOT run. The gatekeeper reads ``SSH_ORIGINAL_COMMAND``: the server's
fixed decoder around one base64 payload (borgtunnel/client/remote.py ``encoded_command``, which
keeps every login shell out of the quoting). It decodes the payload to ``# KIND``, ``set -- ARGS``
and a script, splits ARGS the way sh would (refusing any shell syntax beyond quoting), ignores
the script, and takes only the data from ARGS: the socket path, the environment assignments,
the borg options, repository, archive and paths. Each is checked against the
client's policy file; borg's argv, ``BORG_RSH`` and the environment are built here. Anything
else is refused with a one-line reason on stderr, logged through ``logger`` (syslog/journal).

Standalone: Python 3 standard library only, no borgtunnel import, installable as one file
(``borgtunnel gatekeeper > /usr/local/bin/borgtunnel-gatekeeper``). Policy file, default
``/etc/borgtunnel/gatekeeper.conf`` (``--policy PATH`` in the forced command overrides it)::

    [gatekeeper]
    # paths that may be backed up (one per line); anything below them too
    paths =
        /etc
        /home
    # the directory of the forwarded socket (the server's remote_socket must be in it)
    socket_dir = ~/.cache/borgtunnel
    # which borg runs (the server's remote_borg is ignored)
    borg = /usr/bin/borg
    # restores from the server: off unless enabled, and only into these directories
    restore = no
    restore_targets =
        /var/restore
    # device nodes, FIFOs, setuid/setgid files and file capabilities in a restore (else refused)
    restore_special = no
    # every pull from a filesystem snapshot (no, btrfs, lvm), run by the installed snapshot
    # script (SNAPSHOT_SCRIPT); snapshot_fallback and lvm_snapshot_size as on the server
    snapshot = no

    # sources the server may name in a pull (docs/sources.md); the gatekeeper runs these
    # commands itself, built from these settings: the server only names them
    [source app]
    type = postgresql
    database = app
"""

from __future__ import annotations

import argparse
import base64
import configparser
import contextlib
import dataclasses
import errno
import io
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import IO, Union

VERSION = "1"
DEFAULT_POLICY = "/etc/borgtunnel/gatekeeper.conf"
LOG_TAG = "borgtunnel-gatekeeper"

# Exit codes: the same meanings as the server's run script (borgtunnel/client/remote.py RunExit), so
# the server reports a gatekeeper's preparation failure exactly like the script's.
EXIT_SYMLINK = 65
EXIT_MKDIR_FAILED = 66
EXIT_NOT_OWNER = 67
EXIT_NOT_A_SOCKET = 68
EXIT_NO_TOOL = 69
EXIT_SHARED_DIR = 70
EXIT_TOO_LONG = 71
EXIT_NO_GO = 72
EXIT_UNSAFE_ANCESTOR = 73
EXIT_REFUSED = 77  # EX_NOPERM: the request is not allowed
EXIT_POLICY = 78  # EX_CONFIG: the policy file is missing or broken

MAX_SOCKET_PATH = 100
URL_PREFIX = "ssh://borgtunnel/"
# The BORG_RSH we build: the socket path comes from the environment, never quoted into text.
RSH_BY_TOOL = {
    "nc": "sh -c 'exec nc -N -U \"$BORGTUNNEL_SOCKET\"'",
    "socat": "sh -c 'exec socat STDIO \"UNIX-CONNECT:$BORGTUNNEL_SOCKET\"'",
}
SOCAT_UNSAFE = frozenset(",:!\\'\"(){}[]<>\n")
# The server's snapshot run script (borgtunnel/client/snapshot.py SNAPSHOT_PRELUDE + the run
# script), put here by ``borgtunnel gatekeeper`` when it prints this program: the gatekeeper
# runs this copy, installed and reviewable on the client, never the script a request carries.
SNAPSHOT_SCRIPT = ""  # filled in by `borgtunnel gatekeeper` (borgtunnel/ssh/enrol.py)
SNAPSHOT_KINDS = ("btrfs", "lvm")
# As the server's config checks them (config/model.py CLIENT_NAME_RE, LVM_SIZE_RE).
CLIENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LVM_SIZE_RE = re.compile(
    r"[1-9][0-9]{0,15}(\.[0-9]{1,6})?[bBsSkKmMgGtTpPeE]?|[1-9][0-9]{0,2}%(ORIGIN|VG|FREE|PVS)"
)

# --- requests ------------------------------------------------------------------------------


class RefusedError(Exception):
    """The request is not allowed; ``str()`` is the one-line reason."""

    def __init__(self, reason: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class BorgCall:
    """What the server asked borg to do, as data: options, repository, archive, paths."""

    env: Mapping[str, str]
    program: tuple[str, ...]  # the server's remote_borg words: logged, never run
    options: tuple[str, ...]  # normalised to --name=value / --flag words
    repository: str
    archive: str
    paths: tuple[str, ...]
    pattern_files: tuple[str, ...] = ()  # --patterns-from FILE (may hold R roots)
    pattern_roots: tuple[str, ...] = ()  # the R roots of --pattern values
    exclude_files: tuple[str, ...] = ()  # --exclude-from FILE (exclude patterns only)
    # borg 2's form: ``--repo=URL`` among the options, the archive as the first word after
    # ``--`` (borg 2 has no REPO::ARCHIVE).
    borg2: bool = False


@dataclass(frozen=True)
class SnapshotAsk:
    """What a snapshot run's arguments say: KIND CLIENT LVM_SIZE FALLBACK N PATH…"""

    kind: str
    client: str
    lvm_size: str
    fallback: bool
    paths: tuple[str, ...]


@dataclass(frozen=True)
class RunRequest:
    socket: str
    call: BorgCall
    kind: str = "run"
    # A run with sources: the server's dump jobs, to be matched against the policy's.
    jobs: tuple[SourceJob, ...] = ()
    # A run with a snapshot: the server's settings, to be matched against the policy's.
    snapshot: SnapshotAsk | None = None


@dataclass(frozen=True)
class RestoreRequest:
    socket: str
    target: str
    call: BorgCall
    # extract (the target must be empty), force, or dry-run (borg's --dry-run is in the call)
    mode: str = "extract"
    kind: str = "restore"


@dataclass(frozen=True)
class CleanupRequest:
    pid: int | None
    paths: tuple[str, ...]
    kind: str = "cleanup"


@dataclass(frozen=True)
class DoctorRequest:
    socket: str
    kind: str = "doctor"


# typing.Union, not |: the gatekeeper must also run on clients with Python < 3.10.
Request = Union[RunRequest, RestoreRequest, CleanupRequest, DoctorRequest]  # noqa: UP007

# --- splitting the command the way sh would ------------------------------------------------

# Unquoted, these mean something to sh beyond a plain word; shlex.join never leaves them bare.
_SHELL_SYNTAX = frozenset("|&<>()$`*?[]#~{}!^\n")
_DOUBLE_QUOTE_ESCAPES = frozenset('$`"\\\n')


class _Splitter:
    """POSIX sh word splitting for the subset a quoting function produces: words, '…', "…",
    backslash escapes and ``;`` between commands. Anything that would expand or redirect is
    refused: the gatekeeper only accepts requests whose meaning does not depend on a shell."""

    def __init__(self, text: str, *, one_line: bool = False) -> None:
        self.text = text
        self.one_line = one_line  # stop at the first unquoted newline; no ';' allowed
        self.pos = 0
        self.commands: list[list[str]] = [[]]
        self.word: list[str] = []
        self.in_word = False

    def split(self) -> list[list[str]]:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\n;":
                if self._separator(char):
                    return self.commands
            elif char == "'":
                self._single_quoted()
            elif char == '"':
                self._double_quoted()
            elif char == "\\":
                self._escaped()
            elif char in _SHELL_SYNTAX:
                raise RefusedError(f"shell syntax {char!r} in the command")
            else:
                self._add(char)
                self.pos += 1
        self._end_word()
        if self.one_line:
            return self.commands
        if not self.commands[-1]:
            self.commands.pop()  # a trailing ';'
        if not self.commands:
            raise RefusedError("empty command")
        return self.commands

    def _separator(self, char: str) -> bool:
        """Blank, newline or ';'; True when the split ends here (one_line's newline)."""
        if (char == "\n" and not self.one_line) or (char == ";" and self.one_line):
            raise RefusedError(f"shell syntax {char!r} in the command")
        self._end_word()
        self.pos += 1
        if char == "\n":
            return True
        if char == ";":
            if not self.commands[-1]:
                raise RefusedError("empty command before ';'")
            self.commands.append([])
        return False

    def _add(self, text: str) -> None:
        self.word.append(text)
        self.in_word = True

    def _end_word(self) -> None:
        if self.in_word:
            self.commands[-1].append("".join(self.word))
        self.word = []
        self.in_word = False

    def _single_quoted(self) -> None:
        end = self.text.find("'", self.pos + 1)
        if end < 0:
            raise RefusedError("unterminated single quote")
        self._add(self.text[self.pos + 1 : end])
        self.pos = end + 1

    def _double_quoted(self) -> None:
        self._add("")
        self.pos += 1
        while True:
            if self.pos >= len(self.text):
                raise RefusedError("unterminated double quote")
            char = self.text[self.pos]
            following = self.text[self.pos + 1 : self.pos + 2]
            if char == '"':
                self.pos += 1
                return
            if char == "\\" and following and following in _DOUBLE_QUOTE_ESCAPES:
                if following != "\n":
                    self._add(following)
                self.pos += 2
                continue
            if char in "$`":
                raise RefusedError(f"shell expansion {char!r} in the command")
            self._add(char)
            self.pos += 1

    def _escaped(self) -> None:
        following = self.text[self.pos + 1 : self.pos + 2]
        if not following:
            raise RefusedError("trailing backslash in the command")
        if following != "\n":  # backslash-newline is a line continuation
            self._add(following)
        self.pos += 2


def split_command(text: str) -> list[list[str]]:
    """The commands (lists of words) of a ``;``-separated command line, as sh would split it."""
    return _Splitter(text).split()


# --- parsing: the one place that knows the server's command shapes -------------------------

_ENV_ALLOWED: Mapping[str, re.Pattern[str]] = {
    "PYTHONUTF8": re.compile(r"[01]"),
    "LANG": re.compile(r"[A-Za-z0-9_.@-]{1,64}"),
    "LC_ALL": re.compile(r"[A-Za-z0-9_.@-]{1,64}"),
    "LC_CTYPE": re.compile(r"[A-Za-z0-9_.@-]{1,64}"),
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": re.compile(r"yes|no"),
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": re.compile(r"yes|no"),
    "BORG_HOSTNAME_IS_UNIQUE": re.compile(r"yes|no"),
    "BORG_EXIT_CODES": re.compile(r"legacy|modern"),
    "BORG_PASSPHRASE_FD": re.compile(r"0"),
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# borg create/extract options a pull may use. "flag" takes no value, "value" one, "exclude" an
# exclude pattern, "pattern" a pattern line (parsed as borg does: an R root is a path to check),
# "patterns-file"/"exclude-file" a file of those (in the policy's paths, read and checked here,
# handed to borg as a private copy), "tag-name" a plain file name (borg joins it to each
# directory and, with --keep-exclude-tags, backs up what it names: "/etc/shadow" or
# "../../root" would be read from outside every root). Names must match exactly: the
# gatekeeper writes each option back as --NAME=VALUE, so borg's own prefix matching (--pat,
# --patterns-fr) never applies.
# Everything else is refused — --rsh, --remote-path, --paths-from-command,
# --content-from-command, --paths-from-stdin, --read-special (reads devices and FIFOs),
# --timestamp (its reference-file form stats any path), ...
_COMMON_FLAGS = [
    "--log-json",
    "--progress",
    "--list",
    "--dry-run",
    "-n",
    "--numeric-ids",
    "--numeric-owner",
    "--noflags",
    "--nobsdflags",
    "--noacls",
    "--noxattrs",
    "--sparse",
    "--info",
    "-v",
    "--verbose",
    "--warning",
    "--error",
    "--critical",
    "--debug",
    "--show-rc",
    "--show-version",
    "--iec",
]
_CREATE_OPTIONS: Mapping[str, str] = {
    **dict.fromkeys(_COMMON_FLAGS, "flag"),
    **dict.fromkeys(
        [
            "--json",
            "--stats",
            "-s",
            "--one-file-system",
            "-x",
            "--exclude-caches",
            "--keep-exclude-tags",
            "--noatime",
            "--noctime",
            "--nobirthtime",
        ],
        "flag",
    ),
    **dict.fromkeys(
        [
            "--compression",
            "-C",
            "--comment",
            "--checkpoint-interval",
            "-c",
            "--chunker-params",
            "--files-cache",
            "--lock-wait",
            "--upload-ratelimit",
            "--upload-buffer",
            "--filter",
            "--debug-topic",
        ],
        "value",
    ),
    "--exclude-if-present": "tag-name",
    **dict.fromkeys(["--exclude", "-e"], "exclude"),
    "--pattern": "pattern",
    "--patterns-from": "patterns-file",
    "--exclude-from": "exclude-file",
}
_EXTRACT_OPTIONS: Mapping[str, str] = {
    **dict.fromkeys(_COMMON_FLAGS, "flag"),
    **dict.fromkeys(["--strip-components", "--lock-wait", "--debug-topic"], "value"),
    **dict.fromkeys(["--exclude", "-e"], "exclude"),
    "--pattern": "pattern",
}
_SHORT_ALIASES = {"-e": "--exclude", "-C": "--compression", "-c": "--checkpoint-interval"}


# The server's command line: this decoder around one base64 payload, exactly as
# borgtunnel/client/remote.py writes it (a test keeps the two in sync).
DECODER_HEAD = (
    "sh -c 'command -v base64 >/dev/null 2>&1 || "
    '{ echo "borgtunnel: the client has no base64 (coreutils); install it" >&2; exit 74; }; '
    "c=$(printf %s "
)
DECODER_TAIL = ' | base64 -d) && eval "$c"\''
_PAYLOAD = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_SET_LINE = "set -- "


def decode_command(command: str) -> tuple[str, list[str]]:
    """The server's command -> (kind, ARGS): what ``# KIND`` and ``set -- ARGS`` say."""
    if not (command.startswith(DECODER_HEAD) and command.endswith(DECODER_TAIL)):
        raise RefusedError(f"not a borgtunnel request: {_show(command, 120)}")
    payload = command[len(DECODER_HEAD) : len(command) - len(DECODER_TAIL)]
    if not _PAYLOAD.fullmatch(payload):
        raise RefusedError("not a borgtunnel request: the payload is not base64")
    try:
        program = base64.b64decode(payload, validate=True).decode("utf-8", "surrogateescape")
    except ValueError:
        raise RefusedError("not a borgtunnel request: the payload is not base64") from None
    header, _, rest = program.partition("\n")
    if not header.startswith("# ") or not rest.startswith(_SET_LINE):
        raise RefusedError("not a borgtunnel request: no '# KIND' and 'set --' lines")
    (args,) = _Splitter(rest[len(_SET_LINE) :], one_line=True).split()
    return header[2:], args


def parse_request(command: str) -> Request:
    """``SSH_ORIGINAL_COMMAND`` -> a request, by its kind and the positions of its ARGS.

    Kinds and ARGS (borgtunnel/client/remote.py builds them; only this data is used):

    - ``borgtunnel-run``: SOCKET RSH_NC RSH_SOCAT [env K=V…] BORG… create ARGS, where ARGS end
      in ``-- ssh://borgtunnel/REPO::ARCHIVE PATH…`` (borg 1.x) or, for borg 2, carry
      ``--repo=ssh://borgtunnel/REPO`` and end in ``-- ARCHIVE PATH…``
    - ``borgtunnel-run-sources``: the same with the sources block (parse_sources_block) after
      RSH_SOCAT; the jobs are matched against the policy's (check_jobs)
    - ``borgtunnel-run-snapshot``: KIND CLIENT LVM_SIZE FALLBACK N PATH… before a plain run's
      ARGS; matched against the policy's snapshot settings (check_snapshot)
    - ``borgtunnel-restore``: SOCKET RSH_NC RSH_SOCAT [env K=V…] sh -c SCRIPT
      borgtunnel-restore TARGET MODE BORG… extract ARGS
    - ``borgtunnel-cleanup``: PID-or-empty SOCKET SOCKET.pid
    - ``borgtunnel-remove``: PATH…
    - ``borgtunnel-doctor``: SOCKET [BORG…]

    The scripts are ignored: they are never run, and they may change with the server's version.
    """
    kind, args = decode_command(command)
    if kind == "borgtunnel-restore-load":
        raise RefusedError(
            "loading a dump into a database is not done through the gatekeeper (it would run "
            "a loader the policy does not list); restore the dump's file with --source and "
            "--target, then load it on the client"
        )
    run_parser = _RUN_PARSERS.get(kind)
    if run_parser is not None and len(args) >= 4:
        return run_parser(args)
    if kind == "borgtunnel-restore" and len(args) >= 4:
        return _parse_restore(args)
    if kind == "borgtunnel-cleanup" and len(args) == 3 and (not args[0] or args[0].isdigit()):
        return CleanupRequest(pid=int(args[0]) if args[0] else None, paths=tuple(args[1:]))
    if kind == "borgtunnel-remove" and args:
        return CleanupRequest(pid=None, paths=tuple(args))
    if kind == "borgtunnel-doctor" and args:
        return DoctorRequest(socket=args[0])
    raise RefusedError(f"not a borgtunnel request: {_show(kind, 60)} {_show(' '.join(args), 80)}")


def _parse_run(args: Sequence[str]) -> RunRequest:
    socket, _rsh_nc, _rsh_socat, *rest = args
    return RunRequest(socket=socket, call=_parse_borg(rest, "create", _CREATE_OPTIONS))


def _parse_snapshot_run(args: Sequence[str]) -> RunRequest:
    """``KIND CLIENT LVM_SIZE FALLBACK N PATH…`` (client/snapshot.py), then a plain run's."""
    if len(args) < 5 or not args[4].isdigit() or len(args[4]) > 4:
        raise RefusedError("a snapshot run: bad snapshot arguments")
    kind, client, size, fallback, count = args[:5]
    rest = list(args[5:])
    if len(rest) < int(count) + 4 or fallback not in {"0", "1"}:
        raise RefusedError("a snapshot run: the snapshot arguments are cut short")
    paths, rest = rest[: int(count)], rest[int(count) :]
    socket, _rsh_nc, _rsh_socat, *words = rest
    ask = SnapshotAsk(kind, client, size, fallback == "1", tuple(paths))
    call = _parse_borg(words, "create", _CREATE_OPTIONS)
    return RunRequest(socket=socket, call=call, snapshot=ask)


def _parse_sources_run(args: Sequence[str]) -> RunRequest:
    """``SOCKET RSH_NC RSH_SOCAT`` + the sources block + borg create with ``--read-special
    --exclude-from=borgtunnel-special-files`` and ``borgtunnel-sources`` as its last path."""
    socket, _rsh_nc, _rsh_socat, *rest = args
    jobs, words = parse_sources_block(rest)
    call = _parse_borg(without_source_options(words), "create", _CREATE_OPTIONS)
    if not call.paths or call.paths[-1] != SOURCES_DIR:
        raise RefusedError(f"a run with sources must end its paths with {SOURCES_DIR!r}")
    return RunRequest(socket=socket, call=replace(call, paths=call.paths[:-1]), jobs=tuple(jobs))


_RUN_PARSERS: Mapping[str, Callable[[Sequence[str]], RunRequest]] = {
    "borgtunnel-run": _parse_run,
    "borgtunnel-run-sources": _parse_sources_run,
    "borgtunnel-run-snapshot": _parse_snapshot_run,
}


def _parse_restore(args: Sequence[str]) -> RestoreRequest:
    socket, _rsh_nc, _rsh_socat, *rest = args
    env: list[str] = []
    if rest and rest[0] == "env":
        env.append(rest.pop(0))
        while rest and "=" in rest[0] and _ENV_NAME.fullmatch(rest[0].partition("=")[0]):
            env.append(rest.pop(0))
    if len(rest) < 6 or rest[:2] != ["sh", "-c"] or rest[3] != "borgtunnel-restore":
        raise RefusedError("not a borgtunnel restore request")
    target, mode = rest[4], rest[5]
    if mode not in {"extract", "force", "dry-run"}:
        raise RefusedError(f"unknown restore mode {_show(mode, 40)}")
    call = _parse_borg([*env, *rest[6:]], "extract", _EXTRACT_OPTIONS)
    return RestoreRequest(socket=socket, target=target, call=call, mode=mode)


def _parse_borg(words: Sequence[str], subcommand: str, allowed: Mapping[str, str]) -> BorgCall:
    """``[env K=V…] BORG… SUBCOMMAND OPTIONS -- ssh://borgtunnel/REPO::ARCHIVE PATH…``."""
    env: dict[str, str] = {}
    rest = list(words)
    if rest and rest[0] == "env":
        rest.pop(0)
        while rest and "=" in rest[0] and _ENV_NAME.fullmatch(rest[0].partition("=")[0]):
            name, _, value = rest.pop(0).partition("=")
            env[name] = value
    if subcommand not in rest:
        raise RefusedError(f"not a borg {subcommand} request")
    at = rest.index(subcommand)
    program, rest = tuple(rest[:at]), rest[at + 1 :]
    if not program:
        raise RefusedError(f"no borg program before {subcommand!r}")
    if "--" not in rest:
        raise RefusedError("borg arguments without '--' before the repository")
    at = rest.index("--")
    options, positional = rest[:at], rest[at + 1 :]
    repo_options = [word for word in options if word.startswith("--repo=")]
    options = [word for word in options if not word.startswith("--repo=")]
    parsed = _parse_options(options, allowed)
    if len(repo_options) > 1:
        raise RefusedError("more than one --repo")
    if not positional:
        raise RefusedError("no repository given" if not repo_options else "no archive given")
    if repo_options:  # borg 2: --repo=ssh://borgtunnel/REPO -- ARCHIVE PATH…
        location = repo_options[0].removeprefix("--repo=")
        archive, *paths = positional
        if not location.startswith(URL_PREFIX) or "::" in location:
            raise RefusedError(f"repository must be {URL_PREFIX}PATH, got {_show(location)}")
        repository = location[len(URL_PREFIX) - 1 :]
    else:
        location, *paths = positional
        if not location.startswith(URL_PREFIX) or "::" not in location:
            raise RefusedError(
                f"repository must be {URL_PREFIX}PATH::ARCHIVE, got {_show(location)}"
            )
        repository, _, archive = location[len(URL_PREFIX) - 1 :].partition("::")
    if not archive or "/" in archive:
        raise RefusedError(f"bad archive name {_show(archive)}")
    return BorgCall(
        env=env,
        program=program,
        options=tuple(parsed.options),
        repository=repository,
        archive=archive,
        paths=tuple(paths),
        pattern_files=tuple(parsed.pattern_files),
        pattern_roots=tuple(parsed.roots),
        exclude_files=tuple(parsed.exclude_files),
        borg2=bool(repo_options),
    )


@dataclass
class _Options:
    options: list[str]  # normalised: --name=value / --flag
    pattern_files: list[str]
    exclude_files: list[str]
    roots: list[str]  # the R roots of --pattern values


def _parse_options(words: Sequence[str], allowed: Mapping[str, str]) -> _Options:
    """Normalise and sort the options; refuse what is not allowed or not understood."""
    parsed = _Options([], [], [], [])
    todo = list(words)
    while todo:
        word = todo.pop(0)
        name, has_value, value = word.partition("=") if word.startswith("--") else (word, "", "")
        name = _SHORT_ALIASES.get(name, name)
        kind = allowed.get(name)
        if kind is None:
            raise RefusedError(f"borg option {_show(name)} is not allowed")
        if kind == "flag":
            if has_value:
                raise RefusedError(f"borg option {name} takes no value")
            parsed.options.append(name)
            continue
        if not has_value:
            if not todo:
                raise RefusedError(f"borg option {name} needs a value")
            value = todo.pop(0)
        if kind == "tag-name" and (value in {"", ".", ".."} or "/" in value):
            raise RefusedError(f"{name} {_show(value)} must be a plain file name")
        if kind == "exclude":
            check_selection_pattern(value, "fm", f"--exclude {_show(value)}")
        elif kind == "pattern":
            # borg reads a --pattern value as one pattern-file line, without stripping it.
            line = parse_pattern_line(value, f"--pattern {_show(value)}")
            if line.command == "R":
                parsed.roots.append(line.value)
        elif kind == "patterns-file":
            parsed.pattern_files.append(value)
        elif kind == "exclude-file":
            parsed.exclude_files.append(value)
        parsed.options.append(f"{name}={value}")
    return parsed


# --- borg's pattern language ---------------------------------------------------------------------
# The same in borg 1.2.4, 1.4.5 and 2.0.0b25 (src/borg/patterns.py parse_inclexcl_command,
# load_pattern_file; helpers clean_lines): the FIRST character is the command and the rest,
# with every leading whitespace character Python knows (str.lstrip: also \v, \f, \x1c-\x1f,
# \x85, U+00A0, U+2000…) removed, is its value. So "R/etc", "R.", "r/root" and "R\v/root" are all
# roots. A patterns file is read as text (universal newlines), each line stripped at both ends,
# empty lines and lines starting with "#" after stripping skipped; a --pattern value is not
# stripped. "P STYLE" changes how the following include/exclude lines of that file are read,
# never a root. tests/test_gatekeeper_patterns.py checks this parser against each borg's own.
PATTERN_COMMANDS = {"-": "-", "!": "!", "+": "+", "R": "R", "r": "R", "P": "P", "p": "P"}
PATTERN_STYLES = frozenset({"fm", "sh", "re", "pp", "pf"})
MAX_PATTERN_FILE = 1 << 20  # bytes; a pull's patterns file is a few KiB


@dataclass(frozen=True)
class PatternLine:
    command: str  # "-" exclude, "!" exclude (no recursion), "+" include, "R" root, "P" style
    value: str  # the root path, the style, or the include/exclude pattern


def parse_pattern_line(line: str, where: str, style: str = "sh") -> PatternLine:
    """One pattern line, as borg parses it (``style``: the one include/exclude lines without a
    prefix use); refuse what borg would not accept as well as what this gatekeeper cannot be
    sure borg reads the same way (see the block comment above)."""
    command = PATTERN_COMMANDS.get(line[:1])
    if command is None:
        raise RefusedError(f"{where}: a pattern must start with one of - ! + R r P p")
    # Borg strips Unicode whitespace; a non-ASCII one is the one kind of character a text
    # encoding other than ours could turn into something else (or nothing) before borg strips:
    # refused rather than guessed.
    if any(char.isspace() and not char.isascii() for char in line):
        raise RefusedError(f"{where}: non-ASCII whitespace in a pattern")
    value = line[1:].lstrip()
    if not value:
        raise RefusedError(f"{where}: a pattern needs a value after its command")
    if command == "P" and value not in PATTERN_STYLES:
        raise RefusedError(f"{where}: unknown pattern style {_show(value, 40)}")
    if command in "-!+":
        check_selection_pattern(value, style, where)
    return PatternLine(command, value)


def check_selection_pattern(pattern: str, style: str, where: str) -> None:
    """An include/exclude pattern borg accepts (patterns.py parse_pattern): a known STYLE:
    prefix, a regular expression that compiles. It selects within the roots, nothing more."""
    if len(pattern) > 2 and pattern[2] == ":" and pattern[:2].isalnum():
        style, pattern = pattern[:2], pattern[3:]
        if style not in PATTERN_STYLES:
            raise RefusedError(f"{where}: unknown pattern style {_show(style, 40)}")
    if style == "re":
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RefusedError(f"{where}: bad regular expression ({exc})") from None


def pattern_file_lines(text: str) -> list[str]:
    """borg's clean_lines over a text file: universal newlines, stripped, no empty or # lines."""
    lines = (line.strip() for line in io.StringIO(text, newline=None))
    return [line for line in lines if line and not line.startswith("#")]


def read_pattern_file(path: str, roots: Sequence[str], what: str) -> str:
    """The text of a patterns/exclude file in ``roots``: a regular file, read once, bounded,
    strict UTF-8 (borg runs with PYTHONUTF8=1 and reads the copy we hand it, not this path)."""
    check_path(path, roots, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise RefusedError(f"{what} {_show(path)}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RefusedError(f"{what} {_show(path)} is not a regular file")
        # What was opened, not what the name pointed to a moment earlier (a rename race).
        with contextlib.suppress(OSError):
            check_path(os.readlink(f"/proc/self/fd/{fd}"), roots, what)
        data = handle.read(MAX_PATTERN_FILE + 1)
    if len(data) > MAX_PATTERN_FILE:
        raise RefusedError(f"{what} {_show(path)} is larger than {MAX_PATTERN_FILE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RefusedError(f"{what} {_show(path)} is not UTF-8 text") from None


def pattern_file_roots(text: str, where: str) -> list[str]:
    """The R roots of a --patterns-from file; every line must parse."""
    roots = []
    style = "sh"  # borg's default in a patterns file; "P STYLE" changes it for what follows
    for text_line in pattern_file_lines(text):
        line = parse_pattern_line(text_line, where, style)
        if line.command == "R":
            roots.append(line.value)
        elif line.command == "P":
            style = line.value
    return roots


def check_exclude_file(text: str, where: str) -> None:
    """An --exclude-from file: each line an exclude pattern (fm: unless prefixed)."""
    for line in pattern_file_lines(text):
        check_selection_pattern(line, "fm", where)


def _show(text: str, limit: int = 240) -> str:
    """A value for a one-line message: repr (newlines and controls escaped), shortened."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


# --- sources: database dumps and commands the policy lists -----------------------------------
# The server may only NAME a source of this policy: a run with sources (``borgtunnel-run-sources``)
# carries the server's dump jobs (label, archive path, argv) for its own verification; each must
# be a job this policy's ``[source NAME]`` sections give, word for word, and the gatekeeper then
# runs ITS OWN argv. The jobs are built exactly as the server builds them
# (borgtunnel/client/sources.py, borgtunnel/config/sources.py's rules); tests/sourcecases.py holds
# both to one table, so a difference is a refusal naming the first differing word, never a guess.

SOURCES_MARK = "borgtunnel-sources"
SOURCES_DIR = "borgtunnel-sources"
SPECIAL_EXCLUDES = "borgtunnel-special-files"
SOURCE_OPTIONS = ("--read-special", f"--exclude-from={SPECIAL_EXCLUDES}")
EXIT_SOURCES = 75  # the run script's code for "the sources could not be prepared"
MAX_SOURCES = 32
MAX_JOBS = 256
MAX_ARGC = 256
# A dump still running this long after borg ended (stuck on a lock) is stopped.
DUMP_GRACE_SECONDS = 5.0
SOURCE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
DB_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.$-]{0,62}")
HOST_RE = re.compile(r"(?:/[^\0\n]{0,200}|[A-Za-z0-9_][A-Za-z0-9_.:-]{0,252})")
_SOURCE_KEYS = {
    "postgresql": frozenset({"type", "database", "user", "host", "port"}),
    "mariadb": frozenset({"type", "database", "defaults_file", "socket", "host", "port"}),
    "sqlite": frozenset({"type", "path"}),
    "command": frozenset({"type", "command"}),
}
# sqlite3 exits 0 even when .dump failed: the SQL must end in COMMIT (client/sources.py).
_SQLITE_DUMP = (
    'sqlite3 -readonly -bail -cmd ".timeout 600000" "$1" .dump | '
    "awk '{ print } END { exit $0 != \"COMMIT;\" }'"
)


@dataclass(frozen=True)
class SourceJob:
    """One dump program writing one file of the archive (``path`` relative, under SOURCES_DIR)."""

    label: str
    path: str
    argv: tuple[str, ...]


def _source_error(where: str, message: str) -> RefusedError:
    return RefusedError(f"policy {where}: {message}", EXIT_POLICY)


def _db_names(where: str, key: str, text: str) -> tuple[str, ...]:
    names = tuple(text.split())
    if not names:
        raise _source_error(where, f"{key}: names no database (one name, several, or all)")
    if "all" in names and len(names) > 1:
        raise _source_error(where, f"{key}: 'all' stands alone, not in a list")
    if len(set(names)) != len(names):
        raise _source_error(where, f"{key}: names a database twice")
    for name in names:
        if not DB_NAME_RE.fullmatch(name):
            raise _source_error(where, f"{key}: {name!r} is not a plain database name")
    return names


def _absolute_value(where: str, key: str, value: str) -> str:
    if not value.startswith("/") or "\n" in value or "\0" in value:
        raise _source_error(where, f"{key}: {value!r} must be an absolute path")
    return value


def _port_value(where: str, value: str) -> str:
    if not value.isdigit() or not 1 <= int(value) <= 65535 or value != str(int(value)):
        raise _source_error(where, f"port: {value!r} is not a port number (1-65535)")
    return value


def source_jobs(name: str, settings: Mapping[str, str], where: str) -> list[SourceJob]:
    """A ``[source NAME]`` section -> its dump jobs, with the server's argv (sources.py)."""
    if not SOURCE_NAME_RE.fullmatch(name):
        raise _source_error(where, f"{name!r} is not a source name (a-z, 0-9, '_', '-')")
    kind = settings.get("type", "").strip()
    if kind not in _SOURCE_KEYS:
        raise _source_error(where, f"type: must be one of {', '.join(sorted(_SOURCE_KEYS))}")
    unknown = sorted(set(settings) - _SOURCE_KEYS[kind])
    if unknown:
        raise _source_error(where, f"unknown key(s) for a {kind} source: {', '.join(unknown)}")
    values = {key: value.strip() for key, value in settings.items()}
    for key, value in values.items():
        if not value:
            raise _source_error(where, f"{key}: is empty")
    if kind == "postgresql":
        return _postgres_jobs(name, values, where)
    if kind == "mariadb":
        return [_source_job(kind, name, f"{name}.sql", _mariadb_argv(values, where))]
    if kind == "sqlite":
        path = _absolute_value(where, "path", values.get("path", ""))
        return [
            _source_job(kind, name, f"{name}.sql", ("sh", "-c", _SQLITE_DUMP, "sqlite-dump", path))
        ]
    try:
        command = tuple(shlex.split(values.get("command", ""), posix=True))
    except ValueError as exc:
        raise _source_error(where, f"command: {exc}") from None
    if not command or command[0].startswith("-"):
        raise _source_error(where, "command: must start with a program's name or path")
    return [_source_job(kind, name, name, command)]


def _source_job(kind: str, label: str, file: str, argv: Sequence[str]) -> SourceJob:
    return SourceJob(label=label, path=f"{SOURCES_DIR}/{kind}/{file}", argv=tuple(argv))


def _postgres_jobs(name: str, values: Mapping[str, str], where: str) -> list[SourceJob]:
    connection = ["--no-password"]
    if "user" in values:
        if not DB_NAME_RE.fullmatch(values["user"]):
            raise _source_error(where, f"user: {values['user']!r} is not a plain role name")
        connection.append(f"--username={values['user']}")
    if "host" in values:
        if not HOST_RE.fullmatch(values["host"]):
            raise _source_error(where, f"host: {values['host']!r} is not a host or socket dir")
        connection.append(f"--host={values['host']}")
    if "port" in values:
        connection.append(f"--port={_port_value(where, values['port'])}")
    databases = _db_names(where, "database", values.get("database", ""))
    dump = ("pg_dump", "--format=custom", "--compress=0", *connection)
    if databases == ("all",):
        return [_source_job("postgresql", name, f"{name}.sql", ("pg_dumpall", *connection))]
    if len(databases) == 1:
        argv = (*dump, f"--dbname={databases[0]}")
        return [_source_job("postgresql", name, f"{name}.dump", argv)]
    return [
        _source_job("postgresql", f"{name}/{db}", f"{name}/{db}.dump", (*dump, f"--dbname={db}"))
        for db in databases
    ]


def _mariadb_argv(values: Mapping[str, str], where: str) -> list[str]:
    argv = ["mariadb-dump"]
    if "defaults_file" in values:  # must come first (then the connection, as sources.py)
        argv.append(
            f"--defaults-file={_absolute_value(where, 'defaults_file', values['defaults_file'])}"
        )
    if "socket" in values:
        argv.append(f"--socket={_absolute_value(where, 'socket', values['socket'])}")
    if "host" in values:
        host = values["host"]
        if host.startswith("/") or not HOST_RE.fullmatch(host):
            raise _source_error(where, f"host: {host!r} is not a host name")
        argv.append(f"--host={host}")
    if "port" in values:
        argv.append(f"--port={_port_value(where, values['port'])}")
    argv += ["--single-transaction", "--routines", "--events", "--triggers"]
    databases = _db_names(where, "database", values.get("database", ""))
    if databases == ("all",):
        argv.append("--all-databases")
    else:
        argv += ["--databases", *databases]
    return argv


def parse_sources_block(words: Sequence[str]) -> tuple[list[SourceJob], list[str]]:
    """``borgtunnel-sources NPATHS PATH… NJOBS (LABEL RELPATH ARGC ARGV…)…`` then borg's
    words -> (the server's jobs, the rest). The PATHs are not used: the gatekeeper walks the
    checked paths itself."""
    rest = list(words)

    def number(what: str, limit: int) -> int:
        if not rest or not rest[0].isdigit() or len(rest[0]) > 4 or int(rest[0]) > limit:
            raise RefusedError(f"a run with sources: bad {what}")
        return int(rest.pop(0))

    if not rest or rest.pop(0) != SOURCES_MARK:
        raise RefusedError("a run with sources: no sources block")
    paths = number("path count", 1 << 12)
    if len(rest) < paths:
        raise RefusedError("a run with sources: the paths are cut short")
    del rest[:paths]
    jobs: list[SourceJob] = []
    for _ in range(number("job count", MAX_JOBS)):
        if len(rest) < 3:
            raise RefusedError("a run with sources: a job is cut short")
        label, path = rest.pop(0), rest.pop(0)
        argc = number("argument count", MAX_ARGC)
        if argc == 0 or len(rest) < argc:
            raise RefusedError(f"a run with sources: job {_show(label)} is cut short")
        jobs.append(SourceJob(label=label, path=path, argv=tuple(rest[:argc])))
        del rest[:argc]
    return jobs, rest


def without_source_options(words: Sequence[str]) -> list[str]:
    """borg's words without the two options a run with sources adds (the gatekeeper adds its
    own): only their exact spelling, only before ``--``; any other spelling stays, to be
    refused by the option rules."""
    end = words.index("--") if "--" in words else len(words)
    head = [word for word in words[:end] if word not in SOURCE_OPTIONS]
    return [*head, *words[end:]]


def check_jobs(requested: Sequence[SourceJob], policy: Policy) -> tuple[SourceJob, ...]:
    """Each job the server asks for must be one of the policy's, word for word: the server can
    only name a listed source, never choose a parameter. The policy's own jobs are returned."""
    if not requested:
        raise RefusedError("a run with sources names no source")
    allowed = {job.label: job for job in policy.source_jobs}
    chosen: list[SourceJob] = []
    for job in requested:
        mine = allowed.get(job.label)
        if mine is None:
            listed = ", ".join(sorted(allowed)) or "none"
            raise RefusedError(
                f"source {_show(job.label, 80)} is not in this client's policy (listed: {listed})"
            )
        if job.path != mine.path:
            raise RefusedError(
                f"source {job.label!r}: the server's archive path {_show(job.path, 120)} is not "
                f"the policy's {mine.path!r}"
            )
        if job.argv != mine.argv:
            shorter = min(len(job.argv), len(mine.argv))
            at = next((i for i in range(shorter) if job.argv[i] != mine.argv[i]), shorter)
            theirs = job.argv[at] if at < len(job.argv) else "(nothing)"
            ours = mine.argv[at] if at < len(mine.argv) else "(nothing)"
            raise RefusedError(
                f"source {job.label!r}: the server asks for {_show(theirs, 120)} where the "
                f"policy has {_show(ours, 120)} (word {at + 1} of the dump command); "
                "the server's sources must match the policy's"
            )
        if mine in chosen:
            raise RefusedError(f"source {job.label!r} is asked for twice")
        chosen.append(mine)
    return tuple(chosen)


# --- policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """The client's own rules. Defaults are the strict ones."""

    paths: tuple[str, ...]
    socket_dir: str = "~/.cache/borgtunnel"
    borg: str = "borg"
    restore: bool = False
    restore_targets: tuple[str, ...] = ()
    # device nodes, FIFOs, setuid/setgid files and file capabilities in a restore
    restore_special: bool = False
    source: str = ""
    # The dump jobs of the policy's [source NAME] sections, in the order the file gives them.
    source_jobs: tuple[SourceJob, ...] = ()
    # "btrfs" or "lvm": every pull reads a snapshot; "" none (a snapshot run is refused).
    snapshot: str = ""
    snapshot_fallback: bool = False
    lvm_snapshot_size: str = "10%ORIGIN"

    def summary(self) -> dict[str, object]:
        return {
            "policy": self.source,
            "paths": list(self.paths),
            "socket_dir": self.socket_dir,
            "borg": self.borg,
            "restore": self.restore,
            "restore_targets": list(self.restore_targets),
            "restore_special": self.restore_special,
            "sources": {job.label: list(job.argv) for job in self.source_jobs},
            "snapshot": self.snapshot or None,
        }


_POLICY_KEYS = frozenset(
    {
        "paths",
        "socket_dir",
        "borg",
        "restore",
        "restore_targets",
        "restore_special",
        "snapshot",
        "snapshot_fallback",
        "lvm_snapshot_size",
    }
)


def load_policy(path: str) -> Policy:
    """Read the policy; any problem is a refusal (fail closed), naming the file and key."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise RefusedError(f"policy {path}: {exc.strerror or exc}", EXIT_POLICY) from None
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise RefusedError(f"policy {path}: {first}", EXIT_POLICY) from None
    if not parser.has_section("gatekeeper"):
        raise RefusedError(f"policy {path}: no [gatekeeper] section", EXIT_POLICY)
    jobs = _policy_sources(parser, path)
    section = parser["gatekeeper"]
    unknown = sorted(set(section) - _POLICY_KEYS)
    if unknown:
        raise RefusedError(f"policy {path}: unknown key(s) {', '.join(unknown)}", EXIT_POLICY)
    paths = _policy_paths(path, "paths", section.get("paths", ""))
    if not paths:
        raise RefusedError(f"policy {path}: paths: at least one path is required", EXIT_POLICY)
    restore = _policy_bool(section, path, "restore")
    restore_special = _policy_bool(section, path, "restore_special")
    snapshot, snapshot_fallback, lvm_size = _policy_snapshot(section, path, paths)
    socket_dir = section.get("socket_dir", "~/.cache/borgtunnel").strip().rstrip("/")
    if not socket_dir.startswith(("/", "~/")):
        raise RefusedError(f"policy {path}: socket_dir: must be absolute or ~/…", EXIT_POLICY)
    return Policy(
        paths=paths,
        socket_dir=socket_dir,
        borg=section.get("borg", "borg").strip() or "borg",
        restore=restore,
        restore_targets=_policy_paths(path, "restore_targets", section.get("restore_targets", "")),
        restore_special=restore_special,
        source=path,
        source_jobs=jobs,
        snapshot=snapshot,
        snapshot_fallback=snapshot_fallback,
        lvm_snapshot_size=lvm_size,
    )


def _policy_bool(section: configparser.SectionProxy, path: str, key: str) -> bool:
    try:
        return section.getboolean(key, fallback=False)
    except ValueError:
        raise RefusedError(f"policy {path}: {key}: must be yes or no", EXIT_POLICY) from None


def _policy_snapshot(
    section: configparser.SectionProxy, path: str, paths: Sequence[str]
) -> tuple[str, bool, str]:
    snapshot = section.get("snapshot", "no").strip()
    if snapshot not in {"no", *SNAPSHOT_KINDS}:
        raise RefusedError(f"policy {path}: snapshot: must be no, btrfs or lvm", EXIT_POLICY)
    fallback = _policy_bool(section, path, "snapshot_fallback")
    size = section.get("lvm_snapshot_size", "10%ORIGIN").strip()
    if not LVM_SIZE_RE.fullmatch(size):
        raise RefusedError(
            f"policy {path}: lvm_snapshot_size: {size!r} is not a size ('1G') or a share "
            "('10%ORIGIN')",
            EXIT_POLICY,
        )
    if snapshot != "no" and "/" in paths:
        raise RefusedError(
            f"policy {path}: snapshot: '/' cannot be read from a snapshot; list the "
            "directories below it in paths",
            EXIT_POLICY,
        )
    return ("" if snapshot == "no" else snapshot), fallback, size


def _policy_sources(parser: configparser.ConfigParser, path: str) -> tuple[SourceJob, ...]:
    """``[source NAME]`` sections -> dump jobs; any other section is a mistake, refused."""
    jobs: list[SourceJob] = []
    names = []
    for section in parser.sections():
        if section == "gatekeeper":
            continue
        kind, _, name = section.partition(" ")
        if kind != "source" or not name.strip():
            raise RefusedError(
                f"policy {path}: unknown section [{section}] (only [gatekeeper] and [source NAME])",
                EXIT_POLICY,
            )
        names.append(name.strip())
        where = f"{path}: [source {name.strip()}]"
        jobs += source_jobs(name.strip(), dict(parser[section]), where)
    if len(names) > MAX_SOURCES:
        raise RefusedError(f"policy {path}: at most {MAX_SOURCES} sources", EXIT_POLICY)
    if len(set(names)) != len(names):
        raise RefusedError(f"policy {path}: two [source] sections have one name", EXIT_POLICY)
    return tuple(jobs)


def _policy_paths(source: str, key: str, text: str) -> tuple[str, ...]:
    paths = tuple(line.strip() for line in text.splitlines() if line.strip())
    for item in paths:
        if not item.startswith("/"):
            raise RefusedError(f"policy {source}: {key}: {item!r} is not absolute", EXIT_POLICY)
    return tuple(os.path.normpath(item) for item in paths)


# --- checking a request against the policy -------------------------------------------------


def expand_home(path: str, home: str) -> str:
    return home.rstrip("/") + "/" + path[2:] if path.startswith("~/") else path


def _within(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def check_path(path: str, roots: Sequence[str], what: str) -> None:
    """``path`` (as given and with symlinks resolved) lies in one of ``roots``."""
    if not path.startswith("/"):
        raise RefusedError(f"{what} {_show(path)} is not an absolute path")
    if "\0" in path or any(part == ".." for part in path.split("/")):
        raise RefusedError(f"{what} {_show(path)} contains '..'")
    given = os.path.normpath(path)
    # A policy path may itself be a symlink (/home -> /usr/home): compare resolved with resolved.
    resolved_roots = [*roots, *(os.path.realpath(root) for root in roots)]
    if not _within(given, roots) or not _within(os.path.realpath(given), resolved_roots):
        raise RefusedError(f"{what} {_show(path)} is outside the policy's paths")


def check_socket(path: str, policy: Policy, home: str) -> str:
    """The resolved socket path, if it is a ``*.sock`` directly in the policy's socket_dir."""
    resolved = expand_home(path, home)
    directory = os.path.normpath(expand_home(policy.socket_dir, home))
    parent, _, name = resolved.rpartition("/")
    # normpath is lexical: "DIR/link/../x.sock" would pass it and land where the link points.
    if (
        any(part in {".", ".."} for part in parent.split("/"))
        or os.path.normpath(parent or "/") != directory
        or not name.endswith(".sock")
        or name.startswith(".")
    ):
        raise RefusedError(
            f"socket {_show(path)} is not a *.sock in the policy's socket_dir {directory}"
        )
    return resolved


def check_env(env: Mapping[str, str]) -> None:
    for name, value in env.items():
        pattern = _ENV_ALLOWED.get(name)
        if pattern is None:
            raise RefusedError(f"environment variable {name} may not be set by the server")
        if not pattern.fullmatch(value):
            raise RefusedError(f"environment variable {name}={_show(value)} is not allowed")


def check_run(request: RunRequest, policy: Policy, home: str) -> str:
    """Refuse anything the policy does not allow; return the resolved socket path."""
    socket = check_socket(request.socket, policy, home)
    call = request.call
    check_env(call.env)
    if not call.paths:
        raise RefusedError("no paths to back up")
    for path in call.paths:
        check_path(path, policy.paths, "path")
    for path in call.pattern_roots:
        check_path(path, policy.paths, "pattern root")
    checked_pattern_files(call, policy)
    check_snapshot(request, policy)
    return socket


def check_snapshot(request: RunRequest, policy: Policy) -> None:
    """The policy decides whether every pull reads a snapshot; the server's settings must say
    the same (a server that leaves the snapshot out would get live files silently)."""
    ask = request.snapshot
    if ask is None:
        if policy.snapshot:
            raise RefusedError(
                f"this client's policy reads every pull from a {policy.snapshot} snapshot; "
                f'set snapshot = "{policy.snapshot}" for it on the server'
            )
        return
    if not policy.snapshot:
        raise RefusedError(
            f"the server asks for a {_show(ask.kind, 20)} snapshot; this client's policy takes "
            "none (snapshot = no)"
        )
    if ask.kind != policy.snapshot:
        raise RefusedError(
            f"the server asks for a {_show(ask.kind, 20)} snapshot; this client's policy says "
            f"snapshot = {policy.snapshot}"
        )
    if ask.fallback != policy.snapshot_fallback:
        yes_no = "yes" if policy.snapshot_fallback else "no"
        raise RefusedError(
            f"the server's snapshot_fallback differs from this client's policy "
            f"(snapshot_fallback = {yes_no})"
        )
    if ask.kind == "lvm" and ask.lvm_size != policy.lvm_snapshot_size:
        raise RefusedError(
            f"the server's lvm_snapshot_size {_show(ask.lvm_size, 40)} is not this client's "
            f"policy's {policy.lvm_snapshot_size!r}"
        )
    if not CLIENT_NAME_RE.fullmatch(ask.client):
        raise RefusedError(f"a snapshot run: bad client name {_show(ask.client, 80)}")
    if ask.paths != request.call.paths:
        raise RefusedError("a snapshot run: the snapshot's paths are not borg's paths")
    if not SNAPSHOT_SCRIPT:
        raise RefusedError(
            "this gatekeeper has no snapshot script: install the program "
            "`borgtunnel gatekeeper` prints"
        )


def checked_pattern_files(call: BorgCall, policy: Policy) -> dict[str, str]:
    """Each --patterns-from/--exclude-from file's text, read once and checked: every line of
    a patterns file parses and each of its R roots is in the policy's paths."""
    texts: dict[str, str] = {}
    for path in call.pattern_files:
        text = read_pattern_file(path, policy.paths, "patterns file")
        for root in pattern_file_roots(text, f"patterns file {_show(path)}"):
            check_path(root, policy.paths, f"pattern root in {path}")
        texts[path] = text
    for path in call.exclude_files:
        texts[path] = read_pattern_file(path, policy.paths, "exclude file")
        check_exclude_file(texts[path], f"exclude file {_show(path)}")
    return texts


@contextlib.contextmanager
def private_pattern_files(
    call: BorgCall, policy: Policy, texts: Mapping[str, str] | None = None
) -> Iterator[BorgCall]:
    """The call with each patterns/exclude file replaced by a private copy of the text checked
    here (or of ``texts``, checked_pattern_files' result): borg reads exactly what was checked,
    whatever happens to the original meanwhile."""
    if texts is None:
        texts = checked_pattern_files(call, policy)
    if not texts:
        yield call
        return
    try:
        directory = tempfile.mkdtemp(prefix="borgtunnel-gatekeeper-")  # 0700, a fresh name
    except OSError as exc:
        raise RefusedError(f"cannot copy the patterns files: {exc}") from None
    try:
        copies: dict[str, str] = {}
        for number, (path, text) in enumerate(texts.items()):
            copies[path] = os.path.join(directory, f"patterns-{number}")
            with open(copies[path], "x", encoding="utf-8", newline="") as handle:
                handle.write(text)
        options = []
        for option in call.options:
            name, _, value = option.partition("=")
            is_file = name in {"--patterns-from", "--exclude-from"}
            options.append(f"{name}={copies[value]}" if is_file else option)
        yield replace(call, options=tuple(options))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def check_restore(request: RestoreRequest, policy: Policy, home: str) -> str:
    if not policy.restore:
        raise RefusedError("restore is not allowed by this client's policy")
    socket = check_socket(request.socket, policy, home)
    check_env(request.call.env)
    check_path(request.target, policy.restore_targets, "restore target")
    if not os.path.isdir(request.target):
        raise RefusedError(f"restore target {_show(request.target)} is not a directory")
    if request.mode == "extract" and os.listdir(request.target):
        raise RefusedError(
            f"restore target {_show(request.target)} is not empty; use --force to restore into it"
        )
    return socket


def check_cleanup(request: CleanupRequest, policy: Policy, home: str) -> int | None:
    """Only our own sockets and pid files. The pid to signal, if one of those pid files records
    it; any other pid is not signalled (the run usually ended and removed its pid file already,
    which is why that is not a refusal: the server's cleanup still removes the socket)."""
    sockets: list[str] = []
    for path in request.paths:
        socket = path[: -len(".pid")] if path.endswith(".sock.pid") else path
        sockets.append(check_socket(socket, policy, home))
    if request.pid is None:
        return None
    for socket in sockets:
        if _recorded_borg_pid(socket + ".pid") == request.pid:
            return request.pid
    return None


# --- the client side of the protocol ---------------------------------------------------------


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _fail(message: str, code: int) -> RefusedError:
    return RefusedError(f"borgtunnel: {message}", code)


def prepare_socket(path: str) -> str:
    """The run script's rules, then the tool (nc or socat) that will connect borg to it."""
    prepare_socket_dir(path)
    return _pick_tool(path)


def prepare_socket_dir(path: str) -> None:
    """The run script's rules (borgtunnel/client/remote.py, "Directories"), step by step, with
    its exit codes and messages; tests/socketdir_cases.py holds both to one table.

    Never changes a mode. A missing directory (and missing parents) is created 0700, after the
    existing part of the chain passed the ancestor rule; the socket directory must be a real
    directory of ours not writable by group or others; every component above it, up to /, is
    owned by root or us and, if writable by group or others, sticky (symlinks on the way are
    owner-checked, and then the real path is checked the same way); a stale socket is removed.
    """
    if len(path.encode("utf-8", "surrogateescape")) > MAX_SOCKET_PATH:
        raise _fail(f"socket path {path} is longer than 100 bytes (unix socket limit)", 71)
    directory = path.rpartition("/")[0] or "/"
    _create_missing(directory)
    if os.path.islink(directory):
        raise _fail(f"socket directory {directory} is a symlink; refusing", EXIT_SYMLINK)
    if not os.path.isdir(directory):
        raise _fail(f"{directory} is not a directory", EXIT_MKDIR_FAILED)
    info = os.lstat(directory)
    if info.st_uid != os.geteuid():
        raise _fail(
            f"socket directory {directory} is not owned by {pwd_name()}; refusing", EXIT_NOT_OWNER
        )
    if info.st_mode & 0o022:
        raise _fail(
            f"socket directory {directory} is writable by group or others (a shared "
            "directory); use a private one (0700 or 0755)",
            EXIT_SHARED_DIR,
        )
    if _check_above(directory, directory):
        _check_above(os.path.realpath(directory) + "/x", directory)
    _remove_stale_socket(path)


def _create_missing(directory: str) -> None:
    """mkdir -p, 0700, once the part of the chain that exists passed the ancestor rule."""
    existing = directory
    while not os.path.lexists(existing):
        existing = existing.rpartition("/")[0] or "/"
    if existing == directory:
        return
    symlinked = _check_above(existing + "/x", directory)
    if symlinked and os.path.isdir(existing):
        _check_above(os.path.realpath(existing) + "/x", directory)
    old = os.umask(0o077)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError:
        raise _fail(f"cannot create {directory}", EXIT_MKDIR_FAILED) from None
    finally:
        os.umask(old)


def _remove_stale_socket(path: str) -> None:
    """sshd never unlinks a forwarded socket. The script's `[ -S ]` follows a symlink, and its
    `rm -f` then removes the link itself; anything else there is refused."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
            return
    if os.path.lexists(path):
        raise _fail(f"{path} exists and is not a socket; refusing to remove it", 68)


def _check_above(path: str, wanted: str) -> bool:
    """Every component above ``path`` up to /: owned by root or us; writable by group or others
    only if sticky (nobody else may then rename our or root's entry in it). True if one is a
    symlink (its owner is checked, not its target's: the caller checks the real path too)."""
    symlinked = False
    component = path
    while component != "/":
        component = component.rpartition("/")[0] or "/"
        try:
            info = os.lstat(component)
        except OSError:
            raise _fail(
                f"cannot inspect {component} (on the way to {wanted})", EXIT_UNSAFE_ANCESTOR
            ) from None
        if info.st_uid not in {0, os.geteuid()}:
            raise _fail(
                f"{component} (on the way to {wanted}) is owned by uid {info.st_uid}, "
                f"neither root nor {pwd_name()}; refusing",
                EXIT_UNSAFE_ANCESTOR,
            )
        if stat.S_ISLNK(info.st_mode):
            symlinked = True
        elif not stat.S_ISDIR(info.st_mode):
            raise _fail(
                f"{component} (on the way to {wanted}) is not a directory", EXIT_UNSAFE_ANCESTOR
            )
        elif info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise _fail(
                f"{component} (on the way to {wanted}) is writable by group or others "
                "and not sticky; refusing",
                EXIT_UNSAFE_ANCESTOR,
            )
    return symlinked


def _pick_tool(path: str) -> str:
    if _has_nc_with_n():
        return "nc"
    if shutil.which("socat") and not SOCAT_UNSAFE.intersection(path):
        return "socat"
    raise _fail("neither nc (netcat-openbsd, with -N and -U) nor socat is installed", 69)


def _recorded_borg_pid(pid_file: str) -> int | None:
    """The borg pid in ``PATH.pid`` ("OWNER BORGPID"), if there is one."""
    try:
        with open(pid_file, encoding="ascii", errors="replace") as handle:
            words = handle.read().split()
    except OSError:
        return None
    return int(words[1]) if len(words) >= 2 and words[1].isdigit() else None


def _is_borg(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"borg" in handle.read()
    except OSError:
        return False


def _stop_orphan(pid_file: str) -> None:
    """An earlier run whose link dropped left its borg running (it holds the cache lock)."""
    old = _recorded_borg_pid(pid_file)
    if old is None or not _is_borg(old):
        return
    _say(f"borgtunnel: stopping borg {old}, left running by an earlier run whose link dropped")
    with contextlib.suppress(ProcessLookupError):
        os.kill(old, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _is_borg(old):
        time.sleep(0.1)


def _read_go() -> bool:
    """Read ``go\\n`` from fd 0 byte by byte: the rest of stdin is borg's passphrase."""
    line = b""
    while not line.endswith(b"\n") and len(line) < 16:
        chunk = os.read(0, 1)
        if not chunk:
            return False
        line += chunk
    return line == b"go\n"


def _own_env() -> dict[str, str]:
    """The environment of what the gatekeeper starts: its own, without the server's command."""
    return {k: v for k, v in os.environ.items() if k != "SSH_ORIGINAL_COMMAND"}


def _server_env(call: BorgCall) -> dict[str, str]:
    """_own_env with the server's checked assignments (check_env), for borg."""
    env = _own_env()
    env.update(call.env)
    # borg decodes patterns files with its locale's encoding: UTF-8 here, as the gatekeeper
    # decoded them (the server always sends PYTHONUTF8=1; a server's 0 would not be ours).
    env["PYTHONUTF8"] = "1"
    return env


def _borg_env(call: BorgCall, tool: str, socket: str) -> dict[str, str]:
    env = _server_env(call)
    # borg 2 prefers BORGSTORE_RSH (an inherited one would win over ours): both are ours.
    env["BORG_RSH"] = env["BORGSTORE_RSH"] = RSH_BY_TOOL[tool]
    env["BORGTUNNEL_SOCKET"] = socket
    return env


def _write_pid_file(pid_file: str, text: str) -> None:
    with open(pid_file, "w", encoding="ascii") as handle:
        handle.write(text + "\n")


def _owns(pid_file: str) -> bool:
    try:
        with open(pid_file, encoding="ascii", errors="replace") as handle:
            words = handle.read().split()
    except OSError:
        return False
    return bool(words) and words[0] == str(os.getpid())


def serve_borg(
    socket: str,
    argv: Sequence[str],
    call: BorgCall,
    consume: Callable[[IO[bytes]], bool] | None = None,
    dumps: Dumps | None = None,
) -> int:
    """Prepare, ready, go, borg, pid, wait, clean up: the run script's protocol in Python.
    With ``consume``, borg's stdout is read by it (a restore's tar stream); when it stops early
    (returns False), borg is stopped too."""
    tool = prepare_socket(socket)
    pid_file = socket + ".pid"
    _stop_orphan(pid_file)
    _write_pid_file(pid_file, str(os.getpid()))
    _say(f"borgtunnel-ready {tool} {socket}")
    if not _read_go():
        _remove_if_ours(socket, pid_file)
        raise RefusedError("no go from the server; borg not started", EXIT_NO_GO)
    env = _borg_env(call, tool, socket)
    if dumps is not None:
        try:
            dumps.start()
        except RefusedError:
            _remove_if_ours(socket, pid_file)
            raise
    try:
        child = subprocess.Popen(
            argv,
            stdin=0,
            stdout=subprocess.PIPE if consume else None,
            env=env,
            # borg reads the dumps' FIFOs as borgtunnel-sources/... from their directory
            cwd=dumps.directory if dumps is not None else None,
        )
    except OSError as exc:
        if dumps is not None:
            dumps.finish(report=False)
        _remove_if_ours(socket, pid_file)
        raise RefusedError(f"cannot run {argv[0]}: {exc.strerror or exc}", 127) from None
    # sshd may close the session with SIGHUP/SIGTERM to us; borg gets it too and cleans up.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda sig, _frame: child.send_signal(sig))
    dump_pids = "".join(f" {pid}" for pid in dumps.pids()) if dumps is not None else ""
    _write_pid_file(pid_file, f"{os.getpid()} {child.pid}{dump_pids}")
    _say(f"borgtunnel-pid {child.pid}")
    try:
        if consume is not None and child.stdout is not None:
            with child.stdout:
                finished = consume(child.stdout)
            if not finished:
                child.terminate()
    except BaseException:
        child.terminate()
        raise
    finally:
        status = child.wait()
        if dumps is not None:
            dumps.finish()
        _remove_if_ours(socket, pid_file)
    return _shell_status(status)


def _shell_status(returncode: int) -> int:
    """A child's status as sh reports it: 128 + N for one killed by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


# --- running the dumps: named pipes that borg create --read-special reads -------------------


def special_file_excludes(paths: Sequence[str]) -> str:
    """borg exclude lines (``sh:``) for every FIFO and device under ``paths``, symlinks to them
    included (find -P PATHS -xtype p/b/c): --read-special would read each one, and hang on a
    FIFO or read a whole disk. The run script's escaping: '[' and a newline become '?', '*',
    '?', ']' and '\\' are bracketed (matching a neighbour too only excludes more)."""
    lines = []
    for found in _special_files(paths):
        text = found.replace("[", "\x01").replace("\n", "\x01")
        text = re.sub(r"[]*?\\]", lambda m: f"[{m.group(0)}]", text)
        lines.append("sh:" + text.replace("\x01", "?"))
    return "".join(line + "\n" for line in lines)


def _is_special(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode  # follows a symlink, as -xtype does
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode)


def _special_files(paths: Sequence[str]) -> Iterator[str]:
    for top in paths:
        if _is_special(top):
            yield top
        if os.path.islink(top):
            continue  # find -P does not descend through a symlink given as a path
        for directory, dirs, files in os.walk(top, followlinks=False):
            for name in (*dirs, *files):
                path = os.path.join(directory, name)
                if _is_special(path):
                    yield path


def _stop_dump(child: subprocess.Popen[bytes]) -> int:
    """SIGTERM to the dump's session (a shell's children too), SIGKILL if that is ignored."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signum)
        try:
            return child.wait(timeout=DUMP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            continue
    return child.wait()


class Dumps:
    """The dumps of one run: a private directory next to the socket with a FIFO per job, each
    dump in its own session writing into its FIFO; afterwards every FIFO released, a dump still
    running after DUMP_GRACE_SECONDS stopped, each status reported, the directory removed."""

    def __init__(self, socket: str, jobs: Sequence[SourceJob], paths: Sequence[str]) -> None:
        self.directory = socket + ".sources"
        self.jobs = tuple(jobs)
        self.paths = tuple(paths)
        self.children: list[tuple[SourceJob, subprocess.Popen[bytes]]] = []

    @property
    def excludes(self) -> str:
        return os.path.join(self.directory, SPECIAL_EXCLUDES)

    def borg_options(self) -> tuple[str, ...]:
        return ("--read-special", f"--exclude-from={self.excludes}")

    def start(self) -> None:
        self._remove()
        try:
            os.mkdir(self.directory, 0o700)
            with open(self.excludes, "x", encoding="utf-8", errors="surrogateescape") as handle:
                handle.write(special_file_excludes(self.paths))
            for job in self.jobs:
                fifo = os.path.join(self.directory, job.path)
                os.makedirs(os.path.dirname(fifo), mode=0o700, exist_ok=True)
                os.mkfifo(fifo, 0o600)
        except OSError as exc:
            self._remove()
            message = f"cannot prepare the sources in {self.directory}: {exc}"
            raise _fail(message, EXIT_SOURCES) from None
        env = _own_env()  # not the server's assignments: those are for borg
        for job in self.jobs:
            fifo = os.path.join(self.directory, job.path)
            try:
                # The shell opens the FIFO (blocking until borg reads it), then becomes the dump.
                child = subprocess.Popen(
                    [
                        "sh",
                        "-c",
                        'f=$1; shift; exec "$@" > "$f"',
                        "borgtunnel-dump",
                        fifo,
                        *job.argv,
                    ],
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                self.finish(report=False)
                raise _fail(
                    f"cannot start the dump of source {job.label!r}: {exc}", EXIT_SOURCES
                ) from None
            self.children.append((job, child))

    def pids(self) -> list[int]:
        return [child.pid for _, child in self.children]

    def finish(self, *, report: bool = True) -> None:
        try:
            self._release()
            deadline = time.monotonic() + DUMP_GRACE_SECONDS
            for job, child in self.children:
                try:
                    status = child.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    status = _stop_dump(child)
                if report:
                    # The link may be gone: a failed report must not skip the cleanup.
                    with contextlib.suppress(OSError):
                        _say(f"borgtunnel-source {job.label} {_shell_status(status)}")
        finally:
            for _job, child in self.children:
                if child.poll() is None:
                    _stop_dump(child)
            self.children.clear()
            self._remove()

    def _release(self) -> None:
        """Opening a FIFO read-write never blocks and frees a dump blocked opening it (borg
        never reached it); once closed, that dump's next write fails."""
        if not os.path.isdir(self.directory) or os.path.islink(self.directory):
            return
        for directory, _dirs, files in os.walk(self.directory):
            for name in files:
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):
                    if stat.S_ISFIFO(os.lstat(path).st_mode):
                        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))

    def _remove(self) -> None:
        if os.path.islink(self.directory):
            raise _fail(f"{self.directory} is a symlink; refusing", EXIT_SOURCES)
        self._release()
        shutil.rmtree(self.directory, ignore_errors=True)


def _remove_if_ours(socket: str, pid_file: str) -> None:
    """Only while our pid file still names us: a newer run may own the socket by now."""
    if _owns(pid_file):
        for stale in (socket, pid_file):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)


def borg_argv(policy: Policy, subcommand: str, call: BorgCall, paths: Sequence[str]) -> list[str]:
    """borg's argv, built here from checked data: the server's program words are not used."""
    url = f"{URL_PREFIX}{call.repository.lstrip('/')}"
    if call.borg2:
        return [policy.borg, subcommand, *call.options, f"--repo={url}", "--", call.archive, *paths]
    return [policy.borg, subcommand, *call.options, "--", f"{url}::{call.archive}", *paths]


def run_cleanup(request: CleanupRequest, pid: int | None) -> int:
    if pid is not None and _is_borg(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for path in request.paths:
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(path)
            if stat.S_ISSOCK(info.st_mode) or (
                path.endswith(".pid") and stat.S_ISREG(info.st_mode)
            ):
                os.unlink(path)
    return 0


def _version_of(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "missing"
    try:
        result = subprocess.run(
            argv, capture_output=True, stdin=subprocess.DEVNULL, check=False, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unusable ({exc})"
    lines = (result.stdout or result.stderr).decode("utf-8", "replace").strip().splitlines()
    if not lines:
        return f"exit status {result.returncode}"
    return next((line for line in lines if "version" in line), lines[0])


def _has_nc_with_n() -> bool:
    if not shutil.which("nc"):
        return False
    probe = subprocess.run(
        ["nc", "-h"], capture_output=True, stdin=subprocess.DEVNULL, check=False, timeout=10
    )
    return b"-N" in probe.stdout + probe.stderr


def run_doctor(socket: str, policy: Policy) -> int:
    """Versions and the policy, then a probe socket the server tries to reverse-forward.

    Same lines as the server's plain doctor script (borgtunnel/ssh/doctor.py), plus ``gatekeeper``
    and ``policy``: ``borgtunnel-doctor KEY VALUE`` on stderr, ``probe PATH`` last, then wait
    for a line on stdin and remove the probe socket.
    """
    _say(f"borgtunnel-doctor gatekeeper {VERSION}")
    _say("borgtunnel-doctor policy " + json.dumps(policy.summary(), sort_keys=True))
    _say(f"borgtunnel-doctor user {pwd_name()}")
    _say(f"borgtunnel-doctor borg {_version_of([policy.borg, '--version'])}")
    _say(f"borgtunnel-doctor nc {'yes' if _has_nc_with_n() else 'missing'}")
    _say(f"borgtunnel-doctor socat {_version_of(['socat', '-V'])}")
    directory = socket.rpartition("/")[0] or "/"
    probe = f"{directory}/doctor-{os.getpid()}.sock"
    try:
        prepare_socket_dir(probe)
    except RefusedError as exc:
        _say(f"borgtunnel-doctor probe-failed {exc.reason}")
        return 0
    _say(f"borgtunnel-doctor probe {probe}")
    _read_go()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(probe)
    return 0


def pwd_name() -> str:
    import pwd  # noqa: PLC0415 - only the doctor needs it

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# === restore: the gatekeeper extracts, borg only reads ======================================
# borg <= 1.4's extract follows a symlink an earlier item of the same archive made (every 1.2.x;
# upstream CVE-2026-62268): ``evil -> /victim`` and then ``evil/authorized_keys`` writes
# /victim/authorized_keys. A compromised server holds the repository and the key, so it can make
# such an archive, and it can serve other data on another connection (a "list first, then
# extract" check is a TOCTOU). So borg writes nothing here: ``borg export-tar ... -`` streams the
# archive through the same tunnel, and the code below extracts that one stream itself, checking
# each member before writing it: relative names without '..', every directory on the way opened
# with O_NOFOLLOW|O_DIRECTORY from the target's fd (a symlink is created, never followed), hard
# links only to files this extraction wrote, device nodes, FIFOs, setuid/setgid files and file
# capabilities only when the policy says ``restore_special = yes``. What it refuses is not
# written; the restore then exits 77 with the reason (and logs it). Every read is bounded.
#
# Metadata: owner (by name, like borg extract, unless --numeric-ids; only as root), mode,
# mtime/atime, hard links, symlinks. borg 1.2/1.4 export GNU tar: mtime in whole seconds, no
# xattrs, no ACLs. borg 2 exports PAX: times to about a microsecond (it writes ns / 1e9) and
# xattrs (user.* always, others only with restore_special); ACLs and BSD flags are never restored
# through the gatekeeper. Memory: one (dev, inode) per file written (hard links may name any of
# them) and one entry per directory (its metadata is set at the end), as borg extract keeps too.

TAR_BLOCK = 512
MAX_MEMBER_PATH = 4096  # bytes of a member's name or link target (Linux PATH_MAX)
MAX_NAME_COMPONENT = 255  # bytes of one path component (NAME_MAX)
MAX_PAX_HEADER = 1 << 20  # one member's PAX records (xattrs included)
MAX_REPORTED = 20  # refusals reported one by one; the rest are counted
EXIT_RESTORE_ERROR = 2  # borg's "error": the stream broke or a write failed
RESTORE_REFUSED_PREFIX = "borgtunnel-restore-refused: "  # the server's restore.py reads it
_COPY_CHUNK = 1 << 20
_ZERO_BLOCK = bytes(TAR_BLOCK)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SETID = stat.S_ISUID | stat.S_ISGID
_REGULAR, _HARDLINK, _SYMLINK, _CHAR, _BLOCK, _DIRECTORY, _FIFO = (
    b"0",
    b"1",
    b"2",
    b"3",
    b"4",
    b"5",
    b"6",
)
_SPECIAL_TYPES = {_CHAR: stat.S_IFCHR, _BLOCK: stat.S_IFBLK, _FIFO: stat.S_IFIFO}
# Options of borg extract that export-tar does not have: the extractor below does what they mean.
_EXTRACTOR_FLAGS = frozenset(
    {
        "--dry-run",
        "-n",
        "--numeric-ids",
        "--numeric-owner",
        "--noacls",
        "--noxattrs",
        "--noflags",
        "--nobsdflags",
        "--sparse",
    }
)


class TarStreamError(Exception):
    """The stream is not a tar this reader accepts (or it ended early): the restore stops."""


class UnsafeMemberError(Exception):
    """This member would write outside the target or needs an opt-in: it is not written."""


@dataclass
class TarMember:
    """One member of the stream, as bytes where the file system takes bytes."""

    name: bytes
    kind: bytes
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    size: int
    mtime_ns: int
    atime_ns: int | None
    linkname: bytes
    major: int
    minor: int
    xattrs: dict[bytes, bytes]
    acls: int


def _tar_number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (non-negative only)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise TarStreamError("negative number in a tar header")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not re.fullmatch(rb"[0-7]+", text):
        raise TarStreamError(f"bad number {text[:20]!r} in a tar header")
    return int(text, 8)


def _pax_time_ns(value: bytes) -> int:
    """PAX "seconds[.fraction]" as integer nanoseconds, without a float's rounding."""
    match = re.fullmatch(rb"(-?)([0-9]{1,20})(?:\.([0-9]{1,30}))?", value)
    if match is None:
        raise TarStreamError(f"bad PAX time {value[:40]!r}")
    sign, whole, fraction = match.groups()
    nanoseconds = int(whole) * 1_000_000_000 + int((fraction or b"").ljust(9, b"0")[:9])
    return -nanoseconds if sign else nanoseconds


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``LENGTH KEY=VALUE\\n`` records; later ones win, as in every tar reader."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 12)
        if space < 0 or not data[pos:space].isdigit():
            raise TarStreamError("bad PAX record length")
        end = pos + int(data[pos:space])
        if end <= space + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarStreamError("bad PAX record")
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not key:
            raise TarStreamError("bad PAX record")
        records[key] = value
        pos = end
    return records


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


class TarReader:
    """A streaming reader for what Python's tarfile writes (borg export-tar uses it): ustar/GNU
    headers, GNU long names and PAX records. Anything else (sparse, multi-volume, global PAX
    headers, unknown types) is an error, and every piece of metadata is read with a bound."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.remaining = 0  # data bytes of the current member not read yet
        self.padding = 0

    def _read(self, size: int) -> bytes:
        data = self.stream.read(size)
        while len(data) < size:
            more = self.stream.read(size - len(data))
            if not more:
                raise TarStreamError("the tar stream ended early")
            data += more
        return data

    def read_data(self) -> Iterator[bytes]:
        """The current member's data, in chunks."""
        while self.remaining:
            chunk = self._read(min(self.remaining, _COPY_CHUNK))
            self.remaining -= len(chunk)
            yield chunk

    def _skip_data(self) -> None:
        for _ in self.read_data():
            pass
        if self.padding:
            self._read(self.padding)
            self.padding = 0

    def next(self) -> TarMember | None:
        """The next member (skipping the rest of the current one), or None at the end."""
        self._skip_data()
        long_name: bytes | None = None
        long_link: bytes | None = None
        pax: dict[bytes, bytes] = {}
        while True:
            block = self._read(TAR_BLOCK)
            if block == _ZERO_BLOCK:
                return None
            self._check_sum(block)
            kind = block[156:157]
            size = _tar_number(block[124:136])
            if kind in {b"L", b"K", b"x"}:
                limit = MAX_PAX_HEADER if kind == b"x" else MAX_MEMBER_PATH + 1
                if size > limit:
                    raise TarStreamError(f"tar {kind!r} header of {size} bytes (limit {limit})")
                data = self._read(_padded(size))[:size]
                if kind == b"x":
                    pax.update(_pax_records(data))
                elif kind == b"L":
                    long_name = data.split(b"\0", 1)[0]
                else:
                    long_link = data.split(b"\0", 1)[0]
                continue
            return self._member(
                block, kind=kind, size=size, pax=pax, long_name=long_name, long_link=long_link
            )

    @staticmethod
    def _check_sum(block: bytes) -> None:
        unsigned = sum(block[:148]) + 256 + sum(block[156:])  # the checksum field as blanks
        signed = unsigned - 256 * sum(1 for byte in block[:148] + block[156:] if byte > 127)
        if _tar_number(block[148:156]) not in {unsigned, signed}:
            raise TarStreamError("bad tar header checksum")

    def _member(
        self,
        block: bytes,
        *,
        kind: bytes,
        size: int,
        pax: Mapping[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarMember:
        name = block[0:100].split(b"\0", 1)[0]
        if block[257:265] == b"ustar\x0000":  # POSIX ustar: a name prefix (GNU has none)
            prefix = block[345:500].split(b"\0", 1)[0]
            name = prefix + b"/" + name if prefix else name
        if kind == b"\0":
            kind = _REGULAR  # the old spelling of a regular file
        if kind not in {_REGULAR, _HARDLINK, _SYMLINK, _CHAR, _BLOCK, _DIRECTORY, _FIFO}:
            raise TarStreamError(f"tar member type {kind!r} is not supported")
        if any(key.startswith(b"GNU.sparse.") for key in pax):
            raise TarStreamError("sparse tar members are not supported")
        if b"size" in pax:
            size = _pax_int(pax[b"size"])
        if kind != _REGULAR and size:
            raise TarStreamError(f"a tar member of type {kind!r} with data")
        mtime_ns = _tar_number(block[136:148]) * 1_000_000_000
        member = TarMember(
            name=pax.get(b"path", long_name if long_name is not None else name),
            kind=kind,
            mode=_tar_number(block[100:108]) & 0o7777,
            uid=_pax_int(pax[b"uid"]) if b"uid" in pax else _tar_number(block[108:116]),
            gid=_pax_int(pax[b"gid"]) if b"gid" in pax else _tar_number(block[116:124]),
            uname=pax.get(b"uname", block[265:297].split(b"\0", 1)[0]).decode("utf-8", "replace"),
            gname=pax.get(b"gname", block[297:329].split(b"\0", 1)[0]).decode("utf-8", "replace"),
            size=size,
            mtime_ns=_pax_time_ns(pax[b"mtime"]) if b"mtime" in pax else mtime_ns,
            atime_ns=_pax_time_ns(pax[b"atime"]) if b"atime" in pax else None,
            linkname=pax.get(
                b"linkpath", long_link if long_link is not None else block[157:257].split(b"\0")[0]
            ),
            major=_tar_number(block[329:337]),
            minor=_tar_number(block[337:345]),
            xattrs={
                key[len(b"SCHILY.xattr.") :]: value
                for key, value in pax.items()
                if key.startswith(b"SCHILY.xattr.")
            },
            acls=sum(1 for key in pax if key.startswith(b"SCHILY.acl.")),
        )
        self.remaining = size
        self.padding = _padded(size) - size
        return member

    def drain(self) -> None:
        """Read what follows the end marker (tarfile pads to a 10 KiB record) until EOF."""
        while self.stream.read(_COPY_CHUNK):
            pass


def _pax_int(value: bytes) -> int:
    if not value.isdigit() or len(value) > 20:
        raise TarStreamError(f"bad PAX number {value[:40]!r}")
    return int(value)


def _link_source(member: TarMember) -> tuple[bytes, ...]:
    """The components of a hard link's target, with the same rules as a member's name."""
    try:
        source = member_parts(member.linkname)
    except UnsafeMemberError as exc:
        raise UnsafeMemberError(f"hard link target: {exc}") from None
    if not source:
        raise UnsafeMemberError("hard link to the target directory")
    return source


def member_parts(name: bytes, *, directory: bool = False) -> tuple[bytes, ...]:
    """The components of a member name below the target; refuses what could leave it."""
    if len(name) > MAX_MEMBER_PATH:
        raise UnsafeMemberError(f"name longer than {MAX_MEMBER_PATH} bytes")
    if b"\0" in name:
        raise UnsafeMemberError("NUL in the name")
    if name.startswith(b"/"):
        raise UnsafeMemberError("absolute name")
    if directory and name.endswith(b"/"):
        name = name[:-1]
    parts = tuple(part for part in name.split(b"/") if part != b".")
    if b".." in parts:
        raise UnsafeMemberError("'..' in the name")
    if b"" in parts:
        raise UnsafeMemberError("empty component in the name")
    if any(len(part) > MAX_NAME_COMPONENT for part in parts):
        raise UnsafeMemberError(f"a name component longer than {MAX_NAME_COMPONENT} bytes")
    return parts


@dataclass(frozen=True)
class ExtractSettings:
    write: bool = True  # False: a dry run checks every member and writes nothing
    special: bool = False  # the policy's restore_special
    numeric: bool = False  # --numeric-ids: owners by number, not by name
    xattrs: bool = True  # not --noxattrs
    sparse: bool = False
    chown: bool = False  # only root can give files away


class Extractor:
    """Writes the members of one tar stream below ``root`` (a directory fd), never outside it."""

    def __init__(self, root: int | None, settings: ExtractSettings) -> None:
        self.root = root
        self.settings = settings
        self.written: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the files written
        self.dirs: list[tuple[tuple[bytes, ...], TarMember]] = []  # metadata set at the end
        self.refused: list[str] = []  # the first MAX_REPORTED reasons
        self.refused_count = 0
        self.error: str | None = None  # the stream broke: the restore stopped
        self.item_errors: list[str] = []  # the first MAX_REPORTED items that failed to write
        self.item_error_count = 0
        self.skipped_xattrs = 0
        self.skipped_acls = 0
        self.owner_failures = 0
        # dry run: the symlinks and files the stream made so far (there is no file system)
        self.links: set[tuple[bytes, ...]] = set()
        self.files: set[tuple[bytes, ...]] = set()
        self._owners: dict[tuple[str, str, int], int] = {}

    # -- the stream --

    def consume(self, stream: IO[bytes]) -> bool:
        """Extract every member; False when it stopped early (the caller then stops borg)."""
        reader = TarReader(stream)
        old_umask = os.umask(0)  # modes are set exactly; new files start 0600, dirs 0700
        try:
            while (member := reader.next()) is not None:
                self._one(member, reader)
            self._finish_dirs()
            reader.drain()
        except TarStreamError as exc:
            self.error = f"the archive's tar stream: {exc}"
            return False
        except OSError as exc:
            self.error = f"writing the restore: {exc}"
            return False
        finally:
            os.umask(old_umask)
        return True

    def _one(self, member: TarMember, reader: TarReader) -> None:
        try:
            parts = member_parts(member.name, directory=member.kind == _DIRECTORY)
            self._check(member, parts)
            if self.settings.write and self.root is not None:
                self._write(member, parts, reader)
            else:
                self._pretend(member, parts)
        except UnsafeMemberError as exc:
            self._refuse(member.name, str(exc))
        except OSError as exc:  # like borg extract: this item failed, the others go on
            self._item_failed(member.name, exc)

    def _item_failed(self, name: bytes, exc: OSError) -> None:
        self.item_error_count += 1
        if self.item_error_count <= MAX_REPORTED:
            text = f"{_show(name.decode('utf-8', 'surrogateescape'), 200)}: {exc.strerror or exc}"
            self.item_errors.append(text)
            _say(f"{LOG_TAG}: warning: restore item {text}")

    def _refuse(self, name: bytes, reason: str) -> None:
        self.refused_count += 1
        if self.refused_count > MAX_REPORTED:
            return
        text = f"{_show(name.decode('utf-8', 'surrogateescape'), 200)}: {reason}"
        self.refused.append(text)
        _say(f"{LOG_TAG}: refused restore item {text}")
        log("warning", f"restore: refused item {text}")

    def _check(self, member: TarMember, parts: tuple[bytes, ...]) -> None:
        """What the member's header alone says: type, special bits, link target."""
        special = self.settings.special
        if not parts and member.kind != _DIRECTORY:
            raise UnsafeMemberError("names the target directory itself")
        if member.kind in _SPECIAL_TYPES and not special:
            what = "FIFO" if member.kind == _FIFO else "device node"
            raise UnsafeMemberError(f"a {what}; the policy has restore_special = no")
        if member.kind == _REGULAR and member.mode & _SETID and not special:
            raise UnsafeMemberError("setuid/setgid file; the policy has restore_special = no")
        if b"security.capability" in member.xattrs and self.settings.xattrs and not special:
            raise UnsafeMemberError("file capabilities; the policy has restore_special = no")
        if member.kind == _SYMLINK and not 0 < len(member.linkname) <= MAX_MEMBER_PATH:
            raise UnsafeMemberError("symlink target empty or too long")
        if member.kind == _SYMLINK and b"\0" in member.linkname:
            raise UnsafeMemberError("NUL in the symlink target")

    # -- a dry run: the same refusals, from what the stream made so far --

    def _pretend(self, member: TarMember, parts: tuple[bytes, ...]) -> None:
        for depth in range(1, len(parts)):
            if parts[:depth] in self.links:
                raise UnsafeMemberError("below a symlink (it would not be followed)")
        if member.kind == _HARDLINK and _link_source(member) not in self.files:
            raise UnsafeMemberError("hard link to something this restore did not write")
        self.links.discard(parts)
        self.files.discard(parts)
        if member.kind == _SYMLINK:
            self.links.add(parts)
        elif member.kind in {_REGULAR, _HARDLINK}:
            self.files.add(parts)

    # -- writing, always relative to a directory fd opened without following symlinks --

    def _walk(self, parts: Sequence[bytes], *, create: bool) -> int:
        """An fd of the directory ``parts`` below the root; no component may be a symlink."""
        if self.root is None:
            raise TarStreamError("a dry run has no target to write to")
        current = os.dup(self.root)
        try:
            for part in parts:
                try:
                    following = os.open(part, _DIR_FLAGS, dir_fd=current)
                except FileNotFoundError:
                    if not create:
                        raise UnsafeMemberError("a directory on its way is missing") from None
                    os.mkdir(part, 0o700, dir_fd=current)
                    following = os.open(part, _DIR_FLAGS, dir_fd=current)
                except OSError as exc:
                    if exc.errno in {errno.ELOOP, errno.ENOTDIR}:
                        raise UnsafeMemberError(
                            "below a symlink or non-directory (it would not be followed)"
                        ) from None
                    raise
                os.close(current)
                current = following
        except BaseException:
            os.close(current)
            raise
        return current

    def _write(self, member: TarMember, parts: tuple[bytes, ...], reader: TarReader) -> None:
        if not parts:
            return  # the target itself: it keeps its own owner and mode
        parent = self._walk(parts[:-1], create=True)
        try:
            name = parts[-1]
            if member.kind == _DIRECTORY:
                if not self._clear(parent, name, keep_dir=True):
                    os.mkdir(name, 0o700, dir_fd=parent)
                self.dirs.append((parts, member))
            elif member.kind == _REGULAR:
                self._clear(parent, name)
                self._write_file(parent, name, member, reader)
            elif member.kind == _SYMLINK:
                self._clear(parent, name)
                os.symlink(member.linkname, name, dir_fd=parent)
                self._set_by_name(parent, name, member)
            elif member.kind == _HARDLINK:
                self._link(parent, name, member)
            else:
                self._clear(parent, name)
                device = os.makedev(member.major, member.minor)
                os.mknod(name, member.mode | _SPECIAL_TYPES[member.kind], device, dir_fd=parent)
                self._set_by_name(parent, name, member)
        finally:
            os.close(parent)

    @staticmethod
    def _clear(parent: int, name: bytes, *, keep_dir: bool = False) -> bool:
        """Remove what is at ``name`` (a symlink itself, never what it points to); True when
        it is a directory that stays (a directory member over an existing directory)."""
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(info.st_mode):
            if keep_dir:
                return True
            os.rmdir(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
        return False

    def _write_file(self, parent: int, name: bytes, member: TarMember, reader: TarReader) -> None:
        fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent)
        try:
            for chunk in reader.read_data():
                if self.settings.sparse and chunk.count(0) == len(chunk):
                    os.lseek(fd, len(chunk), os.SEEK_CUR)
                    continue
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            if self.settings.sparse:
                os.ftruncate(fd, member.size)
            self._set_by_fd(fd, member)
            info = os.fstat(fd)
            self.written.add((info.st_dev, info.st_ino))
        finally:
            os.close(fd)

    def _link(self, parent: int, name: bytes, member: TarMember) -> None:
        source = _link_source(member)
        source_parent = self._walk(source[:-1], create=False)
        try:
            try:
                info = os.stat(source[-1], dir_fd=source_parent, follow_symlinks=False)
            except FileNotFoundError:
                info = None
            if info is None or (info.st_dev, info.st_ino) not in self.written:
                raise UnsafeMemberError("hard link to something this restore did not write")
            with contextlib.suppress(FileNotFoundError):
                existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if (existing.st_dev, existing.st_ino) == (info.st_dev, info.st_ino):
                    return
            self._clear(parent, name)
            os.link(
                source[-1],
                name,
                src_dir_fd=source_parent,
                dst_dir_fd=parent,
                follow_symlinks=False,
            )
        finally:
            os.close(source_parent)

    def _owner(self, member: TarMember) -> tuple[int, int]:
        """By name when the name exists here (borg extract's rule), else by number."""
        if self.settings.numeric:
            return member.uid, member.gid
        import grp  # noqa: PLC0415 - only a restore needs them
        import pwd  # noqa: PLC0415

        def lookup(kind: str, name: str, number: int) -> int:
            key = (kind, name, number)
            if key not in self._owners and len(self._owners) < 10_000:
                try:
                    found = pwd.getpwnam(name).pw_uid if kind == "u" else grp.getgrnam(name).gr_gid
                except (KeyError, ValueError):
                    found = number
                self._owners[key] = found
            return self._owners.get(key, number)

        uid = lookup("u", member.uname, member.uid) if member.uname else member.uid
        gid = lookup("g", member.gname, member.gid) if member.gname else member.gid
        return uid, gid

    def _times(self, member: TarMember) -> tuple[int, int]:
        atime = member.atime_ns if member.atime_ns is not None else member.mtime_ns
        return atime, member.mtime_ns

    def _set_by_fd(self, fd: int, member: TarMember) -> None:
        """Owner, xattrs, mode (after the owner: chown clears setuid), times."""
        if self.settings.chown:
            try:
                os.fchown(fd, *self._owner(member))
            except OSError:
                self.owner_failures += 1
        self._set_xattrs(fd, member)
        os.fchmod(fd, member.mode)
        os.utime(fd, ns=self._times(member))

    def _set_by_name(self, parent: int, name: bytes, member: TarMember) -> None:
        """For symlinks and special files, which are not opened: never following a symlink."""
        if self.settings.chown:
            try:
                os.chown(name, *self._owner(member), dir_fd=parent, follow_symlinks=False)
            except OSError:
                self.owner_failures += 1
        if member.xattrs or member.acls:
            self.skipped_xattrs += len(member.xattrs)
            self.skipped_acls += member.acls
        os.utime(name, ns=self._times(member), dir_fd=parent, follow_symlinks=False)

    def _set_xattrs(self, fd: int, member: TarMember) -> None:
        self.skipped_acls += member.acls
        if not self.settings.xattrs:
            return
        for key, value in member.xattrs.items():
            if not (key.startswith(b"user.") or self.settings.special):
                self.skipped_xattrs += 1
                continue
            try:
                os.setxattr(fd, key, value)
            except OSError:
                self.skipped_xattrs += 1

    def _finish_dirs(self) -> None:
        """Directories last, deepest first: their mode may forbid writing into them."""
        for parts, member in reversed(self.dirs):
            try:
                fd = self._walk(parts, create=False)
            except UnsafeMemberError:
                continue  # a later member replaced it
            except OSError as exc:
                self._item_failed(member.name, exc)
                continue
            try:
                self._set_by_fd(fd, member)
            except OSError as exc:
                self._item_failed(member.name, exc)
            finally:
                os.close(fd)

    # -- the outcome --

    def status(self, borg_status: int, *, json_lines: bool) -> int:
        """The restore's exit status: refusals first, then errors, then borg's own."""
        for note in self._notes():
            _say(f"{LOG_TAG}: {note}")
        if self.refused_count:
            first = "; ".join(self.refused[:3])
            more = self.refused_count - min(len(self.refused), 3)
            text = f"{self.refused_count} unsafe item(s) in the archive not restored: {first}"
            if more > 0:
                text += f" (and {more} more)"
            _say(RESTORE_REFUSED_PREFIX + text)
            log("warning", f"restore refused: {text}")
            return EXIT_REFUSED
        if self.error is not None:
            if json_lines and not 1 < borg_status < 128:
                record = {"type": "log_message", "levelname": "ERROR", "name": LOG_TAG}
                _say(json.dumps({**record, "message": self.error}))
            if 1 < borg_status < 128:
                return borg_status  # borg failed first (and said why); the stream broke after
            _say(f"{LOG_TAG}: restore failed: {self.error}")
            log("err", f"restore failed: {self.error}")
            return EXIT_RESTORE_ERROR
        if borg_status == 0 and self._notes():
            return 1  # borg's "warning"
        return borg_status

    def _notes(self) -> list[str]:
        notes = []
        if self.skipped_xattrs:
            notes.append(
                f"warning: {self.skipped_xattrs} xattr(s) not restored (only user.* "
                "unless restore_special = yes; none on symlinks and special files)"
            )
        if self.skipped_acls:
            notes.append(f"warning: {self.skipped_acls} ACL(s) not restored (not supported)")
        if self.owner_failures:
            notes.append(f"warning: the owner of {self.owner_failures} item(s) could not be set")
        if self.item_error_count:
            notes.append(
                f"warning: {self.item_error_count} item(s) could not be written, first: "
                + self.item_errors[0]
            )
        return notes


def export_tar_argv(policy: Policy, call: BorgCall) -> list[str]:
    """``borg export-tar ... -``: the archive as one tar stream on borg's stdout. The options
    export-tar does not know (extract's writing options) are the extractor's business."""
    options = [word for word in call.options if word not in _EXTRACTOR_FLAGS]
    if call.borg2:
        options.append("--tar-format=PAX")  # borg 2: times in ns, xattrs
    exported = dataclasses.replace(call, options=tuple(options))
    return borg_argv(policy, "export-tar", exported, ["-", *call.paths])


def extract_settings(request: RestoreRequest, policy: Policy) -> ExtractSettings:
    options = set(request.call.options)
    return ExtractSettings(
        write=request.mode != "dry-run" and not options & {"--dry-run", "-n"},
        special=policy.restore_special,
        numeric=bool(options & {"--numeric-ids", "--numeric-owner"}),
        xattrs="--noxattrs" not in options,
        sparse="--sparse" in options,
        chown=os.geteuid() == 0,
    )


def _check_opened_target(root: int, target: str, policy: Policy) -> None:
    """What was opened is still in restore_targets (not swapped for a symlink since
    check_restore looked). Without /proc there is nothing to ask; check_restore stands."""
    try:
        opened = os.readlink(f"/proc/self/fd/{root}")
    except OSError:
        return
    allowed = [*policy.restore_targets, *(os.path.realpath(t) for t in policy.restore_targets)]
    if not _within(opened, allowed):
        os.close(root)
        raise RefusedError(f"restore target {_show(target)} is now {_show(opened)}; refusing")


def run_restore(socket: str, request: RestoreRequest, policy: Policy) -> int:
    """borg export-tar through the tunnel, extracted here into the (checked) target."""
    settings = extract_settings(request, policy)
    root = None
    if settings.write:
        try:
            root = os.open(request.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise RefusedError(f"restore target {_show(request.target)}: {exc.strerror}") from None
        _check_opened_target(root, request.target, policy)
    extractor = Extractor(root, settings)
    try:
        argv = export_tar_argv(policy, request.call)
        status = serve_borg(socket, argv, request.call, consume=extractor.consume)
    finally:
        if root is not None:
            os.close(root)
    return extractor.status(status, json_lines="--log-json" in request.call.options)


# === end of the restore block ================================================================


# --- main ------------------------------------------------------------------------------------


def log(priority: str, message: str) -> None:
    """One line to syslog/journal through logger; a missing logger never turns a refusal into
    an acceptance, it only loses the log line (stderr still has it)."""
    who = os.environ.get("SSH_CONNECTION", "").split(" ")[0] or "local"
    line = f"{message} (from {who})".replace("\n", "\\n")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["logger", "-t", LOG_TAG, "-p", f"auth.{priority}", "--", line],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            timeout=10,
        )


def handle(command: str, policy: Policy, home: str) -> int:
    """Parse, check, log, run. Raises RefusedError for anything not allowed."""
    request = parse_request(command)
    if isinstance(request, RunRequest) and request.jobs:
        return run_with_sources(request, policy, home)
    if isinstance(request, RunRequest) and request.snapshot is not None:
        return run_with_snapshot(request, policy, home)
    if isinstance(request, RunRequest):
        socket = check_run(request, policy, home)
        call = request.call
        log("info", f"run: borg create {call.archive!r} of {list(call.paths)} to {socket}")
        with private_pattern_files(call, policy) as checked:
            return serve_borg(socket, borg_argv(policy, "create", checked, call.paths), checked)
    if isinstance(request, RestoreRequest):
        socket = check_restore(request, policy, home)
        call = request.call
        log(
            "notice",
            f"restore: borg export-tar {call.archive!r}, extracted by the gatekeeper into "
            f"{request.target} ({request.mode})",
        )
        return run_restore(socket, request, policy)
    if isinstance(request, CleanupRequest):
        pid = check_cleanup(request, policy, home)
        signalled = f"pid {pid}" if pid is not None else f"pid {request.pid} not ours, no signal"
        log("info", f"cleanup: {signalled}; remove {list(request.paths)}")
        return run_cleanup(request, pid)
    socket = check_socket(request.socket, policy, home)
    return run_doctor(socket, policy)


def run_with_sources(request: RunRequest, policy: Policy, home: str) -> int:
    """A run whose sources are the policy's own jobs, named by the server."""
    socket = check_run(request, policy, home)
    jobs = check_jobs(request.jobs, policy)
    call = request.call
    log(
        "info",
        f"run: borg create {call.archive!r} of {list(call.paths)} and sources "
        f"{[job.label for job in jobs]} to {socket}",
    )
    texts = checked_pattern_files(call, policy)
    roots = [*call.paths, *call.pattern_roots]
    for path in call.pattern_files:
        roots += pattern_file_roots(texts[path], f"patterns file {_show(path)}")
    dumps = Dumps(socket, jobs, roots)
    with private_pattern_files(call, policy, texts) as checked:
        options = replace(checked, options=(*checked.options, *dumps.borg_options()))
        argv = borg_argv(policy, "create", options, [*call.paths, SOURCES_DIR])
        return serve_borg(socket, argv, checked, dumps=dumps)


def run_with_snapshot(request: RunRequest, policy: Policy, home: str) -> int:
    """The installed snapshot script (SNAPSHOT_SCRIPT) with arguments built here from checked
    data: the policy's snapshot settings, the checked paths, the policy's borg and options. It
    does the run protocol itself (the same socket rules as ours, one table: socketdir_cases)."""
    socket = check_run(request, policy, home)
    call = request.call
    ask = request.snapshot
    assert ask is not None  # noqa: S101 - handle() only calls this for a snapshot run
    log(
        "info",
        f"run: borg create {call.archive!r} of {list(call.paths)} from a {policy.snapshot} "
        f"snapshot to {socket}",
    )
    with private_pattern_files(call, policy) as checked:
        args = [
            policy.snapshot,
            ask.client,
            policy.lvm_snapshot_size,
            "1" if policy.snapshot_fallback else "0",
            str(len(call.paths)),
            *call.paths,
            socket,
            RSH_BY_TOOL["nc"],
            RSH_BY_TOOL["socat"],
            *borg_argv(policy, "create", checked, call.paths),
        ]
        env = _server_env(call)
        for name in ("BORG_RSH", "BORGSTORE_RSH"):  # the script sets its own from its arguments
            env.pop(name, None)
        argv = ["sh", "-c", SNAPSHOT_SCRIPT, "borgtunnel-run-snapshot", *args]
        try:
            child = subprocess.Popen(argv, stdin=0, env=env)
        except OSError as exc:
            raise RefusedError(f"cannot run sh: {exc.strerror or exc}", 127) from None
        # sshd may end the session with SIGHUP/SIGTERM: the script's traps remove the snapshots.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda sig, _frame: child.send_signal(sig))
        status = child.wait()
    return _shell_status(status)


def _home() -> str:
    home = os.environ.get("HOME")
    if home:
        return home
    import pwd  # noqa: PLC0415 - only needed when sshd gave no HOME

    return pwd.getpwuid(os.geteuid()).pw_dir


@contextlib.contextmanager
def _refusals() -> Iterator[list[int]]:
    """Turn RefusedError into its one-line reason on stderr, a log line and the exit code."""
    code = [0]
    try:
        yield code
    except RefusedError as exc:
        _say(exc.reason if exc.reason.startswith("borgtunnel:") else f"{LOG_TAG}: {exc.reason}")
        if exc.code in {EXIT_REFUSED, EXIT_POLICY}:
            log("warning", f"refused: {exc.reason}")
        code[0] = exc.code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=LOG_TAG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default=DEFAULT_POLICY, metavar="PATH")
    parser.add_argument("--version", action="version", version=f"{LOG_TAG} {VERSION}")
    args = parser.parse_args(argv)
    command = os.environ.get("SSH_ORIGINAL_COMMAND")
    with _refusals() as code:
        if command is None:
            raise RefusedError("no command (an interactive login is not allowed for this key)")
        policy = load_policy(args.policy)
        code[0] = handle(command, policy, _home())
    return code[0]


if __name__ == "__main__":
    sys.exit(main())
