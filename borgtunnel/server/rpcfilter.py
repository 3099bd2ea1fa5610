"""A read-only ``borg serve`` for borg 1.x restores: the client's RPC requests, checked one by one.

``python -m borgtunnel.server.rpcfilter -- borg serve …`` runs in place of the serve (fd 0 and 1
the client's socket): it starts the serve with its stdin on a pipe and its stdout on the socket,
and copies the client's requests to the pipe. Its own process, not a thread of the daemon: the
daemon's event loop, busy forwarding the restore's data, would hold the GIL and delay each
request (a thread doubled a 300 MB restore's time).

borg 1.x ``borg serve`` has no read-only mode: ``--append-only`` still takes new data, key
changes and lock breaks, and ``--storage-quota`` only stops a commit, after the data is written.
A restore only reads, so its serve gets the client's requests through this filter: each msgpack
request (``{"i": id, "m": method, "a": args}``, or borg 1.0's ``(1, id, method, args)``) is read
whole, and only the methods ``borg extract`` uses pass; anything else ends the connection before
borg sees it (the client's borg gets borg's own ``InvalidRPCMethod`` answer for it, after borg
serve answered what came before). The answers (the bulk of a restore) go from borg to the client
directly.

Pure code: the decoder is a bounded subset of msgpack (what borg's requests use), and
:class:`RequestFilter` turns received bytes into bytes to forward or a refusal.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

# What `borg extract` (and `list`, `info`) of borg 1.2 and 1.4 call; `open` only without create.
# Refused among borg's rpc_methods: put, delete, commit, destroy, save_key, break_lock, check,
# get_free_nonce, commit_nonce_reservation, inject_exception.
RESTORE_METHODS: Final = frozenset(
    {"negotiate", "open", "get", "list", "scan", "__len__", "load_key", "rollback"}
)
# The line on stderr that tells the listener (server/serve.py) a request was refused.
REFUSED_PREFIX: Final = "borgtunnel-refused: "
# A read request is an id or two: anything this large is not one.
MAX_REQUEST: Final = 1 << 20
_MAX_DEPTH: Final = 16


class IncompleteError(Exception):
    """More bytes are needed."""


class MalformedError(Exception):
    """Not msgpack borg would send."""


def decode(buf: bytes, pos: int = 0, depth: int = 0) -> tuple[object, int]:
    """One msgpack object at ``pos``: (value, end). str and bin both come out as bytes, map keys
    as they are; raises IncompleteError or MalformedError."""
    if depth > _MAX_DEPTH:
        raise MalformedError("nested too deeply")
    kind, value, pos = _header(buf, pos)
    if kind == "raw":
        return _raw(buf, pos, value)
    if kind == "array":
        return _array(buf, pos, value, depth)
    if kind == "map":
        return _map(buf, pos, value, depth)
    return value, pos


def _header(buf: bytes, pos: int) -> tuple[str, Any, int]:
    """(kind, value or count, position after the header) of the object at ``pos``."""
    tag = _take(buf, pos, 1)[0]
    pos += 1
    if tag <= 0x7F or tag >= 0xE0 or tag in _SIMPLE:  # fixints, nil, false, true
        return "value", _SIMPLE.get(tag, tag if tag <= 0x7F else tag - 0x100), pos
    for low, high, kind in _FIXED_RANGES:
        if low <= tag <= high:
            return kind, tag - low, pos
    if tag in _LENGTHS:
        size, kind = _LENGTHS[tag]
        count = int.from_bytes(_take(buf, pos, size), "big")
        pos += size
        if kind == "ext":
            return "raw", count, pos + 1  # a type byte, then the data
        return kind, count, pos
    if tag in _NUMBERS:
        fmt = _NUMBERS[tag]
        size = struct.calcsize(fmt)
        return "value", struct.unpack(fmt, _take(buf, pos, size))[0], pos + size
    if tag in _FIXEXT:
        return "raw", _FIXEXT[tag], pos + 1
    raise MalformedError(f"msgpack type byte {tag:#04x}")


_FIXED_RANGES: Final = ((0xA0, 0xBF, "raw"), (0x90, 0x9F, "array"), (0x80, 0x8F, "map"))
_SIMPLE: Final = {0xC0: None, 0xC2: False, 0xC3: True}
_LENGTHS: Final = {
    0xC4: (1, "raw"),
    0xC5: (2, "raw"),
    0xC6: (4, "raw"),
    0xD9: (1, "raw"),
    0xDA: (2, "raw"),
    0xDB: (4, "raw"),
    0xDC: (2, "array"),
    0xDD: (4, "array"),
    0xDE: (2, "map"),
    0xDF: (4, "map"),
    0xC7: (1, "ext"),
    0xC8: (2, "ext"),
    0xC9: (4, "ext"),
}
_NUMBERS: Final = {
    0xCA: ">f",
    0xCB: ">d",
    0xCC: ">B",
    0xCD: ">H",
    0xCE: ">I",
    0xCF: ">Q",
    0xD0: ">b",
    0xD1: ">h",
    0xD2: ">i",
    0xD3: ">q",
}
_FIXEXT: Final = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


def _take(buf: bytes, pos: int, size: int) -> bytes:
    if pos + size > len(buf):
        raise IncompleteError
    return buf[pos : pos + size]


def _raw(buf: bytes, pos: int, size: int) -> tuple[bytes, int]:
    if size > MAX_REQUEST:
        raise MalformedError("a string longer than any read request")
    return _take(buf, pos, size), pos + size


def _array(buf: bytes, pos: int, count: int, depth: int) -> tuple[list[object], int]:
    if count > MAX_REQUEST:
        raise MalformedError("an array longer than any read request")
    items = []
    for _ in range(count):
        item, pos = decode(buf, pos, depth + 1)
        items.append(item)
    return items, pos


def _map(buf: bytes, pos: int, count: int, depth: int) -> tuple[dict[object, object], int]:
    if count > MAX_REQUEST:
        raise MalformedError("a map longer than any read request")
    items: dict[object, object] = {}
    for _ in range(count):
        key, pos = decode(buf, pos, depth + 1)
        value, pos = decode(buf, pos, depth + 1)
        if not isinstance(key, bytes | int | bool | None):
            raise MalformedError("a map key borg never sends")
        items[key] = value
    return items, pos


def restore_refusal(request: object) -> str | None:
    """Why ``request`` (a decoded borg RPC request) may not reach a restore's serve, or None."""
    if isinstance(request, dict):
        method, args = request.get(b"m"), request.get(b"a")
        create = args.get(b"create") if isinstance(args, dict) else None
    elif isinstance(request, list) and len(request) == 4:  # borg 1.0: (1, id, method, args)
        method, args = request[2], request[3]
        create = args[1] if isinstance(args, list) and len(args) > 1 else None
    else:
        return "not a borg RPC request"
    if not isinstance(method, bytes):
        return "not a borg RPC request (no method name)"
    name = method.decode("utf-8", "backslashreplace")
    if name not in RESTORE_METHODS:
        return f"{name!r}, which a restore never needs (it only reads)"
    if name == "open" and create:
        return "'open' with create, which a restore never needs"
    return None


