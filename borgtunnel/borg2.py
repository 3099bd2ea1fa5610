"""Pure builders for borg 2 command lines (2.0.0b25): the counterpart of borg.py's 1.x ones.

borg 2 keeps a repository in borgstore namespaces (``archives/``, ``packs/``, ``keys/`` …) and
has no ``--append-only``: the server's policy is ``borg serve --rest`` on the one backend
``FILE:REPO`` with ``--permissions`` (docs/borg-versions.md has what each one allows, measured).
The client still reaches it through ``BORG_RSH`` (borg copies it into ``BORGSTORE_RSH``) ending
in ``sh -c '…'``, which drops the words borg appends: the client cannot pick the backend, the
path or the permissions. Repository and archive are options and a positional of their own
(``--repo=URL`` and ``-- NAME``); borg 2 has no ``REPO::ARCHIVE``. The client's ``borg create``
is borg.create_argv's (``borg2=True``): one place decides its options.
"""

from __future__ import annotations

from pathlib import Path

# What a restore's tunnel may do: read, never write.
RESTORE_PERMISSIONS = "read-only"


def serve_argv(borg: str, repository: Path, *, permissions: str) -> list[str]:
    """One connection's ``borg serve``: this repository's files only, with ``permissions``."""
    return [
        borg,
        "serve",
        "--rest",
        f"--backend=FILE:{repository}",
        "--restrict-to-repository",
        str(repository),
        f"--permissions={permissions}",
    ]


def repo_create_argv(borg: str, repository: Path, encryption: str) -> list[str]:
    """``borg repo-create``; the key stays in the repository (borg 2's repokey location)."""
    return [borg, "repo-create", f"--repo={repository}", f"--encryption={encryption}"]


def info_argv(borg: str, repository: Path, archive_id: str) -> list[str]:
    """``borg info --json`` of the one archive with this id (names are series, not unique)."""
    return [borg, "info", "--json", f"--repo={repository}", f"--match-archives=aid:{archive_id}"]


def key_export_argv(borg: str, repository: Path, destination: Path) -> list[str]:
    return [borg, "key", "export", f"--repo={repository}", "--", str(destination)]


def key_import_argv(borg: str, repository: Path, source: Path) -> list[str]:
    return [borg, "key", "import", f"--repo={repository}", "--", str(source)]


def break_lock_argv(borg: str, repository: Path) -> list[str]:
    """Removes every lock in ``locks/`` (borg 2 encrypts them: needs the passphrase)."""
    return [borg, "break-lock", f"--repo={repository}"]


# --- server-side maintenance -------------------------------------------------------------------


def delete_argv(borg: str, repository: Path, archive_id: str) -> list[str]:
    """Soft-delete the one archive with this id (``borg undelete`` until a compact)."""
    return [
        borg,
        "delete",
        "--log-json",
        f"--repo={repository}",
        f"--match-archives=aid:{archive_id}",
    ]


def compact_argv(borg: str, repository: Path) -> list[str]:
    return [borg, "compact", "--log-json", f"--repo={repository}"]


def check_argv(borg: str, repository: Path, *, verify_data: bool) -> list[str]:
    verify = ["--verify-data"] if verify_data else []
    return [borg, "check", "--log-json", *verify, f"--repo={repository}"]


def list_argv(borg: str, repository: Path) -> list[str]:
    """Name, id and time of every archive (``repo-list`` reads the ``archives/`` namespace)."""
    return [borg, "repo-list", "--json", f"--repo={repository}"]


def archives_info_argv(borg: str, repository: Path) -> list[str]:
    """Per-archive stats of every archive (borg 2's info records files and original size)."""
    return [borg, "info", "--json", f"--repo={repository}"]
