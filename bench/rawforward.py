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
import time
from pathlib import Path

from bench import patches
from borgtunnel.borg import RSH_BY_TOOL
from borgtunnel.client.remote import GO, parse_ready_line, run_command
from borgtunnel.config import load_config
from borgtunnel.ssh.tunnel import Target, Tunnel


async def _transfer(args: argparse.Namespace) -> dict[str, object]:
    config = load_config(Path(args.config))
    client = config.client(args.client)
    ssh = config.ssh_for(client)
    if args.window:
        ssh = ssh.model_copy(update={"window": args.window})
    target = Target(client.host, client.port, client.user, ssh)
    async with Tunnel.connect(target) as tunnel:
        errors: list[str] = []
        # The same one-command protocol as a pull (borgtunnel/client/remote.py), with the
        # transfer in place of borg create: prepare, "ready", forward, "go", run, socket removed.
        payload = ["sh", "-c", f'head -c {args.bytes} /dev/zero | nc -N -U "$BORGTUNNEL_SOCKET"']
        command = run_command(
            client.remote_socket_path, RSH_BY_TOOL["nc"], RSH_BY_TOOL["socat"], payload
        )
        async with tunnel.start(command) as rr:
            remote = None
            while remote is None:
                line = await rr.next_line()
                if line is None:
                    raise SystemExit(f"remote prepare failed: {''.join(errors)}")
                remote = parse_ready_line(line)
                if remote is None:
                    errors.append(line)
            async with tunnel.forward(remote.path, Path(args.sink)):
                before = resource.getrusage(resource.RUSAGE_SELF)
                started = time.perf_counter()
                rr.send_and_close(GO)
                status, _ = await rr.finish(on_stderr=errors.append)
                seconds = time.perf_counter() - started
                after = resource.getrusage(resource.RUSAGE_SELF)
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
