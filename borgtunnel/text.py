"""Text from clients made safe for a terminal."""

from __future__ import annotations


def printable(text: str) -> str:
    """Control characters (ESC, CR, newlines, C1 …) shown as escapes, so text a client sent
    cannot forge lines, move the cursor or retitle a terminal. Printable text is unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
