"""A bug in borgtunnel is exit 70 and a ``failed`` run, never Python's exit 1 ("warnings only").

The bug is injected (monkeypatch) — nothing in a real run is known to raise — but everything
around it is real: the history database, the CLI, and for the second client a real pull through
a real sshd, which must still happen after the first client's run blew up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from borgtunnel import cli
from borgtunnel.config import load_config
from borgtunnel.history import History
from borgtunnel.runs import jobs
from tests import hostile, pullkit
from tests.sshd import SshdServer


class InjectedBugError(RuntimeError):
    pass


def _two_client_config(tmp_path: Path, sshd: SshdServer) -> tuple[Path, Path]:
    data = pullkit.make_client_data(tmp_path / "client-data")
    good = tmp_path / "repos" / "good"
    pullkit.init_repo(tmp_path, good)
    clients = {
        "buggy": pullkit.client_table(sshd, "buggy", tmp_path / "repos" / "buggy", [data]),
        "good": pullkit.client_table(sshd, "good", good, [data]),
    }
    config = pullkit.write_config(
        tmp_path / "bt.toml", clients=clients, **pullkit.base_config(tmp_path, sshd)
    )
    return config, good


pytestmark = pytest.mark.usefixtures("reset_logging")


@pytest.mark.sshd
def test_a_bug_in_one_pull_is_exit_70_and_the_next_client_still_pulls(
    tmp_path: Path, sshd: SshdServer, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    config, good = _two_client_config(tmp_path, sshd)
    real_pull = jobs.pull  # type: ignore[attr-defined]  # patched below, as jobs sees it

    async def buggy_pull(config: Any, client: Any, **kw: Any) -> Any:
        if client.name == "buggy":
            raise InjectedBugError("boom")
        return await real_pull(config, client, **kw)

    monkeypatch.setattr(jobs, "pull", buggy_pull)

    code = cli.main(["--config", str(config), "pull", "buggy", "good"])

    out = capsys.readouterr().out.splitlines()
    assert code == 70
    assert out[0].startswith("buggy: failed ")
    assert "internal error: InjectedBugError('boom')" in out[0]
    assert out[1].startswith("good: ok ")
    assert len(pullkit.archives(tmp_path, good)) == 1
    (row,) = hostile.runs(tmp_path, "buggy")
    assert row["result"] == "failed"
    assert "internal error" in row["error"]


def test_a_crash_outside_any_pull_is_exit_70(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    config = pullkit.write_config(
        tmp_path / "bt.toml",
        server={"state_dir": str(tmp_path / "state"), "socket_dir": str(tmp_path / "run")},
        ssh={},
        clients={"c1": {"host": "h", "repository": "/r", "paths": ["/x"], "encryption": "none"}},
    )
    load_config(config)  # the file itself is fine

    def broken_open(_state_dir: Path) -> History:
        raise InjectedBugError("database layer bug")

    monkeypatch.setattr(History, "open", broken_open)

    code = cli.main(["--config", str(config), "pull", "c1"])

    assert code == 70
    assert "internal error: InjectedBugError('database layer bug')" in capsys.readouterr().err
