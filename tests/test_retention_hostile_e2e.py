"""A compromised client against the server's retention (issue 16, item 4), real sshd and borg.

Through its append-only tunnel a client can add archives with any name and any date
(``borg create --timestamp 2099-…``), and date its real archive as it likes. ``borg prune``
trusts those dates: the future ones took every keep slot, the server's own prune deleted the
real archives, compact made it permanent and the run said ``ok``. Now the retention counts only
archives the server verified, by the time the server recorded, and reports the others.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests import pullkit
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

NAME_FORMAT = "c1-{now:%Y-%m-%dT%H:%M:%S.%f}"
# Dated by the client: one in the future, one in the past, and a 1.x checkpoint name (borg
# prune treats those apart, and `borg list` hides them unless asked) in the future too.
FORGED = {
    "evil-2099": "2099-03-01T00:00:00",
    "evil-1999": "1999-03-01T00:00:00",
    "c1-2098.checkpoint": "2098-12-31T00:00:00",
}

HOSTILE = r"""#!/bin/sh
# During its pull, through its tunnel: the forged archives, then its real archive dated 2099.
for arg in "$@"; do case $arg in ssh://*::*) url=${arg%%::*} ;; esac; done
@CREATES@
verb=$1; shift
exec @BORG@ "$verb" --timestamp 2099-06-01T00:00:00 "$@"
"""


def _hostile_borg(tmp_path: Path) -> Path:
    src = tmp_path / "forged-src"
    src.mkdir()
    (src / "ransom-note").write_text("pay\n")
    borg = shutil.which("borg")
    assert borg is not None
    creates = "\n".join(
        f'{borg} create --timestamp {when} "$url::{name}" {src} >&2 || exit 9'
        for name, when in FORGED.items()
    )
    script = tmp_path / "hostile-borg"
    script.write_text(HOSTILE.replace("@BORG@", borg).replace("@CREATES@", creates))
    script.chmod(0o755)
    return script


def _config(tmp_path: Path, sshd: SshdServer, repo: Path, data: Path, **client: object) -> Path:
    conf = pullkit.base_config(tmp_path, sshd)
    table = pullkit.client_table(sshd, "c1", repo, [data], archive=NAME_FORMAT, **client)
    path = pullkit.write_config(tmp_path / "bt.toml", clients={"c1": table}, **conf)
    path.write_text(path.read_text() + "\n[clients.c1.retention]\nkeep_daily = 2\n")
    return path


def _archives(tmp_path: Path, repo: Path) -> list[str]:
    """Every archive, checkpoints included (1.x's `borg list` hides those by default)."""
    out = pullkit.borg(tmp_path, "list", "--json", "--consider-checkpoints", str(repo))
    return sorted(a["name"] for a in json.loads(out)["archives"])


def _pull(config: Path) -> str:
    result = pullkit.run_cli(config, "pull", "c1")
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r" archive=(c1-\S+)", result.stdout)
    assert found is not None, result.stdout
    return found.group(1)


def test_future_dated_archives_from_a_client_never_make_the_server_prune_real_ones(
    tmp_path: Path, sshd: SshdServer
) -> None:
    data = pullkit.make_client_data(tmp_path / "client-data", random_bytes=20_000)
    repo = tmp_path / "repos" / "c1"
    pullkit.init_repo(tmp_path, repo)
    config = _config(tmp_path, sshd, repo, data)
    first = _pull(config)
    _config(tmp_path, sshd, repo, data, remote_borg=str(_hostile_borg(tmp_path)))
    dated_2099 = _pull(config)  # verified: the server read it back; only its date is a lie
    _config(tmp_path, sshd, repo, data)
    newest = _pull(config)
    assert _archives(tmp_path, repo) == sorted([first, dated_2099, newest, *FORGED])

    # keep_daily = 2 over the three verified archives of today, by the server's clock: the
    # newest (daily #1) and, the count not reached, the oldest; the middle one goes.
    dry = pullkit.run_cli(config, "maintain", "c1", "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert f"prune ok: would remove 1: {dated_2099}; keep 5" in dry.stdout, dry.stdout
    assert len(_archives(tmp_path, repo)) == 6  # a dry run changes nothing

    result = pullkit.run_cli(config, "maintain", "c1")

    out = result.stdout
    assert result.returncode == 1, out + result.stderr  # a warning: tampering, nothing lost
    assert "unverified warning: tampering suspected: 3 archive(s)" in out, out
    for name in FORGED:
        assert repr(name) in out
    assert f"prune ok: removed 1: {dated_2099}; kept 5" in out, out
    assert "compact ok: freed" in out
    assert _archives(tmp_path, repo) == sorted(
        [first, newest, *FORGED]
    )  # nothing unverified deleted either
    pullkit.borg(tmp_path, "check", str(repo))
    for archive in (newest, first):
        target = tmp_path / "restored" / archive
        pullkit.extract(tmp_path, repo, archive, target)
        pullkit.assert_same_tree(data, target)
    status = json.loads(pullkit.run_cli(config, "status", "--json").stdout)[0]
    assert status["last_maintain_result"] == "warning"

    # The next run says it again (until someone removes them) and still removes nothing real.
    again = pullkit.run_cli(config, "maintain", "c1")
    assert again.returncode == 1, again.stdout
    assert "tampering suspected: 3 archive(s)" in again.stdout
    assert "prune ok: removed 0: -; kept 5" in again.stdout
