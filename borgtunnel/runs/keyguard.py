"""Keep the server's copy of each repository key and put it back when a client changed it.

Through its append-only ``borg serve`` a client can still run ``borg key change-passphrase``
(or ``key import``): borg 1.x's ``save_key`` RPC has no append-only check. Afterwards the
server's passphrase no longer opens the repository and every later pull fails. A re-wrapped key
holds the same master key, so the copy exported at ``init`` (or at the first verified pull of an
existing repository) still decrypts everything: comparing it with the repository's ``config``
after every pull is a file read, and putting it back is one ``borg key import``.

borg 2's ``--permissions`` keep the ``keys/`` namespace read-only for every permission a pull
may use, so there the guard is a second line: the same comparison, on the ``keys/`` files.

The copy is ``state_dir/keys/NAME.key``, mode 0600 (it is wrapped with the passphrase, as in the
repository). After a deliberate key change on the server, delete that file: the next verified
pull saves the new key.
"""

from __future__ import annotations

import configparser
import contextlib
from dataclasses import dataclass
from pathlib import Path

from borgtunnel import borg
from borgtunnel import borg2 as borg2_argv
from borgtunnel.privatedir import ensure_private_dir
from borgtunnel.server.localborg import run_local_borg


class KeyGuardError(Exception):
    """The key copy could not be saved or put back; the message says which and why."""


@dataclass(frozen=True)
class KeyTampering:
    """The repository key differed from the server's copy; ``restored`` says if it is back."""

    saved: Path
    restored: bool
    detail: str = ""
    borg2: bool = False
    # The repository's id differs from the saved copy's: another repository stands at the path.
    other_repository: str | None = None

    def message(self) -> str:
        if self.other_repository is not None:
            return (
                f"key guard: the repository here (id {self.other_repository[:16]}…) is not the "
                f"one whose key the server saved in {self.saved}: it was created again outside "
                "`borgtunnel init`. Nothing was changed. If that was intended, delete the saved "
                "copy (the next verified pull saves the new key); otherwise find out who did it"
            )
        if self.restored:
            done = f"the server's copy from {self.saved} was put back"
        else:
            done = f"putting back the server's copy from {self.saved} FAILED ({self.detail})"
        if self.borg2:
            # keys/ is read-only through every borg 2 tunnel a pull uses: not the client.
            return (
                "tampering: the repository key (keys/) differs from the server's copy, and no "
                f"borg 2 client tunnel can write keys/; {done}. Find out who changed it on the "
                "server; archives are intact if the master key is unchanged"
            )
        return (
            "tampering: the repository key was changed through the client's tunnel (borg key "
            f"change-passphrase or key import run by the client); {done}. Archives are intact "
            "(the master key is unchanged), but the client may be compromised: check it, rotate "
            "its SSH key and passphrase, and look at its last archives before trusting them"
        )


def key_path(state_dir: Path, client: str) -> Path:
    return state_dir / "keys" / f"{client}.key"


def repository_key_blob(repository: Path) -> str | None:
    """The key stored in a borg 1.x repository's ``config`` or borg 2's ``keys/`` (None: none)."""
    if (repository / "keys").is_dir():
        return _borg2_key_blob(repository / "keys")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        text = (repository / "config").read_text(encoding="utf-8")
        parser.read_string(text)
        blob = parser.get("repository", "key", fallback="")
    except (OSError, UnicodeError, configparser.Error):
        return None
    return "".join(blob.split()) or None


def _borg2_keys(keys: Path) -> dict[Path, str]:
    """Each key file in borg 2's ``keys/`` with its text, in name order. borg 2 keeps a key as
    ``BORG_KEY REPO_ID`` + base64 lines, the format of ``borg key export``. Raises OSError,
    UnicodeError."""
    files = sorted(entry for entry in keys.iterdir() if entry.is_file())
    return {entry: entry.read_text(encoding="ascii") for entry in files}


