"""What the exit status of the client's borg means: the one table, for every borg we support.

borg 1.2 has three codes: 0 ok, 1 warning, 2 error. borg 1.4 keeps those by default and, with
``BORG_EXIT_CODES=modern``, returns a specific code per error (3-99) and per warning (100-107),
listed in its docs/internals/frontends.rst ("Error codes"). We ask for modern codes only when the
client is known to run borg >= 1.4 (borgtunnel/clientborg.py), so a code is read in the meaning
we asked for: without the request, 3-255 are not borg's (126/127 come from the shell: command not
executable / not found), and even with it, a code borg never returns is not a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from borgtunnel.borg import Outcome

# The login shell's own statuses: the command (remote_borg) is not there or cannot be run.
SHELL_NOT_EXECUTABLE = 126
SHELL_NOT_FOUND = 127


@dataclass(frozen=True)
class ExitCode:
    """One borg exit code: borg's class name, what it means for the run, what to do about it."""

    code: int
    name: str
    outcome: Outcome
    advice: str


def _codes(*entries: tuple[int, str, Outcome, str]) -> Mapping[int, ExitCode]:
    return {code: ExitCode(code, name, outcome, advice) for code, name, outcome, advice in entries}


_E, _W = Outcome.ERROR, Outcome.WARNING

_REPO = "check the client's repository setting and the server's disk"
_LOCK = (
    "another borg holds the lock (a pull still running, or a stale lock after a crash): wait, or "
    "run `borg break-lock` on the server once no borg is running"
)
_LINK = (
    "the connection to the server's borg serve closed: see the serve lines in the server's log "
    "and check the SSH link"
)
_INTEGRITY = "data integrity error: run `borg check` on the server"

# borg 1.4.5 docs/internals/frontends.rst, checked against the real borg 1.4.5 (tests).
MODERN: Mapping[int, ExitCode] = _codes(
    (2, "Error", _E, "borg reported an error"),
    (3, "CancelledByUser", _E, "cancelled"),
    (4, "CommandError", _E, "borg rejected the command line: check create_args"),
    (5, "PlaceholderError", _E, "a placeholder in the archive name is malformed"),
    (6, "InvalidPlaceholder", _E, "the archive name uses an unknown placeholder"),
    (10, "Repository.AlreadyExists", _E, "a repository already exists there"),
    (11, "Repository.AtticRepository", _E, "an Attic repository: upgrade it on the server"),
    (12, "Repository.CheckNeeded", _E, "repository inconsistent: run `borg check` on the server"),
    (
        13,
        "Repository.DoesNotExist",
        _E,
        (
            "the repository does not exist on the server: run `borgtunnel init CLIENT` first, or "
            "fix the client's repository path"
        ),
    ),
    (
        14,
        "Repository.InsufficientFreeSpaceError",
        _E,
        "no space left on the server's repository file system: free space there",
    ),
    (15, "Repository.InvalidRepository", _E, f"not a valid borg repository: {_REPO}"),
    (16, "Repository.InvalidRepositoryConfig", _E, f"repository config invalid: {_REPO}"),
    (17, "Repository.ObjectNotFound", _E, "an object is missing: run `borg check` on the server"),
    (18, "Repository.ParentPathDoesNotExist", _E, f"the repository's parent is missing: {_REPO}"),
    (19, "Repository.PathAlreadyExists", _E, f"something else is at the repository path: {_REPO}"),
    (20, "Repository.StorageQuotaExceeded", _E, "the repository's storage quota is exhausted"),
    (21, "Repository.PathPermissionDenied", _E, "the server's borg may not access the repository"),
    (25, "MandatoryFeatureUnsupported", _E, "the repository needs a newer borg on the client"),
    (26, "NoManifestError", _E, "the repository has no manifest: run `borg check` on the server"),
    (27, "UnsupportedManifestError", _E, "the repository needs a newer borg on the client"),
    (30, "Archive.AlreadyExists", _E, "an archive of that name exists: make `archive` unique"),
    (31, "Archive.DoesNotExist", _E, "archive not found"),
    (32, "Archive.IncompatibleFilesystemEncodingError", _E, "a file name is not UTF-8-safe"),
    (40, "KeyfileInvalidError", _E, "the key file is invalid"),
    (41, "KeyfileMismatchError", _E, "the key file belongs to another repository"),
    (
        42,
        "KeyfileNotFoundError",
        _E,
        "no key file for this repository on the client: borgtunnel supports repokey encryption",
    ),
    (43, "NotABorgKeyFile", _E, "not a borg key file"),
    (44, "RepoKeyNotFoundError", _E, "the repository has no key entry: it may have been tampered"),
    (45, "RepoIdMismatch", _E, "the key belongs to another repository"),
    (46, "UnencryptedRepo", _E, "the repository is not encrypted"),
    (47, "UnknownKeyType", _E, "unknown key type: the repository needs a newer borg"),
    (48, "UnsupportedPayloadError", _E, "the repository needs a newer borg on the client"),
    (50, "NoPassphraseFailure", _E, "borg got no passphrase: check passphrase_file/_command"),
    (51, "PasscommandFailure", _E, "borg's passcommand failed"),
    (
        52,
        "PassphraseWrong",
        _E,
        (
            "wrong passphrase: the client's passphrase_file/passphrase_command does not open the "
            "repository"
        ),
    ),
    (53, "PasswordRetriesExceeded", _E, "wrong passphrase (retries exceeded)"),
    (60, "Cache.CacheInitAbortedError", _E, "the client's borg cache could not be initialised"),
    (61, "Cache.EncryptionMethodMismatch", _E, "the repository's encryption changed: tampering?"),
    (62, "Cache.RepositoryAccessAborted", _E, "repository access aborted by borg"),
    (
        63,
        "Cache.RepositoryIDNotUnique",
        _E,
        (
            "the client's cache is newer than the repository: was the repository restored or "
            "replaced?"
        ),
    ),
    (
        64,
        "Cache.RepositoryReplay",
        _E,
        (
            "the repository is older than the client last saw it: a rollback attack or a restored "
            "repository; investigate before deleting the client's borg cache"
        ),
    ),
    (70, "LockError", _E, _LOCK),
    (71, "LockErrorT", _E, _LOCK),
    (72, "LockFailed", _E, f"cannot create a lock: {_LOCK}"),
    (73, "LockTimeout", _E, f"lock timeout: {_LOCK}"),
    (74, "NotLocked", _E, "lock lost (was not locked)"),
    (75, "NotMyLock", _E, "lock taken over by another process"),
    (80, "ConnectionClosed", _E, _LINK),
    (81, "ConnectionClosedWithHint", _E, _LINK),
    (82, "InvalidRPCMethod", _E, "the server's borg serve rejected an RPC call"),
    (
        83,
        "PathNotAllowed",
        _E,
        "the server's borg serve refused the repository path (restricted to the configured one)",
    ),
    (84, "RemoteRepository.RPCServerOutdated", _E, "the server's borg is too old for the client's"),
    (85, "UnexpectedRPCDataFormatFromClient", _E, "borg serve got malformed RPC data"),
    (86, "UnexpectedRPCDataFormatFromServer", _E, "the client got malformed RPC data"),
    (87, "ConnectionBrokenWithHint", _E, _LINK),
    (90, "IntegrityError", _E, _INTEGRITY),
    (91, "FileIntegrityError", _E, _INTEGRITY),
    (92, "DecompressionError", _E, _INTEGRITY),
    (95, "ArchiveTAMInvalid", _E, _INTEGRITY),
    (96, "ArchiveTAMRequiredError", _E, _INTEGRITY),
    (97, "TAMInvalid", _E, _INTEGRITY),
    (98, "TAMRequiredError", _E, _INTEGRITY),
    (99, "TAMUnsupportedSuiteError", _E, "the repository needs a newer borg on the client"),
    (100, "FileChangedWarning", _W, "a file changed while it was backed up"),
    (101, "IncludePatternNeverMatchedWarning", _W, "an include pattern never matched"),
    (102, "BackupError", _W, "some files could not be backed up"),
    (103, "BackupRaceConditionError", _W, "a file changed type while it was backed up"),
    (104, "BackupOSError", _W, "some files could not be read"),
    (105, "BackupPermissionError", _W, "permission denied on some files: run borg as root?"),
    (106, "BackupIOError", _W, "I/O errors reading some files: check the client's disks"),
    (
        107,
        "BackupFileNotFoundError",
        _W,
        "a path to back up does not exist on the client: check the client's paths",
    ),
)

