"""The small part of the systemd service protocol that borgtunnel speaks, without libsystemd.

* Readiness and status notification (``sd_notify``): one datagram of newline-separated
  ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``; a leading ``@``
  means the abstract namespace.
* The watchdog: ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, which must be our pid when set) asks
  for ``WATCHDOG=1`` more often than that period; we ping at half of it.
* Socket activation (``sd_listen_fds_with_names``): ``$LISTEN_PID`` must be our pid,
  ``$LISTEN_FDS`` descriptors start at fd 3, ``$LISTEN_FDNAMES`` carries each
  ``FileDescriptorName=`` separated by colons.
* ``$JOURNAL_STREAM`` (``device:inode``) tells whether stderr is connected to journald, in which
  case a ``<N>`` prefix on a line sets its syslog priority.

Notification never raises on a failed send (no socket, socket gone, queue full): it returns
False and leaves logging to the caller, so a service also runs unchanged outside systemd.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, NoReturn

__all__ = [
    "LISTEN_FDS_START",
    "ListenFd",
    "Notifier",
    "journal_stream_matches",
    "listen_fds",
    "notify",
    "parse_listen_environment",
    "watchdog_interval",
    "watchdog_loop",
]

LISTEN_FDS_START: Final = 3
"""The first descriptor passed by socket activation (``SD_LISTEN_FDS_START``)."""

_LISTEN_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_DEFAULT_FD_NAME: Final = "unknown"  # what sd_listen_fds_with_names() reports without names
_SEND_TIMEOUT: Final = 1.0  # seconds; the service manager drains its queue quickly
_DIGITS: Final = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() would accept "²"


def _socket_address(value: str) -> str | None:
    """Turn ``$NOTIFY_SOCKET`` into an address for ``sendto``; None if it is not one we speak."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # Newer systemd also speaks "vsock:CID:PORT" (for VMs); a service on the host never gets it.
    return None


class Notifier:
    """Sends ``sd_notify`` messages to one notification socket.

    ``Notifier()`` reads ``$NOTIFY_SOCKET`` once, at construction; ``Notifier("")`` is disabled
    (every call returns False), as is a socket address that is neither ``/path`` nor ``@name``.
    Each message is a ``KEY=VALUE`` string without newlines. A send blocks only while the
    manager's queue is full (it is wedged) and gives up after ``timeout`` seconds, so calling
    it from a coroutine stalls the event loop by at most that much.
    """

    __slots__ = ("_address", "_timeout")

    def __init__(self, socket_path: str | None = None, *, timeout: float = _SEND_TIMEOUT) -> None:
        if socket_path is None:
            socket_path = os.environ.get("NOTIFY_SOCKET")
        self._address = _socket_address(socket_path) if socket_path else None
        self._timeout = timeout

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to send to."""
        return self._address is not None

    def notify(self, *messages: str) -> bool:
        """Send ``messages`` as one datagram; True when the datagram was sent.

        Raises ValueError for a message that is not ``KEY=VALUE`` or contains a newline (a
        programming error); never raises for a failed send.
        """
        for message in messages:
            key, sep, _ = message.partition("=")
            if not sep or not key or "\n" in message:
                raise ValueError(f"not a KEY=VALUE notification message: {message!r}")
        if self._address is None or not messages:
            return False
        payload = "\n".join(messages).encode("utf-8", errors="replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(self._timeout)
                sock.sendto(payload, self._address)
        except (OSError, ValueError):
            # ValueError: an address with an embedded NUL byte. OSError covers a missing
            # socket, a path over 108 bytes, a full queue (timeout) and permission problems.
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: ``READY=1``, optionally with a status line."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", _status_message(status))

    def status(self, text: str) -> bool:
        """A one-line, free-form status shown by ``systemctl status``."""
        return self.notify(_status_message(text))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun: ``STOPPING=1``."""
        if status is None:
            return self.notify("STOPPING=1")
        return self.notify("STOPPING=1", _status_message(status))

    def reloading(self, status: str | None = None) -> bool:
        """A configuration reload has begun; send :meth:`ready` when it is done.

        Carries ``MONOTONIC_USEC=`` (``CLOCK_MONOTONIC`` in microseconds), which systemd >= 253
        requires for ``Type=notify-reload`` and older versions ignore.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        messages = ["RELOADING=1", f"MONOTONIC_USEC={now_usec}"]
        if status is not None:
            messages.append(_status_message(status))
        return self.notify(*messages)

    def watchdog(self) -> bool:
        """Keep-alive ping: ``WATCHDOG=1``."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start/stop/reload times out."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")


