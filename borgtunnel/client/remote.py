"""Shell text that runs on the client. Pure: builders and parsers only.

A pull is ONE remote command (every extra exec costs an SSH channel open plus a login-shell
start — 0.1 s on a client whose ~/.bashrc does work — and the unchanged-data pull is dominated by
such fixed costs). The command speaks a tiny line protocol on stderr/stdin:

1. it prepares the socket directory (resolve ``~``; create a missing one 0700; refuse, never
   chmod, an unsafe one — see "Directories" below; remove a stale socket, which sshd never
   unlinks; pick ``nc -N -U`` or ``socat``) and prints ``borgtunnel-ready TOOL PATH`` on stderr;
2. it waits for a line ``go`` on stdin — sent once the server holds the reverse forward at PATH —
   and hands the rest of stdin (the passphrase, if any) to borg;
3. it starts borg, prints ``borgtunnel-pid N`` (so an abandoned run can be stopped by pid), waits
   for it, removes the socket and exits with borg's status.

``PATH.pid`` next to the socket names the run that owns it ("SHELLPID BORGPID"). A run whose link
dropped cannot be stopped by the server (no link), and its borg create would keep the client's
borg cache lock: the next run finds its pid there and stops it first. A run only removes the
socket and pid file while it still owns them, so an old run ending late never deletes a newer
run's forwarded socket.

If stdin closes without ``go`` (the forward failed) the script exits without running borg.

Login shells. sshd hands the command to the login user's shell (``$SHELL -c COMMAND``) and the
shells disagree about quoting: fish reads ``\\`` and ``\'`` inside single quotes as escapes,
tcsh refuses a newline inside quotes and expands ``!`` even there. So no script text and no
value (paths, excludes, archive name, borg argv) is ever put on the command line as such: the
script, preceded by ``set -- ARG…`` quoted for POSIX sh, travels base64-encoded inside one
single-quoted word, and the only shell that parses it is ``sh`` on the client::

    sh -c 'command -v base64 … || exit 74; c=$(printf %s BASE64 | base64 -d) && eval "$c"'

Every character of that line is in ``COMMAND_CHARSET`` — letters, digits, blanks and
``$(){}|;&>"%+/=-._:`` — none of which bash, dash, zsh, fish or tcsh treat specially inside
single quotes, so each of them passes the word to ``sh`` unchanged (``encoded_command`` asserts
it). A shell that mangled it would hand ``base64 -d`` garbage, which fails, and ``&&`` then
runs nothing. Cost: one ``base64`` process and a third more bytes, still one exec.

Directories. The prepare step never changes the mode of a directory. A missing socket
directory (and missing parents) is created 0700. The socket directory must be a real
directory (no symlink) owned by the login user and not writable by group or others; every
component above it, up to ``/``, must be owned by root or the user, and one writable by group
or others must be sticky (``/tmp``: the kernel then lets nobody else rename the user's or root's
entry in it). Symlinks on the way are owner-checked, and the real path (``cd -P``) is checked by
the same rule. The existing part of the chain is checked before anything is created. This is
OpenSSH's StrictModes rule except for sticky ancestors (see borgtunnel/privatedir.py).
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum


class RunExit(IntEnum):
    """Exit codes of the run script before borg starts, each with a fixed meaning."""

    SYMLINK = 65
    MKDIR_FAILED = 66
    NOT_OWNER = 67
    NOT_A_SOCKET = 68
    NO_TOOL = 69
    SHARED_DIR = 70
    TOO_LONG = 71
    NO_GO = 72
    UNSAFE_ANCESTOR = 73
    NO_BASE64 = 74
    SOURCES = 75


READY_PREFIX = "borgtunnel-ready "
PID_PREFIX = "borgtunnel-pid "
SOURCE_PREFIX = "borgtunnel-source "
GO = b"go\n"

# $1 configured socket path (may start with "~/"), $2 BORG_RSH for nc, $3 for socat, then borg's
# argv. Messages go to stderr; the server shows them as the reason of a failed pull.
RUN_SCRIPT = r"""
set -u
set -f
p=$1; rsh_nc=$2; rsh_socat=$3; shift 3
case $p in "~/"*) p=$HOME/${p#"~/"} ;; esac
if [ ${#p} -gt 100 ]; then
  echo "borgtunnel: socket path $p is longer than 100 bytes (unix socket limit)" >&2; exit 71
fi
d=${p%/*}
[ -n "$d" ] || d=/
me=$(id -u)
sl=0
# m (mode string) and o (owner uid) of $1, a symlink itself rather than its target.
inspect() {
  l=$(LC_ALL=C ls -ldn -- "$1" 2>/dev/null) || return 1
  set -- $l
  m=$1; o=$3
}
# Every component above $1 up to /: owned by root or us; writable by group or others only if
# sticky (nobody else may then rename our or root's entry in it). $2 is the directory we need.
check_above() {
  c=$1
  while :; do
    c=${c%/*}; [ -n "$c" ] || c=/
    if ! inspect "$c"; then
      echo "borgtunnel: cannot inspect $c (on the way to $2)" >&2; return 73
    fi
    if [ "$o" != 0 ] && [ "$o" != "$me" ]; then
      echo "borgtunnel: $c (on the way to $2) is owned by uid $o," \
        "neither root nor $(id -un); refusing" >&2
      return 73
    fi
    case $m in
      l*) sl=1 ;;
      d????????[tT]*) ;;
      d????w*|d???????w*)
        echo "borgtunnel: $c (on the way to $2) is writable by group or others" \
          "and not sticky; refusing" >&2
        return 73 ;;
      d*) ;;
      *) echo "borgtunnel: $c (on the way to $2) is not a directory" >&2; return 73 ;;
    esac
    [ "$c" = / ] && return 0
  done
}
# The same rule along the real path of the existing directory $1, if check_above met a symlink
# (sl=1; the usual path has none, and every ls costs a fork on the client).
check_real() {
  [ "$sl" = 1 ] || return 0
  r=$(CDPATH='' cd -P -- "$1" 2>/dev/null && pwd -P && echo .) || {
    echo "borgtunnel: cannot resolve $1" >&2; return 73; }
  r=${r%.}; r=${r%?}
  check_above "$r/x" "$2"
}
e=$d
while [ ! -e "$e" ] && [ ! -L "$e" ]; do e=${e%/*}; [ -n "$e" ] || e=/; done
if [ "$e" != "$d" ]; then
  check_above "$e/x" "$d" || exit 73
  if [ -d "$e" ]; then check_real "$e" "$d" || exit 73; fi
  sl=0
  (umask 077 && mkdir -p -- "$d") || { echo "borgtunnel: cannot create $d" >&2; exit 66; }
fi
if [ -L "$d" ]; then echo "borgtunnel: socket directory $d is a symlink; refusing" >&2; exit 65; fi
if [ ! -d "$d" ]; then echo "borgtunnel: $d is not a directory" >&2; exit 66; fi
if [ ! -O "$d" ]; then
  echo "borgtunnel: socket directory $d is not owned by $(id -un); refusing" >&2; exit 67
fi
inspect "$d" || { echo "borgtunnel: cannot inspect $d" >&2; exit 66; }
case $m in
  d????w*|d???????w*)
    echo "borgtunnel: socket directory $d is writable by group or others" \
      "(a shared directory); use a private one (0700 or 0755)" >&2
    exit 70 ;;
esac
check_above "$d" "$d" || exit 73
check_real "$d" "$d" || exit 73
if [ -S "$p" ]; then
  rm -f -- "$p"
elif [ -e "$p" ] || [ -L "$p" ]; then
  echo "borgtunnel: $p exists and is not a socket; refusing to remove it" >&2; exit 68
fi
if command -v nc >/dev/null 2>&1 && nc -h 2>&1 | grep -q -e '-N'; then
  t=nc; BORG_RSH=$rsh_nc
elif command -v socat >/dev/null 2>&1; then
  t=socat; BORG_RSH=$rsh_socat
else
  echo "borgtunnel: neither nc (netcat-openbsd, with -N and -U) nor socat is installed" >&2
  exit 69
fi
pf=$p.pid
old=
[ -f "$pf" ] && read -r _ old _ < "$pf" 2>/dev/null
printf '%s\n' "$$" > "$pf"
if [ -n "$old" ] && [ -r "/proc/$old/cmdline" ] && tr '\0' ' ' < "/proc/$old/cmdline" | grep -q borg
then
  echo "borgtunnel: stopping borg $old, left running by an earlier run whose link dropped" >&2
  kill -TERM "$old" 2>/dev/null
  i=0
  while [ $i -lt 100 ] && kill -0 "$old" 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
fi
# Snapshots (borgtunnel/client/snapshot.py prepends the prelude that defines this), taken once
# no earlier run's borg holds them.
[ -z "${borgtunnel_snap:-}" ] || snapshot_prepare || exit $?
BORGTUNNEL_SOCKET=$p
# borg 2 reads BORGSTORE_RSH and copies BORG_RSH into it only when it is unset: one set by the
# client's profile would otherwise take borg elsewhere. borg 1.x ignores it.
BORGSTORE_RSH=$BORG_RSH
export BORG_RSH BORGSTORE_RSH BORGTUNNEL_SOCKET
printf 'borgtunnel-ready %s %s\n' "$t" "$p" >&2
IFS= read -r go || exit 72
[ "$go" = go ] || exit 72
# Sources (borgtunnel/client/sources.py): each dump writes into a named pipe in the private
# directory $sd, which borg reads (--read-special) from there as borgtunnel-sources/...
sd=; dumps=; dpids=
# Opening a pipe read-write never blocks and releases a dump blocked opening it for writing
# (borg never reached it); once closed, that dump's next write fails. Then the directory goes.
release() {
  [ -d "$1" ] && [ ! -L "$1" ] || return 0
  find "$1" -type p -exec sh -c ': <> "$1"' sh {} \; 2>/dev/null
  cd / && rm -rf -- "$1"
}
# Runs the first $1 of the remaining arguments as a dump ("$@" cannot be cut in place), in a
# session of its own where setsid exists, so stopping it stops what it started (a shell's
# children) too: "stop" signals the group, or the pid alone.
ss=
command -v setsid >/dev/null 2>&1 && ss=setsid
first() {
  n=$1; shift; k=$#; i=0
  for a do [ $i -lt "$n" ] && set -- "$@" "$a"; i=$((i + 1)); done
  shift "$k"; exec $ss "$@"
}
# (dash's kill knows no "--"; "-TERM -PGID" is read the same by dash, bash and busybox.)
stop() { kill -TERM "-$1" 2>/dev/null || kill -TERM "$1" 2>/dev/null; }
if [ "${1-}" = borgtunnel-sources ]; then
  sd=$p.sources
  release "$sd"
  if ! printf 'a\0' | sed -z 's/a/b/' >/dev/null 2>&1 ||
    ! find / -maxdepth 0 -xtype d >/dev/null 2>&1; then
    echo "borgtunnel: sources need GNU find and sed on the client" >&2; exit 75
  fi
  (umask 077 && mkdir -- "$sd") || { echo "borgtunnel: cannot create $sd" >&2; exit 75; }
  n=$2; shift 2
  # --read-special would read every pipe and device under the paths, and follow symlinks to
  # them: exclude each (sh: pattern; '*', '?', ']' and '\' bracketed; '[' and a newline matched
  # by '?', since borg's regex of '[[]' warns; matching a neighbour too only excludes more).
  (k=$#; i=0; for a do [ $i -lt "$n" ] && set -- "$@" "$a"; i=$((i + 1)); done; shift "$k"
    exec find -P "$@" \( -xtype p -o -xtype b -o -xtype c \) -print0) 2>/dev/null |
    sed -z 's/[[\n]/\x01/g; s/[]*?\\]/[&]/g; s/\x01/?/g; s/^/sh:/' |
    tr '\0' '\n' > "$sd/borgtunnel-special-files"
  shift "$n"
  nj=$1; shift
  bad=
  while [ "$nj" -gt 0 ]; do
    label=$1; f=$sd/$2; argc=$3; shift 3
    if (umask 077 && mkdir -p -- "${f%/*}" && mkfifo -m 600 -- "$f"); then
      (first "$argc" "$@") < /dev/null > "$f" &
      dumps="$dumps $!:$label"; dpids="$dpids $!"
    else
      bad=1; echo "borgtunnel: cannot create the pipe $f" >&2
    fi
    shift "$argc"; nj=$((nj - 1))
  done
  if [ -n "$bad" ] || ! cd -- "$sd"; then
    for j in $dumps; do stop "${j%%:*}"; done
    release "$sd"; exit 75
  fi
fi
exec 3<&0
"$@" 0<&3 3<&- &
pid=$!
exec 3<&-
printf '%s %s%s\n' "$$" "$pid" "$dpids" > "$pf"
printf 'borgtunnel-pid %s\n' "$pid" >&2
wait "$pid"
s=$?
if [ -n "$sd" ]; then
  # The link may be gone: a write to it must not end this script before the cleanup.
  trap '' PIPE
  find "$sd" -type p -exec sh -c ': <> "$1"' sh {} \; 2>/dev/null
  # A dump still running a while after borg ended (stuck on a lock) is stopped.
  (sleep 5; for j in $dumps; do stop "${j%%:*}"; done) >/dev/null 2>&1 &
  killer=$!
  for j in $dumps; do
    wait "${j%%:*}"
    printf 'borgtunnel-source %s %s\n' "${j#*:}" "$?" >&2
  done
  kill "$killer" 2>/dev/null
  release "$sd"
fi
owner=
read -r owner _ < "$pf" 2>/dev/null
[ "$owner" = "$$" ] && rm -f -- "$p" "$pf"
exit "$s"
"""


# Characters of the command line the login shell sees. None is special inside single quotes in
# bash, dash, zsh, fish or tcsh (no quote, backslash, "!", newline); base64 needs only A-Za-z0-9+/=.
COMMAND_CHARSET = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 $(){}|;&>\"%+/=-._:'"
)

_DECODER = (
    "sh -c 'command -v base64 >/dev/null 2>&1 || "
    '{ echo "borgtunnel: the client has no base64 (coreutils); install it" >&2; exit 74; }; '
    'c=$(printf %s {payload} | base64 -d) && eval "$c"\''
)


# What each encoded command is, on its first line: a client-side gatekeeper
# (borgtunnel/client/gatekeeper.py) reads the kind and the ``set --`` line, never the script.
REQUEST_RUN = "borgtunnel-run"
# A run with sources: a gatekeeper runs its policy's own dumps, matched against the server's.
REQUEST_RUN_SOURCES = "borgtunnel-run-sources"
REQUEST_RESTORE = "borgtunnel-restore"
REQUEST_CLEANUP = "borgtunnel-cleanup"
REQUEST_REMOVE = "borgtunnel-remove"
REQUEST_DOCTOR = "borgtunnel-doctor"
REQUEST_SCRIPT = "borgtunnel-script"  # anything else (tests, tools): no gatekeeper allows it


def encoded_command(script: str, args: Sequence[str], *, kind: str = REQUEST_SCRIPT) -> str:
    """A command line that runs ``script`` with ``args`` as "$@" under POSIX sh, whatever the
    login shell: both travel base64-encoded, so the login shell sees no value and no quoting.

    The decoded program is ``# KIND``, then ``set -- ARGS`` (shlex-quoted, one line: shlex
    never leaves a newline unquoted), then the script.
    """
    program = f"# {kind}\nset -- {shlex.join(args)}\n{script}"
    payload = base64.b64encode(program.encode("utf-8", "surrogateescape")).decode("ascii")
    command = _DECODER.replace("{payload}", payload)
    if not COMMAND_CHARSET.issuperset(command) or command.count("'") != 2:
        raise AssertionError(f"remote command has a character some login shell reads: {command!r}")
    return command


def run_command(
    configured_path: str,
    rsh_nc: str,
    rsh_socat: str,
    argv: Sequence[str],
    *,
    kind: str = REQUEST_RUN,
    sources: Sequence[str] = (),
) -> str:
    """The whole remote side of a pull (or a restore) as one command line; every value is an
    argument. ``sources`` is the block borgtunnel/client/sources.py builds (sources_args)."""
    args = [configured_path, rsh_nc, rsh_socat, *sources, *argv]
    return encoded_command(RUN_SCRIPT, args, kind=kind)


@dataclass(frozen=True)
class RemoteSocket:
    """Where the forwarded socket lives on the client and which tool connects to it."""

    path: str
    tool: str


def parse_ready_line(line: str) -> RemoteSocket | None:
    """``borgtunnel-ready TOOL PATH`` -> RemoteSocket; anything else -> None."""
    if not line.startswith(READY_PREFIX):
        return None
    tool, _, path = line[len(READY_PREFIX) :].rstrip("\n").partition(" ")
    if tool not in {"nc", "socat"} or not path.startswith("/"):
        return None
    return RemoteSocket(path=path, tool=tool)


def parse_pid_line(line: str) -> int | None:
    if not line.startswith(PID_PREFIX):
        return None
    text = line[len(PID_PREFIX) :].strip()
    return int(text) if text.isdigit() else None


def parse_source_line(line: str) -> tuple[str, int] | None:
    """``borgtunnel-source LABEL STATUS`` -> (label, status); anything else -> None."""
    if not line.startswith(SOURCE_PREFIX):
        return None
    label, _, status = line[len(SOURCE_PREFIX) :].rstrip("\n").partition(" ")
    if not label or len(label) > 200 or not status.isdigit() or len(status) > 3:
        return None
    return label, int(status)


def remove_command(*paths: str) -> str:
    return encoded_command('rm -f -- "$@"', paths, kind=REQUEST_REMOVE)


# Only signal the pid if it is still a borg (pid reuse); without /proc, trust the short window.
# $1 is the pid ("" when borg never started), the rest are the files to remove.
_CLEANUP_SCRIPT = r"""
pid=$1; shift
if [ -n "$pid" ]; then
  if [ -r "/proc/$pid/cmdline" ] && ! tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q borg; then
    :
  else
    kill -TERM "$pid" 2>/dev/null
  fi
fi
rm -f -- "$@"
# A run with sources left its private directory next to the socket ($1 is the socket); the
# run script removes it itself unless it was killed. A dump blocked opening a pipe is released.
sd=$1.sources
if [ -d "$sd" ] && [ ! -L "$sd" ]; then
  find "$sd" -type p -exec sh -c ': <> "$1"' sh {} \; 2>/dev/null
  rm -rf -- "$sd"
fi
"""


def cleanup_command(pid: int | None, path: str) -> str:
    """For an abandoned run: SIGTERM borg (closing a channel does not kill a non-pty process,
    and OpenSSH < 10 refuses signal requests for root), then remove the socket. One exec."""
    args = ["" if pid is None else str(pid), path, path + ".pid"]
    return encoded_command(_CLEANUP_SCRIPT, args, kind=REQUEST_CLEANUP)


def ready_path_matches(configured: str, reported: str) -> bool:
    """Is the path a client's prepare step reported the configured ``remote_socket``?

    An absolute path must be equal. ``~/REST`` must come back as ``HOME/REST`` with an absolute,
    normalised HOME: the server cannot know the client's home, but it can refuse anything else
    (``..``, other file names, a different directory), so a login script printing its own ready
    line cannot make the server remove or forward at a path of its choosing.
    """
    if "\n" in reported or "\0" in reported or not reported.startswith("/"):
        return False
    if not configured.startswith("~/"):
        return reported == configured
    rest = configured[2:]
    home, sep, tail = reported.rpartition("/" + rest) if rest else ("", "", "")
    if not sep or tail or not home.startswith("/"):
        return False
    parts = home.split("/")[1:]
    return all(part not in ("", ".", "..") for part in parts) or home == "/"
