"""Sanity of a new archive after verification: empty, or much smaller than the last one. Pure.

A wrong mount, an emptied directory or a ransomware wipe all produce a perfectly valid archive;
borg reports success. Comparing with the previous archive of the client is what catches them.
"""

from __future__ import annotations


def sanity_warning(
    nfiles: int | None,
    original_size: int | None,
    previous_nfiles: int | None,
    previous_size: int | None,
    max_shrink: float,
) -> str | None:
    """The reason the archive is suspicious, or None. ``max_shrink`` is in percent."""
    if nfiles == 0:
        return "the archive has 0 files (wrong mount, emptied or missing paths?)"
    reasons = []
    for label, now, before in (
        ("file count", nfiles, previous_nfiles),
        ("original size", original_size, previous_size),
    ):
        if now is None or not before:
            continue
        drop = 100.0 * (before - now) / before
        if drop > max_shrink:
            reasons.append(f"{label} fell by {drop:.0f} % ({before} -> {now})")
    if not reasons:
        return None
    return (
        "; ".join(reasons) + f" against the previous archive, more than max_shrink = "
        f"{max_shrink:g} % (wrong mount, emptied directory, wipe?)"
    )
