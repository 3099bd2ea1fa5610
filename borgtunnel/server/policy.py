"""Each tunnel's ``borg serve`` argv: the server's whole policy for one client, in one place.

Whatever the client's borg asks for, its ``BORG_RSH`` drops the words borg appends (borg.py), so
this argv alone decides what the client can reach and do:

- borg 1.x: ``--append-only --restrict-to-repository REPO`` (and ``--storage-quota``). borg 1.x
  ``serve`` has no read-only mode: a restore's serve only gets the read requests of ``borg
  extract`` (server/rpcfilter.py), and has the smallest quota borg accepts
  (``RESTORE_STORAGE_QUOTA``), whatever the client's;
- borg 2: ``--rest`` on ``FILE:REPO`` with the client's ``permissions`` (default write-only:
  it can add archives and cannot read, delete or rename them, nor touch the key), and
  ``read-only`` for a restore.
"""

from __future__ import annotations

import sys

from borgtunnel import borg, borg2
from borgtunnel.config import ClientConfig, Config

# borg 1.2 and 1.4 refuse a quota below 10M ("At least 10M are required"); 1.4 reads 0 as "no
# quota". The quota is the repository's total: on one that holds more, every write fails.
RESTORE_STORAGE_QUOTA = "10M"


def serve_argv(config: Config, client: ClientConfig, *, restore: bool = False) -> list[str]:
    server_borg = config.borg_for(client)
    if client.borg2:
        permissions = borg2.RESTORE_PERMISSIONS if restore else client.serve_permissions
        return borg2.serve_argv(server_borg, client.repository, permissions=permissions)
    if not restore:
        return borg.serve_argv(server_borg, client.repository, storage_quota=client.storage_quota)
    serve = borg.serve_argv(server_borg, client.repository, storage_quota=RESTORE_STORAGE_QUOTA)
    return [sys.executable, "-m", "borgtunnel.server.rpcfilter", "--", *serve]
