"""No module imports from a layer above its own (docs/architecture.md "Layout").

Every ``import borgtunnel…`` / ``from borgtunnel… import …`` of every module is read with ``ast``
(also the ones inside functions and under ``TYPE_CHECKING``: a lazy import is still a dependency).
Modules of one layer may import each other; a module no layer claims fails the test, so a new
package has to be placed deliberately.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

import borgtunnel

PACKAGE = Path(borgtunnel.__file__).parent

# Bottom to top. A key is a module or a package prefix; the longest matching key wins.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "utilities",
        (
            "borgtunnel",  # __init__: the version only
            "borgtunnel.durations",
            "borgtunnel.text",
            "borgtunnel.redact",
            "borgtunnel.oserrors",
            "borgtunnel.systemd",
            "borgtunnel.logs",
            "borgtunnel.privatedir",
        ),
    ),
    ("configuration", ("borgtunnel.config",)),
    (
        "shared state and borg",
        (
            "borgtunnel.borg",
            "borgtunnel.borg2",
            "borgtunnel.borgexit",
            "borgtunnel.clientborg",
            "borgtunnel.history",
            "borgtunnel.lock",
            "borgtunnel.passphrase",
            "borgtunnel.pauses",
        ),
    ),
    ("client, SSH and server", ("borgtunnel.client", "borgtunnel.ssh", "borgtunnel.server")),
    ("runs", ("borgtunnel.runs",)),
    ("maintenance", ("borgtunnel.maintenance",)),
    # The daemon reports after each run and `status` shows the next planned run: one layer.
    ("service and reporting", ("borgtunnel.scheduling", "borgtunnel.reporting")),
    # Commands of several steps that drive the layers below: enrol, steer a running daemon.
    ("commands", ("borgtunnel.enrolment", "borgtunnel.steer")),
    ("command line", ("borgtunnel.cli", "borgtunnel.arguments", "borgtunnel.__main__")),
)


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the key, layer index)
    for index, (_, keys) in enumerate(LAYERS):
        for key in keys:
            # The bare package key matches only borgtunnel/__init__.py itself.
            matches = module == key or (key != "borgtunnel" and module.startswith(key + "."))
            if matches and (best is None or len(key) > best[0]):
                best = (len(key), index)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every borgtunnel module the file imports; ``from pkg import mod`` counts as ``pkg.mod``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "borgtunnel")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "borgtunnel":
                continue
            found.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*candidate.split("."))
                ).is_dir():
                    found.add(candidate)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    homeless = [module_name(p) for p in MODULES if layer_of(module_name(p)) is None]
    assert not homeless, f"place these modules in a layer of tests/test_layers.py: {homeless}"


def test_relative_imports_are_not_used() -> None:
    # The check below reads absolute names only; a relative import would slip past it.
    relative = [
        f"{module_name(p)}:{node.lineno}"
        for p in MODULES
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert not relative


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_import_from_a_higher_layer(path: Path) -> None:
    own = layer_of(module_name(path))
    assert own is not None
    upward = []
    for target in sorted(imported_modules(path)):
        theirs = layer_of(target)
        if theirs is not None and theirs > own:
            upward.append(f"{target} (layer {LAYERS[theirs][0]!r})")
    assert not upward, (
        f"{module_name(path)} (layer {LAYERS[own][0]!r}) imports from above: {', '.join(upward)}"
    )


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The test itself can fail: an upward import in a file is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("from borgtunnel.scheduling.daemon import Daemon\nimport borgtunnel.cli\n")
    found = imported_modules(probe)
    assert {"borgtunnel.scheduling.daemon", "borgtunnel.cli"} <= found
    assert layer_of("borgtunnel.config.model") == 1
    assert max(layer_of(m) or 0 for m in found) > 1


def test_the_documented_layout_names_the_layers() -> None:
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = doc.split("## Layout", 1)[1]
    for name, _ in LAYERS:
        assert name in layout, f"docs/architecture.md Layout does not name the layer {name!r}"


def test_every_package_is_installed() -> None:
    """setuptools lists packages by hand: a new one missing there is absent from the wheel."""
    listed = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    packages = set(listed["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert found == packages
