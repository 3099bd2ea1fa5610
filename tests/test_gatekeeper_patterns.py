"""The gatekeeper reads borg's pattern language exactly as each real borg does.

A compromised server that can add a backup root (``--pattern=R/root``, ``R.``, ``r/x``,
``R\\v/x``, a ``--patterns-from`` file holding such a line, ...) backs up anything. Every pattern
line below, and many generated ones, goes through borg's own argument parser (1.2.4, 1.4.5 and
2.0.0b25, each in its own python: tests/borg_pattern_oracle.py) and through the gatekeeper:
where borg refuses the line the gatekeeper refuses it too, and where borg adds roots the
gatekeeper found exactly those roots, or refused the line for its one documented extra rule
(non-ASCII whitespace). The roots it found are then held to the policy's paths.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from borgtunnel.client import gatekeeper as gk
from tests import borgs
from tests.test_gatekeeper_unit import HOME, policy, refusal, server_run_command

ORACLE = Path(__file__).with_name("borg_pattern_oracle.py")
STRICTER = "non-ASCII whitespace in a pattern"  # the gatekeeper's one rule beyond borg's


class Oracle:
    """One borg version's own parser, kept running: one JSON request and answer per line."""

    def __init__(self, python: str) -> None:
        self.process = subprocess.Popen(
            [python, str(ORACLE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # As the gatekeeper runs borg: UTF-8 whatever the locale.
            env={"PATH": os.environ["PATH"], "PYTHONUTF8": "1", "LANG": "C.UTF-8"},
            text=True,
            encoding="utf-8",
            errors="surrogateescape",
        )

    def send(self, requests: list[dict[str, object]]) -> None:
        """Requests go out at once (a few KiB, within the pipe's buffer), so that every borg
        version works on them at the same time; ``answers`` collects them."""
        assert self.process.stdin is not None
        self.process.stdin.write("".join(json.dumps(request) + "\n" for request in requests))
        self.process.stdin.flush()

    def answers(self, count: int) -> list[dict[str, object]]:
        assert self.process.stdout is not None
        return [json.loads(self.process.stdout.readline()) for _ in range(count)]

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def ask_all(
    oracles: dict[str, Oracle], requests: list[dict[str, object]]
) -> list[dict[str, dict[str, object]]]:
    """For each request, every borg version's answer."""
    for oracle in oracles.values():
        oracle.send(requests)
    by_version = {version: oracle.answers(len(requests)) for version, oracle in oracles.items()}
    return [{version: by_version[version][i] for version in oracles} for i in range(len(requests))]


def _python_of(version: str) -> str:
    executable = borgs.executable(version)
    if executable == borgs.DEBIAN_BORG:
        return "/usr/bin/python3"
    return str(Path(executable).parent / "python")


VERSIONS = (borgs.DEBIAN_VERSION, *borgs.BUILT, borgs.BORG2)


@pytest.fixture(scope="module")
def oracles() -> Iterator[dict[str, Oracle]]:
    started: dict[str, Oracle] = {}
    try:
        for version in VERSIONS:
            started[version] = Oracle(_python_of(version))
        yield started
    finally:
        for oracle in started.values():
            oracle.close()


def gatekeeper_option_roots(line: str) -> list[str] | str:
    """The roots the gatekeeper found in ``--pattern=LINE`` (sent by the server's own builders),
    or its refusal."""
    try:
        request = gk.parse_request(server_run_command(extra=(f"--pattern={line}",)))
    except gk.RefusedError as exc:
        return exc.reason
    assert isinstance(request, gk.RunRequest)
    return list(request.call.pattern_roots)


def gatekeeper_file_roots(text: str) -> list[str] | str:
    try:
        return gk.pattern_file_roots(text, "patterns file")
    except gk.RefusedError as exc:
        return exc.reason


def assert_same_reading(
    what: str, gate: list[str] | str, answers: dict[str, dict[str, object]]
) -> None:
    for version, answer in answers.items():
        if "error" in answer:
            assert isinstance(gate, str), f"{what}: borg {version} refuses it, gatekeeper {gate}"
            continue
        borg_roots = answer["roots"]
        assert isinstance(borg_roots, list)
        assert borg_roots[-1] == "/data"
        if isinstance(gate, str):
            assert STRICTER in gate, f"{what}: borg {version} reads {borg_roots}; refused: {gate}"
        else:
            assert gate == borg_roots[:-1], f"{what}: borg {version} reads {borg_roots}"


# Pattern lines an attacker would try next: command glued or spaced, other case, every kind of
# whitespace Python strips, relative and odd roots, other commands, styles, comments.
LINES = [
    "R/etc",
    "R /etc",
    "R\t/etc",
    "R  \t /etc",
    "r/root",
    "r /root",
    "R/",
    "R.",
    "R..",
    "R-",
    "R~",
    "RR/x",
    "R\v/root",
    "R\f/root",
    "R\r/root",
    "R\n/root",
    "R\x1c/root",
    "R\x1f/root",
    "R\x85/root",
    "R\xa0/root",
    "R\u2003/root",
    "R\u3000/root",
    "R\u2028/root",
    "R/etc/../root",
    "R//root",
    "R/root ",
    "R /root # comment",
    " R/root",
    "\tR/root",
    "\ufeffR/root",
    "#R /root",
    "R",
    "R ",
    "r",
    "",
    " ",
    "-",
    "- ",
    "-/root",
    "- /root",
    "!/root",
    "+/root",
    "+ sh:/root/**",
    "- re:^/root",
    "- pf:/root",
    "- pp:/root",
    "- fm:/root",
    "- xx:/root",
    "- /ab:c",
    "P sh",
    "Pre",
    "p pf",
    "P",
    "P xx",
    "P re ",
    "x/root",
    "/root",
    "*/root",
    "e/root",
    "=R/root",
]


def check_options(oracles: dict[str, Oracle], lines: list[str]) -> None:
    requests: list[dict[str, object]] = [{"options": [f"--pattern={line}"]} for line in lines]
    for line, answers in zip(lines, ask_all(oracles, requests), strict=True):
        assert_same_reading(repr(line), gatekeeper_option_roots(line), answers)


def check_files(oracles: dict[str, Oracle], texts: list[str], *, parser: bool = False) -> None:
    requests: list[dict[str, object]] = [{"file": text, "parser": parser} for text in texts]
    for text, answers in zip(texts, ask_all(oracles, requests), strict=True):
        assert_same_reading(repr(text), gatekeeper_file_roots(text), answers)


def test_each_pattern_option_is_read_as_borg_reads_it(oracles: dict[str, Oracle]) -> None:
    check_options(oracles, LINES)


def test_each_patterns_file_line_is_read_as_borg_reads_it(oracles: dict[str, Oracle]) -> None:
    check_files(oracles, [f"- *.tmp\n{line}\n+ /etc\n" for line in LINES])


def test_a_whole_patterns_file_is_read_as_borg_reads_it(oracles: dict[str, Oracle]) -> None:
    """Every line ending Python's text files know (universal newlines), and the ones they do
    not (\\v, \\x1c: str.splitlines would split there, borg does not)."""
    text = (
        "# roots\r\nR /etc\r  r\t/home \n\n\tP re\n- ^/etc/ssl\nR\v/var\n\x0b\n! /tmp\r\n"
        "- x\vR /root\n- y\x1cR /root\nR/srv"
    )
    assert gatekeeper_file_roots(text) == ["/etc", "/home", "/var", "/srv"]
    check_files(oracles, [text], parser=True)


_ALPHABET = st.sampled_from(
    [
        *"RrPp-!+# /.:~e",
        *("sh", "re", "pf", "root"),
        *"\t\v\f\r\n\x1c",
        *"\x85\xa0\u2003\ufeff\u2028",  # non-ASCII: whitespace, and one that is not
    ]
)
_LINE = st.lists(_ALPHABET, max_size=8).map("".join)


# Batches of generated lines: one round trip to the three borgs per example.
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_LINE, min_size=30, max_size=30))
def test_generated_pattern_options_are_read_as_borg_reads_them(
    oracles: dict[str, Oracle], lines: list[str]
) -> None:
    check_options(oracles, lines)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(st.lists(_LINE, max_size=4).map("\n".join), min_size=40, max_size=40))
