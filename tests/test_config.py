"""Configuration: the TOML contract of issue #2, its defaults, and how every error is reported.

An administrator reads these messages with hundreds of clients in one file, so each problem must
name its key as a dotted path; the CLI tests check the same through ``borgtunnel.cli.main``.
"""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from borgtunnel import cli
from borgtunnel.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_SSH,
    Config,
    ConfigError,
    UnknownClientError,
    config_path,
    load_config,
    parse_config,
)

# The example of issue #2, with NAME spelled web1 and the optional per-client ssh table present.
ISSUE_EXAMPLE = """\
[server]
socket_dir = "/run/borgtunnel"     # local sockets; directory created 0700, sockets 0600
state_dir  = "/var/lib/borgtunnel"
borg       = "borg"                # server-side borg executable

[ssh]                              # defaults for every client
identity = "/etc/borgtunnel/id_ed25519"
known_hosts = "/etc/borgtunnel/known_hosts"
keepalive_interval = 10
keepalive_count_max = 30
connect_timeout = 30

[clients.web1]
host = "client.example.org"
port = 22
user = "root"
repository = "/srv/borg/web1"      # absolute path on the server
paths = ["/etc", "/home"]          # required, non-empty
exclude = []                       # borg exclude patterns
archive = "{hostname}-{now}"       # borg placeholders expanded by borg on the client
encryption = "repokey-blake2"      # used by `init`; "none" allowed
passphrase_file = "/etc/borgtunnel/web1.passphrase"
create_args = []                   # extra `borg create` options
remote_borg = "borg"
remote_socket = "~/.cache/borgtunnel/web1.sock"

[clients.web1.ssh]                 # optional: overrides any [ssh] key for this client
"""

SECRET_COMMAND = "pass show borg/web1 --token=s3cr3t-T0KEN"


_REPOSITORIES = itertools.count()


def minimal_client(**overrides: Any) -> dict[str, Any]:
    """The fewest keys a client needs; unencrypted so no passphrase option is required. Each
    gets a repository of its own (two clients may not share one)."""
    base = {
        "host": "h.example",
        "repository": f"/srv/r{next(_REPOSITORIES)}",
        "paths": ["/etc"],
        "encryption": "none",
    }
    return base | overrides


def problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return list(caught.value.problems)


def only_problem(data: dict[str, Any]) -> tuple[str, str]:
    found = problems(data)
    assert len(found) == 1, found
    return found[0]


def write(tmp_path: Path, text: str, name: str = "borgtunnel.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- a valid file and its defaults ------------------------------------------------------------


def test_issue_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ISSUE_EXAMPLE))
    web1 = config.client("web1")
    assert config.source == tmp_path / "borgtunnel.toml"
    assert web1.name == "web1"
    assert web1.host == "client.example.org"
    assert web1.paths == ("/etc", "/home")
    assert web1.repository == Path("/srv/borg/web1")
    assert web1.passphrase_file == Path("/etc/borgtunnel/web1.passphrase")
    assert web1.remote_socket_path == "~/.cache/borgtunnel/web1.sock"
    assert config.server.socket_dir == Path("/run/borgtunnel")
    assert config.ssh_for(web1).known_hosts == Path("/etc/borgtunnel/known_hosts")


def test_client_defaults() -> None:
    client = parse_config(
        {
            "clients": {
                "db": {"host": "h", "repository": "/r", "paths": ["/"], "passphrase_file": "/p"}
            }
        }
    ).client("db")
    assert client.port == 22
    assert client.user == "root"
    assert client.archive == "{hostname}-{now}"
    assert client.encryption == "repokey-blake2"
    assert client.exclude == ()
    assert client.create_args == ()
    assert client.remote_borg == "borg"
    assert client.remote_socket_path == "~/.cache/borgtunnel/db.sock"


