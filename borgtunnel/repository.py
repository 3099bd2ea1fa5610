"""Server-side repository operations (``borgtunnel init``): local borg, passphrase over a pipe."""

from __future__ import annotations

import asyncio
import os

import structlog

from borgtunnel import borg
from borgtunnel.config import ClientConfig, Config
from borgtunnel.passphrase import read_passphrase

log = structlog.get_logger("borgtunnel.repository")


async def init_repository(config: Config, client: ClientConfig) -> int:
    """Create ``client.repository`` with its configured encryption. Returns borg's exit status.

    The passphrase goes through a pipe named by BORG_PASSPHRASE_FD, so it is in no argv and no
    environment. borg refuses on its own if a repository already exists there: nothing that is
    backed up can be overwritten by this command.
    """
    passphrase = await read_passphrase(client)
    argv = borg.init_argv(config.server.borg, client.repository, client.encryption)
    env = {
        **os.environ,
        "BORG_DISPLAY_PASSPHRASE": "no",
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
    }
    pass_fds: tuple[int, ...] = ()
    read_end = -1
    if passphrase is not None:
        read_end, write_end = os.pipe()
        # A passphrase is far below the pipe buffer (64 KiB), so this write cannot block.
        with os.fdopen(write_end, "wb") as writer:
            writer.write(passphrase)
        env["BORG_PASSPHRASE_FD"] = str(read_end)
        pass_fds = (read_end,)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            pass_fds=pass_fds,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    finally:
        if read_end >= 0:
            os.close(read_end)
    output, _ = await process.communicate()
    status = process.returncode
    text = output.decode("utf-8", "replace").strip()
    bound = log.bind(client=client.name, repository=str(client.repository))
    if status == 0:
        bound.info("repository_initialised", encryption=client.encryption)
    else:
        bound.error("repository_init_failed", status=status, output=text)
    return status if status is not None else 2
