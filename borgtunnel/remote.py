"""Shell text that runs on the client before and after a pull. Pure: builders and parsers only.

One round trip prepares everything (resolve ``~``, make the socket directory private, remove a
stale socket, pick nc or socat), because every extra exec on the client is a full SSH channel
open and shell start, and the unchanged-data pull is dominated by such fixed costs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from enum import IntEnum


class PrepareExit(IntEnum):
    """Exit codes of the prepare script, each with a fixed meaning (see PREPARE_SCRIPT)."""

    OK = 0
    SYMLINK = 65
    MKDIR_FAILED = 66
    NOT_OWNER = 67
    NOT_A_SOCKET = 68
    NO_TOOL = 69
    SHARED_DIR = 70
    TOO_LONG = 71


# $1 is the configured path (possibly starting with "~/"). Prints "TOOL\0PATH\0" on success.
PREPARE_SCRIPT = r"""
set -u
p=$1
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
if command -v nc >/dev/null 2>&1 && nc -h 2>&1 | grep -q -e '-N'; then t=nc
elif command -v socat >/dev/null 2>&1; then t=socat
else
  echo "borgtunnel: neither nc (netcat-openbsd, with -N and -U) nor socat is installed" >&2
  exit 69
fi
printf '%s\0%s\0' "$t" "$p"
"""


def prepare_command(configured_path: str) -> str:
    """``sh -c SCRIPT borgtunnel-prepare PATH``: the path is an argument, never script text."""
    return shlex.join(["sh", "-c", PREPARE_SCRIPT, "borgtunnel-prepare", configured_path])


def remove_command(path: str) -> str:
    return shlex.join(["rm", "-f", "--", path])


PID_PREFIX = "borgtunnel-pid "

# The shell reports its pid, then becomes the command (exec keeps the pid). Closing an SSH
# channel does not kill a non-pty remote process, and OpenSSH < 10 refuses signal requests for
# root, so a run we abandon is stopped with a plain `kill` over a fresh exec instead.
_PID_WRAPPER = f'printf "{PID_PREFIX}%s\\n" "$$" >&2; exec "$@"'

# Only signal the pid if it is still a borg (pid reuse); without /proc, trust the short window.
_KILL_SCRIPT = r"""
if [ -r "/proc/$1/cmdline" ] && ! tr '\0' ' ' < "/proc/$1/cmdline" | grep -q borg; then exit 0; fi
kill -TERM "$1" 2>/dev/null
exit 0
"""


def reporting_pid(argv: list[str]) -> str:
    """``argv`` as one remote command line that first prints ``borgtunnel-pid N`` on stderr."""
    return shlex.join(["sh", "-c", _PID_WRAPPER, "borgtunnel-run", *argv])


def parse_pid_line(line: str) -> int | None:
    if not line.startswith(PID_PREFIX):
        return None
    text = line[len(PID_PREFIX) :].strip()
    return int(text) if text.isdigit() else None


def kill_command(pid: int) -> str:
    return shlex.join(["sh", "-c", _KILL_SCRIPT, "borgtunnel-kill", str(pid)])


@dataclass(frozen=True)
class RemoteSocket:
    """Where the forwarded socket lives on the client and which tool connects to it."""

    path: str
    tool: str


def parse_prepare_output(stdout: bytes) -> RemoteSocket:
    parts = stdout.split(b"\0")
    if len(parts) != 3 or parts[2] or parts[0] not in {b"nc", b"socat"} or not parts[1]:
        raise ValueError(f"unexpected output from the prepare step: {stdout[:200]!r}")
    return RemoteSocket(path=parts[1].decode("utf-8", "surrogateescape"), tool=parts[0].decode())
