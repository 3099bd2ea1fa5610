"""Paused clients: ``borgtunnel pause NAME [--until …]`` keeps a client from being scheduled.

The pauses live in ``state_dir/paused.json`` so that they survive a restart and so that a
``pause`` given while no daemon runs is honoured when one starts. The daemon re-reads the file
when it changes (its mtime, size or inode), so it is the one source of truth: ``status``,
the metrics and the scheduler all read it. Writes take ``state_dir/paused.lock`` (flock) and
replace the file atomically (write + rename), so a reader never sees half a file.

A pause with ``until`` ends by itself at that time; expired entries are dropped at the next
write. The file is small and ours (in the private state_dir), but it is still read bounded and
validated: a broken file is an error naming the file, never a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Final

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from borgtunnel.durations import parse_duration
from borgtunnel.privatedir import ensure_private_dir

log = structlog.get_logger("borgtunnel.pauses")

PAUSES_FILENAME: Final = "paused.json"
_LOCK_FILENAME: Final = "paused.lock"
# Hundreds of clients take a few dozen kB; anything far bigger is not ours.
MAX_FILE_BYTES: Final = 1 << 20


class PauseFileError(Exception):
    """``path`` cannot be read or written as the pause file; ``reason`` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Pause:
    since: datetime
    until: datetime | None = None  # None: until `borgtunnel resume`

    def active(self, now: datetime) -> bool:
        return self.until is None or now < self.until


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    since: datetime
    until: datetime | None = None


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = 1
    clients: dict[str, _Entry] = {}


def pauses_path(state_dir: Path) -> Path:
    return state_dir / PAUSES_FILENAME


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def load_pauses(state_dir: Path) -> dict[str, Pause]:
    """Every recorded pause (expired ones included); {} when there is no file."""
    path = pauses_path(state_dir)
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PauseFileError(path, f"cannot read it: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise PauseFileError(path, f"is larger than {MAX_FILE_BYTES} bytes")
    try:
        parsed = _File.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(top)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise PauseFileError(path, f"is not a valid pause file: {problems}") from exc
    return {
        name: Pause(_aware(entry.since), _aware(entry.until) if entry.until else None)
        for name, entry in parsed.clients.items()
    }


def active_pauses(state_dir: Path, now: datetime) -> dict[str, Pause]:
    """The pauses in force at ``now``; a broken file counts as none, with a warning (status and
    metrics must still work; the daemon keeps its own last good copy, see PauseWatch)."""
    try:
        pauses = load_pauses(state_dir)
    except PauseFileError as exc:
        log.warning("pause_file_unreadable", path=str(exc.path), error=exc.reason)
        return {}
    return {name: p for name, p in pauses.items() if p.active(now)}


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    ensure_private_dir(state_dir)
    fd = os.open(state_dir / _LOCK_FILENAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _save(state_dir: Path, pauses: Mapping[str, Pause]) -> None:
    path = pauses_path(state_dir)
    document = _File(
        clients={name: _Entry(since=p.since, until=p.until) for name, p in sorted(pauses.items())}
    )
    temporary = path.with_name(f".{PAUSES_FILENAME}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(json.dumps(document.model_dump(mode="json"), indent=2) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def set_pause(state_dir: Path, client: str, until: datetime | None, now: datetime) -> Pause:
    """Pause ``client`` (replacing an earlier pause of it); drops expired entries."""
    with _locked(state_dir):
        pauses = {n: p for n, p in load_pauses(state_dir).items() if p.active(now)}
        pause = Pause(since=now, until=until)
        pauses[client] = pause
        _save(state_dir, pauses)
    return pause


def clear_pause(state_dir: Path, client: str, now: datetime) -> bool:
    """Resume ``client``; True if it was paused (an expired pause counts as not paused)."""
    with _locked(state_dir):
        pauses = load_pauses(state_dir)
        was = client in pauses and pauses[client].active(now)
        kept = {n: p for n, p in pauses.items() if n != client and p.active(now)}
        if kept != pauses:
            _save(state_dir, kept)
    return was


def parse_until(text: str, now: datetime, zone: tzinfo) -> datetime:
    """``--until``: an ISO time (``2026-03-02T08:00``, in ``zone`` without an offset) or a
    duration from now (``36h``, ``1d12h``, borgtunnel/durations.py). ValueError names both forms;
    a time that is not in the future is refused."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        try:
            when = now + timedelta(seconds=parse_duration(text))
        except ValueError:
            raise ValueError(
                f"--until {text!r}: give an ISO time (2026-03-02T08:00, optionally with an "
                "offset) or a duration such as '36h' or '1d12h'"
            ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=zone)
    if when <= now:
        raise ValueError(f"--until {text!r} is not in the future")
    return when.astimezone(UTC)


class PauseWatch:
    """The daemon's view of the pause file: re-read when it changes, last good copy kept when
    it breaks (with one error line per change, not one per loop)."""

    def __init__(self, state_dir: Path) -> None:
        self._path = pauses_path(state_dir)
        self._state_dir = state_dir
        self._seen: tuple[int, int, int] | None = None
        self._pauses: dict[str, Pause] = {}

    def current(self) -> dict[str, Pause]:
        try:
            info = self._path.stat()
            key = (info.st_ino, info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            key = (0, 0, 0)
        except OSError as exc:
            log.error("pause_file_unreadable", path=str(self._path), error=str(exc))
            return self._pauses
        if key != self._seen:
            self._seen = key
            try:
                self._pauses = load_pauses(self._state_dir)
            except PauseFileError as exc:
                log.error(
                    "pause_file_unreadable",
                    path=str(exc.path),
                    error=exc.reason,
                    keeping="the pauses read before",
                )
        return self._pauses

    def active(self, now: datetime) -> dict[str, Pause]:
        return {name: p for name, p in self.current().items() if p.active(now)}
