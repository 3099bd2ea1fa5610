"""``clients.NAME.borg_version`` and what it decides at load time: borg 2's defaults, and the
settings borg 2 cannot honour, refused naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from borgtunnel.config import ConfigError, parse_config

SERVER = {"borg2": "/opt/borg2/bin/borg"}


def _config(server: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    client = {"host": "h", "repository": "/srv/r", "paths": ["/etc"], "encryption": "none"}
    return {"server": server or {}, "clients": {"web1": client | extra}}


def _borg2(**extra: Any) -> dict[str, Any]:
    base = {"borg_version": 2, "passphrase_file": "/etc/borgtunnel/web1.pass"}
    config = _config(SERVER, **base, **extra)
    if "encryption" not in extra:
        del config["clients"]["web1"]["encryption"]
    return config


def _problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return list(caught.value.problems)


def test_default_is_borg_1() -> None:
    assert parse_config(_config()).client("web1").borg_version == 1
    assert parse_config(_config(borg_version=1)).client("web1").borg_version == 1


def test_borg_2_gets_its_own_defaults_and_the_server_borg_2() -> None:
    config = parse_config(_borg2())
    client = config.client("web1")
    assert client.borg2
    assert client.encryption == "aes256-ocb"
    assert client.archive == "{hostname}"  # a series
    assert client.serve_permissions == "write-only"
    assert config.borg_for(client) == SERVER["borg2"]
    assert config.borg_for(parse_config(_config(SERVER)).client("web1")) == "borg"


def test_borg_2_without_a_server_borg_2_names_the_key() -> None:
    data = _borg2()
    data["server"] = {}
    [(key, message)] = _problems(data)
    assert key == "clients.web1.borg_version"
    assert "[server] borg2" in message


@pytest.mark.parametrize(
    ("permissions", "reason"),
    [("all", "delete"), ("read-only", "no archive can be written"), ("anything", "one of")],
)
def test_unsafe_or_unusable_permissions_are_refused(permissions: str, reason: str) -> None:
    [(key, message)] = _problems(_borg2(permissions=permissions))
    assert key == "clients.web1.permissions"
    assert reason in message


def test_no_delete_is_allowed() -> None:
    assert parse_config(_borg2(permissions="no-delete")).client("web1").serve_permissions == (
        "no-delete"
    )


def test_permissions_belong_to_borg_2_only() -> None:
    [(key, message)] = _problems(_config(permissions="write-only"))
    assert key == "clients.web1.permissions"
    assert "append-only" in message


def test_storage_quota_cannot_be_enforced_by_borg_2() -> None:
    [(key, message)] = _problems(_borg2(storage_quota="100G"))
    assert key == "clients.web1.storage_quota"
    assert "no --storage-quota" in message


@pytest.mark.parametrize(
    ("version", "encryption"), [(2, "repokey-blake2"), (2, "none"), (1, "aes256-ocb")]
)
def test_encryption_must_be_of_the_version(version: int, encryption: str) -> None:
    data = _borg2(encryption=encryption) if version == 2 else _config(encryption=encryption)
    if version == 1:
        data["clients"]["web1"]["passphrase_file"] = "/p"
    problems = _problems(data)
    assert ("clients.web1.encryption", problems[0][1]) == problems[0]
    assert f"not a borg {version} mode" in problems[0][1]


@pytest.mark.parametrize("value", [3, 0, "2", "1.4"])
def test_other_values_are_errors(value: object) -> None:
    problems = _problems(_config(borg_version=value))
    assert problems[0][0].startswith("clients.web1.borg_version")


def test_two_clients_cannot_share_a_repository() -> None:
    data = _config()
    data["clients"]["web2"] = dict(data["clients"]["web1"])
    [(key, message)] = _problems(data)
    assert key == "clients.web2.repository"
    assert "also clients.web1.repository" in message
