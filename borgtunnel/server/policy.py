"""Each tunnel's ``borg serve`` argv: the server's whole policy for one client, in one place.

Whatever the client's borg asks for, its ``BORG_RSH`` drops the words borg appends (borg.py), so
this argv alone decides what the client can reach and do:

- borg 1.x: ``--append-only --restrict-to-repository REPO`` (and ``--storage-quota``);
- borg 2: ``--rest`` on ``FILE:REPO`` with the client's ``permissions`` (default write-only:
  it can add archives and cannot read, delete or rename them, nor touch the key), and
  ``read-only`` for a restore.
"""

from __future__ import annotations

from borgtunnel import borg, borg2
from borgtunnel.config import ClientConfig, Config


def serve_argv(config: Config, client: ClientConfig, *, restore: bool = False) -> list[str]:
    server_borg = config.borg_for(client)
    if client.borg2:
        permissions = borg2.RESTORE_PERMISSIONS if restore else client.serve_permissions
        return borg2.serve_argv(server_borg, client.repository, permissions=permissions)
    quota = None if restore else client.storage_quota
    return borg.serve_argv(server_borg, client.repository, storage_quota=quota)
