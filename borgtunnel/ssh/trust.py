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


def _ask_tty(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in {"y", "yes"}


async def trust(
    config: Config,
    client: ClientConfig,
    *,
    fingerprint: str | None,
    yes: bool,
    replace: bool,
    ask: Ask = _ask_tty,
) -> int:
    """Fetch, show, confirm, write. Exit 0 trusted (or already), 2 refused or failed."""
    ssh = config.ssh_for(client)
    target = Target(client.host, client.port, client.user, ssh)
    try:
        offered = await fetch_host_key(target)
        old = trusted_host_keys(target)
    except TunnelError as exc:
        logs.print_error(f"borgtunnel: {client.name}: {exc}")
        return EXIT_FAILURE
    name = host_pattern(client.host, client.port)
    print(f"{client.name} ({name}) offers a {offered.algorithm} key {offered.fingerprint}")
    if any(key.public == offered.public for key in old):
        print(f"{client.name}: already trusted in {ssh.known_hosts}")
        return EXIT_OK
    if old:
        shown = ", ".join(f"{key.algorithm} {key.fingerprint}" for key in old)
        if not replace:
            print(
                f"{client.name}: refused: {ssh.known_hosts} already trusts a DIFFERENT key for "
                f"{name}: {shown}; offered now: {offered.algorithm} {offered.fingerprint}. "
                "This may be a man-in-the-middle. If the client was really re-installed, verify "
                "the new fingerprint out of band and run again with --replace.",
            )
            return EXIT_FAILURE
        print(f"{client.name}: replacing old key(s) {shown} with {offered.fingerprint}")
    if fingerprint is not None:
        if fingerprint != offered.fingerprint:
            print(
                f"{client.name}: refused: the offered key is {offered.fingerprint}, "
                f"not the expected {fingerprint}"
            )
            return EXIT_FAILURE
    elif not yes and not ask(f"Trust {offered.fingerprint} for {name}?"):
        print(
            f"{client.name}: not trusted (confirm interactively, with --yes, or pass "
            "--fingerprint SHA256:... as verified on the client: ssh-keygen -lf "
            "/etc/ssh/ssh_host_ed25519_key.pub)"
        )
        return EXIT_FAILURE
    path = ssh.known_hosts
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    write_known_hosts(path, with_key(without_host(text, name), name, offered))
    print(f"{client.name}: added {offered.algorithm} {offered.fingerprint} to {path}")
    return EXIT_OK
