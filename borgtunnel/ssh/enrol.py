"""Preparing a client: the gatekeeper program to install there and its authorized_keys line.

Pure apart from reading two files (the packaged gatekeeper, the server's public key).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from borgtunnel.config import ClientConfig, Config

GATEKEEPER_PATH = "/usr/local/bin/borgtunnel-gatekeeper"
# restrict: no pty, agent, X11 or port forwarding; port-forwarding: the reverse unix-socket
# forward a pull needs (restrict alone forbids it, verified against OpenSSH 9.2).
KEY_OPTIONS = "restrict,port-forwarding"


class PublicKeyError(Exception):
    """The public key next to the configured identity is missing or unreadable."""

    def __init__(self, client: str, path: Path | None, reason: str) -> None:
        self.client = client
        self.path = path
        self.reason = reason
        super().__init__(f"{client}: {reason}")


def gatekeeper_source() -> str:
    """The standalone gatekeeper program, exactly as shipped in borgtunnel/client/."""
    return resources.files("borgtunnel.client").joinpath("gatekeeper.py").read_text("utf-8")


def authorized_key_line(
    config: Config, client: ClientConfig, *, command: str = GATEKEEPER_PATH
) -> str:
    """``restrict,port-forwarding,command="…" TYPE KEY COMMENT`` for the client's login user."""
    identity = config.ssh_for(client).identity
    if identity is None:
        raise PublicKeyError(client.name, None, "no ssh.identity configured")
    pub = Path(f"{identity}.pub")
    try:
        words = pub.read_text(encoding="utf-8").split()
    except OSError as exc:
        raise PublicKeyError(
            client.name,
            pub,
            f"cannot read the public key {pub}: {exc.strerror or exc} "
            f"(recreate it with: ssh-keygen -y -f {identity} > {pub})",
        ) from None
    if len(words) < 2 or not words[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise PublicKeyError(client.name, pub, f"{pub} is not an OpenSSH public key")
    if '"' in command:
        raise PublicKeyError(client.name, pub, "the gatekeeper command must not contain '\"'")
    comment = " ".join(words[2:]) or "borgtunnel@server"
    return f'{KEY_OPTIONS},command="{command}" {words[0]} {words[1]} {comment}'
