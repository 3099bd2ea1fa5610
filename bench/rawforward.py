"""Raw throughput of borgtunnel's reverse forward: ``Tunnel.forward`` with no borg involved.

``python -m bench.rawforward --config C --client NAME --sink PATH --bytes N [--window W]``
connects like a pull (same Target, ciphers and window from the config), forwards the client's
socket to ``PATH`` (a bench.sink) and runs ``head -c N /dev/zero | nc -N -U SOCK`` on the client.
Prints JSON: negotiated cipher, window, wall seconds of the remote command, and this process's
CPU seconds for the transfer (the cost of the SSH layer in Python: cipher, MAC, framing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shlex
import time
from pathlib import Path

from bench import patches
from borgtunnel.config import load_config
from borgtunnel.tunnel import Target, Tunnel


async def _transfer(args: argparse.Namespace) -> dict[str, object]:
    config = load_config(Path(args.config))
    client = config.client(args.client)
    ssh = config.ssh_for(client)
    if args.window:
        ssh = ssh.model_copy(update={"window": args.window})
    target = Target(client.host, client.port, client.user, ssh)
    async with Tunnel.connect(target) as tunnel:
        remote = await tunnel.prepare_socket(client.remote_socket_path)
        errors: list[str] = []
        async with tunnel.forward(remote.path, Path(args.sink)):
            before = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            command = f"head -c {args.bytes} /dev/zero | nc -N -U {shlex.quote(remote.path)}"
            status, _ = await tunnel.run(command, stdin=b"", on_stderr=errors.append)
            seconds = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
        await tunnel.remove_socket(remote.path)
        conn = tunnel._conn  # bench only: which cipher did asyncssh negotiate?
        cipher = conn.get_extra_info("recv_cipher")
    if status != 0:
        raise SystemExit(f"remote command exited {status}: {''.join(errors)}")
    return {
        "cipher": cipher,
        "window": ssh.window,
        "seconds": seconds,
        "cpu_user": after.ru_utime - before.ru_utime,
        "cpu_system": after.ru_stime - before.ru_stime,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--client", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--window", type=int, default=0)
    parser.add_argument(
        "--patch", action="append", default=[], help="bench.patches option (prototype)"
    )
    args = parser.parse_args()
    patches.apply(args.patch)
    print(json.dumps(asyncio.run(_transfer(args))), flush=True)


if __name__ == "__main__":
    main()
