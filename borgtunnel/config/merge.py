"""Inheritance: ``[defaults]`` < ``[groups.NAME]`` < ``[clients.NAME]``, on raw TOML tables. Pure.

Each client's effective table is built before pydantic sees it, and where each key came from is
remembered, so that

* a bad value is reported at the key where it was written (``groups.web.port``, not the 300
  ``clients.*.port`` that inherit it), once;
* ``check-config --client NAME`` can say where every setting came from.

Rules (README "Groups, defaults and includes"):

* a key set at a higher level replaces the lower one; the tables ``ssh``, ``retention`` and
  ``check`` merge key by key;
* a list is replaced, unless written as ``{ extend = [...] }``: then it is appended to what the
  lower levels give (built-in: empty);
* ``{client}`` in the template keys is replaced with the client's name; nothing else in braces
  is touched (borg expands ``{hostname}``/``{now}`` in ``archive`` itself);
* ``group`` is a client key only: groups do not nest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict

# Tables whose keys merge one by one across levels.
MERGED_TABLES: Final = frozenset({"ssh", "retention", "check"})
# List-valued keys (the extend form is accepted for these and for ssh.ciphers).
LIST_KEYS: Final = frozenset(
    {
        "paths",
        "exclude",
        "create_args",
        "sources",
        "blackout",
        "notify",
        "before",
        "after",
        "on_failure",
    }
)
LIST_TABLE_KEYS: Final = frozenset({"ssh.ciphers"})
# String settings in which ``{client}`` stands for the client's name (lists: every item).
TEMPLATE_KEYS: Final = frozenset(
    {
        "host",
        "user",
        "repository",
        "remote_socket",
        "passphrase_file",
        "passphrase_command",
        "archive",
        "paths",
        "exclude",
        "create_args",
    }
)
CLIENT_PLACEHOLDER: Final = "{client}"
GROUP_KEY: Final = "group"
EXTEND: Final = "extend"

BUILT_IN: Final = "built-in"
DEFAULTS: Final = "defaults"
CLIENT: Final = "client"


class Origin(BaseModel):
    """Where one effective setting was written: a level and the file holding it."""

    model_config = ConfigDict(frozen=True)

    level: str  # "defaults", "group NAME", "client" (several joined by " + " for an extend)
    file: Path | None = None  # None: the main file

    @property
    def table(self) -> str:
        """The TOML table of the top level: ``defaults``, ``groups.web`` or ``client``."""
        top = self.level.split(" + ")[-1]
        if top.startswith("group "):
            return f"groups.{top.removeprefix('group ')}"
        return top


@dataclass(frozen=True)
class Source:
    """A raw table and the file it was read from (None: the main file)."""

    table: Mapping[str, Any]
    file: Path | None = None


@dataclass
class Merged:
    """Every client's effective raw table, its origins, and what was wrong."""

    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    origins: dict[str, dict[str, Origin]] = field(default_factory=dict)
    groups_of: dict[str, str | None] = field(default_factory=dict)
    problems: list[tuple[Path | None, str, str]] = field(default_factory=list)


def merge_clients(
    client_keys: frozenset[str],
    defaults: Source,
    groups: Mapping[str, Source],
    clients: Mapping[str, Source],
) -> Merged:
    """``client_keys``: the keys a client table may hold (ClientConfig's fields)."""
    out = Merged()
    _check_level(out, DEFAULTS, defaults, client_keys)
    for name, group in groups.items():
        _check_level(out, f"groups.{name}", group, client_keys)
    for name, client in clients.items():
        if not isinstance(client.table, Mapping):
            out.clients[name] = client.table  # pydantic reports the wrong type
            continue
        group_name = client.table.get(GROUP_KEY)
        levels = [(DEFAULTS, defaults)]
        if group_name is not None:
            if not isinstance(group_name, str) or group_name not in groups:
                known = ", ".join(sorted(groups)) or "none"
                out.problems.append(
                    (
                        client.file,
                        f"clients.{name}.{GROUP_KEY}",
                        f"no group {group_name!r} (defined: {known})",
                    )
                )
                continue
            levels.append((f"group {group_name}", groups[group_name]))
        own = {k: v for k, v in client.table.items() if k != GROUP_KEY}
        levels.append((CLIENT, Source(own, client.file)))
        table, origins = _combine(out, name, levels)
        out.clients[name] = _expand(table, name)
        out.origins[name] = origins
        out.groups_of[name] = group_name
    return out


