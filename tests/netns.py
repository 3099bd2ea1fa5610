"""Two network namespaces joined by a cable the tests can pull: for link-fault tests.

A :class:`Link` is a ``server`` and a ``client`` namespace joined by a veth pair with private
test addresses (``10.254.N.1`` and ``10.254.N.2``, /30) that exist only inside those two
namespaces: nothing is routed anywhere else, and the test process itself (in the root
namespace) never sends a packet to them. A real OpenSSH ``sshd`` runs in the client namespace
(:func:`start_client_sshd`); borgtunnel runs in the server namespace (:func:`in_namespace`).
The filesystem is shared, so repositories, configs, sockets and logs live in the test's
``tmp_path`` as usual; only the network is split.

Faults:

* :meth:`Link.cut` pulls the cable: an nftables table in *each* namespace drops every packet
  arriving on the veth. Nothing answers, no RST, no ICMP: TCP on both ends believes the peer is
  still there, which is what a dead WAN link or a suspended laptop looks like. Input hooks on
  both ends: every packet is lost in flight, while each end's own sending goes through its
  stack untouched, as with a real cable.
* :meth:`Link.set_down` takes the client's interface down (the peer loses carrier, the route
  turns ``linkdown``, ARP fails: connects end in "No route to host" after ~3 s, the kernel's
  three ARP probes a second apart).

Cleanup: every namespace is named ``bt-<pid>-<n>`` (pid of the pytest process), so parallel
runs never collide and leftovers of a crashed run can be recognised: :func:`sweep_stale` removes
namespaces whose pid is gone. :func:`destroy_link` kills every process still inside a namespace
before deleting it (``ip netns del`` alone only drops the name; a process inside would keep the
namespace, its veth and its nftables tables alive). The veth pair and the nftables tables live
inside the namespaces and vanish with them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.sshd import (
    HOST,
    SshdError,
    SshdServer,
    build_config,
    find_sshd,
    fingerprint,
    generate_key,
    is_alive,
    known_hosts_line,
    public_key,
    stop_sshd,
)
from tests.sshd import missing_tools as missing_ssh_tools

PREFIX = "bt-"
_NAME = re.compile(r"^bt-(?P<pid>\d+)-(?:\d+-(?:server|client)|probe)$")
SERVER_IF = "bt-srv"
CLIENT_IF = "bt-cli"
CUT_TABLE = "bt_cut"  # nftables names: letters, digits, underscore
SSH_PORT = 22  # a fresh namespace has every port free
PRIVSEP_DIR = Path("/run/sshd")
READY_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0
_numbers = itertools.count()


class NetnsError(RuntimeError):
    """A namespace, veth or nftables step failed; the message carries the tool's words."""


def _run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    result = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def in_namespace(namespace: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``namespace`` (``ip netns exec`` execs it: same pid, same env)."""
    return ["ip", "netns", "exec", namespace, *argv]


# --- availability and stale leftovers ----------------------------------------------------


def missing_tools() -> list[str]:
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    return missing + missing_ssh_tools()


def unusable_reason() -> str | None:
    """Why these tests cannot run here, or None. Probes a namespace: a container may say no."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, veth, nftables)"
    if missing := missing_tools():
        return f"network namespace tests need {', '.join(missing)}"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "netns", "exec", probe, "nft", "list", "tables"])
    except NetnsError as exc:
        return f"cannot create a network namespace with nftables here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def namespaces() -> list[str]:
    """Names from ``ip netns list`` (each line is ``NAME`` or ``NAME (id: N)``)."""
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line]


def sweep_stale() -> list[str]:
    """Delete ``bt-<pid>-*`` namespaces whose pytest process is gone; return their names."""
    swept = []
    for name in namespaces():
        match = _NAME.match(name)
        if match and not is_alive(int(match["pid"])):
            _delete_namespace(name)
            swept.append(name)
    return swept


