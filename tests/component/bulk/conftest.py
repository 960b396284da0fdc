"""Fixtures for bulk-transfer tests: a memnet control stream pair, a real loopback
side-channel listener, a tampering TCP proxy, and a Yamux-like stream that resets a writer
left waiting more than 5 s for window (what py-libp2p does, PY-LIBP2P.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import trio

from lattice.net.bulk import serve_bulk_listener
from lattice.net.streams import StreamClosedError
from lattice.testing.memnet import MemoryNetwork


@pytest.fixture
async def stream_pair(nursery):
    """``await stream_pair()`` -> (a, b): both ends of one memnet stream (a opened it)."""
    net = MemoryNetwork()
    a, b = net.add_peer(), net.add_peer()
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    accepted_send, accepted_recv = trio.open_memory_channel(1)
    finished = trio.Event()

    async def handler(stream):
        await accepted_send.send(stream)
        await finished.wait()  # memnet closes the stream when its handler returns

    b.set_stream_handler("/test/bulk", handler)

    async def open_pair():
        ours = await a.open_stream(b.peer_id, "/test/bulk")
        return ours, await accepted_recv.receive()

    open_pair.net = net
    yield open_pair
    finished.set()


@pytest.fixture
async def listener(nursery):
    return await nursery.start(serve_bulk_listener)


Mutate = Callable[[int, bytes], bytes | None]
"""(offset of this piece in the client->server byte stream, piece) -> bytes to forward,
or None to cut both directions there."""


@pytest.fixture
def proxy(nursery):
    """``await proxy((host, port), mutate)`` -> (host, port) of a TCP proxy in front of
    the target that passes client->server bytes through ``mutate``."""

    async def start(target: tuple[str, int], mutate: Mutate) -> tuple[str, int]:
        async def handle(client: trio.SocketStream) -> None:
            server = await trio.open_tcp_stream(*target)
            async with client, server:
                async with trio.open_nursery() as n:
                    async def upstream():
                        offset = 0
                        try:
                            while data := await client.receive_some(65536):
                                out = mutate(offset, data)
                                offset += len(data)
                                if out is None:
                                    n.cancel_scope.cancel()
                                    return
                                await server.send_all(out)
                            await server.send_eof()
                        except trio.BrokenResourceError:
                            n.cancel_scope.cancel()  # one end reset: so does the proxy

                    async def downstream():
                        try:
                            while data := await server.receive_some(65536):
                                await client.send_all(data)
                        except trio.BrokenResourceError:
                            n.cancel_scope.cancel()

                    n.start_soon(upstream)
                    n.start_soon(downstream)

        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        host, port = listeners[0].socket.getsockname()[:2]
        return host, port

    return start


def _flip_byte_at(position: int) -> Mutate:
    def mutate(offset: int, data: bytes) -> bytes:
        if offset <= position < offset + len(data):
            buf = bytearray(data)
            buf[position - offset] ^= 0x01
            return bytes(buf)
        return data
    return mutate


def _cut_at(position: int) -> Mutate:
    def mutate(offset: int, data: bytes) -> bytes | None:
        if offset + len(data) > position:
            return None
        return data
    return mutate


@pytest.fixture
def flip_byte_at():
    """``flip_byte_at(n)``: a Mutate that flips one bit of client->server byte n."""
    return _flip_byte_at


@pytest.fixture
def cut_at():
    """``cut_at(n)``: a Mutate that cuts the connection before client->server byte n."""
    return _cut_at


# -- a Yamux-like stream ---------------------------------------------------------------


class _Direction:
    def __init__(self, window: int) -> None:
        self.window = window
        self.buf = bytearray()
        self.eof = False
        self.reset = False
        self.changed = trio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@dataclass
class WindowedStream:
    """One end of a duplex pipe with Yamux's flow control: a writer may have at most
    ``window`` unread bytes outstanding, and a write that waits longer than
    ``stall_limit`` seconds for room resets the stream, like py-libp2p's
    "Timed out waiting for window update after 5 seconds"."""

    outbound: _Direction
    inbound: _Direction
    remote_peer_id: str
    stall_limit: float
    protocol: str = "/test/windowed"

    async def read(self, max_bytes: int) -> bytes:
        d = self.inbound
        while not d.buf and not d.eof and not d.reset:
            await d.changed.wait()
        if d.reset:
            raise StreamClosedError("stream reset")
        out = bytes(d.buf[:max_bytes])
        del d.buf[:max_bytes]
        d.notify()  # window update
        return out

    async def write(self, data) -> None:
        d = self.outbound
        view = memoryview(bytes(data))
        while view:
            if d.reset:
                raise StreamClosedError("stream reset")
            room = d.window - len(d.buf)
            if room <= 0:
                with trio.move_on_after(self.stall_limit) as scope:
                    while len(d.buf) >= d.window and not d.reset:
                        await d.changed.wait()
                if scope.cancelled_caught:
                    d.reset = self.inbound.reset = True
                    d.notify()
                    self.inbound.notify()
                    raise StreamClosedError(
                        "Timed out waiting for window update after 5 seconds.")
                continue
            d.buf += view[:room]
            view = view[room:]
            d.notify()
        await trio.lowlevel.checkpoint()

    async def close_write(self) -> None:
        self.outbound.eof = True
        self.outbound.notify()

    async def close(self) -> None:
        await self.close_write()

    async def reset(self) -> None:
        self.outbound.reset = self.inbound.reset = True
        self.outbound.notify()
        self.inbound.notify()


@pytest.fixture
def windowed_pair():
    """``windowed_pair(window=256 KiB, stall_limit=5.0)`` -> (a, b)."""

    def make(window: int = 256 * 1024, stall_limit: float = 5.0):
        ab, ba = _Direction(window), _Direction(window)
        return (WindowedStream(ab, ba, "peer-b", stall_limit),
                WindowedStream(ba, ab, "peer-a", stall_limit))

    return make
