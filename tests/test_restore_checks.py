"""The two defences of a borg 1.x restore without SSH (issue 16, item 7): the read-only request
filter, fed requests packed by borg's own msgpack, and the checks after every restore (key
guard, repository unchanged), run against a real repository changed behind their back."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from borgtunnel.config import parse_config
from borgtunnel.runs import keyguard
from borgtunnel.runs.restore import RestoreOutcome, _check_repository, _Run
from borgtunnel.runs.verify import repository_state
from borgtunnel.server.policy import serve_argv
from borgtunnel.server.rpcfilter import MAX_REQUEST, RequestFilter, refusal_answer
from tests import pullkit

# Debian's borg 1.2.4 lives in the system Python: its msgpack wrapper packs as borg does.
SYSTEM_PYTHON = "/usr/bin/python3"


def borg_packed(requests: Sequence[object], *, legacy: bool = False) -> list[bytes]:
    """Each ``[method, args]`` packed by borg 1.2's own code, as its RemoteRepository sends it
    (``{"i": id, "m": method, "a": args}``; legacy: borg 1.0's ``(1, id, method, args)``)."""
    code = (
        "import json, sys\n"
        "from borg.helpers import msgpack\n"
        "out = []\n"
        "for n, (m, a) in enumerate(json.loads(sys.stdin.read())):\n"
        "    a = {k: (v.encode() if isinstance(v, str) else v) for k, v in a.items()}\n"
        f"    o = (1, n, m, list(a.values())) if {legacy} else {{'i': n, 'm': m, 'a': a}}\n"
        "    out.append(msgpack.packb(o).hex())\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run(
            [SYSTEM_PYTHON, "-c", code],
            input=json.dumps(requests),
            capture_output=True,
            text=True,
            check=True,
        )
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"Debian's borg (python3-borg) is needed to pack requests: {exc}")
    return [bytes.fromhex(h) for h in json.loads(done.stdout)]


READS = [
    ["negotiate", {"client_data": "x"}],
    ["open", {"path": "/srv/r", "create": False, "lock_wait": 1, "lock": True, "exclusive": False}],
    ["load_key", {}],
    ["get", {"id": "i" * 32}],
    ["list", {"limit": 10}],
    ["__len__", {}],
    ["rollback", {}],
]
WRITES = [
    "put",
    "delete",
    "commit",
    "destroy",
    "save_key",
    "break_lock",
    "check",
    "get_free_nonce",
    "commit_nonce_reservation",
    "inject_exception",
]


def _feed_in_pieces(data: bytes, check: RequestFilter, seed: int) -> bytes:
    pieces = random.Random(seed)  # noqa: S311 - reproducible cuts, not secrets
    passed = bytearray()
    pos = 0
    while pos < len(data):
        size = pieces.choice([1, 2, 7, 64, 4096])
        passed += check.feed(data[pos : pos + size])
        pos += size
    return bytes(passed)


@pytest.mark.parametrize("legacy", [False, True])
def test_reads_pass_in_any_pieces(legacy: bool) -> None:
    packed = borg_packed(READS, legacy=legacy)
    for seed in range(5):
        check = RequestFilter()
        assert _feed_in_pieces(b"".join(packed), check, seed) == b"".join(packed)
        assert check.refused is None


@pytest.mark.parametrize("method", WRITES)
def test_every_write_is_refused_and_what_came_before_passes(method: str) -> None:
    before = borg_packed(READS[:3])
    (write,) = borg_packed([[method, {"id": "x" * 32, "data": "y"}]])
    after = borg_packed(READS[3:4])
    check = RequestFilter()

    passed = _feed_in_pieces(b"".join([*before, write, *after]), check, 1)

    assert passed == b"".join(before)
    assert check.refused is not None
    assert repr(method) in check.refused
    assert check.feed(after[0]) == b""  # nothing passes any more


def test_open_with_create_is_refused_in_both_formats() -> None:
    for legacy in (False, True):
        (request,) = borg_packed(
            [["open", {"path": "/r", "create": True, "lock_wait": 1}]], legacy=legacy
        )
        check = RequestFilter()
        assert check.feed(request) == b""
        assert check.refused is not None
        assert "create" in check.refused


def test_a_large_write_is_refused_by_name_before_it_is_all_there() -> None:
    (put,) = borg_packed([["put", {"id": "x" * 32, "data": "z" * (3 * MAX_REQUEST)}]])
    check = RequestFilter()
    assert check.feed(put[:100_000]) == b""
    assert check.refused is not None
    assert "'put'" in check.refused


