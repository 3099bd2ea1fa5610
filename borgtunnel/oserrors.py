"""Errors of this machine's own files and programs, worded for an administrator.

``PermissionError(13, 'Permission denied')`` alone reads like an SSH login refusal; the
administrator needs the path, what was being done with it, and that it happened here, not on
the client. Python's OSError carries the path and the reason but not the operation, so that is
taken from the innermost function of the traceback (``os.stat`` is reached through pathlib's
``stat``, a program start through subprocess's ``_execute_child``, and so on).
"""

from __future__ import annotations

# Innermost function name -> what this server could not do with the path.
_OPERATIONS = {
    "stat": "stat it",
    "lstat": "stat it",
    "is_dir": "stat it",
    "is_file": "stat it",
    "exists": "stat it",
    "access": "check access to it",
    "open": "open it",
    "open_file": "open it",
    "read_bytes": "read it",
    "read_text": "read it",
    "read_file": "read it",
    "write_bytes": "write it",
    "write_text": "write it",
    "mkdir": "create it",
    "makedirs": "create it",
    "touch": "create it",
    "unlink": "remove it",
    "rmdir": "remove it",
    "rename": "rename it",
    "replace": "rename it",
    "chmod": "change its mode",
    "chown": "change its owner",
    "iterdir": "list it",
    "listdir": "list it",
    "scandir": "list it",
    "_execute_child": "run it",
}


def operation(exc: BaseException) -> str:
    """What was being done when ``exc`` was raised, e.g. ``"stat it"``; the function's own name
    when it is not a known file operation."""
    name = ""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return _OPERATIONS.get(name, f"use it (in {name})" if name else "use it")


def is_local_file_error(exc: BaseException) -> bool:
    """An OSError about a path on this machine (network errors carry no file name)."""
    return isinstance(exc, OSError) and exc.filename is not None


def describe(exc: OSError, what: str = "") -> str:
    """``[WHAT ]PATH: REASON (this server could not OPERATION)``; just the error's own text
    when it names no path."""
    if exc.filename is None:
        return f"{what} {exc}".strip() if what else str(exc)
    path = str(exc.filename)
    if exc.filename2 is not None:
        path += f" -> {exc.filename2}"
    reason = exc.strerror or type(exc).__name__
    prefix = f"{what} " if what else ""
    return f"{prefix}{path}: {reason} (this server could not {operation(exc)})"
