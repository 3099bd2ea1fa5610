"""`borgtunnel doctor NAME`: what a client has — borg, nc/socat, forwarding, gatekeeper.

One remote command, the same with and without a gatekeeper: without one, sh runs
DOCTOR_SCRIPT (plain version commands); a gatekeeper recognises the request by its leading
words, prints the same lines plus its version and policy, and never runs the script. Lines are
``borgtunnel-doctor KEY VALUE`` on stderr; the last, ``probe PATH``, names a socket path in the
socket directory that the server then tries to reverse-forward (what a pull needs), before it
writes ``go`` so the remote side removes the probe socket and exits.
"""

from __future__ import annotations

import asyncio
import json
import shlex
from dataclasses import dataclass, field

from borgtunnel.client.remote import GO, REQUEST_DOCTOR, encoded_command
from borgtunnel.clientborg import BorgVersion, major_mismatch
from borgtunnel.config import ClientConfig, Config
from borgtunnel.ssh.tunnel import SHORT_COMMAND_TIMEOUT, Target, Tunnel, TunnelError
from borgtunnel.text import printable

PREFIX = "borgtunnel-doctor "
# What a report keeps of a client's answer (each line is already cut at tunnel.MAX_LINE): the
# doctor request reads for up to twice SHORT_COMMAND_TIMEOUT, time enough for millions of lines.
MAX_OTHER_LINES = 20
MAX_FACTS = 32

# $1 the configured socket path, then remote_borg's words. Read-only apart from creating the
# socket directory (0700) the first pull would create anyway, and the probe socket.
DOCTOR_SCRIPT = r"""
set -u
p=$1; shift
case $p in "~/"*) p=$HOME/${p#"~/"} ;; esac
d=${p%/*}
[ -n "$d" ] || d=/
say() { printf 'borgtunnel-doctor %s %s\n' "$1" "$2" >&2; }
say user "$(id -un)"
if v=$("$@" --version 2>/dev/null); then say borg "$v"; else say borg missing; fi
if command -v nc >/dev/null 2>&1 && nc -h 2>&1 | grep -q -e '-N'; then say nc yes
else say nc missing; fi
if command -v socat >/dev/null 2>&1; then say socat "$(socat -V 2>/dev/null | grep -m1 version)"
else say socat missing; fi
if [ -L "$d" ]; then say probe-failed "socket directory $d is a symlink"; exit 0; fi
if [ ! -e "$d" ]; then
  (umask 077 && mkdir -p -- "$d") || { say probe-failed "cannot create $d"; exit 0; }
fi
probe=$d/doctor-$$.sock
rm -f -- "$probe"
say probe "$probe"
IFS= read -r go
rm -f -- "$probe"
exit 0
"""


def doctor_command(client: ClientConfig) -> str:
    return encoded_command(
        DOCTOR_SCRIPT,
        [client.remote_socket_path, *shlex.split(client.remote_borg)],
        kind=REQUEST_DOCTOR,
    )


def parse_doctor_line(line: str) -> tuple[str, str] | None:
    if not line.startswith(PREFIX):
        return None
    key, _, value = line[len(PREFIX) :].rstrip("\n").partition(" ")
    return key, value


