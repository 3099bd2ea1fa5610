"""The systemd units in systemd/: static checks, ``systemd-analyze`` and a sandbox emulation.

``systemd-analyze verify`` refuses a unit whose ExecStart= binary does not exist, and borgtunnel
is not installed at /usr/local/bin here. So the units are copied into tmp_path with that path
rewritten to a stub script in tmp_path/bin; everything else is verified as shipped. Template
units are verified through an instance (``borgtunnel-pull@web1.service``): verify then loads the
template from the same directory, and verifying the timer and socket pulls in their services.

systemd does not need to be PID 1 for any of this. Tests that need ``systemd-analyze`` skip
with a reason when it is missing.
"""

from __future__ import annotations

import ctypes.util
import errno
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT_FILES = [
    "borgtunnel.service",
    "borgtunnel-pull@.service",
    "borgtunnel-pull@.timer",
    "borgtunnel-serve@.socket",
    "borgtunnel-serve@.service",
]
SERVICES = ["borgtunnel.service", "borgtunnel-pull@.service", "borgtunnel-serve@.service"]
INSTALLED_EXECUTABLE = "/usr/local/bin/borgtunnel"
# Upper bounds for `systemd-analyze security --offline=true` (0 = locked down, 10 = exposed).
# Measured with systemd 252: 1.4, 1.4 and 0.5. The slack absorbs other systemd versions' weights.
EXPOSURE_LIMITS = {
    "borgtunnel.service": 2.0,
    "borgtunnel-pull@web1.service": 2.0,
    "borgtunnel-serve@web1.service": 1.0,
}
# Sandbox settings that differ on purpose: serve only ever talks over unix sockets.
NETWORK_KEYS = {"PrivateNetwork", "IPAddressDeny", "RestrictAddressFamilies"}


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def sandbox(unit: dict[str, list[tuple[str, str]]]) -> dict[str, list[str]]:
    """The [Service] settings from ProtectSystem= (where the sandbox block starts) on."""
    entries = unit["Service"]
    start = [k for k, _ in entries].index("ProtectSystem")
    out: dict[str, list[str]] = {}
    for key, value in entries[start:]:
        out.setdefault(key, []).append(value)
    return out


@pytest.fixture(scope="module")
def units() -> dict[str, dict[str, list[tuple[str, str]]]]:
    return {name: parse_unit(UNIT_DIR / name) for name in UNIT_FILES}


