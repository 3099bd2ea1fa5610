"""Server-side repository operations (``borgtunnel init``): local borg, passphrase over a pipe."""

from __future__ import annotations

import structlog

from borgtunnel import borg, borg2
from borgtunnel.config import ClientConfig, Config
from borgtunnel.passphrase import read_passphrase
from borgtunnel.runs import keyguard
from borgtunnel.server.localborg import run_local_borg

log = structlog.get_logger("borgtunnel.runs.repository")


def repository_exists(client: ClientConfig) -> bool:
    """Whether ``client.repository`` holds a borg repository: borg 1.x and 2 both keep a
    ``config`` (a file, or borg 2's directory) at its top. A missing or empty directory does not;
    anything else there makes ``borg init`` refuse on its own."""
    return (client.repository / "config").exists()


async def init_repository(config: Config, client: ClientConfig) -> int:
    """Create ``client.repository`` with its configured encryption (borg 2: ``repo-create``).
    Returns borg's exit status.

    borg refuses on its own if a repository already exists there: nothing that is backed up can
    be overwritten by this command. The new key is exported to the server's key copy at once,
    before any client could touch it (see keyguard).
    """
    passphrase = await read_passphrase(client)
    server = config.server
    server_borg = config.borg_for(client)
    borg2_repo = client.borg2
    if borg2_repo:
        argv = borg2.repo_create_argv(server_borg, client.repository, client.encryption)
    else:
        argv = borg.init_argv(server_borg, client.repository, client.encryption)
    result = await run_local_borg(argv, state_dir=server.state_dir, passphrase=passphrase)
    bound = log.bind(client=client.name, repository=str(client.repository))
    if result.status != 0:
        bound.error("repository_init_failed", status=result.status, output=result.error_text())
        return result.status if result.status is not None else 2
    bound.info("repository_initialised", encryption=client.encryption)
    saved = await keyguard.save_key_copy(
        server_borg,
        client.repository,
        server.state_dir,
        client.name,
        borg2=borg2_repo,
        replace=True,  # a new repository: a copy of an earlier one at this path is obsolete
    )
    if saved:
        bound.info(
            "repository_key_saved", path=str(keyguard.key_path(server.state_dir, client.name))
        )
    return 0