def test_generated_patterns_files_are_read_as_borg_reads_them(
    oracles: dict[str, Oracle], texts: list[str]
) -> None:
    check_files(oracles, texts)


# --- what the gatekeeper does with the roots: the policy's paths (/etc, /home/u) -------------


@pytest.mark.parametrize(
    "extra",
    [
        ("--pattern=R/root",),
        ("--pattern", "R/root"),
        ("--pattern=r/root",),
        ("--pattern=R /root",),
        ("--pattern=R\v/root",),
        ("--pattern=R\x1c/root",),
        ("--pattern=R/",),
        ("--pattern=R/etc/../root",),
        ("--pattern=R/etc", "--pattern=R/root"),
        ("--exclude=x", "--pattern=R/root"),
    ],
)
def test_a_root_outside_the_policy_is_refused_however_it_is_spelled(
    extra: tuple[str, ...],
) -> None:
    reason = refusal(server_run_command(paths=("/etc",), extra=extra))
    assert "pattern root" in reason
    assert "outside the policy's paths" in reason or "contains '..'" in reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("R.", "is not an absolute path"),
        ("R-", "is not an absolute path"),  # "-" is stdin to borg create
        ("R~/x", "is not an absolute path"),
        ("R\xa0/root", STRICTER),
        ("x/root", "a pattern must start with one of"),
        ("", "a pattern must start with one of"),
        ("R", "a pattern needs a value"),
        ("P xx", "unknown pattern style"),
    ],
)
def test_a_root_or_line_the_gatekeeper_cannot_classify_is_refused(line: str, reason: str) -> None:
    assert reason in refusal(server_run_command(paths=("/etc",), extra=(f"--pattern={line}",)))


