"""The gatekeeper's restore extractor on its own: the tar reader's bounds and the member rules.

Streams are written by Python's tarfile, as borg export-tar writes them; the extractor writes
into a temporary directory. The end-to-end attacks through sshd and borg are in
test_gatekeeper_restore_e2e.py.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from borgtunnel.client import gatekeeper as gk


@pytest.fixture(autouse=True)
def _no_syslog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gk, "log", lambda *_args: None)


def stream(
    *members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.GNU_FORMAT
) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buffer.seek(0)
    return buffer


def member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, **attrs: object
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
    return info, data


def extract(target: Path, source: io.BytesIO, **settings: bool) -> gk.Extractor:
    root = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        extractor = gk.Extractor(root, gk.ExtractSettings(**settings))
        assert extractor.consume(source), extractor.error
    finally:
        os.close(root)
    return extractor


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (b"/etc/passwd", "absolute name"),
        (b"a/../../x", "'..' in the name"),
        (b"..", "'..' in the name"),
        (b"a//b", "empty component"),
        (b"a\0b", "NUL"),
        (b"x" * 256, "component longer than 255"),
        (b"a/" * 2049, "longer than 4096"),
    ],
)
def test_member_names_that_could_leave_the_target_are_refused(name: bytes, reason: str) -> None:
    with pytest.raises(gk.UnsafeMemberError, match=reason):
        gk.member_parts(name)


def test_dot_components_and_a_directorys_slash_are_read_as_paths_below_the_target() -> None:
    assert gk.member_parts(b"./a/./b") == (b"a", b"b")
    assert gk.member_parts(b"d/", directory=True) == (b"d",)
    assert gk.member_parts(b".", directory=True) == ()


@pytest.mark.parametrize(
    ("kind", "size", "limit"),
    [(b"x", gk.MAX_PAX_HEADER + 1, "limit 1048576"), (b"L", gk.MAX_MEMBER_PATH + 2, "limit 4097")],
)
def test_an_oversized_header_is_refused_before_it_is_read(
    kind: bytes, size: int, limit: str
) -> None:
    """A PAX header or GNU long name claiming more than the bound: the reader stops at the
    header, it never buffers the claimed size (the stream here holds only that header)."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = kind, size
    header = info.tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(gk.TarStreamError, match=limit):
        gk.TarReader(io.BytesIO(header)).next()


@pytest.mark.parametrize("kind", [b"S", b"g", b"V", b"7", b"Z"])
def test_tar_types_the_extractor_does_not_know_stop_the_restore(
    tmp_path: Path, kind: bytes
) -> None:
    source = stream(member("x", kind, b"" if kind in {b"7", b"S"} else None))
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        extractor = gk.Extractor(root, gk.ExtractSettings())
        assert not extractor.consume(source)
    finally:
        os.close(root)
    assert extractor.error is not None
    assert list(tmp_path.iterdir()) == []


def test_a_broken_checksum_or_a_truncated_stream_stops_the_restore() -> None:
    good = stream(member("a", data=b"x" * 1000)).getvalue()
    broken = bytearray(good)
    broken[0] ^= 1
    with pytest.raises(gk.TarStreamError, match="checksum"):
        gk.TarReader(io.BytesIO(bytes(broken))).next()
    reader = gk.TarReader(io.BytesIO(good[:700]))
    assert reader.next() is not None
    with pytest.raises(gk.TarStreamError, match="ended early"):
        list(reader.read_data())


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_nothing_is_written_through_a_symlink_the_stream_made(tmp_path: Path, fmt: int) -> None:
    target, victim = tmp_path / "target", tmp_path / "victim"
    target.mkdir()
    victim.mkdir()
    source = stream(
        member("evil", tarfile.SYMTYPE, linkname=str(victim)),
        member("evil/authorized_keys", data=b"attacker\n"),
        member("up", tarfile.SYMTYPE, linkname="../victim"),
        member("up/deeper/x", data=b"attacker\n"),
        member("file", data=b"a file\n"),
        member("file/below", data=b"attacker\n"),
        member("link", tarfile.LNKTYPE, linkname="evil"),
        fmt=fmt,
    )

    extractor = extract(target, source)

    assert list(victim.iterdir()) == []
    assert extractor.refused_count == 4
    assert sorted(p.name for p in target.iterdir()) == ["evil", "file", "up"]
    assert (target / "evil").readlink() == victim