LEGACY: Mapping[int, ExitCode] = _codes(
    (1, "Warning", _W, "borg reported warnings"),
    (2, "Error", _E, "borg reported an error"),
)


def known(code: int | None, *, modern: bool) -> ExitCode | None:
    """The table entry for ``code`` in the meaning we asked borg for, or None."""
    if code is None:
        return None
    if code == 1:
        return LEGACY[1]  # the generic warning, in both modes
    return (MODERN if modern else LEGACY).get(code)


def classify_exit(code: int | None, *, modern: bool) -> Outcome:
    """0 ok; a known warning code; everything else (unknown, shell 126/127, signal, None) error.

    ``None`` (killed by a signal, or no status at all) is an error: a backup that did not say it
    finished did not finish.
    """
    if code == 0:
        return Outcome.OK
    entry = known(code, modern=modern)
    return entry.outcome if entry is not None else Outcome.ERROR


def explain_exit(code: int | None, *, modern: bool, remote_borg: str, borg_ran: bool) -> str:
    """What to tell the administrator about a non-zero status (a warning's or a failure's).

    ``borg_ran``: borg itself started (it printed its version), so a shell status is ruled out.
    """
    if code is None:
        return "borg create was killed or the connection dropped"
    shell = _shell_meaning(code, remote_borg) if not borg_ran else None
    if shell is not None:
        return shell
    entry = known(code, modern=modern)
    if entry is None:
        if code > 128:
            return f"remote_borg {remote_borg!r} was killed by signal {code - 128} (status {code})"
        return (
            f"remote_borg {remote_borg!r} exited with status {code}, which borg never returns "
            f"({'modern' if modern else 'legacy'} exit codes): is it really borg?"
        )
    if entry.name in {"Warning", "Error"}:
        return entry.advice
    return f"{entry.advice} (borg {entry.name}, status {code})"


def _shell_meaning(code: int, remote_borg: str) -> str | None:
    if code == SHELL_NOT_FOUND:
        return f"remote_borg {remote_borg!r} not found on the client (status 127)"
    if code == SHELL_NOT_EXECUTABLE:
        return f"remote_borg {remote_borg!r} is not executable on the client (status 126)"
    return None
