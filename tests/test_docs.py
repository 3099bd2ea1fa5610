"""The documentation stays navigable and honest: every relative link and #anchor in README.md
and docs/ resolves (anchors as GitHub makes them), every test the docs cite as evidence exists,
every configuration example marked as tested is accepted by `borgtunnel check-config`, and every
key borgtunnel accepts is listed in docs/configuration.md's key index."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import unicodedata
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from borgtunnel.config import CheckSettings, ClientConfig, Config, RetentionSettings
from borgtunnel.config.model import SSHOptions

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Files whose links are checked; systemd/README.md is linked from the map and links back.
LINKED = [ROOT / "README.md", *DOCS, ROOT / "systemd" / "README.md"]
# Files whose cited tests and tested configuration blocks are checked.
CITING = [ROOT / "README.md", *DOCS]
CONFIGURATION_DOC = ROOT / "docs" / "configuration.md"

FENCE = re.compile(r"^ {0,3}```.*?^ {0,3}```[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"\[(?:[^\]\n]|\n(?!\n))*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text with fenced code blocks blanked (same length, so offsets stay meaningful)."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): the rendered text lowercased, every
    character but letters, digits, marks, `_`, `-` and spaces dropped, spaces made `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("*", "")
    kept = (
        char for char in text.lower() if char in " -_" or unicodedata.category(char)[0] in "LNM"
    )
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a markdown file; a repeated heading gets -1, -2 … like on GitHub."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for match in HEADING.finditer(prose(path.read_text())):
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(path: Path) -> Iterator[str]:
    return links_in(path.read_text())


def links_in(markdown: str) -> Iterator[str]:
    """Link targets in the prose, not inside code blocks or code spans."""
    text = prose(markdown)
    spans = [match.span() for match in CODE_SPAN.finditer(text)]
    for match in LINK.finditer(text):
        if not any(start <= match.start() < end for start, end in spans):
            yield match.group(1)


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_a_doc_opens_with_its_summary_and_the_way_back(path: Path) -> None:
    title, blank, summary = path.read_text().split("\n")[:3]
    assert title.startswith("# "), f"{rel(path)}: the first line is not a title"
    assert blank == "", f"{rel(path)}: no blank line after the title"
    assert "](../README.md#documentation)" in summary, (
        f"{rel(path)}: the line after the title is not a summary linking back to the README map"
    )


def test_every_doc_is_in_the_readme_map() -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Documentation\n")
    end = text.find("\n## ", start + 1)
    mapped = set(links_in(text[start : end if end != -1 else None]))
    missing = [rel(path) for path in DOCS if rel(path) not in mapped]
    assert not missing, f"docs files not in the README's Documentation table: {missing}"


def test_github_slug_matches_what_github_makes() -> None:
    # Anchors GitHub generated for headings of this kind (quotes, colons, code, repeats).
    assert github_slug("Gatekeeper: the server's key can only pull") == (
        "gatekeeper-the-servers-key-can-only-pull"
    )
    assert github_slug("Sockets `borgtunnel serve` accepts") == "sockets-borgtunnel-serve-accepts"
    assert github_slug("Keeping repositories healthy: retention, compact, check") == (
        "keeping-repositories-healthy-retention-compact-check"
    )
    assert github_slug("Tamper-aware compact") == "tamper-aware-compact"
    assert github_slug("borg 2") == "borg-2"


@pytest.mark.parametrize("path", LINKED, ids=rel)
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    broken = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: …: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: {rel(linked)} has no heading with anchor #{anchor}")
    assert not broken, f"{rel(path)}:\n  " + "\n  ".join(broken)


def defined_tests() -> dict[str, set[str]]:
    """Each test file's test function names (also methods and async ones)."""
    pattern = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(test_\w+)", re.MULTILINE)
    return {path.name: set(pattern.findall(path.read_text())) for path in TESTS.glob("test_*.py")}


CITED = re.compile(r"^(?:tests/)?(test_\w+\.py)(?:::(test_\w+))?$|^::(test_\w+)$|^(test_\w+)$")


def cited_tests(path: Path) -> Iterator[tuple[str | None, str | None, str]]:
    """(file, function, as written) for each test cited in a code span, in order. A
    ``::test_name`` continues the file named last before it; a bare ``test_name`` may be in
    any file."""
    current: str | None = None
    for span in CODE_SPAN.finditer(path.read_text()):
        word = span.group(0)[1:-1]
        match = CITED.match(word)
        if match is None:
            continue
        file_name, function, continued, bare = match.groups()
        if file_name:
            current = file_name
            yield file_name, function, word
        elif continued:
            yield current, continued, word
        else:
            yield None, bare, word


@pytest.mark.parametrize("path", CITING, ids=rel)
def test_every_cited_test_exists(path: Path) -> None:
    functions = defined_tests()
    everywhere = set().union(*functions.values())
    missing = []
    for file_name, function, written in cited_tests(path):
        if file_name is None and function is not None and written.startswith("::"):
            missing.append(f"{written}: continues no test file named before it")
        elif file_name is not None and file_name not in functions:
            missing.append(f"{written}: no tests/{file_name}")
        elif file_name is not None and function and function not in functions[file_name]:
            missing.append(f"{written}: tests/{file_name} has no {function}")
        elif file_name is None and function not in everywhere:
            missing.append(f"{written}: no test function of that name in tests/")
    assert not missing, f"{rel(path)} cites tests that do not exist:\n  " + "\n  ".join(missing)