def test_ssh_layers_merge_key_by_key() -> None:
    config = parse_config(
        {
            "ssh": {"keepalive_interval": 5, "connect_timeout": 7, "identity": "/k/global"},
            "clients": {
                "a": minimal_client(ssh={"connect_timeout": 99}),
                "b": minimal_client(),
            },
        }
    )
    a = config.ssh_for(config.client("a"))
    b = config.ssh_for(config.client("b"))
    # [clients.a.ssh] overrides only the key it sets ...
    assert a.connect_timeout == 99
    # ... [ssh] still applies to the keys it does not set ...
    assert a.keepalive_interval == 5
    assert a.identity == Path("/k/global")
    # ... and DEFAULT_SSH fills whatever neither layer sets.
    assert a.keepalive_count_max == DEFAULT_SSH.keepalive_count_max
    assert a.known_hosts == DEFAULT_SSH.known_hosts
    assert a.ciphers == DEFAULT_SSH.ciphers
    assert a.agent is False
    assert b.connect_timeout == 7
    assert b.keepalive_interval == 5


def test_no_ssh_table_gives_the_documented_defaults() -> None:
    config = parse_config({"clients": {"a": minimal_client()}})
    settings = config.ssh_for(config.client("a"))
    assert settings.identity == Path("/etc/borgtunnel/id_ed25519")
    assert settings.known_hosts == Path("/etc/borgtunnel/known_hosts")
    assert (settings.keepalive_interval, settings.keepalive_count_max) == (10, 30)
    assert settings.connect_timeout == 30
    assert settings.ciphers[0].startswith("aes128-gcm")


def test_client_may_turn_off_what_ssh_turned_on() -> None:
    """A falsy override (agent = false) is still an override, not "unset"."""
    config = parse_config(
        {"ssh": {"agent": True}, "clients": {"a": minimal_client(ssh={"agent": False})}}
    )
    assert config.ssh_for(config.client("a")).agent is False


# --- each error names its dotted key ----------------------------------------------------------


def test_wrong_type_is_reported_with_dotted_key() -> None:
    key, message = only_problem({"clients": {"web1": minimal_client(port="twenty-two")}})
    assert key == "clients.web1.port"
    assert message.startswith("Input should be a valid integer")


@pytest.mark.parametrize(
    ("data", "expected_key"),
    [
        ({"clinets": {}}, "clinets"),
        ({"server": {"sokcet_dir": "/x"}}, "server.sokcet_dir"),
        ({"ssh": {"idenity": "/x"}}, "ssh.idenity"),
        ({"daemon": {"max_paralel": 2}}, "daemon.max_paralel"),
        ({"clients": {"web1": minimal_client(hots="x")}}, "clients.web1.hots"),
        ({"clients": {"web1": minimal_client(ssh={"idenity": "/x"})}}, "clients.web1.ssh.idenity"),
        # The client's name is its table key; a `name` key would silently disagree with it.
        ({"clients": {"web1": minimal_client(name="other")}}, "clients.web1.name"),
    ],
    ids=["top", "server", "ssh", "daemon", "client", "client-ssh", "name-key"],
)
def test_unknown_key_is_an_error(data: dict[str, Any], expected_key: str) -> None:
    assert only_problem(data) == (expected_key, "unknown key (check the spelling)")


