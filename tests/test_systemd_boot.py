"""The shipped units under a real systemd 252 as PID 1, installed the way docs/install.md says.

One container per module (tests/nspawn.py: this machine's root under a throwaway overlay,
booted with ``systemd-nspawn``), checks in order, each its own test:

* docs/install.md's marked install blocks run word for word, in a copy of the checkout's files at
  /usr/local/src/borgtunnel (the only difference: pip finds the
  wheels in a directory built on the host, ``PIP_NO_INDEX``/``PIP_FIND_LINKS``, and apt must not
  download, because the container has no network); the repositories live under
  ``/var/backups/borg``, writable only through docs/install.md's ``ReadWritePaths=`` drop-in;
* the daemon: READY (``enable --now`` returns), STATUS, a scheduled pull ``ok`` and read back,
  ``status``/``history``, reload with a good and a broken config, stop during a pull that blocks
  on a FIFO, the watchdog;
* ``borgtunnel-pull@NAME`` and its timer; ``borgtunnel-serve@NAME.socket`` activation and idle exit.

The unit files in systemd/ are installed unchanged. Values that are minutes long as shipped
are shortened by runtime drop-ins under /run, each named in the test that uses it: the
watchdog (WatchdogSec=5min, RestartSec=30s), the timer's RandomizedDelaySec=1h (after checking
that the missed run is scheduled at once) and serve's idle timeout (300 s when activated). The
client is an sshd on 127.0.0.1 inside the container, started as a transient unit.

Root only. The module skips (with nspawn's own message) only when nspawn cannot boot a
container here at all; a missing ``systemd-nspawn`` is a failure, because scripts/setup
installs it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import nspawn

pytestmark = [
    pytest.mark.systemd_boot,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="booting a container with systemd-nspawn needs root"
    ),
    pytest.mark.timeout(300),
]

CHECKOUT = Path(__file__).resolve().parent.parent
INSTALL_DOC = CHECKOUT / "docs" / "install.md"
WHEELS_INSIDE = "/opt/bt-test-wheels"
CHECKOUT_INSIDE = "/usr/local/src/borgtunnel"
CLIENT = "/srv/bt-client"  # the loopback client's sshd, keys and data, inside the container
REPOS = "/var/backups/borg"  # as in docs/install.md's ReadWritePaths= drop-in
SSH_PORT = 2222
DAEMON_STOP_TIMEOUT = 3
# apt-get install with every package already there must not try to download or upgrade.
APT_OFFLINE = 'APT::Get::Download "false";\nAPT::Get::Upgrade "false";\n'


def install_block(name: str) -> str:
    """The ```sh block right after ``<!-- tested: NAME -->`` in docs/install.md."""
    match = re.search(
        rf"^<!-- tested: {re.escape(name)} -->\n```sh\n(.*?)^```$",
        INSTALL_DOC.read_text(),
        flags=re.MULTILINE | re.DOTALL,
    )
    assert match, f"docs/install.md has no block marked <!-- tested: {name} -->"
    return match.group(1)


def copy_checkout(target: Path) -> None:
    """The checkout's files as a fresh clone (plus uncommitted work) would have them: tracked
    and untracked-but-not-ignored files, no .venv, caches or build output. The install
    commands run in this copy, which also makes them independent of which file system the
    checkout is on (the container sees only the root file system and what is bound in)."""
    listed = subprocess.run(
        ["git", "-C", str(CHECKOUT), "ls-files", "-z", "--cached", "--others",
         "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = CHECKOUT / name
        if source.is_symlink() or not source.is_file():  # .borg -> the shared builds; deleted
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)


def build_wheels(target: Path, checkout: Path) -> None:
    """Wheels of borgtunnel's dependencies and build backend, for pip inside (no network
    there). borgtunnel itself is left out: the install commands build it from the checkout."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(target), str(checkout),
         "setuptools>=77", "wheel"],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for own in target.glob("borgtunnel-*"):
        own.unlink()


def config_toml(*, schedule: str | None, extra: str = "") -> str:
    every_minute = f'schedule = "{schedule}"\n' if schedule else ""
    common = f'host = "127.0.0.1"\nport = {SSH_PORT}\nuser = "root"\n'
    return f"""\
[daemon]
stop_timeout = {DAEMON_STOP_TIMEOUT}

[clients.web1]
{common}repository = "{REPOS}/web1"
paths = ["{CLIENT}/web1"]
encryption = "repokey-blake2"
passphrase_file = "/etc/borgtunnel/web1.pass"
{every_minute}
[clients.db1]
{common}repository = "{REPOS}/db1"
paths = ["{CLIENT}/db1"]
encryption = "none"

[clients.slow]
{common}repository = "{REPOS}/slow"
paths = ["{CLIENT}/slow"]
encryption = "none"
create_args = ["--read-special"]
{every_minute}
[clients.web2]
{common}repository = "{REPOS}/web2"
paths = ["{CLIENT}/web1"]
encryption = "none"
{extra}"""


CONFIG_PATH = "/etc/borgtunnel/borgtunnel.toml"


def write_config(box: nspawn.Container, text: str) -> None:
    box.run(f"cat > {CONFIG_PATH} <<'TOML'\n{text}TOML\nchmod 0600 {CONFIG_PATH}")


def start_client(box: nspawn.Container) -> None:
    """The loopback client: sample data, a FIFO, and an sshd on 127.0.0.1 that lets the
    server's key in (restrict,port-forwarding as docs/clients.md recommends)."""
    box.run(f"""
        install -d -m 0700 {CLIENT}
        mkdir -p {CLIENT}/web1/docs {CLIENT}/db1 {CLIENT}/slow
        printf 'hello from web1\\n' > {CLIENT}/web1/docs/readme.txt
        head -c 300000 /dev/urandom > {CLIENT}/web1/random.bin
        printf 'db dump\\n' > {CLIENT}/db1/dump.sql
        mkfifo {CLIENT}/slow/blocks-until-written
        ssh-keygen -q -t ed25519 -N '' -f {CLIENT}/host_key
        printf 'restrict,port-forwarding %s\\n' "$(cat /etc/borgtunnel/id_ed25519.pub)" \\
            > {CLIENT}/authorized_keys
        cat > {CLIENT}/sshd_config <<CONF
        Port {SSH_PORT}
        ListenAddress 127.0.0.1
        HostKey {CLIENT}/host_key
        AuthorizedKeysFile {CLIENT}/authorized_keys
        UsePAM no
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        AllowStreamLocalForwarding yes
        CONF
        usermod -p '*' root
        systemd-run --unit=bt-client-sshd -p Type=notify -p RuntimeDirectory=sshd \\
            /usr/sbin/sshd -D -f {CLIENT}/sshd_config
    """)


def unit_property(box: nspawn.Container, unit: str, prop: str) -> str:
    return box.run(f"systemctl show -P {prop} {unit}").stdout.strip()


def wait_for(what: str, probe: Callable[[], bool], timeout: float, box: nspawn.Container) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{journal(box)}")


def journal(box: nspawn.Container) -> str:
    """The units' recent journal, for failure messages."""
    return box.run(
        "journalctl -b --no-pager -n 80 -o short-precise -u 'borgtunnel*' | grep -v serve_stderr",
        check=False,
    ).stdout


def history(box: nspawn.Container, client: str) -> list[dict[str, Any]]:
    text = box.run(f"borgtunnel history {client} --json --limit 50", check=False).stdout
    runs: list[dict[str, Any]] = json.loads(text) if text.strip().startswith("[") else []
    return runs


def borg_processes(box: nspawn.Container) -> str:
    """Every borg process in the container: server-side serves and client-side creates."""
    return box.run("pgrep -a -f 'borg (serve|create) ' || true").stdout.strip()


def journal_since(box: nspawn.Container, cursor: str, unit: str = "borgtunnel") -> str:
    return box.run(
        f"journalctl --no-pager -o cat -u {unit} --after-cursor={shlex.quote(cursor)}", check=False
    ).stdout


def journal_cursor(box: nspawn.Container) -> str:
    line = box.run("journalctl -n 0 --show-cursor --no-pager").stdout.strip().splitlines()[-1]
    return line.removeprefix("-- cursor: ")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nspawn.Container]:
    missing = nspawn.missing_tools()
    assert not missing, f"missing {missing}: ./scripts/setup installs systemd-container"
    scratch = tmp_path_factory.mktemp("nspawn")
    checkout = scratch / "checkout"
    copy_checkout(checkout)
    wheels = scratch / "wheels"
    build_wheels(wheels, checkout)
    # The wheel build left build/ and *.egg-info in the copy; the install commands start clean.
    for leftover in (checkout / "build", *checkout.glob("*.egg-info")):
        shutil.rmtree(leftover, ignore_errors=True)
    binds = [(wheels, WHEELS_INSIDE, True), (checkout, CHECKOUT_INSIDE, False)]
    machine = f"bt-{os.getpid()}"
    try:
        with nspawn.booted(machine, scratch / "boot", binds=binds) as box:
            box.run(f"printf '{APT_OFFLINE}' > /etc/apt/apt.conf.d/99bt-test-offline")
            yield box
    except nspawn.NspawnUnusableError as exc:
        pytest.skip(f"systemd-nspawn cannot boot a container here: {exc}")


@pytest.fixture(scope="module")
def installed(box: nspawn.Container) -> nspawn.Container:
    install(box)
    return box


def install(box: nspawn.Container) -> None:
    """docs/install.md's install and repositories blocks, the config and the client, its start."""
    pip_offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS_INSIDE}
    box.run(install_block("install"), cwd=CHECKOUT_INSIDE, env=pip_offline, timeout=300)
    box.run(install_block("repositories"), cwd=CHECKOUT_INSIDE)
    start_client(box)
    box.run("umask 077; printf 'web1 passphrase %s\\n' $RANDOM$RANDOM > /etc/borgtunnel/web1.pass")
    write_config(box, config_toml(schedule="* * * * *"))
    fingerprint = box.run(f"ssh-keygen -lf {CLIENT}/host_key.pub").stdout.split()[1]
    box.run(f"borgtunnel trust web1 --fingerprint {fingerprint}")
    box.run("for c in db1 slow web2; do borgtunnel init $c; done")
    box.run(install_block("start"), cwd=CHECKOUT_INSIDE)


# --- install -----------------------------------------------------------------------------------


def test_install_puts_the_command_where_the_units_run_it(installed: nspawn.Container) -> None:
    box = installed
    for unit in (
        "borgtunnel.service",
        "borgtunnel-pull@db1.service",
        "borgtunnel-serve@web2.service",
    ):
        exec_start = unit_property(box, unit, "ExecStart")
        program = re.search(r"path=(\S+)", exec_start)
        assert program, exec_start
        assert program.group(1) == "/usr/local/bin/borgtunnel", exec_start
        assert box.run(f"{program.group(1)} --version").stdout.startswith("borgtunnel")
        assert f"{REPOS}" in unit_property(box, unit, "ReadWritePaths"), "drop-in not applied"
    # The installed package is the wheel built from the checkout, not an editable install.
    location = box.run("/opt/borgtunnel/bin/python -c 'import borgtunnel as b; print(b.__file__)'")
    assert location.stdout.startswith("/opt/borgtunnel/lib/"), location.stdout


def test_without_the_drop_in_the_repositories_are_read_only(installed: nspawn.Container) -> None:
    """docs/install.md's drop-in is what makes a repository outside /srv/borg writable: the same
    pull@ unit without it fails on the read-only file system. The daemon is stopped first: while
    it runs, pull@ hands the pull to it (docs/control.md), and the daemon has its own drop-in."""
    box = installed
    drop_in = "/etc/systemd/system/borgtunnel-pull@.service.d/repositories.conf"
    box.run("systemctl stop borgtunnel", timeout=180)
    box.run(f"mv {drop_in} /tmp/bt-drop-in && systemctl daemon-reload")
    try:
        assert REPOS not in unit_property(box, "borgtunnel-pull@db1.service", "ReadWritePaths")
        done = box.run("systemctl start borgtunnel-pull@db1.service", check=False, timeout=120)
        assert done.returncode != 0
        failed = history(box, "db1")[0]
        assert failed["result"] == "failed", failed
        assert "read-only file system" in journal(box).lower(), journal(box)
    finally:
        box.run(f"mv /tmp/bt-drop-in {drop_in} && systemctl daemon-reload")
        box.run("systemctl start borgtunnel", timeout=180)


# --- the daemon --------------------------------------------------------------------------------


def test_daemon_ready_and_status(installed: nspawn.Container) -> None:
    box = installed
    # Type=notify: `enable --now` returned only after READY=1.
    assert unit_property(box, "borgtunnel.service", "ActiveState") == "active"
    assert unit_property(box, "borgtunnel.service", "SubState") == "running"
    status = unit_property(box, "borgtunnel.service", "StatusText")
    assert "next:" in status or "running" in status, status
    shown = box.run("systemctl status --no-pager borgtunnel", check=False).stdout
    assert f'Status: "{status}"' in shown, shown


def test_reload_with_good_config(installed: nspawn.Container) -> None:
    box = installed
    pid = unit_property(box, "borgtunnel.service", "MainPID")
    cursor = journal_cursor(box)
    extra = (
        f'\n[clients.extra]\nhost = "127.0.0.1"\nport = {SSH_PORT}\nuser = "root"\n'
        f'repository = "{REPOS}/extra"\npaths = ["/etc/hostname"]\nencryption = "none"\n'
    )
    write_config(box, config_toml(schedule="* * * * *", extra=extra))
    done = box.run("systemctl reload borgtunnel", check=False)
    assert done.returncode == 0, done.stderr
    wait_for("config_reloaded", lambda: "config_reloaded" in journal_since(box, cursor), 10, box)
    assert unit_property(box, "borgtunnel.service", "MainPID") == pid
    assert unit_property(box, "borgtunnel.service", "ActiveState") == "active"


def test_reload_with_broken_config_fails_where_typed(installed: nspawn.Container) -> None:
    box = installed
    pid = unit_property(box, "borgtunnel.service", "MainPID")
    good = box.run(f"cat {CONFIG_PATH}").stdout
    cursor = journal_cursor(box)
    write_config(box, good.replace("port = 2222", 'port = "not a port"', 1))
    try:
        done = box.run("systemctl reload borgtunnel", check=False)
        # The administrator sees the failure where the command was typed ...
        assert done.returncode != 0, "systemctl reload exited 0 with a broken config"
        # ... and the running daemon keeps the old configuration.
        assert unit_property(box, "borgtunnel.service", "MainPID") == pid
        assert unit_property(box, "borgtunnel.service", "ActiveState") == "active"
        errors = box.run(
            "journalctl --no-pager -o cat -p err -u borgtunnel "
            f"--after-cursor={shlex.quote(cursor)}",
            check=False,
        ).stdout
        assert "port" in errors, f"journalctl -p err shows no reason:\n{errors}"
    finally:
        write_config(box, good)


def test_pull_at_service_and_timer(installed: nspawn.Container) -> None:
    box = installed
    done = box.run("systemctl start borgtunnel-pull@db1.service", check=False, timeout=120)
    runs = history(box, "db1")
    assert done.returncode == 0, journal(box)
    assert runs, "no run recorded"
    assert runs[0]["result"] == "ok", runs[0]
    assert unit_property(box, "borgtunnel-pull@db1.service", "Result") == "success"
    assert runs[0]["archive"] in server_borg(box, f"list --short {REPOS}/db1").split()
    pulled = len(runs)
    # The timer: a stamp from two days ago is a missed daily run. Persistent=yes schedules the
    # catch-up now (its calendar base is "now", not the next midnight), plus the fixed random
    # delay of RandomizedDelaySec=1h, up to an hour. A runtime drop-in then sets that delay to
    # 0, so the shipped timer starts the shipped service within seconds.
    timer = "borgtunnel-pull@db1.timer"
    box.run(
        "mkdir -p /var/lib/systemd/timers && "
        f"touch -d '2 days ago' /var/lib/systemd/timers/stamp-{timer} && "
        f"systemctl enable --now {timer}"
    )
    assert unit_property(box, timer, "UnitFileState") == "enabled"
    calendar = unit_property(box, timer, "TimersCalendar")
    base = re.search(r"next_elapse=\w+ (\S+ \S+) UTC", calendar)
    assert base, calendar
    due = datetime.strptime(base.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert due <= datetime.now(UTC) + timedelta(minutes=1), f"no catch-up scheduled: {calendar}"
    box.run(
        f"mkdir -p /run/systemd/system/{timer}.d && "
        f"printf '[Timer]\\nRandomizedDelaySec=0\\n' "
        f"> /run/systemd/system/{timer}.d/zz-test.conf && "
        f"systemctl daemon-reload && systemctl restart {timer}"
    )
    wait_for("the timer's pull of db1", lambda: len(history(box, "db1")) > pulled, 60, box)
    wait_for(
        "the timer's pull to finish",
        lambda: history(box, "db1")[0]["result"] != "running",
        60,
        box,
    )
    assert history(box, "db1")[0]["result"] == "ok", history(box, "db1")
    assert unit_property(box, timer, "ActiveState") == "active"
    assert unit_property(box, "borgtunnel-pull@db1.service", "Result") == "success"


def test_serve_socket_activation_and_idle_exit(installed: nspawn.Container) -> None:
    box = installed
    service = "borgtunnel-serve@web2.service"
    box.run("systemctl enable --now borgtunnel-serve@web2.socket")
    assert box.run("stat -c %a /run/borgtunnel-serve/web2.sock").stdout.strip() == "600"
    assert unit_property(box, service, "ActiveState") == "inactive"
    rsh = "sh -c 'exec nc -N -U /run/borgtunnel-serve/web2.sock'"
    borg_env = (
        f"BORG_RSH={shlex.quote(rsh)} BORG_BASE_DIR=/tmp/bt-web2-client "
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=no"
    )
    box.run(f"{borg_env} borg create ssh://borgtunnel{REPOS}/web2::first {CLIENT}/web1")
    assert unit_property(box, service, "ActiveState") == "active"
    assert "served" in unit_property(box, service, "StatusText")
    # The policy is the server's: another repository through the same socket is refused.
    other = box.run(f"{borg_env} borg list ssh://borgtunnel{REPOS}/db1", check=False)
    assert other.returncode != 0
    assert "not allowed" in other.stderr, other.stderr
    # Idle exit. Activated by the shipped unit, serve exits after 300 s idle (its default under
    # socket activation; tests/test_socketserve.py checks the default itself). Waiting that
    # long here would be most of the module's time, so a runtime drop-in runs the shipped
    # command with --idle-timeout 2; the shipped one must not switch the default off.
    shipped = exec_argv(box, service)
    if "--idle-timeout" in shipped:
        value = float(shipped[shipped.index("--idle-timeout") + 1])
        assert value > 0, f"the shipped unit disables the idle exit: {shipped}"
    box.run(
        f"mkdir -p /run/systemd/system/{service}.d && "
        f"printf '[Service]\\nExecStart=\\nExecStart=%s\\n' {shlex.quote(with_idle(shipped, 2))} "
        f"> /run/systemd/system/{service}.d/zz-test-idle.conf && "
        f"systemctl daemon-reload && systemctl restart {service}"
    )
    try:
        cursor = journal_cursor(box)
        box.run(f"{borg_env} borg create ssh://borgtunnel{REPOS}/web2::second {CLIENT}/web1")
        wait_for(
            "serve to exit when idle",
            lambda: unit_property(box, service, "ActiveState") == "inactive",
            30,
            box,
        )
        assert "idle" in journal_since(box, cursor, service)
        assert unit_property(box, service, "Result") == "success"
        assert unit_property(box, "borgtunnel-serve@web2.socket", "ActiveState") == "active"
        # ... and the socket starts it again on the next connection.
        box.run(f"{borg_env} borg create ssh://borgtunnel{REPOS}/web2::third {CLIENT}/web1")
        assert unit_property(box, service, "ActiveState") == "active"
    finally:
        box.run(f"rm -rf /run/systemd/system/{service}.d && systemctl daemon-reload", check=False)
    assert server_borg(box, f"list --short {REPOS}/web2").split() == ["first", "second", "third"]


def exec_argv(box: nspawn.Container, unit: str) -> list[str]:
    """The unit's ExecStart= command line as systemd parsed it."""
    shown = unit_property(box, unit, "ExecStart")
    match = re.search(r"argv\[\]=(.*?) ;", shown)
    assert match, shown
    return match.group(1).split()


def with_idle(argv: list[str], seconds: float) -> str:
    if "--idle-timeout" in argv:
        at = argv.index("--idle-timeout")
        argv = [*argv[:at], *argv[at + 2 :]]
    return shlex.join([*argv, "--idle-timeout", str(seconds)])


def server_borg(box: nspawn.Container, command: str) -> str:
    """The server's own borg on a repository, as an administrator would run it (a fresh
    BORG_BASE_DIR: the pulls reached the same repository as ssh://borgtunnel/...)."""
    return box.run(
        "export BORG_BASE_DIR=/tmp/bt-admin BORG_RELOCATED_REPO_ACCESS_IS_OK=yes "
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes "
        "BORG_PASSCOMMAND='cat /etc/borgtunnel/web1.pass'\n" + f"borg {command}"
    ).stdout


def test_scheduled_pull_ok_and_read_back(installed: nspawn.Container) -> None:
    box = installed

    def daemon_runs() -> list[dict[str, Any]]:
        return [r for r in history(box, "web1") if r["trigger"] == "daemon"]

    wait_for(
        "the daemon's scheduled pull of web1",
        lambda: any(r["result"] not in {"running"} for r in daemon_runs()),
        75,
        box,
    )
    finished = [r for r in daemon_runs() if r["result"] != "running"]
    assert finished[-1]["result"] == "ok", (finished[-1], journal(box))
    archive = finished[-1]["archive"]
    box.run(f"""
        mkdir /tmp/bt-restore && cd /tmp/bt-restore
        BORG_PASSCOMMAND='cat /etc/borgtunnel/web1.pass' BORG_BASE_DIR=/tmp/bt-admin \\
            BORG_RELOCATED_REPO_ACCESS_IS_OK=yes borg extract {REPOS}/web1::{archive}
        cmp {CLIENT}/web1/random.bin /tmp/bt-restore{CLIENT}/web1/random.bin
        diff -r {CLIENT}/web1 /tmp/bt-restore{CLIENT}/web1
    """)
    status = json.loads(box.run("borgtunnel status --json").stdout)
    web1 = next(row for row in status if row["client"] == "web1")
    assert web1["last_result"] == "ok", web1
    assert web1["next_run"], web1
    table = box.run("borgtunnel history web1").stdout
    assert archive in table, table


def test_stop_during_a_pull_leaves_nothing(installed: nspawn.Container) -> None:
    box = installed

    def slow_running() -> bool:
        runs = history(box, "slow")
        return bool(runs) and runs[0]["result"] == "running" and runs[0]["trigger"] == "daemon"

    wait_for("the daemon's pull of slow to block on its FIFO", slow_running, 75, box)
    time.sleep(1)  # let the remote borg create reach the FIFO
    running = borg_processes(box)
    assert "borg create" in running, (history(box, "slow")[:1], journal(box))
    assert "borg serve" in running, running
    started = time.monotonic()
    box.run("systemctl stop borgtunnel", timeout=180)
    took = time.monotonic() - started
    assert unit_property(box, "borgtunnel.service", "ActiveState") == "inactive"
    assert unit_property(box, "borgtunnel.service", "Result") == "success"
    # stop_timeout, then serve's SIGTERM and one exec on the client: seconds on a live link.
    assert took < DAEMON_STOP_TIMEOUT + 10, f"stop took {took:.1f} s\n{journal(box)}"
    wait_for("every borg process on both ends to exit", lambda: not borg_processes(box), 15, box)
    assert history(box, "slow")[0]["result"] == "interrupted", history(box, "slow")[0]
    leftover = box.run(f"ls -d {REPOS}/slow/lock.* 2>/dev/null || true").stdout.strip()
    assert not leftover, f"stale repository lock: {leftover}"
    assert not box.run("ls /run/borgtunnel").stdout.strip(), "socket left in /run/borgtunnel"
    # The next pull, through the shipped pull@ unit, finds no lock and succeeds.
    box.run(f"rm {CLIENT}/slow/blocks-until-written && echo now-a-file > {CLIENT}/slow/data")
    done = box.run("systemctl start borgtunnel-pull@slow.service", check=False, timeout=120)
    assert done.returncode == 0, history(box, "slow")[0]
    assert history(box, "slow")[0]["result"] == "ok", history(box, "slow")[0]


def test_watchdog_kills_and_restarts_a_stopped_daemon(installed: nspawn.Container) -> None:
    """WatchdogSec=5min and RestartSec=30s as shipped; a runtime drop-in shortens both so the
    test takes seconds. Everything else is the shipped unit."""
    box = installed
    write_config(box, config_toml(schedule=None))  # nothing scheduled: only the watchdog acts
    box.run(
        "mkdir -p /run/systemd/system/borgtunnel.service.d && "
        "printf '[Service]\\nWatchdogSec=3s\\nRestartSec=1s\\n' "
        "> /run/systemd/system/borgtunnel.service.d/zz-test-watchdog.conf && "
        "systemctl daemon-reload && systemctl restart borgtunnel"
    )
    try:
        pid = unit_property(box, "borgtunnel.service", "MainPID")
        restarts = int(unit_property(box, "borgtunnel.service", "NRestarts"))
        time.sleep(4)  # pinging every 1.5 s keeps it alive past one watchdog period
        assert unit_property(box, "borgtunnel.service", "MainPID") == pid
        box.run(f"kill -STOP {pid}")
        wait_for(
            "the watchdog to kill and restart the daemon",
            lambda: (
                int(unit_property(box, "borgtunnel.service", "NRestarts")) > restarts
                and unit_property(box, "borgtunnel.service", "ActiveState") == "active"
            ),
            30,
            box,
        )
        assert unit_property(box, "borgtunnel.service", "MainPID") != pid
        assert box.run(f"test ! -e /proc/{pid}", check=False).returncode == 0
        journal = box.run("journalctl --no-pager -u borgtunnel -o cat").stdout
        assert "Watchdog timeout" in journal, journal[-2000:]
    finally:
        box.run(
            "rm -rf /run/systemd/system/borgtunnel.service.d && systemctl daemon-reload && "
            "systemctl stop borgtunnel",
            check=False,
        )