def _status_message(text: str) -> str:
    return "STATUS=" + " ".join(text.splitlines())


def notify(*messages: str) -> bool:
    """Send ``messages`` to ``$NOTIFY_SOCKET`` as one datagram; False when unset or on failure."""
    return Notifier().notify(*messages)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None when not asked for.

    None also when ``$WATCHDOG_PID`` is set to another process (we inherited the variables).
    Raises ValueError for values that are not positive integers.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if usec_text is None:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text is not None and _parse_positive("WATCHDOG_PID", pid_text) != os.getpid():
        return None
    return _parse_positive("WATCHDOG_USEC", usec_text) / 2 / 1_000_000


async def watchdog_loop(notifier: Notifier, interval: float) -> NoReturn:
    """Send ``WATCHDOG=1`` now and then every ``interval`` seconds until cancelled.

    Run it as a task next to the service's real work: it proves the event loop still runs.
    """
    if not interval > 0:
        raise ValueError(f"watchdog interval must be positive, got {interval!r}")
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


@dataclass(frozen=True, slots=True)
class ListenFd:
    """A descriptor passed by socket activation and its ``FileDescriptorName=``."""

    fd: int
    name: str


def listen_fds() -> list[ListenFd]:
    """Take the descriptors passed by socket activation; [] when there are none for us.

    Sets ``FD_CLOEXEC`` on each descriptor and always removes ``LISTEN_PID``, ``LISTEN_FDS``
    and ``LISTEN_FDNAMES`` from the environment, so child processes neither inherit nor
    misread them (like ``sd_listen_fds_with_names(1, …)``). Raises ValueError for malformed
    variables or when a promised descriptor is not open.
    """
    try:
        passed = parse_listen_environment(os.environ, os.getpid())
        for item in passed:
            try:
                flags = fcntl.fcntl(item.fd, fcntl.F_GETFD)
                fcntl.fcntl(item.fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            except OSError as exc:
                raise ValueError(
                    f"LISTEN_FDS={len(passed)} but descriptor {item.fd} is not usable: "
                    f"{exc.strerror}"
                ) from exc
        return passed
    finally:
        for name in _LISTEN_VARIABLES:
            os.environ.pop(name, None)


def parse_listen_environment(environ: Mapping[str, str], pid: int) -> list[ListenFd]:
    """The pure part of :func:`listen_fds`: which descriptors ``environ`` passes to ``pid``."""
    pid_text = environ.get("LISTEN_PID")
    if pid_text is None:
        return []
    if _parse_positive("LISTEN_PID", pid_text) != pid:
        return []
    count_text = environ.get("LISTEN_FDS")
    if count_text is None:
        raise ValueError("LISTEN_PID is set but LISTEN_FDS is not")
    count = _parse_count("LISTEN_FDS", count_text)
    if count == 0:
        return []
    names_text = environ.get("LISTEN_FDNAMES")
    names = [_DEFAULT_FD_NAME] * count if names_text is None else names_text.split(":")
    if len(names) != count:
        raise ValueError(
            f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}: {names_text!r}"
        )
    return [ListenFd(LISTEN_FDS_START + i, name) for i, name in enumerate(names)]


def journal_stream_matches(stream_fd: int = 2) -> bool:
    """True when ``stream_fd`` is the journald stream named by ``$JOURNAL_STREAM``.

    Then a ``<N>`` prefix on each line sets its syslog priority. Never raises.
    """
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    device_text, sep, inode_text = value.partition(":")
    if not sep:
        return False
    try:
        device, inode = int(device_text, 10), int(inode_text, 10)
    except ValueError:
        return False
    try:
        st = os.fstat(stream_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def _parse_count(variable: str, text: str) -> int:
    """A non-negative decimal integer, digits only (no sign, no blanks)."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"{variable} is not a non-negative integer: {text!r}")
    return int(text, 10)


def _parse_positive(variable: str, text: str) -> int:
    value = _parse_count(variable, text)
    if value == 0:
        raise ValueError(f"{variable} must be positive, got {text!r}")
    return value
