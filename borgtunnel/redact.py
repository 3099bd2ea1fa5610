"""Configured URLs (apprise notifications, healthchecks pings) kept out of everything printed.

Those URLs are credentials: ``tgram://BOTTOKEN/CHAT``, ``pbul://TOKEN``, ``pover://USER@TOKEN``,
``json://host/?+Authorization=Bearer …``, ``mailtos://host?user=…&pass=…``, a healthchecks ping
UUID. Where the token sits differs per service, so no rule for "the secret part" can be right
for all of them: a URL is only ever shown as its scheme and its position in the list it came
from (``#2 tgram://…``), and any text that may quote one (apprise's own log lines, exception
messages) is scrubbed of every piece of every configured URL before it is logged or stored.
"""

from __future__ import annotations

import re
import urllib.parse

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}")
# Any URL-looking word in free text: whatever its service, only its scheme stays.
_URL_IN_TEXT = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]{0,31})://[^\s'\"<>]*")
# Pieces shorter than this are not secrets (and would blank out ordinary words).
_MIN_PIECE = 4
_SPLIT = re.compile(r"[/:@?&=#,;+\s]+")
# Tokens often carry a prefix (``o.TOKEN``): long enough sub-pieces count on their own too.
_SUBSPLIT = re.compile(r"[._~-]+")
_MIN_SUBPIECE = 8

_known_pieces: set[str] = set()


def redact_url(url: str, index: int | None = None) -> str:
    """``tgram://…`` (``#2 tgram://…`` with a 1-based position): nothing after the scheme."""
    scheme, sep, _ = url.partition("://")
    shown = f"{scheme.lower()}://…" if sep and _SCHEME.fullmatch(scheme) else "<url>"
    return shown if index is None else f"#{index} {shown}"


def remember_url(url: str) -> None:
    """Note the pieces of a configured URL, so :func:`scrub` removes them wherever they appear:
    the whole, user, password, host, each path segment and each query value (not the keys)."""
    rest = url.partition("://")[2] or url
    where, _, query = rest.partition("?")
    pieces = {url, rest, where, query, *_SPLIT.split(where)}
    for pair in query.split("&"):
        value = pair.partition("=")[2]
        pieces.update({pair, value, *_SPLIT.split(value)})
    for _, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        pieces.update({value, *_SPLIT.split(value)})
    pieces.update(
        sub for p in list(pieces) for sub in _SUBSPLIT.split(p) if len(sub) >= _MIN_SUBPIECE
    )
    # As written, percent-decoded and percent-encoded: a message may quote any of them.
    pieces |= {urllib.parse.unquote(p) for p in pieces} | {urllib.parse.quote(p) for p in pieces}
    _known_pieces.update(p for p in pieces if len(p) >= _MIN_PIECE)


def scrub(text: str) -> str:
    """``text`` without any piece of a configured URL, and with every URL cut to its scheme."""
    for piece in sorted(_known_pieces, key=len, reverse=True):
        if piece in text:
            text = text.replace(piece, "…")
    return _URL_IN_TEXT.sub(lambda m: f"{m.group(1)}://…", text)