@dataclass
class DoctorReport:
    """What one client has. ``problems`` empty means a pull can work."""

    client: str
    where: str
    facts: dict[str, str] = field(default_factory=dict)
    forwarding: str = "not tested"
    # A local unix-socket forward a pull never needs (None: not tested).
    local_forwarding: bool | None = None
    other_output: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Why the doctor could not connect or finish, as raised (enroll tells a refused key apart).
    error: TunnelError | None = None

    def said(self, line: str) -> None:
        """Keep one line of other output: the last MAX_OTHER_LINES, whatever a client sends."""
        if line.strip():
            self.other_output.append(line.rstrip("\n"))
            del self.other_output[:-MAX_OTHER_LINES]

    def learn(self, key: str, value: str) -> None:
        """Keep one fact; a client inventing keys gets the first MAX_FACTS kept."""
        if key in self.facts or len(self.facts) < MAX_FACTS:
            self.facts[key] = value

    @property
    def exit_code(self) -> int:
        return 2 if self.problems else 0

    def gatekeeper_text(self) -> str:
        version = self.facts.get("gatekeeper")
        if version is None:
            return (
                "none: the server's key can run any command on this client "
                "(docs/clients.md: Gatekeeper)"
            )
        try:
            policy = json.loads(self.facts.get("policy", "{}"))
        except (ValueError, RecursionError):
            policy = {}
        if not isinstance(policy, dict):
            policy = {}
        restore = (
            "allowed into " + _listed(policy.get("restore_targets", []))
            if policy.get("restore")
            else "refused"
        )
        sources = policy.get("sources")
        listed = _listed(list(sources)) if isinstance(sources, dict) and sources else ""
        return (
            f"version {version}, policy {policy.get('policy', '?')}: paths "
            f"{_listed(policy.get('paths', []))}; socket_dir {policy.get('socket_dir', '?')}; "
            f"borg {policy.get('borg', '?')}; restore {restore}"
            + (f"; sources {listed}" if listed else "")
        )

    def local_forwarding_text(self) -> str:
        if self.local_forwarding is None:
            return "not tested"
        if self.local_forwarding:
            return (
                "ALLOWED: this key can connect to unix sockets on the client (e.g. "
                "/run/docker.sock); set AllowStreamLocalForwarding remote "
                "(docs/clients.md: Gatekeeper)"
            )
        return "refused (good: a pull only needs the reverse forward)"

    def lines(self) -> list[str]:
        rows = [
            ("login user", self.facts.get("user", "?")),
            ("borg", self.facts.get("borg", "?")),
            ("nc", self.facts.get("nc", "?")),
            ("socat", self.facts.get("socat", "?")),
            ("forwarding", self.forwarding),
            ("local fwd", self.local_forwarding_text()),
            ("gatekeeper", self.gatekeeper_text()),
        ]
        out = [f"{self.client}: {self.where}"]
        out += [f"  {name:<11} {value}" for name, value in rows]
        out += [f"  said: {line}" for line in self.other_output]
        out += [f"  PROBLEM: {problem}" for problem in self.problems]
        # Facts, policy and "said" lines are whatever the client printed.
        return [printable(line) for line in out]


def _listed(value: object) -> str:
    """A policy list as the client sent it; any other JSON value as its text."""
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    return str(value)


def borg_version_problem(client: ClientConfig, said: str) -> str | None:
    """``borg --version`` on the client (``borg 2.0.0b25``) against ``borg_version``: a pull
    builds its command line for the configured major, so a mismatch fails every pull."""
    version = BorgVersion.parse(said.removeprefix("borg").strip())
    if version is None:
        return None
    return major_mismatch(version, client=client.name, configured=client.borg_version)


async def doctor(config: Config, client: ClientConfig) -> DoctorReport:
    target = Target(client.host, client.port, client.user, config.ssh_for(client))
    report = DoctorReport(client.name, f"{target.user}@{target.host}:{target.port}")
    try:
        await _examine(target, client, report)
    except TunnelError as exc:
        report.error = exc
        report.problems.append(str(exc))
        return report
    if report.facts.get("borg", "missing") == "missing":
        report.problems.append(f"remote_borg {client.remote_borg!r} does not run on the client")
    elif (mismatch := borg_version_problem(client, report.facts.get("borg", ""))) is not None:
        report.problems.append(mismatch)
    if report.facts.get("nc") != "yes" and report.facts.get("socat", "missing") == "missing":
        report.problems.append("neither nc (netcat-openbsd) nor socat is installed")
    if not report.forwarding.startswith("allowed"):
        report.problems.append(f"reverse unix-socket forwarding: {report.forwarding}")
    return report


async def _examine(target: Target, client: ClientConfig, report: DoctorReport) -> None:
    async with Tunnel.connect(target) as tunnel, tunnel.start(doctor_command(client)) as rr:
        probe = None
        async with asyncio.timeout(SHORT_COMMAND_TIMEOUT):
            while (line := await rr.next_line()) is not None:
                parsed = parse_doctor_line(line)
                if parsed is None:
                    report.said(line)
                    continue
                key, value = parsed
                if key == "probe":
                    probe = value
                    break
                if key == "probe-failed":
                    report.forwarding = f"not tested: {value}"
                    continue
                report.learn(key, value)
        if probe is not None:
            result = await tunnel.probe_forwarding(probe)
            if result.remote_refused is not None:
                report.forwarding = f"refused: {result.remote_refused}"
            else:
                report.forwarding = f"allowed (reverse unix-socket forward at {probe})"
            report.local_forwarding = result.local_allowed
        elif not report.facts:
            report.forwarding = "not tested: the client did not run the doctor request"
        rr.send_and_close(GO)
        async with asyncio.timeout(SHORT_COMMAND_TIMEOUT):
            while (line := await rr.next_line()) is not None:
                report.said(line)
            await rr.status()