@pytest.mark.parametrize(
    ("overrides", "expected_key", "fragment"),
    [
        ({"repository": "srv/borg"}, "clients.web1.repository", "absolute"),
        ({"paths": []}, "clients.web1.paths", "at least 1"),
        ({"paths": ["/etc", "home"]}, "clients.web1.paths", "'home' must be an absolute path"),
        ({"paths": ["-"]}, "clients.web1.paths", "absolute"),
        ({"archive": "daily/x"}, "clients.web1.archive", "'/'"),
        ({"archive": "  "}, "clients.web1.archive", "empty"),
        ({"passphrase_file": "/etc/p"}, "clients.web1", "encryption is 'none'"),
        ({"encryption": "repokey"}, "clients.web1", "needs passphrase_file or passphrase_command"),
        (
            {"encryption": "repokey", "passphrase_file": "/p", "passphrase_command": "cat /p"},
            "clients.web1",
            "only one of",
        ),
        ({"encryption": "rot13"}, "clients.web1.encryption", "'repokey-blake2'"),
        ({"remote_socket": "sock/web1.sock"}, "clients.web1.remote_socket", "absolute"),
        ({"remote_socket": "/" + "s" * 120}, "clients.web1.remote_socket", "longer than"),
        ({"remote_socket": "/tmp/a\nb.sock"}, "clients.web1.remote_socket", "newline"),
        ({"schedule": "61 * * * *"}, "clients.web1.schedule", "minute"),
        ({"schedule": "every day"}, "clients.web1.schedule", "5 fields"),
        ({"blackout": ["Funday 01:00-02:00"]}, "clients.web1.blackout", "Funday"),
        ({"blackout": ["daily 00:00-24:00"]}, "clients.web1.blackout", "whole week"),
        ({"port": 0}, "clients.web1.port", "greater than or equal to 1"),
        ({"retries": -1}, "clients.web1.retries", "greater than or equal to 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_client_value_errors(overrides: dict[str, Any], expected_key: str, fragment: str) -> None:
    key, message = only_problem({"clients": {"web1": minimal_client(**overrides)}})
    assert key == expected_key
    assert fragment in message


@pytest.mark.parametrize("name", ["web 1", "../x", "-web", ".hidden", "a/b", "x" * 65, ""])
def test_bad_client_names(name: str) -> None:
    key, message = only_problem({"clients": {name: minimal_client()}})
    assert key == "clients"
    assert repr(name) in message


def test_bad_timezone_is_reported() -> None:
    key, message = only_problem({"daemon": {"timezone": "Mars/Olympus_Mons"}})
    assert key == "daemon.timezone"
    assert "Mars/Olympus_Mons" in message


def test_relative_server_dirs_are_refused() -> None:
    key, message = only_problem({"server": {"socket_dir": "run/borgtunnel"}})
    assert (key, message) == ("server.socket_dir", "must be an absolute path")


def test_all_problems_are_reported_at_once() -> None:
    found = problems(
        {
            "server": {"state_dir": "relative"},
            "clients": {
                "web1": minimal_client(port="x", paths=[]),
                "db": minimal_client(hots="typo", repository="r"),
            },
        }
    )
    keys = {key for key, _ in found}
    assert keys == {
        "server.state_dir",
        "clients.web1.port",
        "clients.web1.paths",
        "clients.db.hots",
        "clients.db.repository",
    }


def test_error_text_names_file_and_each_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        [clients.web1]
        host = "h"
        port = "x"
        repository = "/r"
        paths = []
        encryption = "none"
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}: invalid configuration"
    assert any(
        line.strip().startswith("clients.web1.port: Input should be a valid integer")
        for line in lines
    )
    assert any(line.strip().startswith("clients.web1.paths: ") for line in lines)


# --- reading the file -------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == path
    assert str(path) in str(caught.value)
    assert "No such file" in str(caught.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[clients.web1\nhost = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert "TOML syntax error" in str(caught.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[clients.caf\xe9]\nhost = "h"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert "not UTF-8" in str(caught.value)


def test_a_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_config_path_precedence() -> None:
    env = {CONFIG_ENV: "/from/env.toml"}
    assert config_path("/from/cli.toml", env) == Path("/from/cli.toml")
    assert config_path(None, env) == Path("/from/env.toml")
    assert config_path(None, {}) == DEFAULT_CONFIG_PATH
    assert config_path(None, {CONFIG_ENV: ""}) == DEFAULT_CONFIG_PATH


def test_unknown_client_lookup_lists_the_configured_ones() -> None:
    config = parse_config({"clients": {"web1": minimal_client(), "db": minimal_client()}})
    with pytest.raises(UnknownClientError) as caught:
        config.client("mail")
    assert str(caught.value) == "no client 'mail' in the configuration (configured: db, web1)"


# --- redacted view ----------------------------------------------------------------------------


def _config_with_secret_command() -> Config:
    return parse_config(
        {
            "ssh": {"connect_timeout": 5},
            "clients": {
                "web1": minimal_client(encryption="repokey", passphrase_command=SECRET_COMMAND),
                "db": minimal_client(ssh={"connect_timeout": 42}),
            },
        }
    )


def test_redacted_hides_passphrase_command_and_shows_effective_ssh() -> None:
    data = _config_with_secret_command().redacted()
    text = json.dumps(data)
    assert "s3cr3t" not in text
    assert "pass show" not in text
    assert data["clients"]["web1"]["passphrase_command"] == "<hidden>"
    assert data["clients"]["web1"]["ssh"]["connect_timeout"] == 5
    assert data["clients"]["db"]["ssh"]["connect_timeout"] == 42
    assert data["clients"]["db"]["ssh"]["known_hosts"] == "/etc/borgtunnel/known_hosts"
    assert data["clients"]["db"]["remote_socket"] == "~/.cache/borgtunnel/db.sock"
    # Only per-client effective settings: a global [ssh] block would suggest it is used as-is.
    assert "ssh" not in data


# --- through the CLI --------------------------------------------------------------------------


BAD_PORT = """\
[clients.web1]
host = "h"
port = "x"
repository = "/r"
paths = ["/etc"]
encryption = "none"
"""


@pytest.mark.usefixtures("reset_logging")
def test_cli_bad_config_exits_78_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BAD_PORT)
    code = cli.main(["--config", str(path), "--log-format", "json", "check-config"])
    out, err = capsys.readouterr()
    assert code == 78
    assert out == ""
    assert str(path) in err
    assert "clients.web1.port: Input should be a valid integer" in err


@pytest.mark.usefixtures("reset_logging")
def test_cli_uses_config_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, BAD_PORT, name="from-env.toml")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert cli.main(["--log-format", "json", "check-config"]) == 78
    assert str(path) in capsys.readouterr().err


@pytest.mark.usefixtures("reset_logging")
def test_cli_check_config_prints_json_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        f"""\
        [clients.web1]
        host = "h"
        repository = "/r"
        paths = ["/etc"]
        passphrase_command = "{SECRET_COMMAND}"
        """,
    )
    code = cli.main(["--config", str(path), "--log-format", "json", "check-config"])
    out, _ = capsys.readouterr()
    assert code == 0
    data = json.loads(out)
    assert data["clients"]["web1"]["passphrase_command"] == "<hidden>"
    assert data["clients"]["web1"]["ssh"]["keepalive_interval"] == 10
    assert "s3cr3t" not in out


@pytest.mark.usefixtures("reset_logging")
def test_cli_pull_unknown_client_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        f"""\
        [server]
        socket_dir = "{tmp_path}/sockets"
        state_dir = "{tmp_path}/state"

        [clients.web1]
        host = "h"
        repository = "/r"
        paths = ["/etc"]
        encryption = "none"
        """,
    )
    code = cli.main(["--config", str(path), "--log-format", "json", "pull", "mail"])
    err = capsys.readouterr().err
    assert code == 78
    assert "'mail'" in err
    assert "web1" in err
    # Nothing was started: no state or socket directory appeared.
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "sockets").exists()


def test_empty_passphrase_command_is_refused() -> None:
    key, _ = only_problem({"clients": {"web1": minimal_client(passphrase_command="")}})
    assert key.startswith("clients.web1")


@pytest.mark.parametrize(
    ("data", "expected_key"),
    [
        (
            {
                "clients": {
                    "web1": minimal_client(encryption="repokey", passphrase_file="web1.pass")
                }
            },
            "clients.web1.passphrase_file",
        ),
        ({"ssh": {"identity": "id_ed25519"}}, "ssh.identity"),
        ({"ssh": {"known_hosts": "known_hosts"}}, "ssh.known_hosts"),
    ],
    ids=["passphrase_file", "identity", "known_hosts"],
)
def test_relative_secret_paths_are_refused(data: dict[str, Any], expected_key: str) -> None:
    key, _ = only_problem(data)
    assert key == expected_key
