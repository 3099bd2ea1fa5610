"""Text for people: client text made safe for a terminal, sizes for tables."""

from __future__ import annotations


def printable(text: str) -> str:
    """Control characters (ESC, CR, newlines, C1 …) shown as escapes, so text a client sent
    cannot forge lines, move the cursor or retitle a terminal. Printable text is unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def option_like(text: str) -> str | None:
    """Why ``text`` could be read as an option by a program it is passed to, or None.

    A leading '-' is an option to nearly every program; leading whitespace is one ``read``, a
    ``strip()`` or an unquoted shell expansion away from it. Archive names reach hooks as
    ``{archive}`` and ``BORGTUNNEL_ARCHIVE``, so the names borgtunnel accepts never start so."""
    if text[:1] == "-":
        return "starts with '-' (a program would read it as an option)"
    if text[:1].isspace():
        return "starts with whitespace (stripped, it could read as an option)"
    return None


def format_size(n: int | None) -> str:
    """``"1.4MB"`` (decimal units, as borg prints them); ``"-"`` for unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}TB"
