"""Preparing a client: the gatekeeper program to install there and its authorized_keys line.

Pure apart from reading two files (the packaged gatekeeper, the server's public key).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from borgtunnel.client.remote import RUN_SCRIPT
from borgtunnel.client.snapshot import SNAPSHOT_PRELUDE
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


# The line of gatekeeper.py that receives the snapshot run script.
_SNAPSHOT_SLOT = (
    'SNAPSHOT_SCRIPT = ""  # filled in by `borgtunnel gatekeeper` (borgtunnel/ssh/enrol.py)'
)


def gatekeeper_source() -> str:
    """The standalone gatekeeper program as shipped in borgtunnel/client/, with this version's
    snapshot run script in its slot: the client then runs its own, installed copy of it."""
    text = resources.files("borgtunnel.client").joinpath("gatekeeper.py").read_text("utf-8")
    if text.count(_SNAPSHOT_SLOT) != 1:
        raise AssertionError("gatekeeper.py has lost its SNAPSHOT_SCRIPT slot")
    script = SNAPSHOT_PRELUDE + RUN_SCRIPT
    return text.replace(_SNAPSHOT_SLOT, f"SNAPSHOT_SCRIPT = {script!r}")


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


def gatekeeper_policy(client: ClientConfig) -> str:
    """A gatekeeper.conf that allows exactly what the client's config asks for: its paths, the
    directory of its remote_socket and its remote_borg (when that is one word; a command such
    as ``sudo -n borg`` is the server's choice, the gatekeeper runs ``borg``). Restores off."""
    socket_dir = client.remote_socket_path.rsplit("/", 1)[0] or "/"
    words = client.remote_borg.split()
    borg = words[0] if len(words) == 1 else "borg"
    paths = "".join(f"\n    {path}" for path in client.paths)
    return f"[gatekeeper]\npaths ={paths}\nsocket_dir = {socket_dir}\nborg = {borg}\nrestore = no\n"


def install_steps(config: Config, client: ClientConfig, *, command: str = GATEKEEPER_PATH) -> str:
    """What to do on the client before its first pull, as shell an administrator can follow:
    the gatekeeper program, its policy for this client, the authorized_keys line. Raises
    PublicKeyError like authorized_key_line."""
    line = authorized_key_line(config, client, command=command)
    policy = gatekeeper_policy(client)
    return (
        f"# on the server: the gatekeeper program, to copy to {client.host}\n"
        "borgtunnel gatekeeper > borgtunnel-gatekeeper\n"
        f"# on the client, as root\n"
        f"install -m 0755 borgtunnel-gatekeeper {GATEKEEPER_PATH}\n"
        "install -d -m 0755 /etc/borgtunnel\n"
        "cat > /etc/borgtunnel/gatekeeper.conf <<'CONF'\n"
        f"{policy}"
        "CONF\n"
        f"# and this line in the authorized_keys of {client.user} "
        f"(usually ~{client.user}/.ssh/authorized_keys):\n"
        f"{line}\n"
    )
