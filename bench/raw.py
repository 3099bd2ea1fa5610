"""Raw tunnel throughput: bytes from ``/dev/zero`` on the client through a reverse unix-socket
forward into a sink on the server, borg not involved. borgtunnel's ``Tunnel.forward`` (asyncssh)
against OpenSSH's ``ssh -R``, on loopback and through the delay proxy."""

from __future__ import annotations

import json
import resource
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bench.env import BenchError, Workspace
from bench.methods import Methods, Site
from bench.sections import MIB, Results, progress, rotated


def _through_sink(ws: Workspace, name: str, send: Callable[[str], dict[str, Any]]) -> float:
    """Start a sink, let ``send(sink_path)`` push bytes at it; return MB/s measured by the sink."""
    sink_path = ws.mkdir("sinks") / f"{name}.sock"
    sink = ws.spawn([sys.executable, "-m", "bench.sink", str(sink_path)])
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != b"ready":
            raise BenchError(f"sink did not start: {sink.stderr.read() if sink.stderr else ''!r}")
        extra = send(str(sink_path))
        out, _ = sink.communicate(timeout=60)
        report = json.loads(out)
    finally:
        ws.stop(sink)
        sink_path.unlink(missing_ok=True)
    if extra.get("bytes") and report["bytes"] != extra["bytes"]:
        raise BenchError(f"sink got {report['bytes']} bytes, expected {extra['bytes']}")
    return float(report["bytes"]) / float(report["seconds"]) / 1e6


def _borgtunnel_raw(
    ws: Workspace,
    m: Methods,
    client: str,
    size: int,
    *,
    results: Results,
    key: str,
    window: int = 0,
) -> Callable[[str], dict[str, Any]]:
    def send(sink: str) -> dict[str, Any]:
        argv = [sys.executable, "-m", "bench.rawforward", "--config", str(m.config)]
        argv += ["--client", client, "--sink", sink, "--bytes", str(size)]
        if window:
            argv += ["--window", str(window)]
        report = json.loads(ws.run(argv).stdout)
        results.info[f"{key}.cipher"] = report["cipher"]
        results.info[f"{key}.window"] = report["window"]
        results.add(f"{key}.cpu", report["cpu_user"] + report["cpu_system"])
        return {"bytes": size}

    return send


def _openssh_raw(
    ws: Workspace,
    m: Methods,
    port: int,
    size: int,
    *,
    results: Results,
    key: str,
    options: Sequence[str] = (),
) -> Callable[[str], dict[str, Any]]:
    def send(sink: str) -> dict[str, Any]:
        remote = m.client_sockets / "raw-openssh.sock"
        remote.unlink(missing_ok=True)
        command = f"head -c {size} /dev/zero | nc -N -U {shlex.quote(str(remote))}"
        # The ssh client is our only child reaped meanwhile: its CPU, handshake included.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            ws.run([*ws.ssh_argv(port, "-R", f"{remote}:{sink}", *options), command])
        finally:
            remote.unlink(missing_ok=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        results.add(f"{key}.cpu", cpu)
        return {"bytes": size}

    return send


def raw_tunnel(
    ws: Workspace,
    m: Methods,
    results: Results,
    *,
    runs: int,
    lan: Site,
    wan: Site,
    lan_bytes: int,
    wan_bytes: int,
) -> None:
    variants: dict[str, Callable[[str], dict[str, Any]]] = {
        "raw.lan.borgtunnel": _borgtunnel_raw(
            ws, m, "rawlan", lan_bytes, results=results, key="raw.lan.borgtunnel"
        ),
        "raw.lan.openssh": _openssh_raw(
            ws, m, lan.port, lan_bytes, results=results, key="raw.lan.openssh"
        ),
        "raw.lan.openssh-aes128gcm": _openssh_raw(
            ws,
            m,
            lan.port,
            lan_bytes,
            results=results,
            key="raw.lan.openssh-aes128gcm",
            options=("-c", "aes128-gcm@openssh.com"),
        ),
        "raw.wan.borgtunnel": _borgtunnel_raw(
            ws, m, "rawwan", wan_bytes, results=results, key="raw.wan.borgtunnel"
        ),
        "raw.wan.borgtunnel-2MiB": _borgtunnel_raw(
            ws,
            m,
            "rawwan",
            wan_bytes,
            results=results,
            key="raw.wan.borgtunnel-2MiB",
            window=2 * MIB,
        ),
        "raw.wan.openssh": _openssh_raw(
            ws, m, wan.port, wan_bytes, results=results, key="raw.wan.openssh"
        ),
        "raw.proxy0.borgtunnel": _borgtunnel_raw(
            ws, m, "rawproxy0", lan_bytes, results=results, key="raw.proxy0.borgtunnel"
        ),
    }
    for round_number in range(runs):
        for name in rotated(list(variants), round_number):
            rate = _through_sink(ws, name.replace(".", "-"), variants[name])
            results.add(name, rate)
            progress(f"raw round {round_number + 1} {name}: {rate:.0f} MB/s")
