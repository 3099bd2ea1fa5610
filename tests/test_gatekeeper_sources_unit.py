"""The gatekeeper's sources: its policy's ``[source NAME]`` sections give the same dump jobs as
the server's config (tests/sourcecases.py, one table for both), and a run with sources is only
accepted when every job the server names is one of the policy's, word for word."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from borgtunnel.client import gatekeeper as gk
from borgtunnel.client import sources
from borgtunnel.client.remote import REQUEST_RUN_SOURCES, RUN_SCRIPT, run_command
from borgtunnel.config import ConfigError, parse_config
from tests import pullkit
from tests.sourcecases import INVALID, VALID, SourceCase

BASE = """
[clients.c1]
host = "h"
repository = "/srv/borg/c1"
paths = ["/etc"]
encryption = "none"
"""


def server_jobs(tables: Sequence[Mapping[str, object]]) -> list[sources.DumpJob]:
    text = BASE
    for table in tables:
        text += "[[clients.c1.sources]]\n"
        text += "".join(f"{key} = {pullkit.toml_value(value)}\n" for key, value in table.items())
    config = parse_config(tomllib.loads(text))
    return sources.dump_jobs(config.clients["c1"].sources)


def policy_text(sections: Mapping[str, Mapping[str, str]], paths: str = "/etc") -> str:
    text = f"[gatekeeper]\npaths = {paths}\n"
    for name, settings in sections.items():
        text += f"\n[source {name}]\n"
        for key, value in settings.items():
            text += f"{key} = " + value.replace("\n", "\n    ") + "\n"
    return text


def policy(tmp_path: Path, sections: Mapping[str, Mapping[str, str]]) -> gk.Policy:
    path = tmp_path / "gatekeeper.conf"
    path.write_text(policy_text(sections))
    return gk.load_policy(str(path))


def as_gatekeeper_jobs(jobs: Sequence[sources.DumpJob]) -> list[gk.SourceJob]:
    return [gk.SourceJob(label=job.label, path=job.path, argv=job.argv) for job in jobs]


@pytest.mark.parametrize("case", VALID, ids=lambda case: case.id)
def test_server_and_gatekeeper_build_the_same_jobs(tmp_path: Path, case: SourceCase) -> None:
    name = str(case.server["name"])
    expected = as_gatekeeper_jobs(server_jobs([case.server]))
    assert expected
    assert list(policy(tmp_path, {name: case.policy}).source_jobs) == expected


@pytest.mark.parametrize("case", INVALID, ids=lambda case: case.id)
def test_server_and_gatekeeper_refuse_the_same_settings(tmp_path: Path, case: SourceCase) -> None:
    with pytest.raises(ConfigError):
        server_jobs([case.server])
    with pytest.raises(gk.RefusedError) as caught:
        policy(tmp_path, {str(case.server["name"]): case.policy})
    assert caught.value.code == gk.EXIT_POLICY
    assert "[source " in caught.value.reason or "section" in caught.value.reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[gatekeeper]\npaths = /etc\n[sources app]\ntype = sqlite\npath = /x\n", "[sources app]"),
        ("[gatekeeper]\npaths = /etc\n[source]\ntype = sqlite\npath = /x\n", "[source]"),
        ("[gatekeeper]\npaths = /etc\n[source a]\npath = /x\n", "type: must be one of"),
        ("[gatekeeper]\npaths = /etc\n[source a]\ntype = sqlite\npath =\n", "path: is empty"),
        ("[gatekeeper]\npaths = /etc\n[source a]\ntype = command\ncommand = 'x\n", "command:"),
        ("[gatekeeper]\npaths = /etc\n[source a]\ntype = postgresql\n", "names no database"),
        ("[gatekeeper]\npaths = /etc\n[Source a]\ntype = sqlite\npath = /x\n", "[Source a]"),
    ],
)
def test_a_broken_source_section_is_a_policy_error(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "gatekeeper.conf"
    path.write_text(text)
    with pytest.raises(gk.RefusedError) as caught:
        gk.load_policy(str(path))
    assert caught.value.code == gk.EXIT_POLICY
    assert reason in caught.value.reason


# --- a run with sources, as the server sends it ------------------------------------------------

SQLITE = {"type": "sqlite", "name": "notes", "path": "/var/lib/notes.db"}
PG = {"type": "postgresql", "name": "pg", "database": ["app", "billing"]}
POLICY_SOURCES = {
    "notes": {"type": "sqlite", "path": "/var/lib/notes.db"},
    "pg": {"type": "postgresql", "database": "app billing"},
}


def sources_run(
    jobs: Sequence[sources.DumpJob],
    *,
    options: Sequence[str] = sources.CREATE_OPTIONS,
    paths: Sequence[str] = ("/etc",),
    last: str = sources.SOURCES_DIR,
) -> str:
    argv = ["borg", "create", *options, "--", "ssh://borgtunnel/srv/borg/c1::a1", *paths, last]
    return run_command(
        "~/.cache/borgtunnel/c1.sock",
        "nc",
        "socat",
        argv,
        kind=REQUEST_RUN_SOURCES,
        sources=sources.sources_args(paths, jobs),
    )


def test_a_server_built_run_with_sources_parses_to_its_jobs() -> None:
    jobs = server_jobs([SQLITE, PG])
    request = gk.parse_request(sources_run(jobs))
    assert isinstance(request, gk.RunRequest)
    assert list(request.jobs) == as_gatekeeper_jobs(jobs)
    assert request.call.paths == ("/etc",)
    assert "--read-special" not in request.call.options
    assert not request.call.exclude_files


def test_listed_sources_are_the_policys_own_jobs(tmp_path: Path) -> None:
    jobs = server_jobs([SQLITE, PG])
    request = gk.parse_request(sources_run(jobs[1:]))  # a subset: pg/app and pg/billing
    assert isinstance(request, gk.RunRequest)
    chosen = gk.check_jobs(request.jobs, policy(tmp_path, POLICY_SOURCES))
    assert [job.label for job in chosen] == ["pg/app", "pg/billing"]


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        # Not listed at all, and its neighbouring spellings.
        ({"type": "sqlite", "name": "other", "path": "/var/lib/notes.db"}, "'other' is not in"),
        ({"type": "sqlite", "name": "notes2", "path": "/var/lib/notes.db"}, "'notes2' is not in"),
        ({"type": "postgresql", "name": "pg", "database": "app"}, "'pg' is not in"),
        # Listed, with a parameter outside the policy.
        ({"type": "sqlite", "name": "notes", "path": "/etc/shadow"}, "'/etc/shadow'"),
        (
            {"type": "postgresql", "name": "pg", "database": ["app", "postgres"]},
            "'pg/postgres' is not in",
        ),
        ({"type": "postgresql", "name": "pg", "database": ["app", "billing"], "port": 1}, "port"),
        (
            {"type": "postgresql", "name": "pg", "database": ["app", "billing"], "user": "root"},
            "--username=root",
        ),
        # Same name, another type: another archive path.
        ({"type": "command", "name": "notes", "command": ["cat", "/etc/shadow"]}, "archive path"),
    ],
)
def test_a_source_outside_the_policy_is_refused(
    tmp_path: Path, server: Mapping[str, object], reason: str
) -> None:
    request = gk.parse_request(sources_run(server_jobs([server])))
    assert isinstance(request, gk.RunRequest)
    with pytest.raises(gk.RefusedError) as caught:
        gk.check_jobs(request.jobs, policy(tmp_path, POLICY_SOURCES))
    assert reason in caught.value.reason
    assert caught.value.code == gk.EXIT_REFUSED


def _with_jobs(jobs: Sequence[gk.SourceJob]) -> str:
    """A request whose sources block is written by hand (what a compromised server sends)."""
    block = [sources.SOURCES_MARK, "1", "/etc", str(len(jobs))]
    for job in jobs:
        block += [job.label, job.path, str(len(job.argv)), *job.argv]
    argv = ["borg", "create", *sources.CREATE_OPTIONS, "--", "ssh://borgtunnel/r::a", "/etc"]
    return run_command(
        "~/.cache/borgtunnel/c1.sock",
        "nc",
        "socat",
        [*argv, sources.SOURCES_DIR],
        kind=REQUEST_RUN_SOURCES,
        sources=block,
    )


NOTES_ARGV = gk.source_jobs("notes", POLICY_SOURCES["notes"], "t")[0].argv


@pytest.mark.parametrize(
    "job",
    [
        # The right label and path with another program, an extra word, a word less.
        gk.SourceJob("notes", "borgtunnel-sources/sqlite/notes.sql", ("cat", "/etc/shadow")),
        gk.SourceJob("notes", "borgtunnel-sources/sqlite/notes.sql", (*NOTES_ARGV, "/etc/x")),
        gk.SourceJob("notes", "borgtunnel-sources/sqlite/notes.sql", NOTES_ARGV[:-1]),
        # Another path for the right job: where borg would read (a FIFO we create there).
        gk.SourceJob("notes", "../../../../etc/passwd", NOTES_ARGV),
        gk.SourceJob("notes", "borgtunnel-sources/sqlite/../../x", NOTES_ARGV),
        # Neighbouring labels: case, blanks, a separator.
        gk.SourceJob("Notes", "borgtunnel-sources/sqlite/notes.sql", NOTES_ARGV),
        gk.SourceJob("notes ", "borgtunnel-sources/sqlite/notes.sql", NOTES_ARGV),
        gk.SourceJob("notes/x", "borgtunnel-sources/sqlite/notes.sql", NOTES_ARGV),
        gk.SourceJob("pg", "borgtunnel-sources/postgresql/pg.dump", ("pg_dump", "--dbname=app")),
    ],
    ids=[
        "program",
        "extra-word",
        "word-less",
        "path-up",
        "path-dotdot",
        "label-case",
        "label-blank",
        "label-slash",
        "pg-group-label",
    ],
)
def test_a_hand_made_job_is_refused(tmp_path: Path, job: gk.SourceJob) -> None:
    request = gk.parse_request(_with_jobs([job]))
    assert isinstance(request, gk.RunRequest)
    with pytest.raises(gk.RefusedError):
        gk.check_jobs(request.jobs, policy(tmp_path, POLICY_SOURCES))


def test_a_job_asked_for_twice_and_no_job_are_refused(tmp_path: Path) -> None:
    job = gk.source_jobs("notes", POLICY_SOURCES["notes"], "t")[0]
    allowed = policy(tmp_path, POLICY_SOURCES)
    for jobs, reason in (([job, job], "twice"), ([], "names no source")):
        request = gk.parse_request(_with_jobs(jobs))
        assert isinstance(request, gk.RunRequest)
        with pytest.raises(gk.RefusedError, match=reason):
            gk.check_jobs(request.jobs, allowed)


def test_no_source_in_the_policy_refuses_every_source(tmp_path: Path) -> None:
    request = gk.parse_request(sources_run(server_jobs([SQLITE])))
    assert isinstance(request, gk.RunRequest)
    with pytest.raises(gk.RefusedError, match=r"listed: none"):
        gk.check_jobs(request.jobs, policy(tmp_path, {}))


@pytest.mark.parametrize(
    ("options", "last", "reason"),
    [
        # Other spellings of the two options are borg options like any other: refused.
        (("--read-special=yes", "--exclude-from=borgtunnel-special-files"), None, "read-special"),
        (
            ("--read-special", "--exclude-from", "borgtunnel-special-files"),
            None,
            "not an absolute path",
        ),
        (("--read-special", "--exclude-from=/etc/x"), None, "exclude file"),
        (("--read-special", "--read-special", "--content-from-command"), None, "not allowed"),
        (sources.CREATE_OPTIONS, "/etc/other", "must end its paths"),
        (sources.CREATE_OPTIONS, "borgtunnel-sources/x", "must end its paths"),
    ],
)
def test_a_run_with_sources_keeps_the_option_rules(
    tmp_path: Path, options: Sequence[str], last: str | None, reason: str
) -> None:
    jobs = server_jobs([SQLITE])
    command = sources_run(jobs, options=options, last=last or sources.SOURCES_DIR)
    allowed = policy(tmp_path, POLICY_SOURCES)
    with pytest.raises(gk.RefusedError) as caught:
        _check_run(command, allowed, str(tmp_path))
    assert reason in caught.value.reason


def _check_run(command: str, allowed: gk.Policy, home: str) -> None:
    request = gk.parse_request(command)
    assert isinstance(request, gk.RunRequest)
    gk.check_run(request, allowed, home)


def test_a_plain_run_may_not_read_special_files() -> None:
    argv = ["borg", "create", "--read-special", "--", "ssh://borgtunnel/r::a", "/etc"]
    command = run_command("~/s.sock", "nc", "socat", argv)
    with pytest.raises(gk.RefusedError, match="read-special"):
        gk.parse_request(command)


@pytest.mark.parametrize(
    "block",
    [
        ["borgtunnel-sources", "x"],
        ["borgtunnel-sources", "5", "/etc"],
        ["borgtunnel-sources", "0", "1", "a", "p"],
        ["borgtunnel-sources", "0", "1", "a", "p", "0"],
        ["borgtunnel-sources", "0", "1", "a", "p", "9", "x"],
        ["borgtunnel-sources", "0", "99999"],
        ["borgtunnel-sources", "0", "257"],
        ["borgtunnel-sources", "0", "-1"],
        ["other-mark", "0", "0"],
    ],
)
def test_a_broken_sources_block_is_refused(block: list[str]) -> None:
    with pytest.raises(gk.RefusedError, match="a run with sources"):
        gk.parse_sources_block(block)


# --- special files: the gatekeeper's walk and the run script's find give the same excludes ----


def _tree(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "file").write_text("x")
    for name in ("a fifo", "new\nline [*?]\\", "star*", "br]acket"):
        os.mkfifo(root / "dir" / name)
    os.mkfifo(root / "dir" / "sub" / "deep")
    (root / "zero").symlink_to("/dev/zero")
    (root / "dangling").symlink_to("/nonexistent")
    (root / "dirlink").symlink_to(root / "dir")


def _script_excludes(paths: Sequence[str]) -> str:
    """The run script's find | sed | tr pipeline (RUN_SCRIPT), on the same paths."""
    start = RUN_SCRIPT.index("  (k=$#; i=0;")
    end = RUN_SCRIPT.index('> "$sd/borgtunnel-special-files"')
    pipeline = RUN_SCRIPT[start:end]
    script = f"n=$1; shift\n{pipeline}\n"
    result = subprocess.run(
        ["sh", "-c", script, "sh", str(len(paths)), *paths],
        capture_output=True,
        check=True,
    )
    return result.stdout.decode("utf-8", "surrogateescape")


