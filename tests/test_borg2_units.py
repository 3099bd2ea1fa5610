"""borg 2's pure parts: argv builders, the server's view of a repository, and what tells its
archives apart (ids: names are series). No process runs here; tests/test_borg2.py runs borg 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from borgtunnel import borg, borg2
from borgtunnel.config import Config, parse_config
from borgtunnel.history import History, RunResult
from borgtunnel.maintenance import retention
from borgtunnel.maintenance.tamper import tamper_report
from borgtunnel.runs import keyguard
from borgtunnel.runs.restore import extract_argv
from borgtunnel.runs.verify import RepositoryState, VerifyError, _check_changed, repository_state
from borgtunnel.server.policy import serve_argv
from borgtunnel.ssh.doctor import borg_version_problem

REPO = Path("/srv/borg2/web 1")
ID = "cd" * 32


def _config(**client: object) -> Config:
    table = {
        "host": "h",
        "repository": str(REPO),
        "paths": ["/etc"],
        "borg_version": 2,
        "passphrase_file": "/p",
    }
    return parse_config({"server": {"borg2": "/b2/borg"}, "clients": {"web1": table | client}})


def test_serve_policy_is_rest_on_one_backend_with_the_permissions() -> None:
    config = _config()
    client = config.client("web1")
    assert serve_argv(config, client) == [
        "/b2/borg",
        "serve",
        "--rest",
        f"--backend=FILE:{REPO}",
        "--restrict-to-repository",
        str(REPO),
        "--permissions=write-only",
    ]
    assert serve_argv(config, client, restore=True)[-1] == "--permissions=read-only"
    no_delete = _config(permissions="no-delete")
    assert serve_argv(no_delete, no_delete.client("web1"))[-1] == "--permissions=no-delete"


def test_create_argv_puts_the_repository_in_an_option_and_the_name_after_the_end_of_options() -> (
    None
):
    argv = borg.create_argv(
        borg2=True,
        remote_borg="/opt/borg2/bin/borg --lock-wait 5",
        repository=REPO,
        archive="-looks-like-an-option",
        paths=["/etc", "-x"],
        exclude=["-e*"],
    )
    assert argv[:3] == ["/opt/borg2/bin/borg", "--lock-wait", "5"]
    end = argv.index("--")
    assert argv[end - 1] == f"--repo=ssh://borgtunnel{REPO.as_posix()}"
    assert argv[end + 1 :] == ["-looks-like-an-option", "/etc", "-x"]
    assert "--exclude=-e*" in argv
    assert {"--json", "--log-json", "--show-version", "--progress"} <= set(argv[:end])


def test_info_reads_one_archive_by_id() -> None:
    assert borg2.info_argv("borg", REPO, ID)[-1] == f"--match-archives=aid:{ID}"


def test_restore_extracts_by_id_with_the_repository_as_an_option() -> None:
    argv = extract_argv(
        remote_borg="borg",
        repository=REPO,
        archive=f"aid:{ID}",
        paths=["/etc/x"],
        dry_run=False,
        borg2=True,
    )
    assert argv[argv.index("--") - 1].startswith("--repo=ssh://borgtunnel/")
    assert argv[argv.index("--") + 1 :] == [f"aid:{ID}", "pp:etc/x"]


def test_deletes_go_by_id_one_archive_at_a_time() -> None:
    argv = retention.delete_argv("borg", REPO, ["a" * 64], borg2=True)
    assert argv == [
        "borg",
        "delete",
        "--log-json",
        f"--repo={REPO}",
        f"--match-archives=aid:{'a' * 64}",
    ]
    with pytest.raises(ValueError, match="unpack"):
        retention.delete_argv("borg", REPO, ["a" * 64, "b" * 64], borg2=True)
    assert retention.list_argv("borg", REPO, borg2=True)[1] == "repo-list"
    assert retention.data_dir(REPO, borg2=True) == REPO / "packs"


def test_archives_are_told_apart_by_id() -> None:
    a = retention.Archive(name="web1", id="a" * 64, time="t1")
    b = retention.Archive(name="web1", id="b" * 64, time="t2")
    assert retention.identity(a, borg2=True) != retention.identity(b, borg2=True)
    assert retention.identity(a) == retention.identity(b)  # 1.x: the name


def test_expected_archives_by_id_and_the_borg2_tamper_message(tmp_path: Path) -> None:
    with History.open(tmp_path) as history:
        for archive_id in ("1" * 64, "2" * 64):
            run = history.start_run("web1", "pull")
            history.finish_run(run, RunResult.OK, archive="web1", archive_id=archive_id)
        assert history.expected_archives("web1") == {"web1"}
        assert history.expected_archives("web1", by_id=True) == {"1" * 64, "2" * 64}
        history.record_removals("web1", ["1" * 64], "pruned", None)
        expected = history.expected_archives("web1", by_id=True)
    assert expected == {"2" * 64}
    report = tamper_report("web1", REPO, expected, {}, borg2=True)
    assert report is not None
    assert report.missing == ("2" * 64,)
    message = report.message()
    assert "borg undelete" in message
    assert "segment" not in message  # the 1.x way back does not apply
    assert tamper_report("web1", REPO, expected, {"2" * 64: "2" * 64}, borg2=True) is None


def _repo2(root: Path, archives: list[str]) -> Path:
    (root / "archives").mkdir(parents=True)
    for name in archives:
        (root / "archives" / name).write_bytes(b"x")
    return root


def test_the_new_archive_must_appear_during_the_run(tmp_path: Path) -> None:
    repo = _repo2(tmp_path / "r", ["a" * 64])
    before = repository_state(repo, borg2=True)
    claim = borg.ArchiveClaim(name="web1", id=ID)
    with pytest.raises(VerifyError, match="no archive object of that id"):
        _check_changed(repo, claim, before, borg2=True)
    (repo / "archives" / ID).write_bytes(b"x")
    _check_changed(repo, claim, before, borg2=True)  # written now: fine
    with pytest.raises(VerifyError, match="no archive object of that id"):
        _check_changed(repo, claim, repository_state(repo, borg2=True), borg2=True)
    # Not a borg 2 repository at all: the other checks stand alone.
    _check_changed(tmp_path / "missing", claim, RepositoryState(), borg2=True)


def test_key_blob_of_a_borg2_repository(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    (repo / "keys").mkdir(parents=True)
    (repo / "keys" / "k1").write_text("BORG_KEY 00ff\nAAAA\nBBBB\n")
    assert keyguard.repository_key_blob(repo) == "AAAABBBB"
    (repo / "keys" / "k2").write_text("BORG_KEY 00ff\nCCCC\n")
    assert keyguard.repository_key_blob(repo) == "AAAABBBB,CCCC"  # a second key differs


@pytest.mark.parametrize(
    ("borg_version", "said", "problem"),
    [
        (2, "borg 2.0.0b25", None),
        (1, "borg 1.4.5", None),
        (
            2,
            "borg 1.2.4",
            "the client runs borg 1.2.4, but clients.web1.borg_version is 2: set it to 1",
        ),
        (1, "borg 2.0.0b25", "set it to 2"),
        (2, "something else", None),
    ],
)
def test_doctor_names_a_borg_major_that_does_not_match(
    borg_version: int, said: str, problem: str | None
) -> None:
    table: dict[str, object] = {
        "host": "h",
        "repository": "/r",
        "paths": ["/etc"],
        "passphrase_file": "/p",
    }
    table |= {"borg_version": 2} if borg_version == 2 else {"encryption": "repokey"}
    client = parse_config({"server": {"borg2": "b"}, "clients": {"web1": table}}).client("web1")
    found = borg_version_problem(client, said)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


def test_repository_ids_of_both_layouts(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "config").write_text("[repository]\nversion = 1\nid = 00aa\nkey = AAAA\n")
    assert keyguard.repository_id(one) == "00aa"
    two = tmp_path / "two"
    (two / "keys").mkdir(parents=True)
    (two / "keys" / "k1").write_text("BORG_KEY 11bb\nAAAA\n")
    assert keyguard.repository_id(two) == "11bb"
    (two / "keys" / "k2").write_text("BORG_KEY 22cc\nBBBB\n")
    assert keyguard.repository_id(two) is None  # two repositories' keys: unknown


async def test_a_key_copy_of_another_repository_is_reported_not_imported(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    (repo / "keys").mkdir(parents=True)
    (repo / "keys" / "k").write_text("BORG_KEY 22cc\nNEWKEY\n")
    saved = keyguard.key_path(tmp_path / "state", "web1")
    saved.parent.mkdir(parents=True)
    saved.write_text("BORG_KEY 11bb\nOLDKEY\n")
    # A borg that would fail loudly if it were run: nothing may be imported here.
    found = await keyguard.check_key(
        "/nonexistent/borg", repo, tmp_path / "state", "web1", borg2=True
    )
    assert found is not None
    assert found.other_repository == "22cc"
    assert not found.restored
    assert "created again outside `borgtunnel init`" in found.message()
    assert (repo / "keys" / "k").read_text() == "BORG_KEY 22cc\nNEWKEY\n"
