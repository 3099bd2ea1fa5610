"""Blocking calls (apprise, HTTP pings) off the event loop, bounded by a timeout.

A daemon thread per call rather than ``asyncio.to_thread``: the default executor is joined when
``asyncio.run`` ends, so one endpoint that never answers would keep a finished ``borgtunnel pull``
from exiting. A daemon thread that outlives its timeout is simply abandoned; the call itself has
its own socket timeouts, so it does not linger for long either.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def call_in_thread(fn: Callable[[], T], *, limit: float, name: str) -> T:
    """``fn()`` in a daemon thread; TimeoutError after ``limit`` seconds (the thread goes on)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # timed out meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # None only with an error

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, not swallowed
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name=name, daemon=True).start()
    async with asyncio.timeout(limit):
        return await future