@pytest.mark.parametrize(
    "junk", [b"\xc1", b"\x92\x01\x02", b"\x81\xc0\xc0", b"\xdf\xff\xff\xff\xff", b"\x91" * 40]
)
def test_what_borg_never_sends_is_refused(junk: bytes) -> None:
    check = RequestFilter()
    assert check.feed(junk + b"\x00" * 16) == b""
    assert check.refused is not None


def test_an_endless_request_is_refused_once_it_passes_the_limit() -> None:
    check = RequestFilter()
    assert check.feed(b"\x81\xa1m") == b""  # a map whose value never comes
    assert check.refused is None
    check.feed(b"\xdb" + (MAX_REQUEST - 1).to_bytes(4, "big") + b"a" * 1000)
    assert check.refused is None
    check.feed(b"a" * (MAX_REQUEST + 1))
    assert check.refused is not None


def test_the_refusal_answer_is_one_borg_reads_as_its_own_error() -> None:
    (request,) = borg_packed([["save_key", {"keydata": "k"}]])
    answer = refusal_answer(request, "'save_key', which a restore never needs")
    code = (
        "import sys\nfrom borg.helpers import msgpack\n"
        "u = msgpack.unpackb(bytes.fromhex(sys.argv[1]))\n"
        "print(u[b'i'], u[b'exception_class'].decode(), u[b'exception_args'][0].decode())\n"
    )
    said = subprocess.run(
        [SYSTEM_PYTHON, "-c", code, answer.hex()], capture_output=True, text=True, check=True
    )
    assert said.stdout.split(" ", 2)[:2] == ["0", "InvalidRPCMethod"]
    assert "save_key" in said.stdout


async def test_the_checks_after_a_restore_find_a_rekey_and_a_write(tmp_path: Path) -> None:
    """Behind the filter: if a write reached the repository anyway (another way in, a borg
    bug), the restore still fails as tampering and the server's key is put back."""
    secret = tmp_path / "pass"
    secret.write_text("right")
    secret.chmod(0o600)
    repo = tmp_path / "repo"
    env = pullkit.borg_env(tmp_path, BORG_PASSPHRASE="right")
    pullkit.borg(tmp_path, "init", "--encryption=repokey", str(repo), env=env)
    config = parse_config(
        {
            "server": {"state_dir": str(tmp_path / "state")},
            "clients": {
                "c1": {
                    "host": "h",
                    "repository": str(repo),
                    "paths": ["/x"],
                    "encryption": "repokey",
                    "passphrase_file": str(secret),
                }
            },
        }
    )
    client = config.clients["c1"]
    state = config.server.state_dir
    assert await keyguard.save_key_copy("borg", repo, state, "c1")
    saved = keyguard.repository_key_blob(repo)
    before = repository_state(repo, borg2=False)
    run = _Run(config, client, RestoreOutcome(client="c1", archive="a", target="/t"))
    await _check_repository(run, before)
    assert run.outcome.tampering is None  # nothing changed, nothing said

    pullkit.borg(tmp_path, "create", f"{repo}::sneaky", str(secret), env=env)
    changed = pullkit.borg_env(tmp_path, BORG_PASSPHRASE="right", BORG_NEW_PASSPHRASE="evil")
    pullkit.borg(tmp_path, "key", "change-passphrase", str(repo), env=changed)
    assert keyguard.repository_key_blob(repo) != saved

    await _check_repository(run, before)

    tampering = run.outcome.tampering or ""
    assert "the repository changed during a restore" in tampering
    assert "the repository key was changed" in tampering
    assert run.outcome.error == tampering
    assert keyguard.repository_key_blob(repo) == saved  # put back
    assert pullkit.archives(tmp_path, repo, BORG_PASSPHRASE="right") == ["sneaky"]


def test_a_borg1_restore_serve_runs_behind_the_filter_with_the_smallest_quota(
    tmp_path: Path,
) -> None:
    config = parse_config(
        {
            "server": {"state_dir": str(tmp_path / "state")},
            "clients": {
                "c1": {
                    "host": "h",
                    "repository": "/srv/r",
                    "paths": ["/x"],
                    "encryption": "none",
                    "storage_quota": "500G",
                }
            },
        }
    )
    client = config.clients["c1"]
    argv = serve_argv(config, client, restore=True)
    assert argv[:4] == [sys.executable, "-m", "borgtunnel.server.rpcfilter", "--"]
    assert argv[4:] == [
        "borg",
        "serve",
        "--append-only",
        "--restrict-to-repository",
        "/srv/r",
        "--storage-quota",
        "10M",
    ]
    assert serve_argv(config, client)[-1] == "500G"  # a pull keeps the client's own