def test_the_threat_model_cites_tests() -> None:
    # The check above must have something to hold: the security model's claims name tests.
    cited = list(cited_tests(ROOT / "docs" / "security.md"))
    assert len([c for c in cited if c[1]]) > 50
    assert any(written.startswith("::") for *_, written in cited)


def marked_blocks(kind: str) -> Iterator[tuple[Path, int, str]]:
    """(file, line, text) of each ```toml block right after ``<!-- tested: KIND -->``."""
    pattern = re.compile(
        rf"^<!-- tested: {re.escape(kind)} -->\n```toml\n(.*?)^```$", re.MULTILINE | re.DOTALL
    )
    for path in CITING:
        text = path.read_text()
        for match in pattern.finditer(text):
            yield path, text.count("\n", 0, match.start()) + 1, match.group(1)


def blocks_as_params(kind: str) -> list[Any]:
    return [pytest.param(*found, id=f"{rel(found[0])}:{found[1]}") for found in marked_blocks(kind)]


def toml_text(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for the value types configuration examples use (JSON's literals are valid TOML)."""
    scalars = [f"{json.dumps(key)} = {json.dumps(value)}" for key, value in data.items()
               if not isinstance(value, Mapping)]  # fmt: skip
    text = (f"[{prefix}]\n" if prefix else "") + "".join(line + "\n" for line in scalars)
    for key, value in data.items():
        if isinstance(value, Mapping):
            text += toml_text(value, f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key))
    return text


def merged(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in overlay.items():
        old = result.get(key)
        both_tables = isinstance(old, Mapping) and isinstance(value, Mapping)
        result[key] = merged(old, value) if both_tables else value  # type: ignore[arg-type]
    return result


def check_config(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "borgtunnel.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "borgtunnel", "--config", str(path), "check-config", "--quiet"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def test_toml_text_round_trips() -> None:
    data = {"a": 1, "s": 'q"\\\n', "l": [["x", "{y}"]], "t": {"u": {"v": True}, "w": 1.5}}
    assert tomllib.loads(toml_text(data)) == data


@pytest.mark.parametrize(("path", "line", "block"), blocks_as_params("config"))
def test_a_full_configuration_example_is_accepted(
    path: Path, line: int, block: str, tmp_path: Path
) -> None:
    done = check_config(block, tmp_path)
    assert done.returncode == 0, f"{rel(path)}:{line}: check-config says:\n{done.stderr}"


def base_configuration() -> str:
    blocks = [b for p, _, b in marked_blocks("config") if p == CONFIGURATION_DOC]
    assert blocks, "docs/configuration.md has no block marked <!-- tested: config -->"
    return blocks[0]


@pytest.mark.parametrize(("path", "line", "block"), blocks_as_params("config-fragment"))
def test_a_fragment_on_the_configuration_example_is_accepted(
    path: Path, line: int, block: str, tmp_path: Path
) -> None:
    """A fragment (one feature's keys) is checked merged onto docs/configuration.md's example."""
    combined = merged(tomllib.loads(base_configuration()), tomllib.loads(block))
    done = check_config(toml_text(combined), tmp_path)
    assert done.returncode == 0, f"{rel(path)}:{line}: check-config says:\n{done.stderr}"


def test_the_checked_examples_are_there() -> None:
    # Without the markers the two tests above would pass by checking nothing.
    assert {p.name for p, _, _ in marked_blocks("config")} >= {
        "README.md", "configuration.md", "reporting.md"
    }  # fmt: skip
    assert {p.name for p, _, _ in marked_blocks("config-fragment")} >= {
        "daemon.md", "maintenance.md"
    }  # fmt: skip


def test_a_broken_example_would_be_caught(tmp_path: Path) -> None:
    done = check_config(base_configuration().replace("port = 22", "prot = 22"), tmp_path)
    assert done.returncode == 78
    assert "clients.web1.prot" in done.stderr


def keys(model: type[BaseModel]) -> set[str]:
    return {
        field.validation_alias if isinstance(field.validation_alias, str) else name
        for name, field in model.model_fields.items()
        if not field.exclude
    } - {"__borgtunnel_client_name__"}


def test_every_configuration_key_is_in_the_key_index() -> None:
    text = CONFIGURATION_DOC.read_text()
    start = text.index("## Every key and where it is described")
    index = text[start : text.index("\n## ", start + 1)]
    listed = {span[1:-1] for span in CODE_SPAN.findall(index)}
    expected = {f"[{table}]" for table in keys(Config)}
    for field in Config.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            expected |= keys(field.annotation)
    for model in (ClientConfig, SSHOptions, RetentionSettings, CheckSettings):
        expected |= keys(model)
    expected.discard("[clients]")
    missing = sorted(expected - listed)
    assert not missing, (
        f"keys borgtunnel accepts but docs/configuration.md's key index does not list: {missing}"
    )
