"""``include = [globs]``: clients and groups from other files, every error naming file and key,
and a SIGHUP that re-reads the included files in a real daemon process."""

from __future__ import annotations

import re
import signal
import textwrap
from pathlib import Path

import pytest

from borgtunnel.config import ConfigError, load_config
from tests.daemon_support import daemon_process, has_event, notify_listener, wait_until

MAIN = """\
    include = ["clients.d/*.toml"]

    [defaults]
    encryption = "none"
    """


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def client(name: str, **keys: str) -> str:
    lines = [f"[clients.{name}]", f'host = "{name}.example.org"']
    lines += [f"{k} = {v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == path
    return [f"{key}: {message}" if key else message for key, message in caught.value.problems]


@pytest.fixture
def main(tmp_path: Path) -> Path:
    return write(tmp_path / "borgtunnel.toml", MAIN)


def test_included_clients_and_groups_load_in_sorted_order(tmp_path: Path, main: Path) -> None:
    write(
        tmp_path / "clients.d" / "00-groups.toml",
        """\
        [groups.web]
        repository = "/srv/borg/{client}"
        paths = ["/var/www"]
        """,
    )
    write(tmp_path / "clients.d" / "web.toml", client("web2", group='"web"'))
    write(tmp_path / "clients.d" / "a-web.toml", client("web1", group='"web"'))
    write(tmp_path / "clients.d" / "notes.txt", "not toml, not matched")
    config = load_config(main)
    assert list(config.clients) == ["web1", "web2"]  # a-web.toml before web.toml
    assert config.client("web2").repository == Path("/srv/borg/web2")
    assert config.client_files["web1"] == tmp_path / "clients.d" / "a-web.toml"
    origin = config.origins["web1"]["repository"]
    assert (origin.level, origin.file) == ("group web", tmp_path / "clients.d" / "00-groups.toml")


def test_absolute_and_literal_paths_and_an_empty_glob(tmp_path: Path) -> None:
    elsewhere = write(
        tmp_path / "elsewhere" / "db.toml",
        client("db1", repository='"/srv/borg/db1"', paths='["/var"]'),
    )
    main = write(
        tmp_path / "etc" / "borgtunnel.toml",
        f'include = ["{elsewhere}", "empty.d/*.toml"]\n[defaults]\nencryption = "none"\n',
    )
    assert list(load_config(main).clients) == ["db1"]


def test_an_error_in_an_included_file_names_the_file_and_the_key(
    tmp_path: Path, main: Path
) -> None:
    write(
        tmp_path / "clients.d" / "web.toml",
        client("web1", port='"ssh"', repository='"/srv/borg/web1"', paths='["/var/www"]'),
    )
    (problem,) = problems_of(main)
    assert problem.startswith("clients.d/web.toml: clients.web1.port: Input should be a valid")


def test_an_error_in_an_included_group_names_its_file(tmp_path: Path, main: Path) -> None:
    write(tmp_path / "clients.d" / "groups.toml", '[groups.web]\npaths = ["var/www"]\n')
    write(
        tmp_path / "clients.d" / "web.toml",
        client("web1", group='"web"', repository='"/srv/borg/w1"')
        + client("web2", group='"web"', repository='"/srv/borg/w2"'),
    )
    assert problems_of(main) == [
        "clients.d/groups.toml: groups.web.paths: 'var/www' must be an absolute path on the client"
    ]


@pytest.mark.parametrize("key", ["server", "defaults", "include", "notify"])
def test_an_included_file_holds_only_clients_and_groups(
    tmp_path: Path, main: Path, key: str
) -> None:
    write(tmp_path / "clients.d" / "x.toml", f"[{key}]\n")
    assert problems_of(main) == [
        f"clients.d/x.toml: {key}: an included file may hold only [clients.*] and [groups.*]"
    ]


@pytest.mark.parametrize("kind", ["clients", "groups"])
def test_a_name_defined_twice_names_both_files(tmp_path: Path, main: Path, kind: str) -> None:
    table = f'[{kind}.web1]\nhost = "h"\nrepository = "/srv/r"\npaths = ["/"]\n'
    write(tmp_path / "clients.d" / "a.toml", table)
    write(tmp_path / "clients.d" / "b.toml", table)
    assert f"clients.d/b.toml: {kind}.web1: defined twice, also in clients.d/a.toml" in (
        problems_of(main)
    )


def test_a_name_in_the_main_file_and_an_include(tmp_path: Path) -> None:
    main = write(
        tmp_path / "borgtunnel.toml",
        MAIN + client("web1", repository='"/srv/a"', paths='["/"]'),
    )
    write(tmp_path / "clients.d" / "b.toml", client("web1", repository='"/srv/b"', paths='["/"]'))
    assert problems_of(main) == [
        "clients.d/b.toml: clients.web1: defined twice, also in the main file"
    ]


def test_a_bad_client_name_in_an_included_file(tmp_path: Path, main: Path) -> None:
    write(tmp_path / "clients.d" / "x.toml", '[clients."-web1"]\nhost = "h"\n')
    (problem,) = problems_of(main)
    assert problem.startswith("clients.d/x.toml: clients: client name '-web1' must be 1-64")


def test_syntax_error_in_an_included_file(tmp_path: Path, main: Path) -> None:
    write(tmp_path / "clients.d" / "bad.toml", "[clients.web1\n")
    (problem,) = problems_of(main)
    assert problem.startswith("clients.d/bad.toml: TOML syntax error:")


@pytest.mark.parametrize(
    ("include", "expected"),
    [
        ('"clients.d/*.toml"', "include: must be a list of file paths or globs"),
        ('[""]', "include: must be a list of file paths or globs"),
        ("[1]", "include: must be a list of file paths or globs"),
        ('["missing.toml"]', "include[0]: '{dir}/missing.toml': no such file"),
        ('["*.toml"]', "include[0]: '*.toml' matches the main file itself"),
    ],
)
def test_include_key_errors(tmp_path: Path, include: str, expected: str) -> None:
    main = write(tmp_path / "borgtunnel.toml", f"include = {include}\n")
    assert problems_of(main) == [expected.format(dir=tmp_path)]


def test_a_group_from_an_include_used_by_a_client_of_the_main_file(
    tmp_path: Path, main: Path
) -> None:
    write(tmp_path / "clients.d" / "g.toml", '[groups.db]\npaths = ["/var/lib"]\n')
    main.write_text(
        main.read_text() + client("db1", group='"db"', repository='"/srv/borg/{client}"')
    )
    assert load_config(main).client("db1").paths == ("/var/lib",)
    main.write_text(main.read_text().replace('group = "db"', 'group = "dbs"'))
    assert problems_of(main) == ["clients.db1.group: no group 'dbs' (defined: db)"]


def test_loading_again_rereads_the_included_files(tmp_path: Path, main: Path) -> None:
    included = write(
        tmp_path / "clients.d" / "web.toml",
        client("web1", repository='"/srv/borg/web1"', paths='["/etc"]'),
    )
    assert load_config(main).client("web1").paths == ("/etc",)
    included.write_text(included.read_text().replace('["/etc"]', '["/srv"]'))
    write(tmp_path / "clients.d" / "db.toml", client("db1", repository='"/r"', paths='["/"]'))
    again = load_config(main)
    assert again.client("web1").paths == ("/srv",)
    assert set(again.clients) == {"web1", "db1"}


def test_sighup_rereads_an_included_file(tmp_path: Path) -> None:
    """The real ``borgtunnel daemon``: a schedule changed in an included file is live after HUP."""
    main = write(
        tmp_path / "borgtunnel.toml",
        f"""\
        include = ["clients.d/*.toml"]
        [server]
        socket_dir = "{tmp_path / "sock"}"
        state_dir = "{tmp_path / "state"}"
        [daemon]
        timezone = "UTC"
        [defaults]
        encryption = "none"
        host = "127.0.0.1"
        port = 9
        """,
    )
    included = write(
        tmp_path / "clients.d" / "web.toml",
        client("web1", repository=f'"{tmp_path / "r"}"', paths='["/x"]', schedule='"0 2 * * *"'),
    )
    notify_path = tmp_path / "notify.sock"
    log = tmp_path / "daemon.log"
    with (
        notify_listener(notify_path) as notify,
        daemon_process(main, log, env={"NOTIFY_SOCKET": str(notify_path)}) as proc,
    ):
        ready = notify.wait_for(lambda m: "READY=1" in m.splitlines(), within=15, what="READY=1")
        assert re.search(r"next: web1 at (\S+ )?02:00$", notify.messages[ready], re.MULTILINE)
        included.write_text(included.read_text().replace("0 2 * * *", "30 3 * * *"))
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(lambda m: "RELOADING=1" in m, within=10, what="RELOADING=1")
        again = notify.wait_for(
            lambda m: "READY=1" in m, within=10, what="READY=1", since=reloading + 1
        )
        assert re.search(r"next: web1 at (\S+ )?03:30$", notify.messages[again], re.MULTILINE), (
            notify.messages[again]
        )
        wait_until(lambda: has_event(log, "config_reloaded"), within=5, what="config_reloaded")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
