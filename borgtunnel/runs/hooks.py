"""Hooks: programs the server runs before and after a client's pull, never through a shell.

* ``before``: run in order before the pull; the first that fails stops the others and the pull
  is not started. Exit 75 (EX_TEMPFAIL) means "skip quietly": the run is recorded ``skipped``.
  Any other failure (non-zero exit, timeout, cannot start) records the run ``failed`` with the
  hook's stderr as the error.
* ``after``: run after every run whose ``before`` hooks all passed, whatever its result
  (``$BORGTUNNEL_RESULT`` tells them), so "stop the database / start it again" pairs hold;
  ``on_failure``: after every failed run, a failed ``before`` included. Their failures are logged
  and change nothing.

Values reach a hook two ways: environment variables (``BORGTUNNEL_CLIENT``, ``_ARCHIVE``,
``_RESULT``, ``_ERROR``, ``_REPOSITORY``) and ``{client}``-style placeholders, replaced *inside*
the argv word that contains them. There is no shell and no splitting, so an archive name such as
``x; rm -rf / $(id)`` is one literal word, never a second word or a command. ``{{``/``}}`` are
literal braces. Before the pull, ``{archive}`` is the configured template (borg expands it
on the client); afterwards it is the name borg reported.

Each hook gets ``hook_timeout`` seconds, then it and its process group are killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from borgtunnel.config import ClientConfig, Config
from borgtunnel.config.reporting import _PLACEHOLDER
from borgtunnel.history import RunResult
from borgtunnel.runs.pull import PullOutcome

log = structlog.get_logger("borgtunnel.hooks")

EXIT_SKIP: Final = 75  # EX_TEMPFAIL: "not now", as cron and MTAs read it
_MAX_STDERR: Final = 4000
_ENV_PREFIX: Final = "BORGTUNNEL_"


@dataclass(frozen=True)
class HookResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: timed out or could not start
    stderr: str
    error: str | None = None  # why it did not run to an exit status

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        what = self.error or f"exited with status {self.returncode}"
        detail = self.stderr.strip()
        return f"{what}: {detail}" if detail else what


def substitute(word: str, values: Mapping[str, str]) -> str:
    """Replace ``{name}`` inside one word; the result is always exactly one word."""

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "{{":
            return "{"
        if text == "}}":
            return "}"
        return values.get(match.group(1), "")

    return _PLACEHOLDER.sub(replace, word)


def hook_values(
    client: ClientConfig, *, archive: str | None, result: str = "", error: str = ""
) -> dict[str, str]:
    return {
        "client": client.name,
        "archive": archive or "",
        "result": result,
        "error": error,
        "repository": str(client.repository),
    }


def hook_env(values: Mapping[str, str], base: Mapping[str, str] = os.environ) -> dict[str, str]:
    env = {k: v for k, v in base.items() if not k.startswith(_ENV_PREFIX)}
    env.update({f"{_ENV_PREFIX}{k.upper()}": v.replace("\0", "") for k, v in values.items()})
    return env


async def run_hook(argv: Sequence[str], values: Mapping[str, str], *, limit: float) -> HookResult:
    """Run one hook: substituted argv, BORGTUNNEL_* environment, no stdin, its own session."""
    words = tuple(substitute(word, values).replace("\0", "") for word in argv)
    try:
        process = await asyncio.create_subprocess_exec(
            *words,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=hook_env(values),
            start_new_session=True,  # its children are killed with it on timeout
        )
    except OSError as exc:
        return HookResult(words, None, "", f"cannot start {words[0]!r}: {exc.strerror or exc}")
    try:
        async with asyncio.timeout(limit):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        _kill_group(process.pid)
        await process.wait()
        return HookResult(words, None, "", f"timed out after {limit:g} s (hook_timeout)")
    except asyncio.CancelledError:
        _kill_group(process.pid)
        with contextlib.suppress(ProcessLookupError):
            await asyncio.shield(process.wait())
        raise
    text = stderr.decode("utf-8", "replace")[-_MAX_STDERR:]
    if stdout.strip():
        log.info("hook_output", argv=list(words), stdout=stdout.decode("utf-8", "replace")[:2000])
    return HookResult(words, process.returncode, text)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_before(config: Config, client: ClientConfig) -> PullOutcome | None:
    """None: go ahead with the pull. Otherwise the outcome of the run that will not happen."""
    hooks = config.hooks_for(client)
    started = time.monotonic()
    values = hook_values(client, archive=client.archive)
    for argv in hooks.before:
        result = await run_hook(argv, values, limit=hooks.timeout)
        if result.ok:
            continue
        took = time.monotonic() - started
        if result.returncode == EXIT_SKIP:
            log.info("run_skipped_by_hook", client=client.name, argv=list(result.argv))
            return PullOutcome(
                client=client.name,
                result=RunResult.SKIPPED,
                error=f"skipped by before hook {result.argv[0]}: {result.stderr.strip()}".rstrip(
                    ": "
                ),
                duration=took,
                hook_failed=True,
            )
        log.error(
            "before_hook_failed",
            client=client.name,
            argv=list(result.argv),
            error=result.describe(),
        )
        return PullOutcome(
            client=client.name,
            result=RunResult.FAILED,
            error=f"before hook {result.argv[0]} {result.describe()}",
            duration=took,
            hook_failed=True,
        )
    return None


async def run_after(config: Config, client: ClientConfig, outcome: PullOutcome) -> None:
    """``after`` (unless ``before`` stopped the run) and ``on_failure``; never raises."""
    try:
        hooks = config.hooks_for(client)
        lists: list[tuple[str, tuple[tuple[str, ...], ...]]] = []
        if not outcome.hook_failed:
            lists.append(("after", hooks.after))
        if outcome.result is RunResult.FAILED:
            lists.append(("on_failure", hooks.on_failure))
        values = hook_values(
            client,
            archive=outcome.stats.archive if outcome.stats else None,
            result=str(outcome.result),
            error=outcome.error or "",
        )
        for kind, argvs in lists:
            for argv in argvs:
                result = await run_hook(argv, values, limit=hooks.timeout)
                if not result.ok:
                    log.warning(
                        "hook_failed",
                        hook=kind,
                        client=client.name,
                        argv=list(result.argv),
                        error=result.describe(),
                    )
    except asyncio.CancelledError:
        raise
    except Exception:  # a hook problem must never change or fail the recorded run
        log.exception("hooks_crashed", client=client.name)
