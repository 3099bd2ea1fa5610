"""``borgtunnel pull`` through a running daemon, ``cancel``, ``pause`` and ``resume``
(the CLI's side of the control socket, docs/control.md).

``pull``: when a daemon answers on the control socket, each named client is queued in it (its
``max_parallel``, its lock), its progress shown here, its summary printed here, and the exit
code is the one-shot pull's. Ctrl-C (or SIGTERM) asks the daemon to cancel these pulls and
waits for their cleanup; a second one stops waiting (the daemon still cancels them: the
connection closed). Without a daemon, ``pull_through_daemon`` returns None and the CLI pulls
in its own process as before.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from borgtunnel import logs
from borgtunnel.config import Config
from borgtunnel.pauses import PauseFileError, clear_pause, parse_until, pauses_path, set_pause
from borgtunnel.reporting import live as rows
from borgtunnel.reporting.progress import PullDisplay
from borgtunnel.scheduling.control_client import (
    ControlConnection,
    ControlError,
    NoDaemonError,
    connect,
)
from borgtunnel.scheduling.control_protocol import (
    CancelRequest,
    Done,
    Error,
    Finished,
    PauseRequest,
    ProgressEvent,
    PullRequest,
    ResumeRequest,
    Started,
)

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 2
EXIT_INTERNAL = 70
# EX_UNAVAILABLE: `cancel` found no daemon to ask (there is nothing it could cancel).
EXIT_NO_DAEMON = 69

_ANSWER_TIMEOUT = 60.0


def _interruptible(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run with SIGINT/SIGTERM cancelling the main task (the coroutine decides what a
    cancellation means)."""

    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - we are inside a task
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        try:
            return await coro
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    return asyncio.run(guarded())


# --- pull ------------------------------------------------------------------------------


def pull_through_daemon(
    config: Config,
    names: Sequence[str],
    *,
    wait: bool,
    progress: bool,
) -> list[int] | None:
    """Each client's exit code, or None when no daemon runs (pull in this process then)."""
    for name in names:
        config.client(name)  # an unknown name is a config error (78) before anything else
    try:
        return _interruptible(
            _pull_all(
                config,
                names,
                wait=wait,
                progress=progress,
            )
        )
    except asyncio.CancelledError:  # a second Ctrl-C: stop waiting for the cleanup
        logs.print_error("borgtunnel: interrupted; the daemon cancels the pulls on its own")
        return [EXIT_FAILURE]


async def _pull_all(
    config: Config,
    names: Sequence[str],
    *,
    wait: bool,
    progress: bool,
) -> list[int] | None:
    """Logging is set up by the caller (through CurrentStderr on a live terminal)."""
    socket_dir = config.server.socket_dir
    connections: list[ControlConnection] = []
    try:
        try:
            connections.append(await connect(socket_dir))
        except NoDaemonError:
            return None
        except ControlError as exc:
            logs.print_error(f"borgtunnel: {exc}")
            return [EXIT_FAILURE]
        try:
            connections.extend([await connect(socket_dir) for _ in names[1:]])
        except (NoDaemonError, ControlError) as exc:
            logs.print_error(f"borgtunnel: the daemon went away: {exc}")
            return [EXIT_FAILURE]
        # Not on a terminal, PullDisplay prints the summaries in the order named.
        with PullDisplay(live=progress) as display:
            for name in names:
                display.feed(rows.Queued(name))
            return await _pull_each(connections, names, wait, display, progress=progress)
    finally:
        for connection in connections:
            await connection.aclose()


async def _pull_each(
    connections: Sequence[ControlConnection],
    names: Sequence[str],
    wait: bool,
    display: PullDisplay,
    *,
    progress: bool,
) -> list[int]:
    tasks = [
        asyncio.create_task(_pull_one(connection, name, wait, display, progress=progress))
        for connection, name in zip(connections, names, strict=True)
    ]
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        logs.print_error(
            "borgtunnel: cancelling the pulls in the daemon and waiting for their cleanup "
            "(Ctrl-C again: stop waiting)"
        )
        for task in tasks:
            task.cancel()  # each asks the daemon to cancel its pull and reads on
        await asyncio.wait(tasks)
    return [task.result() for task in tasks]


async def _pull_one(
    connection: ControlConnection,
    name: str,
    wait: bool,
    display: PullDisplay,
    *,
    progress: bool,
) -> int:
    try:
        await connection.send(PullRequest(client=name, wait=wait, progress=progress))
        return await _follow(connection, name, display)
    except ControlError as exc:
        return _failed(display, name, str(exc))
    except OSError as exc:  # the daemon went away mid-pull
        return _failed(display, name, f"lost the connection to the daemon: {exc}")


