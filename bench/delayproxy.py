"""A TCP proxy on loopback that delays each direction by a fixed time: a WAN link without netem.

``python -m bench.delayproxy --target 127.0.0.1:PORT --delay 0.020`` prints the port it listens on.
Each direction keeps one FIFO of (due time, bytes) and one timer, so ordering is preserved (a
timer per chunk would not be: asyncio's heap does not order equal deadlines). It does not limit
bandwidth: it reads as fast as the sender writes and only stops reading when more than
``HIGH_WATER`` bytes are in flight in one direction (a link with a very large bandwidth-delay
product); at 20 ms one way that allows > 3 GB/s. The SSH channel window, not this proxy, is
what bounds throughput at this latency.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine

HIGH_WATER = 64 * 1024 * 1024
LOW_WATER = 16 * 1024 * 1024
_EOF = b""


class _Direction:
    """Bytes from ``source`` delivered to ``sink`` ``delay`` seconds after they arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.source: asyncio.Transport | None = None
        self.sink: asyncio.Transport | None = None
        self.source_paused = False
        self.ended = False
        self.reverse: _Direction | None = None

    def push(self, data: bytes) -> None:
        due = self.loop.time() + self.delay
        self.queue.append((due, data))
        self.queued += len(data)
        if self.timer is None:
            self.timer = self.loop.call_at(due, self.flush)
        self._throttle()

    def finish(self) -> None:
        """The source sent EOF (or went away): forward it after the same delay, once."""
        if not self.ended:
            self.ended = True
            self.push(_EOF)

    def flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        sink = self.sink
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            self.queued -= len(data)
            if sink is None or sink.is_closing():
                continue
            if not data:  # _EOF: data_received never delivers empty bytes
                if sink.can_write_eof():
                    sink.write_eof()
                # Both directions of the sink's connection are done: release it.
                if self.reverse is None or self.reverse.ended or not sink.can_write_eof():
                    sink.close()
            else:
                sink.write(data)
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)
        self._throttle()

    def _in_flight(self) -> int:
        buffered = self.sink.get_write_buffer_size() if self.sink is not None else 0
        return self.queued + buffered

    def _throttle(self) -> None:
        source = self.source
        if source is None or source.is_closing():
            return
        if not self.source_paused and self._in_flight() > HIGH_WATER:
            source.pause_reading()
            self.source_paused = True
        elif self.source_paused and self._in_flight() < LOW_WATER:
            source.resume_reading()
            self.source_paused = False


class _Side(asyncio.Protocol):
    """One TCP connection; what it receives goes into ``outbound``."""

    def __init__(self, outbound: _Direction, inbound: _Direction) -> None:
        self.outbound = outbound
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.outbound.source = transport
        self.inbound.sink = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.outbound.push(data)

    def eof_received(self) -> bool:
        self.outbound.finish()
        return True  # keep our sending half open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self.outbound.finish()
        # Nothing more can be delivered to us; let the other side's data drain into nowhere.
        self.inbound.sink = None

    def pause_writing(self) -> None:
        self.inbound._throttle()

    def resume_writing(self) -> None:
        self.inbound._throttle()


class _Downstream(_Side):
    """The accepted side: reads nothing until the upstream connection exists."""

    def __init__(
        self,
        outbound: _Direction,
        inbound: _Direction,
        connect: Callable[[_Side, _Direction, _Direction], Coroutine[None, None, None]],
    ) -> None:
        super().__init__(outbound, inbound)
        self._connect = connect
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self._task = asyncio.get_running_loop().create_task(
            self._connect(self, self.outbound, self.inbound)
        )


async def _serve(listen_port: int, target_host: str, target_port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()

    async def connect_upstream(downstream: _Side, up: _Direction, down: _Direction) -> None:
        try:
            await loop.create_connection(lambda: _Side(down, up), target_host, target_port)
        except OSError:
            if downstream.transport is not None:
                downstream.transport.close()
            return
        if downstream.transport is not None:
            downstream.transport.resume_reading()

    def accept() -> _Side:
        up = _Direction(loop, delay)  # client -> server
        down = _Direction(loop, delay)  # server -> client
        up.reverse, down.reverse = down, up
        return _Downstream(up, down, connect_upstream)

    server = await loop.create_server(accept, "127.0.0.1", listen_port)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--delay", type=float, required=True, help="one-way delay, seconds")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, host, int(port), args.delay))


if __name__ == "__main__":
    main()
