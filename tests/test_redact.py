"""Notification and ping URLs are credentials: never printed, logged or stored beyond their
scheme (issue 16, item 11). Unit tests over many apprise schemes, then the real places: a config
error, apprise's own log lines, a failed delivery's log line and history row, and the real
``notify-test`` command's output."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from borgtunnel.config import ConfigError, parse_config
from borgtunnel.config.reporting import import_apprise
from borgtunnel.history import History
from borgtunnel.redact import redact_url, remember_url, scrub
from borgtunnel.reporting import healthchecks
from borgtunnel.reporting.notify import Dispatcher, Message
from tests.reporting_kit import closed_port

# (url, its secrets): each secret must never appear in anything borgtunnel prints or stores.
URLS = [
    (
        "tgram://123456789:AAHsecretBotTokenValue0123456789abcd/987654321",
        ["AAHsecretBotTokenValue0123456789abcd", "123456789:AAH"],
    ),
    ("pbul://o.PushbulletSecretToken1234567", ["PushbulletSecretToken1234567"]),
    (
        "pover://uQiRzpo4DXghDmr9QzzfQu27cmVRsG@aGKbHHW7wGxv3NqHp3Fy7skmVaZWCr",
        ["uQiRzpo4DXghDmr9QzzfQu27cmVRsG", "aGKbHHW7wGxv3NqHp3Fy7skmVaZWCr"],
    ),
    (
        "json://127.0.0.1:9/hook?+Authorization=Bearer%20SuperSecretBearer42",
        ["SuperSecretBearer42"],
    ),
    (
        "mailtos://mail.example.com?user=alice@example.com&pass=HunterPassword77",
        ["HunterPassword77", "alice@example.com"],
    ),
    ("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ", ["TIiajkdnlazkcOXrIdevi7FQ"]),
    ("discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js", ["JHMHI8qBe7bk2ZwO5U711o3dV_js"]),
    ("ntfy://user:NtfyPassw0rd@ntfy.example.com/topic", ["NtfyPassw0rd"]),
    ("gotify://gotify.example.com/GotifyAppToken99", ["GotifyAppToken99"]),
    ("matrix://user:MatrixPass55@matrix.example.com/#room", ["MatrixPass55"]),
    ("json://user:JsonPassword12@127.0.0.1:9/path", ["JsonPassword12"]),
]
PING = "https://hc-ping.example.com/0a1b2c3d-4e5f-6789-abcd-ef0123456789"
ALL_SECRETS = [s for _, secrets in URLS for s in secrets] + ["0a1b2c3d-4e5f-6789-abcd-ef0123456789"]


def _clean(text: str) -> None:
    leaked = [secret for secret in ALL_SECRETS if secret in text]
    assert leaked == [], text


@pytest.mark.parametrize(("url", "secrets"), URLS)
def test_a_url_is_shown_as_its_scheme_only(url: str, secrets: list[str]) -> None:
    scheme = url.partition("://")[0]
    assert redact_url(url) == f"{scheme}://…"
    assert redact_url(url, 3) == f"#3 {scheme}://…"
    remember_url(url)
    quoting = [url, *secrets, url.replace("%20", " "), url.replace("@", "%40")]
    for text in quoting:
        said = scrub(f"error sending to {text} (HTTPSConnectionPool url=/x/{text}/send)")
        assert all(secret not in said for secret in secrets), said


def test_odd_urls_show_nothing() -> None:
    assert redact_url("no scheme at all, token abc") == "<url>"
    assert redact_url("we\x1bird://token") == "<url>"
    assert redact_url("://token") == "<url>"
    assert scrub("see https://example.com/secret-path and that is all") == (
        "see https://… and that is all"
    )


def _config(tmp_path: Path, *, client_notify: list[str] | None = None) -> dict[str, object]:
    client: dict[str, object] = {
        "host": "h",
        "repository": "/r",
        "paths": ["/x"],
        "encryption": "none",
        "healthchecks": PING,
    }
    if client_notify is not None:
        client["notify"] = client_notify
    return {
        "server": {"state_dir": str(tmp_path / "state")},
        "notify": {"urls": [u for u, _ in URLS], "timeout": 3, "retries": 0},
        "clients": {"web1": client},
    }


def test_a_mistyped_url_is_not_quoted_in_the_config_error(tmp_path: Path) -> None:
    data = _config(tmp_path, client_notify=["tgram://notAtoken-SecretMistyped99"])
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    text = str(caught.value)
    assert "clients.web1.notify" in text
    assert "SecretMistyped99" not in text
    assert "tgram://…" in text


def _capture_logs() -> list[str]:
    """Every structlog event from now on, as JSON text (until structlog.reset_defaults())."""
    lines: list[str] = []

    def keep(_logger: object, _method: str, event: structlog.typing.EventDict) -> str:
        lines.append(json.dumps(event, default=str))
        raise structlog.DropEvent

    structlog.configure(processors=[keep])
    return lines


async def test_a_failed_delivery_logs_and_stores_no_secret(tmp_path: Path) -> None:
    config = parse_config(_config(tmp_path))
    lines = _capture_logs()
    try:

        async def sender(url: str, *_: object) -> str | None:
            # What requests says when a host is unreachable: it quotes the URL's path.
            return f"ConnectionError: Max retries exceeded with url: {url} and /{url}/"

        with History.open(config.server.state_dir) as history:
            dispatcher = Dispatcher(
                config.notify, history, urls_for=lambda _: config.notify.urls, sender=sender
            )
            dispatcher.submit(Message("web1", "failure", "t", "b"))
            await dispatcher.aclose(5)
        # apprise's own log lines (some plugins quote their URL) go through the same filter.
        import_apprise()
        logging.getLogger("apprise").warning("MQTT Connection Error received from %s", URLS[0][0])
    finally:
        structlog.reset_defaults()
    conn = sqlite3.connect(tmp_path / "state" / "history.sqlite3")
    try:
        stored = "\n".join(str(row) for row in conn.execute("SELECT * FROM notifications"))
    finally:
        conn.close()
    assert "#1 tgram://…" in stored
    assert "#11 json://…" in stored
    logged = "\n".join(lines)
    assert "notification_failed" in logged
    assert "apprise_said" in logged
    _clean(stored)
    _clean(logged)
    # A ping URL urllib refuses: the exception quotes the URL, whose path is the ping's secret.
    ping_error = await healthchecks.send_ping(PING + "/\x00bad", "fail", "body", 1)
    assert ping_error is not None
    _clean(ping_error)


def test_notify_test_prints_no_secret(tmp_path: Path) -> None:
    """The real command: every URL fails (closed port, no route), none is shown."""
    dead = closed_port()
    urls = [u.replace("127.0.0.1:9", f"127.0.0.1:{dead}") for u, _ in URLS]
    config = tmp_path / "bt.toml"
    config.write_text(
        "[server]\n"
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}\n"
        "[notify]\n"
        f"urls = {json.dumps(urls)}\n"
        "timeout = 3\n"
        "[clients.web1]\n"
        'host = "h"\nrepository = "/r"\npaths = ["/x"]\nencryption = "none"\n'
        f"healthchecks = {json.dumps(PING)}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "borgtunnel", "--config", str(config), "notify-test"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == len(URLS), result.stdout + result.stderr
    assert lines[0].endswith("#1 tgram://…") or lines[0].startswith("FAILED  #1 tgram://…")
    assert any(line.startswith("FAILED  #4 json://…") for line in lines), lines
    _clean(result.stdout)
    _clean(result.stderr)
    check = subprocess.run(
        [sys.executable, "-m", "borgtunnel", "--config", str(config), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    _clean(check.stdout + check.stderr)


def test_every_configured_url_is_remembered_for_scrubbing(tmp_path: Path) -> None:
    parse_config(_config(tmp_path))
    _clean(scrub(" ".join(ALL_SECRETS)))
