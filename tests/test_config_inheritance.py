"""[defaults] < [groups.NAME] < [clients.NAME]: precedence, {client}, list extend, table merge,
every merge error named by the key where it was written, and `check-config --client` output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from borgtunnel.config import ConfigError, load_config, parse_config
from tests import pullkit
from tests.sshd import SshdServer

TOKEN = "s3cr3t-T0KEN"  # a marker that must never be printed


def problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return list(caught.value.problems)


def fleet(**extra: Any) -> dict[str, Any]:
    """Three clients: web1 and web2 in group web, db1 on its own."""
    data: dict[str, Any] = {
        "defaults": {"encryption": "none", "port": 2222, "exclude": ["*.tmp"]},
        "groups": {
            "web": {
                "port": 2200,
                "repository": "/srv/borg/{client}",
                "paths": ["/etc", "/var/www"],
                "schedule": "0 2 * * *",
            }
        },
        "clients": {
            "web1": {"group": "web", "host": "web1.example.org"},
            "web2": {"group": "web", "host": "web2.example.org", "port": 22},
            "db1": {"host": "db1.example.org", "repository": "/srv/borg/db1", "paths": ["/var"]},
        },
    }
    return data | extra


# --- precedence and templates ------------------------------------------------------------------


def test_client_over_group_over_defaults_over_built_in() -> None:
    config = parse_config(fleet())
    web1, web2, db1 = (config.client(n) for n in ("web1", "web2", "db1"))
    assert (web1.port, web2.port, db1.port) == (2200, 22, 2222)
    assert web1.user == "root"  # built-in
    assert web1.schedule == "0 2 * * *"
    assert db1.schedule is None
    assert config.groups_of == {"web1": "web", "web2": "web", "db1": None}
    assert config.origins["web1"]["port"].level == "group web"
    assert config.origins["web2"]["port"].level == "client"
    assert config.origins["db1"]["port"].level == "defaults"
    assert "user" not in config.origins["web1"]


def test_client_placeholder_is_replaced_and_borg_placeholders_are_left() -> None:
    data = fleet()
    data["groups"]["web"] |= {
        "host": "{client}.web.example.org",
        "archive": "{client}-{hostname}-{now}",
        "remote_socket": "/run/borgtunnel-{client}.sock",
        "encryption": "repokey",
        "passphrase_file": "/etc/borgtunnel/{client}.passphrase",
        "paths": ["/srv/{client}"],
        "exclude": ["/srv/{client}/cache"],
    }
    del data["clients"]["web1"]["host"]
    config = parse_config(data)
    web1 = config.client("web1")
    assert web1.host == "web1.web.example.org"
    assert web1.repository == Path("/srv/borg/web1")
    assert config.client("web2").repository == Path("/srv/borg/web2")
    assert web1.archive == "web1-{hostname}-{now}"
    assert web1.remote_socket_path == "/run/borgtunnel-web1.sock"
    assert web1.passphrase_file == Path("/etc/borgtunnel/web1.passphrase")
    assert web1.paths == ("/srv/web1",)
    assert web1.exclude == ("/srv/web1/cache",)


def test_hook_placeholders_are_not_expanded_at_load() -> None:
    # Hooks have their own {client} placeholder, replaced inside the word when they run.
    data = fleet()
    data["defaults"]["after"] = [["/bin/echo", "{client}", "{result}"]]
    config = parse_config(data)
    assert config.hooks_for(config.client("web1")).after == (("/bin/echo", "{client}", "{result}"),)


# --- lists and tables --------------------------------------------------------------------------


def test_a_list_replaces_the_inherited_one() -> None:
    data = fleet()
    data["clients"]["web1"]["exclude"] = ["/var/www/cache"]
    config = parse_config(data)
    assert config.client("web1").exclude == ("/var/www/cache",)
    assert config.client("web2").exclude == ("*.tmp",)


def test_extend_appends_to_what_the_lower_levels_give() -> None:
    data = fleet()
    data["groups"]["web"]["exclude"] = {"extend": ["/var/www/cache"]}
    data["clients"]["web1"]["exclude"] = {"extend": ["/var/www/tmp"]}
    data["clients"]["db1"]["create_args"] = {"extend": ["--compression", "zstd,3"]}
    config = parse_config(data)
    assert config.client("web1").exclude == ("*.tmp", "/var/www/cache", "/var/www/tmp")
    assert config.client("web2").exclude == ("*.tmp", "/var/www/cache")
    assert config.client("db1").create_args == ("--compression", "zstd,3")  # built-in: empty
    assert config.origins["web1"]["exclude"].level == "defaults + group web + client"


def test_tables_merge_key_by_key() -> None:
    data = fleet()
    data["defaults"]["ssh"] = {"connect_timeout": 5, "ciphers": ["aes128-ctr"]}
    data["defaults"]["retention"] = {"keep_daily": 7}
    data["groups"]["web"]["ssh"] = {"window": 1048576, "ciphers": {"extend": ["aes256-ctr"]}}
    data["clients"]["web1"]["retention"] = {"keep_weekly": 4}
    data["clients"]["web1"]["ssh"] = {"connect_timeout": 9}
    config = parse_config(data)
    ssh = config.ssh_for(config.client("web1"))
    assert (ssh.connect_timeout, ssh.window) == (9, 1048576)
    assert ssh.ciphers == ("aes128-ctr", "aes256-ctr")
    retention = config.client("web1").retention
    assert retention is not None
    assert (retention.keep_daily, retention.keep_weekly) == (7, 4)
    assert config.ssh_for(config.client("db1")).connect_timeout == 5


def test_defaults_reporting_keys_still_reach_every_client() -> None:
    data = fleet()
    data["defaults"] |= {"max_age": "2d", "hook_timeout": 30}
    data["clients"]["db1"]["max_age"] = "6h"
    config = parse_config(data)
    assert config.defaults.max_age == 2 * 86400
    assert config.max_age_for(config.client("web1")) == 2 * 86400
    assert config.max_age_for(config.client("db1")) == 6 * 3600
    assert config.hooks_for(config.client("web2")).timeout == 30


# --- errors, each at the key where it was written ----------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["clients"]["web1"].update(group="wbe"),
            ("clients.web1.group", "no group 'wbe' (defined: web)"),
        ),
        (
            lambda d: d["groups"]["web"].update(prot=22),
            ("groups.web.prot", "unknown key (not a client key)"),
        ),
        (
            lambda d: d["defaults"].update(prot=22),
            ("defaults.prot", "unknown key (not a client key)"),
        ),
        (
            lambda d: d["groups"]["web"].update(group="web"),
            ("groups.web.group", "groups do not nest: only a client names its group"),
        ),
        (
            lambda d: d["defaults"].update(group="web"),
            ("defaults.group", "groups do not nest: only a client names its group"),
        ),
        (
            lambda d: d["groups"]["web"].update(port={"extend": [1]}),
            ("groups.web.port", "{ extend = [...] } is only for list settings"),
        ),
        (
            lambda d: d["clients"]["web1"].update(paths={"extend": "/srv"}),
            ("clients.web1.paths", "write { extend = [...] }: one key, a list"),
        ),
        (
            lambda d: d["clients"]["web1"].update(paths={"extend": ["/a"], "replace": ["/b"]}),
            ("clients.web1.paths", "write { extend = [...] }: one key, a list"),
        ),
        (
            lambda d: d["groups"].update(db="not a table"),
            ("groups.db", "must be a table"),
        ),
    ],
)
def test_merge_errors_name_the_key(change: Any, expected: tuple[str, str]) -> None:
    data = fleet()
    change(data)
    assert problems(data) == [expected]  # once, though web1 and web2 both inherit it


def test_a_bad_inherited_value_is_reported_once_where_it_was_written() -> None:
    data = fleet()
    data["groups"]["web"]["port"] = 70000
    data["defaults"]["retries"] = "many"
    data["clients"]["db1"]["jitter"] = -1
    found = problems(data)
    assert ("groups.web.port", "Input should be less than or equal to 65535") in found
    retries = [p for p in found if p[0].endswith("retries")]
    assert [key for key, _ in retries] == ["defaults.retries"]  # not 3 x clients.*.retries
    assert any(key == "clients.db1.jitter" for key, _ in found)
    assert len(found) == 3, found


def test_a_group_repository_without_client_is_shared_and_refused() -> None:
    data = fleet()
    data["groups"]["web"]["repository"] = "/srv/borg/web"
    (problem,) = problems(data)
    assert problem[0] == "groups.web.repository"
    assert "each client needs its own repository" in problem[1]


def test_loader_fields_are_not_keys_of_the_file() -> None:
    # Config carries origins/source for the loader; a file cannot set them.
    assert ("origins", "unknown key (check the spelling)") in problems(fleet(origins={}))


# --- check-config --client ---------------------------------------------------------------------


CONFIG = """\
    [ssh]
    connect_timeout = 45

    [notify]
    urls = ["json://localhost/{token}"]

    [defaults]
    encryption = "repokey"
    passphrase_command = "pass show borg --token={token}"
    exclude = ["*.tmp"]

    [groups.web]
    repository = "/srv/borg/{{client}}"
    paths = ["/etc", "/var/www"]
    exclude = {{ extend = ["/var/www/cache"] }}

    [clients.web1]
    group = "web"
    host = "web1.example.org"
    healthchecks = "https://hc-ping.com/{token}"
    notify = ["json://localhost/{token}/web1"]
    """


def check_config(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "borgtunnel.toml"
    path.write_text(textwrap.dedent(CONFIG).format(token=TOKEN))
    return subprocess.run(
        [sys.executable, "-m", "borgtunnel", "--config", str(path), "check-config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_client_text_says_where_each_setting_came_from(tmp_path: Path) -> None:
    result = check_config(tmp_path, "--client", "web1")
    assert result.returncode == 0, result.stderr
    main = str(tmp_path / "borgtunnel.toml")
    lines = result.stdout.splitlines()
    assert lines[0] == f"client web1 (group web) in {main}"
    rows = {line.split("=", 1)[0].strip(): line for line in lines[1:]}
    assert rows["repository"].endswith(f"# group web ({main})")
    assert '"/srv/borg/web1"' in rows["repository"]
    assert rows["exclude"].endswith(f"# defaults + group web ({main})")
    assert '["*.tmp", "/var/www/cache"]' in rows["exclude"]
    assert rows["host"].endswith(f"# client ({main})")
    assert rows["port"].endswith("# built-in")
    assert rows["ssh.connect_timeout"].endswith(f"# [ssh] ({main})")
    assert rows["ssh.window"].endswith("# built-in")
    assert TOKEN not in result.stdout + result.stderr


def test_check_config_client_json(tmp_path: Path) -> None:
    result = check_config(tmp_path, "--client", "web1", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["client"], data["group"]) == ("web1", "web")
    settings = data["settings"]
    assert settings["repository"] == {
        "value": "/srv/borg/web1",
        "from": "group web",
        "file": str(tmp_path / "borgtunnel.toml"),
    }
    assert settings["port"] == {"value": 22, "from": "built-in", "file": None}
    assert settings["passphrase_command"]["value"] == "<hidden>"
    assert settings["passphrase_command"]["from"] == "defaults"
    assert settings["notify"]["value"] == ["<hidden>"]
    assert settings["healthchecks"]["value"] == "<hidden>"
    assert TOKEN not in result.stdout + result.stderr


def test_check_config_unknown_client(tmp_path: Path) -> None:
    result = check_config(tmp_path, "--client", "web9")
    assert result.returncode == 78
    assert "no client 'web9'" in result.stderr


def test_load_config_reads_groups_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "borgtunnel.toml"
    path.write_text(textwrap.dedent(CONFIG).format(token=TOKEN))
    config = load_config(path)
    assert config.client("web1").repository == Path("/srv/borg/web1")
    assert config.client_files["web1"] is None  # the main file


# --- a real pull of a client whose settings come from its group ---------------------------------


@pytest.mark.sshd
def test_pull_of_a_client_whose_repository_and_paths_come_from_its_group(
    tmp_path: Path, sshd: SshdServer
) -> None:
    data = pullkit.make_client_data(tmp_path / "data" / "lab1")
    repo = tmp_path / "repos" / "lab1"
    pullkit.init_repo(tmp_path, repo)
    base = pullkit.base_config(tmp_path, sshd)
    group = {
        "host": sshd.host,
        "port": sshd.port,
        "user": sshd.user,
        "encryption": "none",
        "repository": f"{tmp_path}/repos/{{client}}",
        "paths": [f"{tmp_path}/data/{{client}}"],
        "remote_socket": f"{sshd.workdir}/rsock/{{client}}.sock",
    }
    lines = [
        f"[{name}]\n" + "".join(f"{k} = {pullkit.toml_value(v)}\n" for k, v in t.items())
        for name, t in (*base.items(), ("groups.lab", group))
    ]
    config = tmp_path / "bt.toml"
    config.write_text("\n".join(lines) + '\n[clients.lab1]\ngroup = "lab"\n')

    result = pullkit.run_cli(config, "pull", "lab1")

    assert result.returncode == 0, result.stderr
    (name,) = pullkit.archives(tmp_path, repo)
    pullkit.extract(tmp_path, repo, name, tmp_path / "restored")
    pullkit.assert_same_tree(data, tmp_path / "restored")
    assert not (sshd.workdir / "rsock" / "lab1.sock").exists()


def test_the_documented_fleet_example_loads(tmp_path: Path) -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    text = doc.read_text(encoding="utf-8")
    blocks = dict(re.findall(r"```toml\n# example: fleet \(([^)]+)\)\n(.*?)```", text, re.DOTALL))
    assert sorted(blocks) == ["borgtunnel.toml", "clients.d/web.toml"], "fleet example gone"
    for name, text in blocks.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    config = load_config(tmp_path / "borgtunnel.toml")
    web1, web2, db1 = (config.client(n) for n in ("web1", "web2", "db1"))
    assert web1.host == "web1.web.example.org"
    assert web2.repository == Path("/srv/borg/web2")
    assert db1.passphrase_file == Path("/etc/borgtunnel/db1.passphrase")
    assert web1.exclude == ("/home/*/.cache", "/var/www/*/cache")
    assert db1.exclude == ("/home/*/.cache",)
    assert (web1.schedule, db1.schedule) == ("0 2 * * *", "0 3 * * *")
    assert web2.retention is not None
    assert (web2.retention.keep_daily, web2.retention.keep_monthly) == (7, 6)
    assert config.max_age_for(db1) == 2 * 86400
    assert config.client_files["web2"] == tmp_path / "clients.d" / "web.toml"