def encode(value: object) -> bytes:
    """msgpack as borg 1.x writes it (``use_bin_type=False``: str and bytes alike as raw)."""
    if value is None or isinstance(value, bool):
        return {None: b"\xc0", False: b"\xc2", True: b"\xc3"}[value]
    if isinstance(value, int):
        if 0 <= value <= 0x7F:
            return bytes([value])
        return b"\xd3" + struct.pack(">q", value)
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, bytes):
        return _length(len(value), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + value
    if isinstance(value, list | tuple):
        return _length(len(value), 0x90, 15, (None, 0xDC, 0xDD)) + b"".join(map(encode, value))
    if isinstance(value, dict):
        body = b"".join(encode(k) + encode(v) for k, v in value.items())
        return _length(len(value), 0x80, 15, (None, 0xDE, 0xDF)) + body
    raise TypeError(f"cannot encode {type(value).__name__}")


def _length(count: int, fixed: int, fixed_max: int, tags: tuple[int | None, int, int]) -> bytes:
    if count <= fixed_max:
        return bytes([fixed | count])
    for tag, size in zip(tags, (1, 2, 4), strict=True):
        if tag is not None and count < 1 << (8 * size):
            return bytes([tag]) + count.to_bytes(size, "big")
    raise ValueError("too long for msgpack")


def refusal_answer(request: bytes, reason: str) -> bytes:
    """borg's own answer to a method it does not serve (``InvalidRPCMethod``), for the refused
    request: the client's borg stops with an error instead of waiting for ever. Empty when the
    request's id cannot be read."""
    try:
        kind, _, _ = _header(request, 0)
    except (IncompleteError, MalformedError, struct.error):
        return b""
    msgid = peek_field(request, b"i", 1)
    if not isinstance(msgid, int):
        return b""
    if kind == "map":
        return encode(
            {
                b"i": msgid,
                b"exception_class": b"InvalidRPCMethod",
                b"exception_args": [f"refused by borgtunnel: {reason}".encode()],
                b"exception_full": [b""],
                b"exception_short": [f"refused by borgtunnel: {reason}".encode()],
                b"exception_trace": False,
                b"sysinfo": b"",
            }
        )
    return encode([1, msgid, b"InvalidRPCMethod", f"refused: {reason}".encode()])


@dataclass
class RequestFilter:
    """Feed it what the client sent; it returns the complete requests that may pass. After a
    refusal (``refused`` set) nothing passes any more: the caller ends the connection."""

    check: Callable[[object], str | None] = restore_refusal
    refused: str | None = None
    # The start of the refused request (up to MAX_REQUEST bytes): what refusal_answer reads.
    refused_request: bytes = b""
    _pending: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> bytes:
        if self.refused is not None:
            return b""
        self._pending += data
        buf = bytes(self._pending)
        pos = 0
        while pos < len(buf):
            try:
                request, end = decode(buf, pos)
            except IncompleteError:
                if len(buf) - pos > MAX_REQUEST:
                    self.refused = self._too_large(buf, pos)
                break
            except (MalformedError, struct.error, RecursionError) as exc:
                self.refused = self._too_large(buf, pos, f"malformed request: {exc}")
                break
            reason = self.check(request)
            if reason is not None:
                self.refused = reason
                break
            pos = end
        if self.refused is not None:
            self.refused_request = buf[pos : pos + MAX_REQUEST]
        del self._pending[:pos]
        return buf[:pos]

    def _too_large(self, buf: bytes, pos: int, otherwise: str = "") -> str:
        """A write (``put``) carries data no read request has: name its method if it can."""
        method = peek_field(buf, b"m", 2, pos)
        if (
            isinstance(method, bytes)
            and (reason := self.check({b"m": method, b"a": {}})) is not None
        ):
            return reason
        return otherwise or f"a request larger than {MAX_REQUEST} bytes"


def peek_field(buf: bytes, key: bytes, index: int, pos: int = 0) -> object:
    """One field of the request at ``pos`` (``key`` of borg's map, or ``index`` of borg 1.0's
    ``(1, id, method, args)``), read before the (maybe huge or incomplete) fields after it:
    borg sends ``i``, ``m``, then ``a``. None when it cannot be told."""
    try:
        kind, count, pos = _header(buf, pos)
        if kind == "array" and count == 4:
            for _ in range(index):
                _, pos = decode(buf, pos, 1)
            return decode(buf, pos, 1)[0]
        if kind != "map":
            return None
        for _ in range(count):
            name, pos = decode(buf, pos, 1)
            value, pos = decode(buf, pos, 1)
            if name == key:
                return value
    except (IncompleteError, MalformedError, struct.error):
        return None
    return None


def relay(serve: subprocess.Popen[bytes], check: RequestFilter) -> None:
    """Client (fd 0) -> the serve's stdin until the client's EOF, the serve's end or a refusal."""
    assert serve.stdin is not None  # noqa: S101 - we asked for a pipe
    with serve.stdin:
        while serve.poll() is None:
            if not select.select([0], [], [], 1.0)[0]:
                continue
            data = os.read(0, 65536)
            if not data:
                return
            passed = check.feed(data)
            try:
                serve.stdin.write(passed)
                serve.stdin.flush()
            except BrokenPipeError:
                return
            if check.refused is not None:
                return


def main(argv: Sequence[str] | None = None) -> int:
    """``-- SERVE_ARGV…``: run the serve behind the filter; exits with the serve's status."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] != ["--"] or len(words) < 2:
        sys.stderr.write("usage: python -m borgtunnel.server.rpcfilter -- BORG serve ...\n")
        return 2
    serve = subprocess.Popen(words[1:], stdin=subprocess.PIPE)
    check = RequestFilter()
    with contextlib.suppress(OSError):  # the client went away: the same end as EOF
        relay(serve, check)
    status = serve.wait()  # after EOF it answers what it was given, then exits
    if check.refused is None:
        return status
    sys.stderr.write(f"{REFUSED_PREFIX}{check.refused}\n")
    sys.stderr.flush()
    # The serve is gone: ours is the only writer on the socket. The client's borg gets an
    # error answer for the refused request, then the end, and stops instead of waiting.
    answer = memoryview(refusal_answer(check.refused_request, check.refused))
    client = socket.socket(fileno=os.dup(1))
    try:
        client.sendall(answer)
        client.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        client.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
