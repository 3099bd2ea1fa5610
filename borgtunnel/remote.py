"""Shell text that runs on the client. Pure: builders and parsers only.

A pull is ONE remote command (every extra exec costs an SSH channel open plus a login-shell
start — 0.1 s on a client whose ~/.bashrc does work — and the unchanged-data pull is dominated by
such fixed costs). The command speaks a tiny line protocol on stderr/stdin:

1. it prepares the socket directory (resolve ``~``; create 0700; refuse a symlink, a directory
   owned by someone else or a shared sticky one; remove a stale socket, which sshd never unlinks;
   pick ``nc -N -U`` or ``socat``) and prints ``borgtunnel-ready TOOL PATH`` on stderr;
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
"""

from __future__ import annotations

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


READY_PREFIX = "borgtunnel-ready "
PID_PREFIX = "borgtunnel-pid "
GO = b"go\n"

# $1 configured socket path (may start with "~/"), $2 BORG_RSH for nc, $3 for socat, then borg's
# argv. Messages go to stderr; the server shows them as the reason of a failed pull.
RUN_SCRIPT = r"""
set -u
p=$1; rsh_nc=$2; rsh_socat=$3; shift 3
case $p in "~/"*) p=$HOME/${p#"~/"} ;; esac
if [ ${#p} -gt 100 ]; then
  echo "borgtunnel: socket path $p is longer than 100 bytes (unix socket limit)" >&2; exit 71
fi
d=${p%/*}
[ -n "$d" ] || d=/
if [ -L "$d" ]; then echo "borgtunnel: socket directory $d is a symlink; refusing" >&2; exit 65; fi
if [ ! -e "$d" ]; then
  (umask 077 && mkdir -p -- "$d") || { echo "borgtunnel: cannot create $d" >&2; exit 66; }
fi
if [ ! -O "$d" ]; then
  echo "borgtunnel: socket directory $d is not owned by $(id -un); refusing" >&2; exit 67
fi
if [ -n "$(find "$d" -maxdepth 0 -perm /077 2>/dev/null)" ]; then
  if [ -k "$d" ]; then
    echo "borgtunnel: socket directory $d is a shared sticky directory; use a private one" >&2
    exit 70
  fi
  chmod 0700 -- "$d" || exit 66
fi
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
BORGTUNNEL_SOCKET=$p
export BORG_RSH BORGTUNNEL_SOCKET
printf 'borgtunnel-ready %s %s\n' "$t" "$p" >&2
IFS= read -r go || exit 72
[ "$go" = go ] || exit 72
exec 3<&0
"$@" 0<&3 3<&- &
pid=$!
exec 3<&-
printf '%s %s\n' "$$" "$pid" > "$pf"
printf 'borgtunnel-pid %s\n' "$pid" >&2
wait "$pid"
s=$?
owner=
read -r owner _ < "$pf" 2>/dev/null
[ "$owner" = "$$" ] && rm -f -- "$p" "$pf"
exit "$s"
"""


def run_command(configured_path: str, rsh_nc: str, rsh_socat: str, argv: Sequence[str]) -> str:
    """The whole remote side of a pull as one command line; every value is an argument."""
    return shlex.join(
        ["sh", "-c", RUN_SCRIPT, "borgtunnel-run", configured_path, rsh_nc, rsh_socat, *argv]
    )


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


def remove_command(*paths: str) -> str:
    return shlex.join(["rm", "-f", "--", *paths])


# Only signal the pid if it is still a borg (pid reuse); without /proc, trust the short window.
_KILL_SCRIPT = r"""
if [ -r "/proc/$1/cmdline" ] && ! tr '\0' ' ' < "/proc/$1/cmdline" | grep -q borg; then exit 0; fi
kill -TERM "$1" 2>/dev/null
exit 0
"""


def cleanup_command(pid: int | None, path: str) -> str:
    """For an abandoned run: SIGTERM borg (closing a channel does not kill a non-pty process,
    and OpenSSH < 10 refuses signal requests for root), then remove the socket. One exec."""
    kill = (
        shlex.join(["sh", "-c", _KILL_SCRIPT, "borgtunnel-kill", str(pid)])
        if pid is not None
        else "true"
    )
    return f"{kill}; {remove_command(path, path + '.pid')}"


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