async def _follow(connection: ControlConnection, name: str, display: PullDisplay) -> int:
    """Read the daemon's messages for one pull until its result; a first cancellation of
    this task (Ctrl-C) asks the daemon to cancel the pull and reads on."""
    cancel_sent = False
    backing_up = False  # the daemon sends no phases: the first figures mean borg is running
    while True:
        try:
            message = await connection.receive()
        except asyncio.CancelledError:
            if cancel_sent:
                raise
            cancel_sent = True
            await connection.send(CancelRequest(client=name))
            continue
        match message:
            case None:
                return _failed(display, name, "the daemon closed the connection (stopped?)")
            case Started():
                display.feed(rows.PhaseChanged(name, rows.Phase.CONNECTING))
            case ProgressEvent():
                if not backing_up:
                    backing_up = True
                    display.feed(rows.PhaseChanged(name, rows.Phase.BACKING_UP))
                display.feed(rows.FiguresSeen(name, message.figures()))
            case Finished():
                failed = message.exit_code in (EXIT_FAILURE, EXIT_INTERNAL)
                display.feed(rows.Finished(name, message.summary, message.exit_code, failed))
                return message.exit_code
            case Error():
                return _failed(display, name, f"the daemon refused: {message.message}")
            case _:  # queued
                continue


def _failed(display: PullDisplay, name: str, why: str) -> int:
    display.feed(rows.Finished(name, f"{name}: failed: {why}", EXIT_FAILURE, failed=True))
    return EXIT_FAILURE


# --- cancel, pause, resume --------------------------------------------------------------


async def _ask(
    socket_dir: Path,
    request: PullRequest | CancelRequest | PauseRequest | ResumeRequest,
    limit: float | None,
) -> Done | Error:
    async with await connect(socket_dir) as connection:
        await connection.send(request)
        async with asyncio.timeout(limit):
            answer = await connection.receive()
    if isinstance(answer, Done | Error):
        return answer
    raise ControlError(f"unexpected answer from the daemon: {answer!r}")


def _report(answer: Done | Error) -> int:
    if isinstance(answer, Done) and answer.ok:
        print(answer.message)
        return EXIT_OK
    text = answer.message
    logs.print_error(f"borgtunnel: {text}")
    return EXIT_FAILURE


def _steer(
    config: Config,
    request: CancelRequest | PauseRequest | ResumeRequest,
    *,
    limit: float | None,
    without_daemon: Callable[[NoDaemonError], int],
) -> int:
    """Ask the daemon and print its answer; ``without_daemon`` when none listens."""
    try:
        answer = _interruptible(_ask(config.server.socket_dir, request, limit))
    except NoDaemonError as exc:
        return without_daemon(exc)
    except (ControlError, TimeoutError, OSError) as exc:
        logs.print_error(f"borgtunnel: {exc}")
        return EXIT_FAILURE
    except asyncio.CancelledError:  # Ctrl-C: what was asked still happens in the daemon
        logs.print_error("borgtunnel: interrupted (the daemon still carries out the request)")
        return EXIT_FAILURE
    return _report(answer)


def cancel(config: Config, name: str) -> int:
    """``borgtunnel cancel NAME``: 0 cancelled (cleanup done), 2 nothing to cancel or the
    socket unusable, 69 no daemon runs."""
    config.client(name)

    def no_daemon(exc: NoDaemonError) -> int:
        logs.print_error(
            f"borgtunnel: {exc}; nothing to cancel. A one-shot `borgtunnel pull` in another "
            "terminal stops with Ctrl-C (or SIGTERM), cleaning up the same way."
        )
        return EXIT_NO_DAEMON

    # No time limit: the answer comes once the run's cleanup is done.
    return _steer(config, CancelRequest(client=name), limit=None, without_daemon=no_daemon)


def pause(config: Config, name: str, until_text: str | None) -> int:
    """``borgtunnel pause NAME [--until T]``: through the daemon, or into the file."""
    config.client(name)
    now = datetime.now(UTC)
    try:
        until = parse_until(until_text, now, config.daemon.zone()) if until_text else None
    except ValueError as exc:
        logs.print_error(f"borgtunnel: {exc}")
        return EXIT_FAILURE

    def into_the_file(_: NoDaemonError) -> int:
        try:
            paused = set_pause(config.server.state_dir, name, until, now)
        except (PauseFileError, OSError) as exc:
            logs.print_error(f"borgtunnel: {exc}")
            return EXIT_FAILURE
        end = f"until {paused.until.isoformat()}" if paused.until else "until resumed"
        return _written(config, f"{name}: paused {end}")

    request = PauseRequest(client=name, until=until)
    return _steer(config, request, limit=_ANSWER_TIMEOUT, without_daemon=into_the_file)


def resume(config: Config, name: str) -> int:
    """``borgtunnel resume NAME``: through the daemon, or in the file."""
    config.client(name)

    def in_the_file(_: NoDaemonError) -> int:
        try:
            was = clear_pause(config.server.state_dir, name, datetime.now(UTC))
        except (PauseFileError, OSError) as exc:
            logs.print_error(f"borgtunnel: {exc}")
            return EXIT_FAILURE
        return _written(config, f"{name}: {'resumed' if was else 'was not paused'}")

    request = ResumeRequest(client=name)
    return _steer(config, request, limit=_ANSWER_TIMEOUT, without_daemon=in_the_file)


def _written(config: Config, what: str) -> int:
    path = pauses_path(config.server.state_dir)
    print(f"{what} (no daemon runs: written to {path}; a daemon started later honours it)")
    return EXIT_OK
