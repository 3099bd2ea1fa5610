"""End to end: `borgtunnel maintain` with the server's real borg, and hostile clients.

Archives for the retention rules are made on the server directly (`borg create --timestamp`,
the date borg stores, which the retention ignores) and recorded in the history as verified at
the server's times (tests/retention_kit.py); the others are real pulls through the real sshd.
Every claim is checked by reading the repository with borg (list, check) or the file system
(segment files, sizes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from borgtunnel.history import History
from borgtunnel.lock import acquire_client_lock
from tests import pullkit, retention_kit
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd


def _write(
    tmp_path: Path,
    sshd: SshdServer,
    repo: Path,
    data: Path,
    *,
    retention: str = "",
    check: str = "",
    **client: object,
) -> Path:
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(sshd, "c1", repo, [data], **client)
    path = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    extra = ""
    if retention:
        extra += f"\n[clients.c1.retention]\n{retention}\n"
    if check:
        extra += f"\n[clients.c1.check]\n{check}\n"
    path.write_text(path.read_text() + extra)
    return path


def _setup(tmp_path: Path, sshd: SshdServer, **kwargs: object) -> tuple[Path, Path, Path]:
    data = tmp_path / "client-data"
    data.mkdir()
    (data / "f").write_bytes(os.urandom(50_000))
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    return data, repo, _write(tmp_path, sshd, repo, data, **kwargs)  # type: ignore[arg-type]


def _forged(tmp_path: Path, repo: Path, name: str, timestamp: str, size: int = 300_000) -> None:
    """An archive made on the server with a forged time and its own incompressible data."""
    src = tmp_path / "forged-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    (src / "blob").write_bytes(os.urandom(size))
    pullkit.borg(tmp_path, "create", "--timestamp", timestamp, f"{repo}::{name}", str(src))


def _data_size(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "data").rglob("*") if p.is_file())


def _segments(repo: Path) -> dict[str, int]:
    return {
        str(p.relative_to(repo)): p.stat().st_size
        for p in (repo / "data").rglob("*")
        if p.is_file()
    }


def _status(config: Path) -> dict[str, object]:
    result = pullkit.run_cli(config, "status", "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    return row  # type: ignore[no-any-return]


FORGED = {
    "a1": "2026-09-15T10:00:00",
    "a2": "2026-10-20T10:00:00",
    "a3": "2026-11-28T08:00:00",
    "a4": "2026-11-28T20:00:00",
    "a5": "2026-11-29T09:00:00",
    "a6": "2026-11-30T09:00:00",
}


def test_prune_keeps_exactly_what_the_rules_say_and_compact_frees_the_space(
    tmp_path: Path, sshd: SshdServer
) -> None:
    _, repo, config = _setup(tmp_path, sshd, retention="keep_daily = 2\nkeep_monthly = 2")
    for index, name in enumerate(FORGED):
        # borg's own dates run backwards, in 2099: only the times the server recorded count.
        _forged(tmp_path, repo, name, f"2099-01-{20 - index}T10:00:00")
    ids = retention_kit.archive_ids(repo, pullkit.borg_env(tmp_path))
    retention_kit.record_verified(
        tmp_path / "state",
        "c1",
        {n: (ids[n], datetime.fromisoformat(w).replace(tzinfo=UTC)) for n, w in FORGED.items()},
    )

    dry = pullkit.run_cli(config, "maintain", "c1", "--prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    # daily: a6 (11-30), a5 (11-29); monthly: November is already kept, then a2, a1.
    assert "would remove 2: a3, a4" in dry.stdout, dry.stdout
    assert "compact" not in dry.stdout  # --prune names exactly the steps to run
    due_dry = pullkit.run_cli(config, "maintain", "c1", "--dry-run")
    assert "would remove 2: a3, a4; keep 4; compact ok: would compact" in due_dry.stdout
    assert sorted(pullkit.archives(tmp_path, repo)) == sorted(FORGED)  # a dry run changes nothing

    size_before = _data_size(repo)
    pruned = pullkit.run_cli(config, "maintain", "c1", "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "prune ok: removed 2: a3, a4; kept 4" in pruned.stdout, pruned.stdout
    assert sorted(pullkit.archives(tmp_path, repo)) == ["a1", "a2", "a5", "a6"]
    assert _data_size(repo) >= size_before  # prune alone frees nothing: the segments stay

    # No flag: what is due. The removal has not been compacted yet, so compact is due.
    due = pullkit.run_cli(config, "maintain", "c1")
    assert due.returncode == 0, due.stderr
    assert "compact ok: freed" in due.stdout, due.stdout
    assert _data_size(repo) < size_before - 2 * 280_000  # a3's and a4's blobs are gone
    assert sorted(pullkit.archives(tmp_path, repo)) == ["a1", "a2", "a5", "a6"]
    pullkit.borg(tmp_path, "check", str(repo))

    # Nothing is due any more: prune runs (it always may), compact does not.
    again = pullkit.run_cli(config, "maintain", "c1")
    assert again.returncode == 0, again.stderr
    assert "compact" not in again.stdout

    history = pullkit.run_cli(config, "history", "c1", "--json")
    runs = json.loads(history.stdout)
    assert [(r["trigger"], r["result"]) for r in runs if r["kind"] == "maintain"] == [
        ("maintain", "ok")
    ] * 3
    assert _status(config)["last_maintain_result"] == "ok"


HOSTILE_SCRIPT = r"""#!/bin/sh
# Called as: hostile-borg create ... -- ssh://borgtunnel/REPO::ARCHIVE PATHS, with BORG_RSH set
for arg in "$@"; do case $arg in ssh://*::*) url=${arg%%::*} ;; esac; done
@BORG@ prune --keep-last 1 "$url" >&2 || exit 9
for a in $(@BORG@ list --short "$url"); do
  @BORG@ delete "$url::$a" >&2 || exit 9
