"""Exit-code meaning (borgtunnel/borgexit.py) and the client-borg version cache (clientborg.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from borgtunnel import borgexit, clientborg
from borgtunnel.borg import Outcome

OK, WARNING, ERROR = Outcome.OK, Outcome.WARNING, Outcome.ERROR


@pytest.mark.parametrize(
    ("code", "legacy", "modern"),
    [
        (0, OK, OK),
        (1, WARNING, WARNING),
        (2, ERROR, ERROR),
        (13, ERROR, ERROR),
        (99, ERROR, ERROR),
        # Only warnings when we asked for modern codes; otherwise not borg's.
        (100, ERROR, WARNING),
        (107, ERROR, WARNING),
        # Codes borg never returns, in either mode: failures (108-125 are unassigned).
        (108, ERROR, ERROR),
        (120, ERROR, ERROR),
        (126, ERROR, ERROR),
        (127, ERROR, ERROR),
        (128, ERROR, ERROR),
        (137, ERROR, ERROR),
        (-1, ERROR, ERROR),
        (None, ERROR, ERROR),
    ],
)
def test_classify_exit(code: int | None, legacy: Outcome, modern: Outcome) -> None:
    assert borgexit.classify_exit(code, modern=False) is legacy
    assert borgexit.classify_exit(code, modern=True) is modern


def test_every_modern_warning_is_100_to_107_and_errors_below_100() -> None:
    for code, entry in borgexit.MODERN.items():
        assert entry.code == code
        expected = WARNING if 100 <= code <= 107 else ERROR
        assert entry.outcome is expected, entry


@pytest.mark.parametrize("code", [126, 127])
def test_shell_status_names_remote_borg(code: int) -> None:
    text = borgexit.explain_exit(code, modern=True, remote_borg="/nonexistent/borg", borg_ran=False)
    assert "remote_borg '/nonexistent/borg'" in text
    assert f"status {code}" in text


def test_a_code_borg_never_returns_names_remote_borg() -> None:
    text = borgexit.explain_exit(42, modern=False, remote_borg="fake-borg", borg_ran=True)
    assert "'fake-borg' exited with status 42, which borg never returns" in text
    # 127 from a borg that ran (it printed its version) is not the shell's "not found".
    text = borgexit.explain_exit(127, modern=True, remote_borg="b", borg_ran=True)
    assert "never returns" in text


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (13, "does not exist on the server"),
        (14, "no space left"),
        (52, "wrong passphrase"),
        (73, "lock timeout"),
        (80, "connection to the server's borg serve closed"),
        (81, "connection to the server's borg serve closed"),
        (107, "does not exist on the client"),
    ],
)
def test_modern_codes_have_actionable_messages(code: int, words: str) -> None:
    text = borgexit.explain_exit(code, modern=True, remote_borg="borg", borg_ran=True)
    assert words in text
    assert f"status {code}" in text
    # Not asked for modern codes: the same number is not borg's.
    legacy = borgexit.explain_exit(code, modern=False, remote_borg="borg", borg_ran=True)
    assert words not in legacy


def test_version_parse_and_order() -> None:
    v145 = clientborg.BorgVersion.parse("1.4.5")
    v124 = clientborg.BorgVersion.parse("1.2.4")
    beta = clientborg.BorgVersion.parse("2.0.0b25")
    assert v145 is not None
    assert v124 is not None
    assert beta is not None
    assert str(beta) == "2.0.0b25"
    assert v124 < v145 < beta
    assert v145.modern_exit_codes
    assert beta.modern_exit_codes
    assert not v124.modern_exit_codes
    for bad in ("", "1.4", "borg 1.4.5", "1.4.5 extra", "x.y.z"):
        assert clientborg.BorgVersion.parse(bad) is None


def test_version_only_from_borgs_show_version_logger() -> None:
    line = "borgbackup version 1.4.5"
    assert clientborg.version_from_log(line, "borg.output.show-version") == (
        clientborg.BorgVersion(1, 4, 5)
    )
    # A file name or another logger saying the same words is not the version line.
    assert clientborg.version_from_log(line, "borg.archiver") is None
    assert clientborg.version_from_log(line, None) is None


def test_cache_remember_forget_and_relearn(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert clientborg.known_version(state, "c1") is None
    v145 = clientborg.BorgVersion(1, 4, 5)
    clientborg.update_after_pull(state, "c1", v145, failed=False)
    assert clientborg.known_version(state, "c1") == v145
    assert (state / "client-borg").stat().st_mode & 0o777 == 0o700
    # A successful pull that somehow showed no version keeps what we knew.
    clientborg.update_after_pull(state, "c1", None, failed=False)
    assert clientborg.known_version(state, "c1") == v145
    # A failure that showed a version replaces it; one that showed none forgets.
    clientborg.update_after_pull(state, "c1", clientborg.BorgVersion(1, 2, 4), failed=True)
    assert clientborg.known_version(state, "c1") == clientborg.BorgVersion(1, 2, 4)
    clientborg.update_after_pull(state, "c1", None, failed=True)
    assert clientborg.known_version(state, "c1") is None
    assert clientborg.known_version(state, "other") is None


def test_cache_garbage_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "client-borg").mkdir()
    (tmp_path / "client-borg" / "c1").write_bytes(b"\xff\xfe not a version")
    assert clientborg.known_version(tmp_path, "c1") is None