# --- the link ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """Server and client namespaces joined by one veth pair."""

    server_ns: str
    client_ns: str
    server_addr: str
    client_addr: str

    def server(self, argv: Sequence[str]) -> list[str]:
        return in_namespace(self.server_ns, argv)

    def client(self, argv: Sequence[str]) -> list[str]:
        return in_namespace(self.client_ns, argv)

    def cut(self) -> None:
        """Silently drop everything arriving on the veth, on both ends (see module doc)."""
        for namespace, interface in ((self.server_ns, SERVER_IF), (self.client_ns, CLIENT_IF)):
            rules = (
                f"table inet {CUT_TABLE} {{\n"
                "  chain input {\n"
                "    type filter hook input priority filter; policy accept;\n"
                f'    iifname "{interface}" drop\n'
                "  }\n"
                "}\n"
            )
            _run(in_namespace(namespace, ["nft", "-f", "-"]), stdin=rules)

    def restore(self) -> None:
        """Remove the drop rules again (idempotent)."""
        for namespace in (self.server_ns, self.client_ns):
            tables = _run(in_namespace(namespace, ["nft", "list", "tables"]))
            if f"table inet {CUT_TABLE}" in tables:
                _run(in_namespace(namespace, ["nft", "delete", "table", "inet", CUT_TABLE]))

    def set_down(self) -> None:
        _run(["ip", "-n", self.client_ns, "link", "set", CLIENT_IF, "down"])

    def set_up(self) -> None:
        """Back up, once both ends have carrier and no address resolution is still in flight.

        An ARP resolution started while the link was down fails a little later, and with it
        every connection queued on it ("No route to host" for a connect made just after the
        link came back): wait until the server's neighbour entry is no longer INCOMPLETE.
        """
        _run(["ip", "-n", self.client_ns, "link", "set", CLIENT_IF, "up"])
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._settled():
            if time.monotonic() > deadline:
                raise NetnsError(f"link {self.server_ns} <-> {self.client_ns} did not come up")
            time.sleep(0.05)

    def _settled(self) -> bool:
        link = _run(["ip", "-n", self.server_ns, "-br", "link", "show", "dev", SERVER_IF])
        neighbour = _run(["ip", "-n", self.server_ns, "neigh", "show", self.client_addr])
        return "LOWER_UP" in link and "INCOMPLETE" not in neighbour


def create_link() -> Link:
    """Two fresh namespaces with ``lo`` up and a veth pair between them; removed on failure."""
    number = next(_numbers)
    base = f"{PREFIX}{os.getpid()}-{number}"
    link = Link(
        server_ns=f"{base}-server",
        client_ns=f"{base}-client",
        server_addr=f"10.254.{number % 256}.1",
        client_addr=f"10.254.{number % 256}.2",
    )
    try:
        _run(["ip", "netns", "add", link.server_ns])
        _run(["ip", "netns", "add", link.client_ns])
        # Created directly inside the namespaces: the names never touch the root namespace,
        # so they cannot collide with another run's.
        veth_pair = ["type", "veth", "peer", "name", CLIENT_IF, "netns", link.client_ns]
        _run(["ip", "link", "add", SERVER_IF, "netns", link.server_ns, *veth_pair])
        for namespace, interface, address in (
            (link.server_ns, SERVER_IF, link.server_addr),
            (link.client_ns, CLIENT_IF, link.client_addr),
        ):
            _run(["ip", "-n", namespace, "addr", "add", f"{address}/30", "dev", interface])
            _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
            _run(["ip", "-n", namespace, "link", "set", interface, "up"])
    except BaseException:
        destroy_link(link)
        raise
    return link


def pids_in(namespace: str) -> set[int]:
    result = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    )
    return {int(word) for word in result.stdout.split() if word.isdigit()}