def _check_level(out: Merged, where: str, level: Source, client_keys: frozenset[str]) -> None:
    if not isinstance(level.table, Mapping):
        out.problems.append((level.file, where, "must be a table"))
        return
    for key in level.table:
        if key == GROUP_KEY:
            out.problems.append(
                (level.file, f"{where}.{key}", "groups do not nest: only a client names its group")
            )
        elif key not in client_keys:
            out.problems.append((level.file, f"{where}.{key}", "unknown key (not a client key)"))


def _combine(
    out: Merged, name: str, levels: Sequence[tuple[str, Source]]
) -> tuple[dict[str, Any], dict[str, Origin]]:
    table: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for level, source in levels:
        if not isinstance(source.table, Mapping):
            continue
        where = _table_of(level, name)
        for key, value in source.table.items():
            if key == GROUP_KEY:
                continue
            if key in MERGED_TABLES and isinstance(value, Mapping):
                inner = dict(table[key]) if isinstance(table.get(key), Mapping) else {}
                for sub, sub_value in value.items():
                    dotted = f"{key}.{sub}"
                    inner[sub] = _value(
                        out,
                        source.file,
                        f"{where}.{dotted}",
                        dotted,
                        below=inner.get(sub),
                        value=sub_value,
                    )
                    origins[dotted] = _origin(origins.get(dotted), level, source.file, sub_value)
                table[key] = inner
                continue
            table[key] = _value(
                out, source.file, f"{where}.{key}", key, below=table.get(key), value=value
            )
            origins[key] = _origin(origins.get(key), level, source.file, value)
    return table, origins


def _table_of(level: str, name: str) -> str:
    if level.startswith("group "):
        return f"groups.{level.removeprefix('group ')}"
    return f"clients.{name}" if level == CLIENT else level


def _is_extend(value: Any) -> bool:  # noqa: ANN401 - raw TOML value
    return isinstance(value, Mapping) and EXTEND in value


def _value(
    out: Merged,
    file: Path | None,
    where: str,
    key: str,
    *,
    below: Any,  # noqa: ANN401 - raw TOML value
    value: Any,  # noqa: ANN401 - raw TOML value
) -> Any:  # noqa: ANN401 - raw TOML value
    if not _is_extend(value):
        return value
    problem = None
    if key not in LIST_KEYS and key not in LIST_TABLE_KEYS:
        problem = "{ extend = [...] } is only for list settings"
    elif set(value) != {EXTEND} or not isinstance(value[EXTEND], list):
        problem = "write { extend = [...] }: one key, a list"
    elif below is not None and not isinstance(below, list):
        problem = "cannot extend: the inherited value is not a list"
    if problem is not None:
        out.problems.append((file, where, problem))
        return below
    return [*(below or ()), *value[EXTEND]]


def _origin(
    below: Origin | None,
    level: str,
    file: Path | None,
    value: Any,  # noqa: ANN401 - raw TOML value
) -> Origin:
    if _is_extend(value) and below is not None:
        return Origin(level=f"{below.level} + {level}", file=file)
    return Origin(level=level, file=file)


def _expand(table: dict[str, Any], name: str) -> dict[str, Any]:
    """Replace ``{client}`` in the template keys; other braces are left for borg."""
    expanded = dict(table)
    for key in TEMPLATE_KEYS & table.keys():
        value = table[key]
        if isinstance(value, str):
            expanded[key] = value.replace(CLIENT_PLACEHOLDER, name)
        elif isinstance(value, list):
            expanded[key] = [
                v.replace(CLIENT_PLACEHOLDER, name) if isinstance(v, str) else v for v in value
            ]
    return expanded