def test_special_files_are_excluded_as_the_run_script_does(tmp_path: Path) -> None:
    _tree(tmp_path / "data")
    paths = [str(tmp_path / "data"), str(tmp_path / "data" / "zero")]
    ours = gk.special_file_excludes(paths)
    assert sorted(ours.splitlines()) == sorted(_script_excludes(paths).splitlines())
    assert len(ours.splitlines()) == 7  # 5 FIFOs, the link to /dev/zero under data and as a path
    assert "sh:" + str(tmp_path / "data" / "dir" / "new?line ?[*][?][]][\\]") in ours


# --- the documented policy example loads -------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"
_MARKED_POLICY = re.compile(
    r"^<!-- tested: gatekeeper -->\n```ini\n(.*?)^```$", re.MULTILINE | re.DOTALL
)


def test_the_documented_policy_with_sources_loads(tmp_path: Path) -> None:
    [example] = _MARKED_POLICY.findall((DOCS / "sources.md").read_text())
    path = tmp_path / "gatekeeper.conf"
    path.write_text(example)
    loaded = gk.load_policy(str(path))
    assert [job.label for job in loaded.source_jobs] == [
        "app/app",
        "app/billing",
        "shop",
        "notes",
        "ldap",
    ]
    assert loaded.source_jobs[-1].argv == ("slapcat", "-n", "1")