def _kill_all_in(namespace: str) -> None:
    """SIGTERM, then SIGKILL, every process in ``namespace`` (zombies count as gone)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        victims = {pid for pid in pids_in(namespace) if is_alive(pid)}
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + KILL_TIMEOUT
        while any(is_alive(pid) for pid in victims) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not any(is_alive(pid) for pid in pids_in(namespace)):
            return


def _delete_namespace(namespace: str) -> None:
    _kill_all_in(namespace)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def destroy_link(link: Link) -> None:
    """Kill what runs inside, delete both namespaces (the veth and nft tables go with them)."""
    for namespace in (link.server_ns, link.client_ns):
        _delete_namespace(namespace)
    left = {link.server_ns, link.client_ns} & set(namespaces())
    if left:
        raise NetnsError(f"namespaces survived deletion: {sorted(left)}")


# --- sshd in the client namespace --------------------------------------------------------


def _client_config(workdir: Path, address: str, host_key: Path) -> str:
    """tests/sshd.py's config, listening on the client's address instead of 127.0.0.1.

    ``build_config`` fixes ``ListenAddress`` (its SshdServer must not lie); here the server is
    built by :func:`start_client_sshd`, which reports the address it really listens on.
    """
    text = build_config(workdir=workdir, port=SSH_PORT, host_key=host_key)
    default = f"ListenAddress {HOST}\n"
    if default not in text:
        raise SshdError(f"build_config no longer starts with {default!r}: update tests/netns.py")
    return text.replace(default, f"ListenAddress {address}\n", 1)


def start_client_sshd(link: Link, workdir: Path) -> SshdServer:
    """A real sshd inside the client namespace on ``client_addr:22``; stop with stop_sshd.

    Same defaults as the ``sshd`` fixture (throwaway keys, ``SetEnv BORG_BASE_DIR`` and the
    marker variable that lets ``stop_sshd`` find every remote command it started).
    """
    sshd = find_sshd()
    if sshd is None:
        raise SshdError("sshd not found")
    workdir.mkdir(parents=True)
    (workdir / "borg-base").mkdir(mode=0o700)
    if not PRIVSEP_DIR.is_dir():
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    host_key = generate_key(workdir / "ssh_host_ed25519_key", "borgtunnel-netns-host")
    client_key = generate_key(workdir / "id_ed25519", "borgtunnel-netns-client")
    (workdir / "authorized_keys").write_text(public_key(client_key) + "\n")
    config_path = workdir / "sshd_config"
    config_path.write_text(_client_config(workdir, link.client_addr, host_key))
    _run([str(sshd), "-t", "-f", str(config_path)])
    log_path = workdir / "sshd.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            link.client([str(sshd), "-D", "-e", "-f", str(config_path)]),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(known_hosts_line(link.client_addr, SSH_PORT, public_key(host_key)))
    server = SshdServer(
        host=link.client_addr,
        port=SSH_PORT,
        user=pwd.getpwuid(os.geteuid()).pw_name,
        client_key=client_key,
        known_hosts=known_hosts,
        host_key=host_key,
        host_key_fingerprint=fingerprint(host_key),
        workdir=workdir.resolve(),
        log_path=log_path,
        config_path=config_path,
        pid=process.pid,
        process=process,
    )
    try:
        _wait_listening(server)
    except BaseException:
        stop_sshd(server)
        raise
    return server


def _wait_listening(server: SshdServer) -> None:
    """sshd logs ``Server listening on ADDR port N.`` once bound (-e: to our log file)."""
    needle = f"Server listening on {server.host} port {server.port}"
    deadline = time.monotonic() + READY_TIMEOUT
    while needle not in server.log_text():
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise SshdError(f"sshd in the client namespace did not start:\n{server.log_text()}")
        time.sleep(0.02)


# --- processes in the server namespace ---------------------------------------------------


@contextlib.contextmanager
def spawned(
    argv: Sequence[str],
    output: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A child writing to ``OUTPUT.out`` and ``OUTPUT.err``; killed and reaped at exit if alive.

    Files rather than pipes: nobody reads a pipe while the test waits, and a full pipe would
    block the child.
    """
    with output.with_suffix(".out").open("wb") as out, output.with_suffix(".err").open("wb") as err:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def wait_for(
    predicate: Callable[[], object], *, within: float, what: str, interval: float = 0.05
) -> float:
    """Poll ``predicate()`` until true; return the seconds it took, fail after ``within``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started