@pytest.fixture
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: package systemd)")
    return tool


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The units in tmp_path/units, ExecStart= pointing at a stub that exists."""
    stub = tmp_path / "bin" / "borgtunnel"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    target = tmp_path / "units"
    target.mkdir()
    for name in UNIT_FILES:
        text = (UNIT_DIR / name).read_text()
        (target / name).write_text(text.replace(INSTALLED_EXECUTABLE, str(stub)))
    return target


# --- static checks -----------------------------------------------------------------------------


def test_every_unit_is_checked():
    shipped = sorted(
        p.name for p in UNIT_DIR.iterdir() if p.suffix in {".service", ".timer", ".socket"}
    )
    assert shipped == sorted(UNIT_FILES)


def test_exec_lines(units):
    daemon = units["borgtunnel.service"]
    assert values(daemon, "Service", "Type") == ["notify"]
    assert values(daemon, "Service", "ExecStart") == [f"{INSTALLED_EXECUTABLE} daemon"]
    assert values(daemon, "Service", "ExecReload") == [
        f"{INSTALLED_EXECUTABLE} check-config --quiet",
        "/bin/kill -HUP $MAINPID",
    ]
    assert values(daemon, "Service", "Restart") == ["on-failure"]
    assert values(daemon, "Service", "RestartPreventExitStatus") == ["78"]
    assert values(daemon, "Service", "WatchdogSec") == ["5min"]
    pull = units["borgtunnel-pull@.service"]
    assert values(pull, "Service", "Type") == ["oneshot"]
    assert values(pull, "Service", "ExecStart") == [f"{INSTALLED_EXECUTABLE} pull %i"]
    serve = units["borgtunnel-serve@.service"]
    assert values(serve, "Service", "Type") == ["notify"]
    assert values(serve, "Service", "ExecStart") == [f"{INSTALLED_EXECUTABLE} serve"]
    assert values(serve, "Unit", "Requires") == ["borgtunnel-serve@%i.socket"]


def test_timer(units):
    timer = units["borgtunnel-pull@.timer"]
    assert values(timer, "Timer", "OnCalendar") == ["daily"]
    assert values(timer, "Timer", "RandomizedDelaySec") == ["1h"]
    assert values(timer, "Timer", "Persistent") == ["yes"]
    assert values(timer, "Install", "WantedBy") == ["timers.target"]


def test_socket_lives_outside_every_runtime_directory(units):
    """A RuntimeDirectory= is deleted when its unit stops; the socket must not be inside one."""
    socket = units["borgtunnel-serve@.socket"]
    [listen] = values(socket, "Socket", "ListenStream")
    assert listen == "/run/borgtunnel-serve/%i.sock"
    assert values(socket, "Socket", "FileDescriptorName") == ["%i"]
    assert values(socket, "Socket", "Accept") == ["no"]
    assert values(socket, "Socket", "SocketMode") == ["0600"]
    assert values(socket, "Socket", "DirectoryMode") == ["0700"]
    for name in SERVICES:
        for directory in values(units[name], "Service", "RuntimeDirectory"):
            assert not listen.startswith(f"/run/{directory}/"), name


def test_shared_runtime_directory_is_preserved(units):
    """Several pull@ instances (and the daemon) share /run/borgtunnel: none may delete it."""
    for name in ["borgtunnel.service", "borgtunnel-pull@.service"]:
        service = units[name]
        assert values(service, "Service", "RuntimeDirectory") == ["borgtunnel"]
        assert values(service, "Service", "RuntimeDirectoryMode") == ["0700"]
        assert values(service, "Service", "RuntimeDirectoryPreserve") == ["yes"]


def test_services_share_state_user_and_sandbox(units):
    daemon = units["borgtunnel.service"]
    for name in SERVICES:
        service = units[name]
        for key in ["StateDirectory", "StateDirectoryMode", "UMask", "Environment", "KillMode"]:
            assert values(service, "Service", key) == values(daemon, "Service", key), (name, key)
        assert values(service, "Service", "User") == [], "runs as root unless the admin says so"
    reference = {k: v for k, v in sandbox(daemon).items() if k not in NETWORK_KEYS}
    for name in SERVICES[1:]:
        other = {k: v for k, v in sandbox(units[name]).items() if k not in NETWORK_KEYS}
        assert other == reference, name
    serve = sandbox(units["borgtunnel-serve@.service"])
    assert serve["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert serve["PrivateNetwork"] == ["yes"]


def test_stop_timeout_covers_the_daemons_own_shutdown(units):
    """systemd must not SIGKILL a daemon that is still within its own stop_timeout."""
    config = pytest.importorskip("borgtunnel.config")
    own = config.DaemonSettings().stop_timeout + config.ServerSettings().serve_stop_timeout
    for name in SERVICES:
        [timeout] = values(units[name], "Service", "TimeoutStopSec")
        assert timeout.endswith("s")
        assert float(timeout.removesuffix("s")) >= own + 10, name


# A stand-in for the daemon's main process: it only records the signals it gets.
_MAIN_PROCESS = """
import signal, sys, time
signal.signal(signal.SIGHUP, lambda *_: open(sys.argv[1], "a").write("HUP\\n"))
print("ready", flush=True)
time.sleep(60)
"""


def _reload_as_systemd_does(config: Path, mainpid: int) -> list[int]:
    """Run borgtunnel.service's ExecReload= lines in order, as systemd does: the first that
    fails ends the reload (and `systemctl reload` exits non-zero). Exit status of each run."""
    borgtunnel = f"{shlex.quote(sys.executable)} -m borgtunnel"
    statuses = []
    for line in values(parse_unit(UNIT_DIR / "borgtunnel.service"), "Service", "ExecReload"):
        command = line.replace(INSTALLED_EXECUTABLE, borgtunnel).replace("$MAINPID", str(mainpid))
        result = subprocess.run(
            shlex.split(command),
            env={**os.environ, "BORGTUNNEL_CONFIG": str(config)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.stdout == "", "nothing for the journal when all is well"
        statuses.append(result.returncode)
        if result.returncode != 0:
            break
    return statuses


@pytest.mark.parametrize("broken", [False, True])
def test_reload_fails_on_a_broken_config_without_signalling(tmp_path, broken):
    config = tmp_path / "borgtunnel.toml"
    config.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
        '[clients.web1]\nhost = "web1.example"\nrepository = "/srv/borg/web1"\n'
        'paths = ["/etc"]\nencryption = "none"\n'
    )
    if broken:
        config.write_text(config.read_text().replace('"web1.example"', "web1.example"))
    signals = tmp_path / "signals"
    main = subprocess.Popen(
        [sys.executable, "-c", _MAIN_PROCESS, str(signals)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert main.stdout is not None
        assert main.stdout.readline() == "ready\n"  # its SIGHUP handler is in place

        statuses = _reload_as_systemd_does(config, main.pid)

        if broken:
            assert statuses == [78]  # check-config refused it; kill never ran
            time.sleep(0.2)
            assert not signals.exists()
        else:
            assert statuses == [0, 0]
            deadline = time.monotonic() + 10
            # open(..., "a") creates the file a moment before the write: wait for the text.
            while not (signals.exists() and signals.read_text()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert signals.read_text() == "HUP\n"
    finally:
        main.kill()
        main.wait()
        if main.stdout is not None:
            main.stdout.close()


# --- systemd-analyze -----------------------------------------------------------------------------

VERIFY_TARGETS = [
    "borgtunnel.service",
    "borgtunnel-pull@.service",
    "borgtunnel-pull@web1.service",
    "borgtunnel-pull@web1.timer",
    "borgtunnel-serve@.socket",
    "borgtunnel-serve@web1.socket",
    "borgtunnel-serve@.service",
    "borgtunnel-serve@web1.service",
]


def verify(analyze: str, unit: Path) -> tuple[int, list[str]]:
    """Exit status and the output lines about our units (host units may add unrelated noise)."""
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if "borgtunnel" in line]


@pytest.mark.parametrize("target", VERIFY_TARGETS)
def test_systemd_analyze_verify(analyze, unit_copy, target):
    returncode, ours = verify(analyze, unit_copy / target)
    assert ours == []
    assert returncode == 0


def test_verify_would_catch_a_mistake(analyze, unit_copy):
    """The check above can fail: a misspelt option is reported (as a warning, exit status 0)."""
    path = unit_copy / "borgtunnel-pull@.service"
    path.write_text(path.read_text().replace("PrivateTmp=yes", "PrivateTemp=yes"))
    _, ours = verify(analyze, unit_copy / "borgtunnel-pull@web1.timer")
    assert any("PrivateTemp" in line for line in ours), ours


@pytest.mark.parametrize(("unit", "limit"), sorted(EXPOSURE_LIMITS.items()))
def test_security_exposure(analyze, unit_copy, unit, limit):
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit_copy / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= limit, result.stdout


# --- sandbox emulation ---------------------------------------------------------------------------
#
# MemoryDenyWriteExecute=yes, the SystemCallFilter= allow list and RestrictAddressFamilies= are
# what most often breaks a Python service (JITs, ctypes/cffi callbacks, unusual system calls,
# netlink). Without systemd as PID 1 the next best thing: install equivalent seccomp filters with
# libseccomp, then exec the interpreter and run what the daemon runs (imports, asyncssh key
# exchange and reverse unix forward, borg through `borg serve --append-only`). The filters are
# rebuilt from the unit file itself.

SECCOMP_INSTALLER = textwrap.dedent(
    """
    import ctypes, errno, json, os, sys
    allowed, mdwe = json.loads(sys.argv[1]), sys.argv[2] == "yes"
    lib = ctypes.CDLL(sys.argv[3], use_errno=True)
    families = json.loads(sys.argv[4])

    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ALLOW, EPERM = 0x7FFF0000, 0x00050000 | errno.EPERM
    EAFNOSUPPORT = 0x00050000 | errno.EAFNOSUPPORT
    EQ, MASKED_EQ, PROT_WRITE, PROT_EXEC, SHM_EXEC = 4, 7, 2, 4, 0o100000

    def check(rc, what):
        if rc < 0:
            raise OSError(-rc, what)

    def load(default, rules):
        ctx = lib.seccomp_init(default)
        for name, action, cmp in rules:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr >= 0:  # negative: not a system call on this architecture
                arg = (Cmp * 1)(cmp) if cmp else None
                check(lib.seccomp_rule_add_array(ctx, action, nr, 1 if cmp else 0, arg), name)
        check(lib.seccomp_load(ctx), "seccomp_load")

    check(-ctypes.CDLL(None).prctl(38, 1, 0, 0, 0), "prctl")  # NoNewPrivileges=yes
    if mdwe:  # systemd's MemoryDenyWriteExecute= filter
        wx = PROT_WRITE | PROT_EXEC
        load(ALLOW, [
            ("mmap", EPERM, Cmp(2, MASKED_EQ, wx, wx)),
            ("mprotect", EPERM, Cmp(2, MASKED_EQ, PROT_EXEC, PROT_EXEC)),
            ("pkey_mprotect", EPERM, Cmp(2, MASKED_EQ, PROT_EXEC, PROT_EXEC)),
            ("shmat", EPERM, Cmp(2, MASKED_EQ, SHM_EXEC, SHM_EXEC)),
        ])
    # RestrictAddressFamilies=: socket() of any other family fails with EAFNOSUPPORT.
    load(ALLOW, [("socket", EAFNOSUPPORT, Cmp(0, EQ, family, 0))
                 for family in range(64) if family not in families])
    load(EPERM, [(name, ALLOW, None) for name in allowed])  # SystemCallErrorNumber=EPERM
    os.execv(sys.executable, [sys.executable, *sys.argv[5:]])
    """
)

SANDBOXED_WORKLOAD = textwrap.dedent(
    """
    import asyncio, json, mmap, os, shutil, socket, sys, tempfile
    report = {}
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)
        report["wx_mmap"] = "allowed"
    except OSError as exc:
        report["wx_mmap"] = exc.errno
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 1)  # in @resources, which the units deny
        report["setpriority"] = "allowed"
    except OSError as exc:
        report["setpriority"] = exc.errno

    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()
        report["netlink"] = "allowed"
    except OSError as exc:
        report["netlink"] = exc.errno
    # glibc asks netlink which address families are configured; it must cope without.
    report["resolve"] = bool(socket.getaddrinfo("localhost", 22, flags=socket.AI_ADDRCONFIG))

    import asyncssh, cryptography, pydantic, structlog  # noqa: F401
    import borgtunnel.systemd  # noqa: F401

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username):
            return True
        def public_key_auth_supported(self):
            return True
        def validate_public_key(self, username, key):
            return True
        def unix_server_requested(self, path):
            return True

    async def count(reader, writer):
        total = 0
        while data := await reader.read(65536):
            total += len(data)
        writer.write(str(total).encode())
        await writer.drain()
        writer.close()

    async def ssh(tmp):
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        server = await asyncssh.create_server(Server, "127.0.0.1", 0, server_host_keys=[host_key])
        port = server.sockets[0].getsockname()[1]
        local, remote = os.path.join(tmp, "l.sock"), os.path.join(tmp, "r.sock")
        listener = await asyncio.start_unix_server(count, local)
        try:
            for cipher in ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"]:
                async with asyncssh.connect(
                    "127.0.0.1", port, known_hosts=None, client_keys=[client_key], config=None,
                    agent_path=None, encryption_algs=[cipher],
                ) as conn:
                    forward = await conn.forward_remote_path(remote, local)
                    reader, writer = await asyncio.open_unix_connection(remote)
                    writer.write(b"x" * 3_000_000)
                    await writer.drain()
                    writer.write_eof()
                    report[cipher] = int(await reader.read())
                    writer.close()
                    forward.close()
                    os.unlink(remote)
        finally:
            listener.close()
            server.close()

    async def borg(tmp):
        if shutil.which("borg") is None:
            report["borg"] = "missing"
            return
        source, repo = os.path.join(tmp, "src"), os.path.join(tmp, "repo")
        os.mkdir(source)
        with open(os.path.join(source, "data"), "wb") as f:
            f.write(os.urandom(1_000_000))
        serve = f"borg serve --append-only --restrict-to-repository {repo}"
        env = dict(os.environ, BORG_BASE_DIR=os.path.join(tmp, "base"), BORG_PASSPHRASE="x",
                   BORG_RSH=f"sh -c 'exec {serve}'")
        url = f"ssh://borgtunnel{repo}"
        for step, args in [("init", ["init", "-e", "repokey-blake2", url]),
                           ("create", ["create", url + "::a1", source]),
                           ("check", ["check", url])]:
            proc = await asyncio.create_subprocess_exec(
                "borg", *args, env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            ok = proc.returncode == 0
            report["borg_" + step] = proc.returncode if ok else err.decode()[-500:]

    async def main():
        tmp = tempfile.mkdtemp(prefix="bt-sbx-")
        try:
            await ssh(tmp)
            await borg(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    asyncio.run(main())
    print(json.dumps(report))
    """
)


def expand_syscall_groups(analyze: str, names: list[str]) -> set[str]:
    """System call names in ``names`` (groups like @system-service expanded recursively)."""
    out: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            out.add(name)
            continue
        listing = subprocess.run(
            [analyze, "syscall-filter", "--no-pager", name],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()[1:]
        members = [m.strip() for m in listing if m.strip() and not m.strip().startswith("#")]
        out |= expand_syscall_groups(analyze, members)
    return out


def test_python_stack_and_borg_run_under_the_units_seccomp_filters(analyze, units, tmp_path):
    libseccomp = ctypes.util.find_library("seccomp")
    if libseccomp is None:
        pytest.skip("libseccomp is not installed (Debian: libseccomp2)")
    service = units["borgtunnel.service"]
    allowed: set[str] = set()
    for line in values(service, "Service", "SystemCallFilter"):
        if line.startswith("~"):
            allowed -= expand_syscall_groups(analyze, line[1:].split())
        else:
            allowed |= expand_syscall_groups(analyze, line.split())
    assert values(service, "Service", "SystemCallErrorNumber") == ["EPERM"]
    [mdwe] = values(service, "Service", "MemoryDenyWriteExecute")
    [family_line] = values(service, "Service", "RestrictAddressFamilies")
    families = [int(getattr(socket, name)) for name in family_line.split()]
    result = subprocess.run(
        [
            *(sys.executable, "-c", SECCOMP_INSTALLER),
            *(json.dumps(sorted(allowed)), mdwe, libseccomp, json.dumps(families)),
            *("-c", SANDBOXED_WORKLOAD),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    # The filters are really active...
    assert report.pop("wx_mmap") == (1 if mdwe == "yes" else "allowed")
    assert report.pop("setpriority") == 1
    assert report.pop("netlink") == errno.EAFNOSUPPORT
    assert report.pop("resolve") is True
    # ...and everything the services do still works.
    expected = {"aes128-gcm@openssh.com": 3_000_000, "chacha20-poly1305@openssh.com": 3_000_000}
    if report.get("borg") == "missing":
        del report["borg"]
    else:
        expected |= {"borg_init": 0, "borg_create": 0, "borg_check": 0}
    assert report == expected
