"""Pure builders for borg command lines and interpreters for what borg says back.

Nothing here runs a process. Keeping argv construction pure means the quoting rules are unit
tested without a client, and there is exactly one place that decides which borg options we use.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

# A constant fake host: borg remembers where a repository was seen (its "location") and asks an
# interactive question when it changes. A fixed URL keeps that check quiet between runs.
URL_HOST = "borgtunnel"

# The remote run script exports the resolved socket path in this variable, so BORG_RSH is a
# constant string: the path is never quoted into shell text inside shell text.
SOCKET_VAR = "BORGTUNNEL_SOCKET"

RSH_BY_TOOL: Mapping[str, str] = {
    # -N: shut the socket down on stdin EOF, otherwise borg's final EOF never reaches serve.
    "nc": shlex.join(["sh", "-c", f'exec nc -N -U "${SOCKET_VAR}"']),
    "socat": shlex.join(["sh", "-c", f'exec socat STDIO "UNIX-CONNECT:${SOCKET_VAR}"']),
}

# socat parses its address argument: these characters would be read as syntax, not as the path.
SOCAT_UNSAFE = frozenset(",:!\\'\"(){}[]<>\n")


class Outcome(StrEnum):
    """What a borg exit code means for the administrator."""

    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


def repository_url(repository: Path) -> str:
    """``ssh://borgtunnel/abs/path``: the path as the client names it to our `borg serve`."""
    return f"ssh://{URL_HOST}{repository.as_posix()}"


def serve_argv(borg: str, repository: Path, *, storage_quota: str | None = None) -> list[str]:
    """The server's policy: append-only, this one repository and nothing else.

    This argv is the only policy that matters: BORG_RSH on the client ends in ``sh -c '…'`` which
    ignores the words borg appends, so a client cannot pick its own ``borg serve`` options.
    ``--storage-quota`` keeps one client from filling the disk every repository shares.
    """
    quota = ["--storage-quota", storage_quota] if storage_quota else []
    return [
        borg,
        "serve",
        "--append-only",
        "--restrict-to-repository",
        str(repository),
        *quota,
    ]


def init_argv(borg: str, repository: Path, encryption: str) -> list[str]:
    return [borg, "init", f"--encryption={encryption}", "--make-parent-dirs", "--", str(repository)]


def info_argv(borg: str, repository: Path, archive: str) -> list[str]:
    """``borg info --json REPO::ARCHIVE``: reads the manifest and the archive's metadata (item
    metadata, not file data) with the server's own key: the server's view of what was written."""
    return [borg, "info", "--json", "--", f"{repository.as_posix()}::{archive}"]


def key_export_argv(borg: str, repository: Path, destination: Path) -> list[str]:
    return [borg, "key", "export", "--", str(repository), str(destination)]


def key_import_argv(borg: str, repository: Path, source: Path) -> list[str]:
    """Puts a saved key blob back; needs no passphrase (the blob is stored as it was wrapped)."""
    return [borg, "key", "import", "--", str(repository), str(source)]


def create_argv(
    *,
    remote_borg: str,
    repository: Path,
    archive: str,
    paths: Sequence[str],
    exclude: Sequence[str] = (),
    extra: Sequence[str] = (),
    borg2: bool = False,
) -> list[str]:
    """``borg create`` for the client, as an argv (quoted later, in one place).

    ``--exclude=PATTERN`` keeps a pattern starting with '-' a value; ``--`` keeps paths and the
    archive name from being read as options. borg 2 has no ``REPO::ARCHIVE``: the repository is
    ``--repo=URL`` and the archive (a series name) the first word after ``--``.
    """
    url = repository_url(repository)
    where = [f"--repo={url}", "--", archive] if borg2 else ["--", f"{url}::{archive}"]
    return [
        *shlex.split(remote_borg),
        "create",
        "--log-json",
        # archive_progress lines a few times a second: the server's evidence that a long run is
        # alive (stall detection) and what a terminal shows.
        "--progress",
        "--json",
        # One log line "borgbackup version X": tells which borg the client runs, at no cost
        # (borgtunnel/clientborg.py), so later pulls can ask a 1.4 for its specific exit codes.
        "--show-version",
        *(f"--exclude={pattern}" for pattern in exclude),
        *extra,
        *where,
        *paths,
    ]


def client_env(*, encrypted: bool, modern_exit_codes: bool = False) -> dict[str, str]:
    """Non-secret environment for the client's borg. Secrets go over stdin, never here.

    Sent inline in the command (``env K=V … borg``) because a session's env requests are dropped
    unless the client's sshd has a matching AcceptEnv. BORG_RSH and the socket path are set by
    the remote run script, which knows the resolved path and whether nc or socat is there.
    """
    env = {
        # UTF-8 regardless of the client's locale: --log-json/--json output and file names.
        "PYTHONUTF8": "1",
        "LANG": "C.UTF-8",
        # Nobody can answer a prompt; each question must have a fixed answer.
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "no",
        # Lets borg remove a stale cache lock left by a killed earlier run on this host.
        "BORG_HOSTNAME_IS_UNIQUE": "yes",
    }
    if modern_exit_codes:
        # borg >= 1.4: a specific code per error and warning (borgtunnel/borgexit.py). Only sent
        # to a client known to run 1.4+, so each code is read in the meaning we asked for.
        env["BORG_EXIT_CODES"] = "modern"
    if encrypted:
        # borg reads the passphrase from fd 0 until EOF: we write it to the channel and close.
        env["BORG_PASSPHRASE_FD"] = "0"  # noqa: S105 - a file descriptor number
    return env


