"""``clients.NAME.borg_version``: 1 (default) is pulled; 2 is refused at load with the reason."""

from __future__ import annotations

from typing import Any

import pytest

from borgtunnel.config import ConfigError, parse_config


def _client(**extra: Any) -> dict[str, Any]:
    return {
        "clients": {
            "web1": {"host": "h", "repository": "/srv/r", "paths": ["/etc"], "encryption": "none"}
            | extra
        }
    }


def test_default_is_borg_1() -> None:
    assert parse_config(_client()).client("web1").borg_version == 1
    assert parse_config(_client(borg_version=1)).client("web1").borg_version == 1


def test_borg_2_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_client(borg_version=2))
    [(key, message)] = caught.value.problems
    assert key == "clients.web1.borg_version"
    assert "borg 2 pull mode is not implemented yet" in message
    assert "OpenSSL >= 3.2" in message


@pytest.mark.parametrize("value", [3, 0, "2", "1.4"])
def test_other_values_are_errors(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_client(borg_version=value))
    assert caught.value.problems[0][0].startswith("clients.web1.borg_version")
