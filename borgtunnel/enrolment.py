"""``borgtunnel enroll NAME``: from a config entry to a verified first archive, resumable.

Four steps, in order; each first checks whether it is done already, prints one line saying what
it did or skipped, and stops the command when it cannot go on:

1. host key: the key the client offers is pinned in its ``known_hosts`` (``borgtunnel trust``'s
   logic: confirmed on a terminal or by ``--fingerprint``; a different pinned key is never
   replaced here);
2. client: ``doctor`` passes — the server's key is accepted, borg, nc/socat and the reverse
   forward work. When the key is refused, the gatekeeper install steps and the
   ``authorized_keys`` line are printed and the command stops with EXIT_PENDING (or, with
   ``--wait``, checks again until it works or the wait times out);
3. repository: created as ``borgtunnel init`` creates it, unless one exists;
4. first pull: the normal recorded, verified pull (reported as ``borgtunnel pull`` reports it),
   unless the history already holds a verified archive of an existing repository — then the
   client is "already enrolled" and nothing changes.

Layer: a command made of the layers below it (ssh, runs, reporting); only the CLI is above.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from borgtunnel import logs
from borgtunnel.config import ClientConfig, Config
from borgtunnel.history import History, RunResult
from borgtunnel.passphrase import PassphraseError
from borgtunnel.reporting.live import Queued, finished_event, watch_run
from borgtunnel.reporting.progress import PullDisplay
from borgtunnel.reporting.reporter import Reporter
from borgtunnel.runs.jobs import run_recorded
from borgtunnel.runs.keyguard import KeyGuardError
from borgtunnel.runs.repository import init_repository, repository_exists
from borgtunnel.ssh import doctor, enrol, trust
from borgtunnel.ssh.tunnel import AuthenticationError, HostKeyError, LocalError, TunnelError
from borgtunnel.text import printable

EXIT_OK = 0
EXIT_FAILURE = 2
# EX_TEMPFAIL: nothing failed, but the client is not ready yet (the server's key is not
# accepted, doctor found a problem): do the printed step, then run enroll again.
EXIT_PENDING = 75
_FAILED = (EXIT_FAILURE, 70)

# How often --wait checks the client again; each check is one SSH login.
POLL_INTERVAL = 3.0


@dataclass(frozen=True)
class EnrolOptions:
    fingerprint: str | None = None  # SHA256:… as read on the client; None: ask on a terminal
    wait: bool = False  # wait for the client to become ready instead of stopping
    wait_timeout: float = 900.0  # seconds --wait waits at most
    command: str = enrol.GATEKEEPER_PATH  # the gatekeeper's path in the printed line
    progress: bool = False  # live progress of the first pull (a terminal)


def _say(client: ClientConfig, text: str) -> None:
    print(f"{client.name}: {text}", flush=True)


async def enroll(
    config: Config,
    client: ClientConfig,
    options: EnrolOptions,
    *,
    ask: trust.Ask = trust.ask_tty,
) -> int:
    """The four steps; the exit code of the first that stops, else of the first pull."""
    code = await _host_key_step(config, client, options, ask)
    if code is None:
        code = await _client_step(config, client, options)
    if code is not None:
        return code
    created = await _repository_step(config, client)
    if created is None:
        return EXIT_FAILURE
    return await _pull_step(config, client, options, created=created)


# --- 1. host key ---------------------------------------------------------------------------


async def _host_key_step(
    config: Config, client: ClientConfig, options: EnrolOptions, ask: trust.Ask
) -> int | None:
    try:
        check = await trust.check_host_key(config, client)
    except TunnelError as exc:
        logs.print_error(f"{client.name}: host key: cannot fetch it: {exc}")
        return EXIT_FAILURE
    offered = check.offered
    shown = f"{offered.algorithm} {offered.fingerprint}"
    if options.fingerprint is not None and (
        refusal := trust.fingerprint_mismatch(check, options.fingerprint)
    ):
        _say(client, f"host key {refusal}; nothing pinned")
        return EXIT_FAILURE
    if check.pinned:
        _say(client, f"host key {shown} already pinned in {check.path}")
        return None
    if check.conflicts:
        _say(
            client,
            f"host key refused: {check.path} already trusts a DIFFERENT key for {check.name}: "
            f"{check.trusted_text()}; offered now: {shown}. This may be a man-in-the-middle; "
            f"if the client was re-installed, verify the new key out of band and run "
            f"`borgtunnel trust {client.name} --replace`",
        )
        return EXIT_FAILURE
    if options.fingerprint is None:
        _say(client, f"host key: {check.name} offers {shown}")
        if not ask(f"Pin {offered.fingerprint} for {check.name}?"):
            _say(
                client,
                "host key not pinned: confirm it on a terminal, or pass --fingerprint "
                "SHA256:... as read on the client (ssh-keygen -lf "
                "/etc/ssh/ssh_host_ed25519_key.pub)",
            )
            return EXIT_FAILURE
    trust.pin_host_key(check)
    _say(client, f"host key {shown} pinned in {check.path}")
    return None


# --- 2. the client: key accepted, doctor clean -----------------------------------------------


async def _client_step(config: Config, client: ClientConfig, options: EnrolOptions) -> int | None:
    report = await doctor.doctor(config, client)
    if not report.problems:
        _say(client, _ready_text(report))
        return None
    if _is_failure(report, waiting=options.wait):
        return _failed(client, report)
    if not _explain_pending(config, client, options, report):
        return EXIT_FAILURE
    if not options.wait:
        _say(
            client,
            f"not ready: do the above, then run `borgtunnel enroll {client.name}` again "
            "(or with --wait)",
        )
        return EXIT_PENDING
    return await _wait_until_ready(config, client, options, report)


async def _wait_until_ready(
    config: Config, client: ClientConfig, options: EnrolOptions, report: doctor.DoctorReport
) -> int | None:
    """--wait: doctor again every POLL_INTERVAL until it passes or wait_timeout is over (a
    check under way then finishes: at most connect_timeout plus a short command longer)."""
    _say(client, f"waiting up to {options.wait_timeout:g}s for the client to become ready")
    deadline = time.monotonic() + options.wait_timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(min(POLL_INTERVAL, max(deadline - time.monotonic(), 0)))
        report = await doctor.doctor(config, client)
        if not report.problems:
            _say(client, _ready_text(report))
            return None
        if _is_failure(report, waiting=True):
            return _failed(client, report)
    _say(
        client,
        f"still not ready after {options.wait_timeout:g}s: {report.problems[0]}; "
        f"run `borgtunnel enroll {client.name}` again once it is done",
    )
    return EXIT_PENDING


def _is_failure(report: doctor.DoctorReport, *, waiting: bool) -> bool:
    """A host key that changed since step 1 or a local file problem: waiting cannot help. A
    client that cannot be reached (step 1 just reached it) is a failure too, unless waiting:
    its sshd may be restarting while the administrator installs the key."""
    if isinstance(report.error, (HostKeyError, LocalError)):
        return True
    return not waiting and isinstance(report.error, TunnelError) and not _key_refused(report)


def _key_refused(report: doctor.DoctorReport) -> bool:
    return isinstance(report.error, AuthenticationError)


def _failed(client: ClientConfig, report: doctor.DoctorReport) -> int:
    logs.print_error(f"{client.name}: client check failed: {report.problems[0]}")
    return EXIT_FAILURE


def _ready_text(report: doctor.DoctorReport) -> str:
    facts = report.facts
    tools = [name for name in ("nc", "socat") if facts.get(name, "missing") not in ("missing", "")]
    gatekeeper = (
        f"gatekeeper version {facts['gatekeeper']}"
        if "gatekeeper" in facts
        else "NO gatekeeper (the server's key can run any command there: docs/enrol.md)"
    )
    # The client's own words (its borg version, user name), made safe for a terminal.
    return printable(
        f"client ready: key accepted as {facts.get('user', '?')}, {facts.get('borg', '?')}, "
        f"{'/'.join(tools)}, reverse forward allowed; {gatekeeper}"
    )


def _explain_pending(
    config: Config, client: ClientConfig, options: EnrolOptions, report: doctor.DoctorReport
) -> bool:
    """What to do on the client: the install steps when the key is refused, else doctor's
    findings. False when the steps cannot be printed (no public key beside the identity)."""
    if _key_refused(report):
        _say(client, f"the server's key is not accepted yet ({report.error}); on the client:")
        try:
            steps = enrol.install_steps(config, client, command=options.command)
        except enrol.PublicKeyError as exc:
            logs.print_error(f"borgtunnel: {exc}")
            return False
        print("".join(f"    {line}\n" for line in steps.splitlines()), end="", flush=True)
        return True
    _say(client, "the client is not ready:")
    print("\n".join(f"    {line}" for line in report.lines()), flush=True)
    return True


# --- 3. repository -------------------------------------------------------------------------


async def _repository_step(config: Config, client: ClientConfig) -> bool | None:
    """True: created now; False: it existed; None: creating it failed (said why)."""
    if repository_exists(client):
        _say(client, f"repository {client.repository} exists")
        return False
    try:
        status = await init_repository(config, client)
    except (PassphraseError, KeyGuardError) as exc:
        logs.print_error(f"{client.name}: repository: {exc}")
        return None
    if status != 0:
        logs.print_error(f"{client.name}: repository: borg init failed with status {status}")
        return None
    _say(client, f"repository {client.repository} created ({client.encryption})")
    return True


# --- 4. the first pull ---------------------------------------------------------------------


async def _pull_step(
    config: Config, client: ClientConfig, options: EnrolOptions, *, created: bool
) -> int:
    with History.open(config.server.state_dir) as history:
        history.recover_interrupted()
        verified = history.verified_archives(client.name, by_id=client.borg2)
        if verified and not created:  # a new repository holds none of them
            newest = max(verified.values(), key=lambda archive: archive.time)
            _say(
                client,
                f"already enrolled: verified archive {newest.name} "
                f"(pulled {newest.time:%Y-%m-%d %H:%M} UTC)",
            )
            return EXIT_OK
        reporter = Reporter(config, history, in_daemon=False)
        reporter.start()
        try:
            with PullDisplay(live=options.progress) as display:
                display.feed(Queued(client.name))
                reporter.run_started(client)
                outcome = await run_recorded(
                    config,
                    client,
                    trigger="enroll",
                    history=history,
                    progress=watch_run(client.name, display.feed),
                )
                display.feed(finished_event(outcome))
                reporter.after_run(client, outcome)
        finally:
            await reporter.aclose()
    if outcome.result in (RunResult.OK, RunResult.WARNING):
        _say(client, "enrolled: the first archive is verified")
    return outcome.exit_code