def test_a_dry_run_refuses_the_same_and_writes_nothing(tmp_path: Path) -> None:
    source = stream(
        member("evil", tarfile.SYMTYPE, linkname="/"),
        member("evil/etc/passwd", data=b"attacker\n"),
        member("f", data=b"ok\n"),
        member("h", tarfile.LNKTYPE, linkname="f"),
        member("outside", tarfile.LNKTYPE, linkname="../f"),
    )
    extractor = gk.Extractor(None, gk.ExtractSettings(write=False))

    assert extractor.consume(source)

    assert extractor.refused_count == 2
    assert [text.split(":")[0] for text in extractor.refused] == ["'evil/etc/passwd'", "'outside'"]


def test_metadata_hard_links_and_late_directory_modes_are_restored(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("owners can only be set as root")
    source = stream(
        member("locked", tarfile.DIRTYPE, mode=0o500, mtime=1_000_000_000),
        member("locked/file", data=b"inside\n", mode=0o640, uid=12345, gid=54321, mtime=1234),
        member("locked/again", tarfile.LNKTYPE, linkname="locked/file"),
        member("sym", tarfile.SYMTYPE, linkname="locked/file", uid=12345, gid=54321),
        fmt=tarfile.PAX_FORMAT,
    )

    extract(tmp_path, source, chown=True)

    file = (tmp_path / "locked" / "file").stat()
    assert (stat.S_IMODE(file.st_mode), file.st_uid, file.st_gid) == (0o640, 12345, 54321)
    assert (file.st_nlink, file.st_mtime_ns) == (2, 1234 * 10**9)
    assert (tmp_path / "locked" / "again").samefile(tmp_path / "locked" / "file")
    locked = (tmp_path / "locked").stat()
    assert (stat.S_IMODE(locked.st_mode), locked.st_mtime_ns) == (0o500, 10**18)
    assert (tmp_path / "sym").lstat().st_uid == 12345


def test_a_symlink_or_file_already_in_a_forced_target_is_replaced_not_followed(
    tmp_path: Path,
) -> None:
    target, victim = tmp_path / "target", tmp_path / "victim"
    target.mkdir()
    victim.mkdir()
    (victim / "f").write_text("mine\n")
    (target / "f").symlink_to(victim / "f")
    (target / "d").symlink_to(victim)

    extractor = extract(
        target, stream(member("f", data=b"new\n"), member("d/f", data=b"attacker\n"))
    )

    assert (victim / "f").read_text() == "mine\n"
    assert not (target / "f").is_symlink()
    assert (target / "f").read_text() == "new\n"
    assert extractor.refused_count == 1


def test_a_target_swapped_for_a_symlink_after_the_check_is_refused(tmp_path: Path) -> None:
    """check_restore looked at the path; what run_restore opened must still be inside."""
    allowed, elsewhere = tmp_path / "restores", tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    (allowed / "today").symlink_to(elsewhere)  # as if swapped in between
    policy = gk.Policy(paths=("/x",), restore=True, restore_targets=(str(allowed),))
    inside = os.open(allowed, os.O_RDONLY | os.O_DIRECTORY)
    try:
        gk._check_opened_target(inside, str(allowed), policy)
    finally:
        os.close(inside)
    swapped = os.open(allowed / "today", os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(gk.RefusedError, match="is now"):
        gk._check_opened_target(swapped, str(allowed / "today"), policy)
