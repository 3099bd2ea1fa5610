"""Reading the configuration: the main file, its includes, inheritance, then validation.

``load_config`` is the one entry point (the CLI, and the daemon on SIGHUP, so a reload re-reads
every included file). Every problem is reported as ``FILE: dotted.key: message``; the file is left
out for the main file, whose name heads the error.
"""

from __future__ import annotations

import glob
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from borgtunnel.config.merge import CLIENT, GROUP_KEY, Origin, Source, merge_clients
from borgtunnel.config.model import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ClientConfig,
    Config,
    ConfigError,
    bad_client_name,
    cross_problems,
    problems_from,
)
from borgtunnel.config.reporting import ClientDefaults

INCLUDE: Final = "include"
GROUPS: Final = "groups"
CLIENTS: Final = "clients"
DEFAULTS: Final = "defaults"
# What the main file may hold; the loader's own fields of Config (source, origins) are not keys.
MAIN_KEYS: Final = frozenset(
    {"server", "daemon", "ssh", "notify", "metrics", DEFAULTS, CLIENTS, GROUPS, INCLUDE}
)
INCLUDED_KEYS: Final = frozenset({CLIENTS, GROUPS})
# `name` is filled in from the table key; `group` is read by the merge.
CLIENT_KEYS: Final = frozenset(ClientConfig.model_fields) - {"name"} | {GROUP_KEY}

Problem = tuple[Path | None, str, str]  # (file or None for the main file, dotted key, message)


def read_toml(path: Path) -> dict[str, Any]:
    """One TOML file; a failure is a ConfigError naming it."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, [("", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [("", f"not UTF-8: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [("", f"TOML syntax error: {exc}")]) from None


def load_config(path: Path) -> Config:
    """Read and validate the main file and everything it includes."""
    return parse_config(read_toml(path), source=path)


def config_path(cli_value: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """--config wins over $BORGTUNNEL_CONFIG, which wins over the default path."""
    if cli_value:
        return Path(cli_value)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def parse_config(data: Mapping[str, Any], source: Path | None = None) -> Config:
    """Validate the main file's data; ``include`` paths are relative to ``source``'s directory."""
    base = source.parent if source is not None else Path.cwd()
    problems: list[Problem] = [
        (None, str(key), "unknown key (check the spelling)") for key in data if key not in MAIN_KEYS
    ]
    clients: dict[str, Source] = {}
    groups: dict[str, Source] = {}
    _collect(problems, clients, groups, data, file=None, base=base)
    for included in _included_files(problems, data.get(INCLUDE, []), base, source):
        try:
            table = read_toml(included)
        except ConfigError as exc:
            problems.extend((included, key, message) for key, message in exc.problems)
            continue
        problems.extend(
            (included, str(key), "an included file may hold only [clients.*] and [groups.*]")
            for key in table
            if key not in INCLUDED_KEYS
        )
        _collect(problems, clients, groups, table, file=included, base=base)
    defaults = data.get(DEFAULTS, {})
    merged = merge_clients(CLIENT_KEYS, Source(defaults), groups, clients)
    # A value in [defaults] or a group is merged into every member: report its problem once.
    problems.extend(dict.fromkeys(merged.problems))
    if problems:
        raise ConfigError(source, _rendered(problems, base))

    reporting_defaults = (
        {k: v for k, v in defaults.items() if k in ClientDefaults.model_fields}
        if isinstance(defaults, Mapping)
        else defaults
    )
    rest = {k: v for k, v in data.items() if k not in {INCLUDE, GROUPS, DEFAULTS, CLIENTS}}
    model_data = {**rest, DEFAULTS: reporting_defaults, CLIENTS: merged.clients}
    try:
        config = Config.model_validate(model_data)
    except ValidationError as exc:
        raise ConfigError(
            source, _rendered(_placed(problems_from(exc), merged.origins, clients), base)
        ) from None
    if cross := cross_problems(config):
        raise ConfigError(source, _rendered(_placed(cross, merged.origins, clients), base))
    return config.model_copy(
        update={
            "source": source,
            "origins": merged.origins,
            "groups_of": merged.groups_of,
            "client_files": {name: entry.file for name, entry in clients.items()},
        }
    )


def _included_files(
    problems: list[Problem], patterns: object, base: Path, main: Path | None
) -> list[Path]:
    """Every file the ``include`` patterns name: each glob's matches sorted, each file once."""
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        problems.append((None, INCLUDE, "must be a list of file paths or globs"))
        return []
    files: dict[Path, None] = {}
    for index, pattern in enumerate(patterns):
        full = Path(pattern).expanduser()
        full = full if full.is_absolute() else base / full
        if glob.has_magic(str(full)):
            # glob.glob, not Path.glob: wildcards may be in any part, the directories too.
            found = glob.glob(str(full))  # noqa: PTH207
            matches = sorted(Path(m) for m in found if Path(m).is_file())
        elif full.is_file():
            matches = [full]
        else:
            problems.append((None, f"{INCLUDE}[{index}]", f"{str(full)!r}: no such file"))
            continue
        for match in matches:
            if main is not None and match.resolve() == main.resolve():
                problems.append(
                    (None, f"{INCLUDE}[{index}]", f"{pattern!r} matches the main file itself")
                )
            else:
                files.setdefault(match)
    return list(files)


