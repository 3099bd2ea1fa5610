"""One client's effective settings and where each came from (``check-config --client NAME``).

Values come from ``Config.redacted()``, so what is secret there (``passphrase_command``, notify
and healthchecks URLs) is masked here too. The ``ssh`` table is shown resolved: a key set in the
client's levels, else in ``[ssh]``, else borgtunnel's built-in value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from borgtunnel.config.merge import BUILT_IN, MERGED_TABLES, Origin
from borgtunnel.config.model import Config

SSH_TABLE: Final = "[ssh]"


@dataclass(frozen=True)
class Setting:
    key: str  # dotted for the keys of a table: ssh.window
    value: Any
    level: str  # built-in, defaults, group NAME, client, [ssh], or "a + b" for an extended list
    file: Path | None  # None for built-in values


@dataclass(frozen=True)
class Effective:
    client: str
    group: str | None
    file: Path | None  # the file the client's table is in
    settings: tuple[Setting, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "group": self.group,
            "file": None if self.file is None else str(self.file),
            "settings": {
                s.key: {
                    "value": s.value,
                    "from": s.level,
                    "file": None if s.file is None else str(s.file),
                }
                for s in self.settings
            },
        }

    def lines(self) -> list[str]:
        head = f"client {self.client}"
        if self.group:
            head += f" (group {self.group})"
        rows = [(s.key, _toml(s.value), _where(s)) for s in self.settings]
        # Aligned comments, but one long list does not push every comment off the screen.
        width = min(max((len(k) + len(v) for k, v, _ in rows), default=0), 50) + 3
        return [
            f"{head} in {self.file}",
            *(f"  {f'{k} = {v}':<{width}} # {w}" for k, v, w in rows),
        ]


def effective(config: Config, name: str) -> Effective:
    client = config.client(name)  # an unknown name raises UnknownClientError
    entry = config.redacted()["clients"][name]
    # What the code uses when the client leaves these unset ([defaults]' reporting keys).
    hooks = config.hooks_for(client)
    entry |= {
        "max_age": config.max_age_for(client),
        "before": [list(argv) for argv in hooks.before],
        "after": [list(argv) for argv in hooks.after],
        "on_failure": [list(argv) for argv in hooks.on_failure],
        "hook_timeout": hooks.timeout,
    }
    origins = config.origins.get(name, {})
    main = config.source
    settings: list[Setting] = []
    for key, value in entry.items():
        if key == "name":
            continue
        if key in MERGED_TABLES and isinstance(value, dict):
            for sub, sub_value in value.items():
                dotted = f"{key}.{sub}"
                origin = origins.get(dotted)
                if origin is None and key == "ssh" and sub in config.ssh.model_fields_set:
                    origin = Origin(level=SSH_TABLE)
                settings.append(_setting(dotted, sub_value, origin, main))
            continue
        settings.append(_setting(key, value, origins.get(key), main))
    client_file = config.client_files.get(name) or main
    return Effective(name, config.groups_of.get(name), client_file, tuple(settings))


def _setting(
    key: str,
    value: Any,  # noqa: ANN401 - JSON-able data
    origin: Origin | None,
    main: Path | None,
) -> Setting:
    if origin is None:
        return Setting(key, value, BUILT_IN, None)
    return Setting(key, value, origin.level, origin.file or main)


def _where(setting: Setting) -> str:
    return setting.level if setting.file is None else f"{setting.level} ({setting.file})"


def _toml(value: Any) -> str:  # noqa: ANN401 - JSON-able data
    """A value written as in the TOML file."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)