def with_env(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``env K=V … argv``: the program ``env`` rather than ``K=V cmd`` syntax, which not every
    login shell (fish) understands. The caller quotes every word, so nothing is shell syntax.
    """
    return ["env", *(f"{key}={value}" for key, value in env.items()), *argv]


# What a client may claim: anything else in its --json is not looked at.
_ARCHIVE_ID_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_ARCHIVE_NAME = 255
_MAX_INT64 = 2**63 - 1


@dataclass(frozen=True)
class ArchiveClaim:
    """What the client's ``borg create --json`` says it wrote: a name and an id to check."""

    name: str
    id: str


@dataclass(frozen=True)
class ArchiveStats:
    """One archive as the server's own ``borg info --json`` reads it from the repository."""

    archive: str
    archive_id: str
    original_size: int
    # None where the server's borg does not say (borg 2's info has neither).
    compressed_size: int | None
    deduplicated_size: int | None
    nfiles: int
    duration: float


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a number borg writes")


def strict_json(text: str) -> Any:  # noqa: ANN401 - JSON is any shape until checked
    """json.loads that refuses NaN/Infinity (which the json module accepts by default)."""
    return json.loads(text, parse_constant=_no_constants)


def _name(value: object) -> str:
    """An archive name we can pass back to borg, store in SQLite and print: a real str of
    printable characters (no control characters, no lone surrogates), no '/', not too long."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ARCHIVE_NAME:
        raise ValueError("archive name missing or too long")
    if "/" in value or not value.isprintable():
        raise ValueError("archive name has characters borg never writes")
    value.encode("utf-8")  # raises on a lone surrogate
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT64:
        raise ValueError(f"{value!r} is not a byte or file count")
    return value


def _optional_count(stats: Mapping[str, object], key: str) -> int | None:
    """Absent is unknown (borg 2); present must be a real count."""
    return _count(stats[key]) if key in stats else None


def parse_create_claim(text: str) -> ArchiveClaim | None:
    """The archive name and id in the client's ``--json``; None when it is not exactly that."""
    try:
        archive = strict_json(text.strip())["archive"]
        archive_id = archive["id"]
        if not isinstance(archive_id, str) or not _ARCHIVE_ID_RE.match(archive_id):
            return None
        return ArchiveClaim(name=_name(archive["name"]), id=archive_id)
    except (ValueError, KeyError, TypeError, UnicodeError):
        return None


def parse_info_json(text: str) -> ArchiveStats | None:
    """The single archive of the server's ``borg info --json`` of one archive (1.x or 2)."""
    try:
        (archive,) = strict_json(text)["archives"]
        stats = archive["stats"]
        duration = float(archive.get("duration", 0.0))
        if not math.isfinite(duration) or duration < 0:
            return None
        archive_id = archive["id"]
        if not isinstance(archive_id, str) or not _ARCHIVE_ID_RE.match(archive_id):
            return None
        return ArchiveStats(
            archive=_name(archive["name"]),
            archive_id=archive_id,
            original_size=_count(stats["original_size"]),
            compressed_size=_optional_count(stats, "compressed_size"),
            deduplicated_size=_optional_count(stats, "deduplicated_size"),
            nfiles=_count(stats["nfiles"]),
            duration=duration,
        )
    except (ValueError, KeyError, TypeError, UnicodeError):
        return None


@dataclass(frozen=True)
class Progress:
    """One ``archive_progress`` line of ``borg create --log-json --progress``."""

    original_size: int
    compressed_size: int
    deduplicated_size: int
    nfiles: int
    path: str
    finished: bool


def parse_progress(line: str) -> Progress | None:
    """The progress figures in ``line``, or None if it is anything else."""
    if '"archive_progress"' not in line:
        return None
    try:
        record = json.loads(line)
        if record.get("type") != "archive_progress":
            return None
        return Progress(
            original_size=int(record.get("original_size") or 0),
            compressed_size=int(record.get("compressed_size") or 0),
            deduplicated_size=int(record.get("deduplicated_size") or 0),
            nfiles=int(record.get("nfiles") or 0),
            path=str(record.get("path") or ""),
            finished=bool(record.get("finished", False)),
        )
    # A client's line is anything: 1e999 is an OverflowError for int(), "[[[…" nested past
    # the json module's recursion limit a RecursionError.
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError):
        return None


@dataclass(frozen=True)
class LogLine:
    """One line of borg's stderr: a --log-json record, or plain text we keep as it is."""

    level: str
    message: str
    fields: Mapping[str, Any]

    @property
    def severity(self) -> int:
        """The ``logging`` level to log the line at (what structlog's ``log()`` takes)."""
        return _SEVERITY[self.level]


_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warning", "ERROR": "error"}
_SEVERITY = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def parse_log_line(line: str) -> LogLine | None:
    """Map a borg ``--log-json`` line to our levels; plain text (from sh, nc, ...) is a warning."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # nested past json's recursion limit: text, too
        record = None
    if not isinstance(record, dict):
        return LogLine("warning", line, {})
    kind = record.get("type")
    if kind == "log_message":
        level = _LEVELS.get(str(record.get("levelname", "")).upper(), "error")
        fields = {k: record[k] for k in ("msgid", "name") if record.get(k)}
        return LogLine(level, str(record.get("message", "")), fields)
    if kind in {
        "archive_progress",
        "progress_percent",
        "progress_message",
        "file_status",
        "question_prompt",
        "question_env_answer",
    }:
        fields = {k: v for k, v in record.items() if k not in {"type", "message"}}
        return LogLine("debug", str(record.get("message") or kind), fields)
    return LogLine("info", line, {})
