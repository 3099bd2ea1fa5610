"""healthchecks.io-style pings: ``URL/start`` when a run starts, ``URL`` on success, ``URL/fail``
(with the error as the body) when a run failed for good.

Plain ``urllib`` in a daemon thread (``background.call_in_thread``): one POST, no dependency.
"""

from __future__ import annotations

import http.client
import urllib.request
from typing import Final, Literal

from borgtunnel.redact import scrub
from borgtunnel.reporting.background import call_in_thread

Ping = Literal["start", "success", "fail"]
_SUFFIX: Final = {"start": "/start", "success": "", "fail": "/fail"}
_MAX_BODY: Final = 10_000  # healthchecks.io keeps the first 10 kB of a ping body


def ping_url(base: str, kind: Ping) -> str:
    return base.rstrip("/") + _SUFFIX[kind]


async def send_ping(base: str, kind: Ping, body: str, limit: float) -> str | None:
    """POST one ping; None on a 2xx answer, else the reason."""
    url = ping_url(base, kind)
    if not url.startswith(("http://", "https://")):  # config checks this; urllib also does file:
        return "not an http(s) URL"
    data = body.encode("utf-8", "replace")[:_MAX_BODY]

    def post() -> str | None:
        request = urllib.request.Request(url, data=data, method="POST")  # noqa: S310 - http(s) only, checked above
        with urllib.request.urlopen(request, timeout=limit) as response:  # noqa: S310 - same
            status = int(response.status)
        return None if 200 <= status < 300 else f"HTTP {status}"

    try:
        return await call_in_thread(post, limit=limit + 1, name="borgtunnel-ping")
    except TimeoutError:
        return f"no answer within {limit:g} s"
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, reset, InvalidURL
        return scrub(str(exc))  # some quote the URL, whose path is the ping's secret