done
exec @BORG@ "$@"
"""


def _hostile_borg(tmp_path: Path) -> Path:
    """A remote_borg that prunes and deletes through the tunnel before the real create."""
    script = tmp_path / "hostile-borg"
    borg = shutil.which("borg")
    assert borg is not None
    script.write_text(HOSTILE_SCRIPT.replace("@BORG@", borg))
    script.chmod(0o755)
    return script


REPLACING_SCRIPT = r"""#!/bin/sh
# Deletes the oldest archive and makes a forged one under its name, then the real create.
for arg in "$@"; do case $arg in ssh://*::*) url=${arg%%::*} ;; esac; done
victim=$(@BORG@ list --short "$url" | head -n 1)
@BORG@ delete "$url::$victim" >&2 || exit 9
@BORG@ create "$url::$victim" @FORGED@ >&2 || exit 9
exec @BORG@ "$@"
"""


def test_an_archive_replaced_under_its_own_name_blocks_compact(
    tmp_path: Path, sshd: SshdServer
) -> None:
    name_format = "c1-{now:%Y-%m-%dT%H:%M:%S.%f}"
    data, repo, config = _setup(tmp_path, sshd, retention="keep_daily = 7", archive=name_format)
    assert pullkit.run_cli(config, "pull", "c1").returncode == 0
    # No maintenance has seen the archive yet: the id its pull verified is what counts.
    (victim,) = pullkit.archives(tmp_path, repo)
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "ransom-note").write_text("pay\n")
    borg = shutil.which("borg")
    assert borg is not None
    script = tmp_path / "replacing-borg"
    script.write_text(REPLACING_SCRIPT.replace("@BORG@", borg).replace("@FORGED@", str(forged)))
    script.chmod(0o755)
    _write(
        tmp_path,
        sshd,
        repo,
        data,
        retention="keep_daily = 7",
        remote_borg=str(script),
        archive=name_format,
    )
    assert pullkit.run_cli(config, "pull", "c1").returncode == 0
    assert victim in pullkit.archives(tmp_path, repo)  # the name is still there ...

    blocked = pullkit.run_cli(config, "maintain", "c1")
    assert blocked.returncode == 2, blocked.stdout  # ... but not the archive we made
    assert "replaced by another archive of the same name (the id changed)" in blocked.stdout
    assert repr(victim) in blocked.stdout
    accepted = pullkit.run_cli(config, "maintain", "c1", "--accept-missing")
    assert accepted.returncode == 0, accepted.stdout
    assert f"accepted as replaced: {victim!r}" in accepted.stdout
    assert pullkit.run_cli(config, "maintain", "c1").returncode == 0


def _last_transaction(repo: Path) -> int:
    lines = (repo / "transactions").read_text().splitlines()
    return int(lines[-1].split()[1].rstrip(","))


def test_a_client_deleting_through_its_tunnel_cannot_free_anything_and_blocks_compact(
    tmp_path: Path, sshd: SshdServer
) -> None:
    data, repo, config = _setup(
        tmp_path, sshd, retention="keep_daily = 7", archive="c1-{now:%Y-%m-%dT%H:%M:%S.%f}"
    )
    for _ in range(2):
        result = pullkit.run_cli(config, "pull", "c1")
        assert result.returncode == 0, result.stderr
    good = sorted(pullkit.archives(tmp_path, repo))
    assert len(good) == 2
    good_transaction = _last_transaction(repo)
    segments = _segments(repo)

    _write(
        tmp_path,
        sshd,
        repo,
        data,
        retention="keep_daily = 7",
        remote_borg=str(_hostile_borg(tmp_path)),
        archive="c1-{now:%Y-%m-%dT%H:%M:%S.%f}",
    )
    hostile = pullkit.run_cli(config, "pull", "c1")
    assert hostile.returncode == 0, hostile.stderr
    left = pullkit.archives(tmp_path, repo)
    assert len(left) == 1
    assert not set(left) & set(good)  # the client deleted both earlier archives ...
    now = _segments(repo)
    assert {k: now.get(k) for k in segments} == segments  # ... but not one segment shrank

    blocked = pullkit.run_cli(config, "maintain", "c1")
    assert blocked.returncode == 2, blocked.stdout
    out = blocked.stdout
    assert "tampering suspected: 2 archive(s) vanished" in out
    for name in good:
        assert repr(name) in out
    assert str(repo / "transactions") in out
    assert "--accept-missing" in out
    assert _segments(repo) == now  # neither compact nor prune ran
    again = pullkit.run_cli(config, "maintain", "c1", "--compact")
    assert again.returncode == 2
    assert "tampering suspected" in again.stdout
    assert _status(config)["last_maintain_result"] == "failed"

    # The roll-back the message describes brings the deleted archives back (on a copy).
    copy = tmp_path / "rolled-back"
    shutil.copytree(repo, copy)
    for segment in (copy / "data").rglob("*"):
        if segment.is_file() and int(segment.name) > good_transaction:
            segment.unlink()
    for pattern in ("index.*", "hints.*", "integrity.*"):
        for leftover in copy.glob(pattern):
            leftover.unlink()
    pullkit.borg(tmp_path, "check", str(copy))
    repo_id = next(
        line.split("=", 1)[1].strip()
        for line in (copy / "config").read_text().splitlines()
        if line.startswith("id")
    )
    verify_base = tmp_path / "verify-borg"
    shutil.rmtree(verify_base / ".cache" / "borg" / repo_id, ignore_errors=True)
    (verify_base / ".config" / "borg" / "security" / repo_id / "manifest-timestamp").unlink(
        missing_ok=True
    )
    assert sorted(pullkit.archives(tmp_path, copy)) == good

    # The administrator acknowledges: compact runs again and the refusal is over.
    accepted = pullkit.run_cli(config, "maintain", "c1", "--accept-missing", "--compact")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "accepted as gone" in accepted.stdout
    assert "compact ok" in accepted.stdout
    assert _data_size(repo) < sum(now.values())  # now the deleted data is really gone
    later = pullkit.run_cli(config, "maintain", "c1", "--compact")
    assert later.returncode == 0, later.stdout


def test_check_detects_a_corrupted_segment(tmp_path: Path, sshd: SshdServer) -> None:
    _, repo, config = _setup(tmp_path, sshd, check='every = "30d"')
    result = pullkit.run_cli(config, "pull", "c1")
    assert result.returncode == 0, result.stderr

    first = pullkit.run_cli(config, "maintain", "c1")  # never checked: due
    assert first.returncode == 0, first.stderr
    assert "check ok: no problems found" in first.stdout
    status = _status(config)
    assert status["last_check_result"] == "ok"
    assert status["last_check"] is not None
    not_due = pullkit.run_cli(config, "maintain", "c1")
    assert "check" not in not_due.stdout  # checked moments ago, every = 30d

    biggest = max(
        (p for p in (repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    raw = bytearray(biggest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    biggest.write_bytes(bytes(raw))

    second = pullkit.run_cli(config, "maintain", "c1", "--check")
    assert second.returncode == 2, second.stdout
    assert "check failed: problems found" in second.stdout
    assert _status(config)["last_check_result"] == "failed"


def test_an_empty_archive_and_a_large_drop_are_warnings_with_the_reason(
    tmp_path: Path, sshd: SshdServer
) -> None:
    data, repo, config = _setup(tmp_path, sshd, archive="c1-{now:%Y-%m-%dT%H:%M:%S.%f}")
    for index in range(9):
        (data / f"more-{index}").write_text("x" * 1000)
    ok = pullkit.run_cli(config, "pull", "c1")
    assert ok.returncode == 0, ok.stderr

    for index in range(8):
        (data / f"more-{index}").unlink()
    dropped = pullkit.run_cli(config, "pull", "c1")
    assert dropped.returncode == 1, dropped.stdout + dropped.stderr
    assert "file count fell by 80 % (10 -> 2)" in dropped.stdout

    empty = tmp_path / "empty-dir"
    empty.mkdir()
    _write(tmp_path, sshd, repo, empty, archive="c1-{now:%Y-%m-%dT%H:%M:%S.%f}")
    zero = pullkit.run_cli(config, "pull", "c1")
    assert zero.returncode == 1, zero.stdout + zero.stderr
    assert "0 files" in zero.stdout
    runs = json.loads(pullkit.run_cli(config, "history", "c1", "--json").stdout)
    assert [r["result"] for r in runs] == ["warning", "warning", "ok"]
    assert "0 files" in runs[0]["error"]
    assert "file count fell" in runs[1]["error"]
    assert len(pullkit.archives(tmp_path, repo)) == 3  # warnings, not failures: archives kept


def test_maintain_is_busy_while_the_client_is_locked_and_waits_with_wait(
    tmp_path: Path, sshd: SshdServer
) -> None:
    _, _, config = _setup(tmp_path, sshd, retention="keep_daily = 1")
    lock = acquire_client_lock(tmp_path / "state", "c1", wait=False)
    try:
        busy = pullkit.run_cli(config, "maintain", "c1")
        assert busy.returncode == 2
        assert (
            f"busy: another borgtunnel process is working on this client by pid {os.getpid()}"
            in busy.stdout
        )
        waiting = subprocess.Popen(
            [*pullkit.cli_argv(config), "maintain", "c1", "--wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                waiting.wait(timeout=2)
        except BaseException:
            waiting.kill()
            waiting.wait()
            raise
    finally:
        lock.release()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, out + err
    assert "prune ok" in out
    with History.open(tmp_path / "state") as history:
        assert [r.kind for r in history.last_runs("c1")] == ["maintain"]


def test_list_shows_the_archives_as_the_servers_borg_reads_them(
    tmp_path: Path, sshd: SshdServer
) -> None:
    _, repo, config = _setup(tmp_path, sshd)
    _forged(tmp_path, repo, "first one", "2026-11-01T10:00:00", size=120_000)
    _forged(tmp_path, repo, "-second\n'odd'", "2026-11-02T10:00:00", size=80_000)

    listed = pullkit.run_cli(config, "list", "c1", "--json")

    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    own = json.loads(pullkit.borg(tmp_path, "list", "--json", str(repo)))["archives"]
    assert [(r["name"], r["id"]) for r in rows] == [(a["name"], a["id"]) for a in own]
    assert [r["time"][:19] for r in rows] == ["2026-11-01T10:00:00", "2026-11-02T10:00:00"]
    assert [(r["nfiles"], r["original_size"]) for r in rows] == [(1, 120_000), (1, 80_000)]
    assert all(r["deduplicated_size"] > 70_000 for r in rows)
    empty = pullkit.run_cli(config, "list", "nosuch")
    assert empty.returncode == 78


def test_an_encrypted_repository_is_listed_maintained_and_restored_with_its_passphrase(
    tmp_path: Path, sshd: SshdServer
) -> None:
    data = pullkit.make_client_data(tmp_path / "client-data")
    repo = tmp_path / "repos" / "c1"
    secret = tmp_path / "c1.passphrase"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(
        sshd, "c1", repo, [data], encryption="repokey-blake2", passphrase_file=str(secret)
    )
    config = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    config.write_text(config.read_text() + "\n[clients.c1.retention]\nkeep_daily = 1\n")
    for argv in (("init", "c1"), ("pull", "c1")):
        result = pullkit.run_cli(config, *argv)
        assert result.returncode == 0, result.stdout + result.stderr

    listed = pullkit.run_cli(config, "list", "c1", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    maintained = pullkit.run_cli(config, "maintain", "c1", "--prune", "--check")
    assert maintained.returncode == 0, maintained.stdout + maintained.stderr
    assert "prune ok: removed 0: -; kept 1; check ok" in maintained.stdout
    target = tmp_path / "target"
    restored = pullkit.run_cli(config, "restore", "c1", row["name"], "--target", str(target))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    pullkit.assert_same_tree(data, target)
    for result in (listed, maintained, restored):
        assert "correct horse" not in result.stdout + result.stderr