def _borg2_key_blob(keys: Path) -> str | None:
    """The bodies of the key files, in name order (a second key is a difference too)."""
    try:
        texts = _borg2_keys(keys)
    except (OSError, UnicodeError):
        return None
    return ",".join(_body(text) for text in texts.values()) or None


def _drop_other_borg2_keys(keys: Path, expected: str) -> None:
    """borg 2 names each key file by its content: an import adds the saved key next to the
    changed one, which would still open the repository with the other passphrase. Once the
    saved key is back, the others go."""
    bodies = {entry: _body(text) for entry, text in _borg2_keys(keys).items()}
    if expected not in bodies.values():
        return
    for entry, body in bodies.items():
        if body != expected:
            entry.unlink()


def _body(text: str) -> str:
    return "".join(text.partition("\n")[2].split())


def _header_id(text: str) -> str | None:
    """The repository id in a key file's or export's first line, ``BORG_KEY <id>``."""
    words = text.partition("\n")[0].split()
    return words[1] if len(words) == 2 and words[0] == "BORG_KEY" else None


def repository_id(repository: Path) -> str | None:
    """borg 1.x: ``config``'s id; borg 2: the id its key files name (``keys/`` is read-only
    through every client tunnel, unlike ``config/``). None when unknown."""
    try:
        if (repository / "keys").is_dir():
            ids = {_header_id(text) for text in _borg2_keys(repository / "keys").values()}
            return ids.pop() if len(ids) == 1 else None
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string((repository / "config").read_text(encoding="utf-8"))
        return parser.get("repository", "id", fallback=None) or None
    except (OSError, UnicodeError, configparser.Error):
        return None


def _saved_id(path: Path) -> str | None:
    try:
        return _header_id(path.read_text(encoding="ascii"))
    except (OSError, UnicodeError):
        return None


def _saved_blob(path: Path) -> str | None:
    try:
        return _body(path.read_text(encoding="ascii")) or None
    except (OSError, UnicodeError):
        return None


async def save_key_copy(
    borg_cmd: str,
    repository: Path,
    state_dir: Path,
    client: str,
    *,
    borg2: bool = False,
    replace: bool = False,
) -> bool:
    """Export the key once; later calls keep the first copy (``replace``: a repository just
    created by ``borgtunnel init``, whose key replaces any older copy). False when there is no
    key."""
    target = key_path(state_dir, client)
    if (target.exists() and not replace) or repository_key_blob(repository) is None:
        return target.exists()
    ensure_private_dir(target.parent)  # state_dir/keys: refused, never chmodded, if shared
    partial = target.with_suffix(".partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    export = borg2_argv.key_export_argv if borg2 else borg.key_export_argv
    result = await run_local_borg(
        export(borg_cmd, repository, partial), state_dir=state_dir, passphrase=None
    )
    if result.status != 0 or _saved_blob(partial) is None:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise KeyGuardError(f"borg key export of {repository} failed: {result.error_text()}")
    partial.chmod(0o600)
    partial.replace(target)
    return True


async def check_key(
    borg_cmd: str, repository: Path, state_dir: Path, client: str, *, borg2: bool = False
) -> KeyTampering | None:
    """Compare the repository's key with the server's copy; put the copy back if they differ."""
    saved = key_path(state_dir, client)
    expected = _saved_blob(saved)
    if expected is None:
        return None  # no copy yet: the caller saves one after a verified pull
    if repository_key_blob(repository) == expected:
        return None
    current, saved_for = repository_id(repository), _saved_id(saved)
    if current is not None and saved_for is not None and current != saved_for:
        return KeyTampering(saved, restored=False, borg2=borg2, other_repository=current)
    restore = borg2_argv.key_import_argv if borg2 else borg.key_import_argv
    result = await run_local_borg(
        restore(borg_cmd, repository, saved), state_dir=state_dir, passphrase=None
    )
    if borg2 and result.status == 0:
        _drop_other_borg2_keys(repository / "keys", expected)
    restored = result.status == 0 and repository_key_blob(repository) == expected
    return KeyTampering(saved, restored, "" if restored else result.error_text(), borg2=borg2)