def _collect(
    problems: list[Problem],
    clients: dict[str, Source],
    groups: dict[str, Source],
    table: Mapping[str, Any],
    *,
    file: Path | None,
    base: Path,
) -> None:
    """Add the file's clients and groups; a name another file already defines is an error."""
    for kind, into in ((CLIENTS, clients), (GROUPS, groups)):
        entries = table.get(kind, {})
        if not isinstance(entries, Mapping):
            problems.append((file, kind, "must be a table of tables"))
            continue
        for name, entry in entries.items():
            if kind == CLIENTS and (bad := bad_client_name(name)) is not None:
                problems.append((file, kind, bad))  # Config checks it too, without the file
                continue
            if name in into:
                first = into[name].file
                problems.append(
                    (file, f"{kind}.{name}", f"defined twice, also in {_label(first, base)}")
                )
                continue
            into[name] = Source(entry, file)


def _placed(
    problems: list[tuple[str, str]],
    origins: Mapping[str, Mapping[str, Origin]],
    clients: Mapping[str, Source],
) -> list[Problem]:
    """Move each ``clients.NAME.KEY`` problem to where KEY was written (file, level); once."""
    placed: dict[Problem, None] = {}
    for key, message in problems:
        where: Problem = (None, key, message)
        parts = key.split(".", 2)
        if len(parts) >= 2 and parts[0] == CLIENTS and parts[1] in clients:
            name, rest = parts[1], parts[2] if len(parts) == 3 else ""
            origin = _origin_of(origins.get(name, {}), rest)
            if origin is None or origin.table == CLIENT:
                where = (clients[name].file, key, message)
            else:
                # Written once, inherited by many: say so, and report it once.
                where = (origin.file, f"{origin.table}.{rest}", message)
        placed.setdefault(where)
    return list(placed)


def _origin_of(origins: Mapping[str, Origin], rest: str) -> Origin | None:
    """The origin of the longest known key that ``rest`` (``paths[2]``, ``ssh.window``) is in."""
    candidate = rest.split("[", 1)[0]
    while candidate:
        if candidate in origins:
            return origins[candidate]
        candidate = candidate.rpartition(".")[0]
    return None


def _label(file: Path | None, base: Path) -> str:
    """A file as an administrator finds it: relative to the main file's directory if inside."""
    if file is None:
        return "the main file"
    return str(file.relative_to(base)) if file.is_relative_to(base) else str(file)


def _rendered(problems: list[Problem], base: Path) -> list[tuple[str, str]]:
    out = []
    for file, key, message in problems:
        if file is None:
            out.append((key, message))
        else:
            out.append((f"{_label(file, base)}: {key}" if key else _label(file, base), message))
    return out
