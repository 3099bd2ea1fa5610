"""Looking at a running pull from outside: which descriptors does ``borg serve`` read and write?

The claim to check: no repository byte is copied through Python on the server side of the
socket. If that holds, each ``borg serve`` child has the *accepted unix socket itself* as fd 0 and
fd 1 (no pipe to a Python relay), the borgtunnel process no longer holds that socket, and the
socket's peer is the connection asyncssh opened to deliver the forwarded channel.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.sshd import descendants


@dataclass
class ServeFds:
    pid: int
    cmdline: str
    fd0: str
    fd1: str
    ss_lines: list[str] = field(default_factory=list)
    parent_holds_socket: bool = False

    @property
    def direct_socket(self) -> bool:
        return self.fd0 == self.fd1 and self.fd0.startswith("socket:[")


def _readlink(path: str) -> str:
    try:
        return str(Path(path).readlink())
    except OSError:
        return "?"


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _fd_targets(pid: int) -> set[str]:
    try:
        entries = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return set()
    return {_readlink(str(entry)) for entry in entries}


def _ss_lines(inode: str) -> list[str]:
    """``ss -xp`` lines for the socket and its peer (matched by inode numbers)."""
    try:
        out = subprocess.run(
            ["ss", "-xpn"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    lines = [line for line in out.splitlines() if re.search(rf"\s{inode}\s", line)]
    peers = set()
    for line in lines:
        peers.update(re.findall(r"\s\*\s+(\d+)\s", line))
    peers.discard(inode)
    for peer in peers:
        lines += [line for line in out.splitlines() if re.search(rf"\s{peer}\s", line)]
    return [" ".join(line.split()) for line in dict.fromkeys(lines)]


def watch_serve(process: subprocess.Popen[bytes], interval: float = 0.02) -> list[ServeFds]:
    """Poll ``process`` until it exits; describe every ``borg serve`` descendant seen."""
    seen: dict[int, ServeFds] = {}
    while process.poll() is None:
        for pid in descendants(process.pid):
            if pid in seen:
                continue
            cmdline = _cmdline(pid)
            if " serve " not in f"{cmdline} ":
                continue
            fd0, fd1 = _readlink(f"/proc/{pid}/fd/0"), _readlink(f"/proc/{pid}/fd/1")
            info = ServeFds(pid, cmdline, fd0, fd1)
            inode = fd0.removeprefix("socket:[").rstrip("]")
            info.parent_holds_socket = fd0 in _fd_targets(process.pid)
            info.ss_lines = _ss_lines(inode) if inode.isdigit() else []
            seen[pid] = info
        time.sleep(interval)
    return list(seen.values())
