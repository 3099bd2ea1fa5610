"""Throwaway login users for tests that need another account (a login shell, an owner).

Each user lives only for one test: ``useradd`` with a home inside a directory the test made,
and at exit (also on failure) its processes are killed by pid, the user and its group removed
and the home deleted. Root only; callers skip otherwise.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# useradd/userdel take /etc/passwd's lock; another test process may hold it for a moment.
_LOCK_RETRIES = 20


def _run_retrying(argv: Sequence[str]) -> None:
    for _attempt in range(_LOCK_RETRIES):
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if result.returncode == 0:
            return
        if "lock" not in result.stderr.lower():
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        time.sleep(0.5)
    raise RuntimeError(f"{' '.join(argv)}: /etc/passwd stayed locked")


def _pids_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("Uid:") and int(line.split()[1]) == uid:
                    found.append(int(entry.name))
                    break
    return found


def _kill_all(uid: int) -> None:
    for _round in range(3):
        pids = _pids_of(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@contextlib.contextmanager
def throwaway_user(name: str, shell: str, home: Path) -> Iterator[pwd.struct_passwd]:
    """A user ``name`` with login shell ``shell`` and home ``home`` (created 0700, theirs)."""
    home.mkdir(mode=0o700)
    created = False
    try:
        # -p '*': not locked (sshd with UsePAM no refuses '!'), and no password can match it.
        _run_retrying(["useradd", "-M", "-U", "-d", str(home), "-s", shell, "-p", "*", "--", name])
        created = True
        user = pwd.getpwnam(name)
        os.chown(home, user.pw_uid, user.pw_gid)
        yield user
    finally:
        if created:
            uid = pwd.getpwnam(name).pw_uid
            _kill_all(uid)
            _run_retrying(["userdel", "--", name])
            with contextlib.suppress(KeyError):
                grp.getgrnam(name)
                _run_retrying(["groupdel", "--", name])
        shutil.rmtree(home, ignore_errors=True)
