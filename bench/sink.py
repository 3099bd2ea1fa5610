"""A unix socket that swallows one connection and reports how fast the bytes came.

``python -m bench.sink PATH`` prints ``ready``, accepts one connection, reads it to EOF into a
reused 1 MiB buffer and prints ``{"bytes": N, "seconds": S}`` (accept to EOF). It runs in its
own process so the reader costs the same for both tunnels and shares no GIL with asyncssh.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def main() -> None:
    path = sys.argv[1]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    conn, _ = listener.accept()
    started = time.perf_counter()
    buffer = bytearray(1024 * 1024)
    view = memoryview(buffer)
    total = 0
    while True:
        count = conn.recv_into(view)
        if not count:
            break
        total += count
    seconds = time.perf_counter() - started
    conn.close()
    listener.close()
    print(json.dumps({"bytes": total, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