@pytest.mark.parametrize(
    "option",
    ["--pat=R/root", "--patt", "--patterns-fr=/etc/p", "--patterns=/etc/p", "--exclude-fr=/etc/x"],
)
def test_borgs_prefix_matching_never_applies(option: str) -> None:
    """argparse would take --patterns-fr for --patterns-from: the gatekeeper knows exact names."""
    assert "is not allowed" in refusal(server_run_command(paths=("/etc",), extra=(option,)))


@pytest.mark.parametrize(
    "tag", ["/etc/shadow", "../../root", "sub/../../../root", "..", ".", "", "a/b", "//"]
)
@pytest.mark.parametrize("split", [False, True])
def test_an_exclude_tag_that_is_not_a_plain_name_is_refused(tag: str, split: bool) -> None:
    """borg joins the tag to each directory and, with --keep-exclude-tags, backs up what it
    names: an absolute or ../ tag reads a file or tree outside every root."""
    option = ("--exclude-if-present", tag) if split else (f"--exclude-if-present={tag}",)
    command = server_run_command(paths=("/etc",), extra=(*option, "--keep-exclude-tags"))
    assert "must be a plain file name" in refusal(command)


def test_a_plain_exclude_tag_passes() -> None:
    command = server_run_command(extra=("--exclude-if-present=.nobackup", "--keep-exclude-tags"))
    request = gk.parse_request(command)
    assert isinstance(request, gk.RunRequest)
    gk.check_run(request, policy(), HOME)
    assert "--exclude-if-present=.nobackup" in request.call.options


def test_options_after_the_double_dash_are_paths(tmp_path: Path) -> None:
    reason = refusal(server_run_command(paths=("/etc", "--pattern=R/root")))
    assert "'--pattern=R/root' is not an absolute path" in reason


@pytest.mark.parametrize(
    "text",
    [
        "R/root\n",
        "- *.tmp\nr /root\n",
        "R\v/root\n",
        "R\x1c/root",
        "- x\rR /root\r",
        "  R\t/root  \n",
        "R.\n",
        "R /etc/../root\n",
    ],
)
def test_a_patterns_file_root_outside_the_policy_is_refused(tmp_path: Path, text: str) -> None:
    patterns = tmp_path / "patterns"
    patterns.write_bytes(text.encode())
    pol = policy(paths=(str(tmp_path), "/etc"))
    command = server_run_command(paths=("/etc",), extra=(f"--patterns-from={patterns}",))
    assert "pattern root in" in refusal(command, pol)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"R /etc\n\xff\n", "is not UTF-8 text"),
        (b"- x\n" * 300_000, "is larger than"),  # 1.2 MB
        (b"x\n", "a pattern must start with one of"),
    ],
)
def test_a_patterns_file_that_cannot_be_read_as_borg_would_is_refused(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    patterns = tmp_path / "patterns"
    patterns.write_bytes(content)
    pol = policy(paths=(str(tmp_path), "/etc"))
    command = server_run_command(paths=("/etc",), extra=("--patterns-from", str(patterns)))
    assert reason in refusal(command, pol)


def test_a_fifo_or_device_is_not_read_as_a_patterns_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    pol = policy(paths=(str(tmp_path), "/dev", "/etc"))
    for path in (fifo, Path("/dev/zero")):
        command = server_run_command(paths=("/etc",), extra=(f"--exclude-from={path}",))
        assert "is not a regular file" in refusal(command, pol)


def test_allowed_patterns_pass_and_borg_gets_a_private_copy(tmp_path: Path) -> None:
    patterns = tmp_path / "patterns"
    patterns.write_text("P re\n- \\.tmp$\nR /etc\n+ /etc/ssl\n! /etc/x\n")
    excludes = tmp_path / "excludes"
    excludes.write_text("/etc/cache\n*.bak\n")
    pol = policy(paths=(str(tmp_path), "/etc", "/home/u"))
    extra = (
        f"--patterns-from={patterns}",
        "--exclude-from",
        str(excludes),
        "--pattern=R/home/u",
        "--pattern=- /home/u/.cache",
    )
    request = gk.parse_request(server_run_command(paths=("/etc",), extra=extra))
    assert isinstance(request, gk.RunRequest)
    gk.check_run(request, pol, HOME)

    with gk.private_pattern_files(request.call, pol) as checked:
        files = [o.partition("=")[2] for o in checked.options if o.startswith("--patterns-from=")]
        files += [o.partition("=")[2] for o in checked.options if o.startswith("--exclude-from=")]
        assert [Path(f).read_text() for f in files] == [patterns.read_text(), excludes.read_text()]
        assert all(Path(f).parent.stat().st_mode & 0o777 == 0o700 for f in files)
        patterns.write_text("R /root\n")  # too late: borg reads the copy
        assert Path(files[0]).read_text().startswith("P re\n")
    assert not any(Path(f).exists() for f in files)
