"""``borgtunnel trust``: enrol a client's host key in its ``known_hosts``, after confirmation.

borgtunnel never trusts a key on first use during a pull. ``trust`` connects once (no login),
shows the key's type and SHA256 fingerprint, and adds it only when the administrator confirms
(interactively, with ``--yes``, or because ``--fingerprint`` matches what was verified out of
band). A host that already has a *different* key is never changed without ``--replace``, and
then the old and the new fingerprint are both shown. Afterwards a pull accepts exactly that key.

The file edit is pure text (this module does not use asyncssh): lines for other hosts,
comments, ``@cert-authority`` and ``@revoked`` markers stay; with ``--replace`` the plain or
hashed (``|1|salt|hash``) entries naming exactly this host are dropped; the new file replaces
the old one atomically, 0600 (or the old file's mode).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from borgtunnel import logs
from borgtunnel.config import ClientConfig, Config
from borgtunnel.ssh.tunnel import HostKey, Target, TunnelError, fetch_host_key, trusted_host_keys

EXIT_OK = 0
EXIT_FAILURE = 2

Ask = Callable[[str], bool]


def host_pattern(host: str, port: int) -> str:
    """How known_hosts names a host: ``[host]:port`` unless the port is 22."""
    return host if port == 22 else f"[{host}]:{port}"


def _names_host(field: str, name: str) -> bool:
    for entry in field.split(","):
        if entry == name:
            return True
        if entry.startswith("|1|"):
            _, _, salt, digest = [*entry.split("|"), "", ""][:4]
            with contextlib.suppress(ValueError):
                mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
                if hmac.compare_digest(base64.b64encode(mac).decode(), digest):
                    return True
    return False


def without_host(text: str, name: str) -> str:
    """``text`` (a known_hosts file) without the plain entries for exactly ``name``."""
    kept = []
    for line in text.splitlines(keepends=True):
        words = line.split()
        if words and not words[0].startswith(("#", "@")) and _names_host(words[0], name):
            continue
        kept.append(line)
    return "".join(kept)


def with_key(text: str, name: str, key: HostKey) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{text}{name} {key.public}\n"


def write_known_hosts(path: Path, text: str) -> None:
    """Replace ``path`` atomically; keep its mode, or 0600 for a new file (dir 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(prefix=".known_hosts.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).chmod(mode)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ask_tty(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in {"y", "yes"}


@dataclass(frozen=True)
class HostKeyCheck:
    """What the client offers against what its ``known_hosts`` already trusts for it."""

    name: str  # the known_hosts pattern: ``host`` or ``[host]:port``
    path: Path  # the client's known_hosts file
    offered: HostKey
    trusted: tuple[HostKey, ...]

    @property
    def pinned(self) -> bool:
        """The offered key is the one already trusted: nothing to do."""
        return any(key.public == self.offered.public for key in self.trusted)

    @property
    def conflicts(self) -> bool:
        """known_hosts trusts other key(s) for this host, and not the offered one."""
        return bool(self.trusted) and not self.pinned

    def trusted_text(self) -> str:
        return ", ".join(f"{key.algorithm} {key.fingerprint}" for key in self.trusted)


async def check_host_key(config: Config, client: ClientConfig) -> HostKeyCheck:
    """Connect once (no login) for the offered key; read what known_hosts trusts. Raises
    TunnelError (unreachable, unreadable known_hosts)."""
    ssh = config.ssh_for(client)
    target = Target(client.host, client.port, client.user, ssh)
    offered = await fetch_host_key(target)
    return HostKeyCheck(
        host_pattern(client.host, client.port),
        ssh.known_hosts,
        offered,
        tuple(trusted_host_keys(target)),
    )


def pin_host_key(check: HostKeyCheck) -> None:
    """Write the offered key for the host, replacing any entries it had."""
    path = check.path
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    write_known_hosts(path, with_key(without_host(text, check.name), check.name, check.offered))


def fingerprint_mismatch(check: HostKeyCheck, expected: str) -> str | None:
    """The refusal when ``--fingerprint`` is not the offered key's; None when it matches."""
    if expected == check.offered.fingerprint:
        return None
    return f"refused: the offered key is {check.offered.fingerprint}, not the expected {expected}"


async def trust(
    config: Config,
    client: ClientConfig,
    *,
    fingerprint: str | None,
    yes: bool,
    replace: bool,
    ask: Ask = ask_tty,
) -> int:
    """Fetch, show, confirm, write. Exit 0 trusted (or already), 2 refused or failed."""
    try:
        check = await check_host_key(config, client)
    except TunnelError as exc:
        logs.print_error(f"borgtunnel: {client.name}: {exc}")
        return EXIT_FAILURE
    offered, name = check.offered, check.name
    print(f"{client.name} ({name}) offers a {offered.algorithm} key {offered.fingerprint}")
    if check.pinned:
        print(f"{client.name}: already trusted in {check.path}")
        return EXIT_OK
    if check.conflicts:
        shown = check.trusted_text()
        if not replace:
            print(
                f"{client.name}: refused: {check.path} already trusts a DIFFERENT key for "
                f"{name}: {shown}; offered now: {offered.algorithm} {offered.fingerprint}. "
                "This may be a man-in-the-middle. If the client was really re-installed, verify "
                "the new fingerprint out of band and run again with --replace.",
            )
            return EXIT_FAILURE
        print(f"{client.name}: replacing old key(s) {shown} with {offered.fingerprint}")
    if fingerprint is not None:
        if (refusal := fingerprint_mismatch(check, fingerprint)) is not None:
            print(f"{client.name}: {refusal}")
            return EXIT_FAILURE
    elif not yes and not ask(f"Trust {offered.fingerprint} for {name}?"):
        print(
            f"{client.name}: not trusted (confirm interactively, with --yes, or pass "
            "--fingerprint SHA256:... as verified on the client: ssh-keygen -lf "
            "/etc/ssh/ssh_host_ed25519_key.pub)"
        )
        return EXIT_FAILURE
    pin_host_key(check)
    print(f"{client.name}: added {offered.algorithm} {offered.fingerprint} to {check.path}")
    return EXIT_OK
