"""Yamux receive credit between two real py-libp2p hosts (lattice.net.yamux_credit): a
reader of many small messages grants credit once per half window, as go-yamux does,
not once per read (each grant is an encrypted frame), and a large transfer read in
small pieces never stalls for want of credit."""

from __future__ import annotations

import contextlib
import logging

import pytest
import trio
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, YamuxStream

from lattice.core.identity import Identity
from lattice.net.host import open_libp2p_node, quiet_libp2p_logging
from lattice.net.streams import read_exactly

pytestmark = pytest.mark.integration  # real sockets, real time

PROTOCOL = "/lattice-test/credit/1"


@contextlib.asynccontextmanager
async def a_stream_between_two_nodes(handler):
    quiet_libp2p_logging(logging.WARNING)
    async with open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as a, \
            open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as b:
        b.set_stream_handler(PROTOCOL, handler)
        await a.connect(f"{b.listen_addrs()[0]}/p2p/{b.peer_id}")
        yield await a.open_stream(b.peer_id, PROTOCOL)


@pytest.fixture
def grants(monkeypatch):
    """Every WINDOW_UPDATE a stream sends: (stream id, credit)."""
    sent: list[tuple[int, int]] = []
    original = YamuxStream.send_window_update

    async def counted(self, delta, *args, **kwargs):
        sent.append((self.stream_id, delta))
        return await original(self, delta, *args, **kwargs)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    return sent


async def test_small_messages_are_granted_credit_per_half_window_not_per_read(grants):
    messages, size = 2000, 100  # 200 kB: under one window, over half of one
    done = trio.Event()

    async def reader(stream):
        for _ in range(messages):
            await read_exactly(stream, size)
        await stream.write(b"k")
        done.set()

    async with a_stream_between_two_nodes(reader) as stream:
        for i in range(messages):
            await stream.write(bytes([i % 256]) * size)
        with trio.fail_after(10):
            await done.wait()
            assert await read_exactly(stream, 1) == b"k"
    granted = [delta for _, delta in grants]
    # py-libp2p's own rule granted on nearly every one of the 2000 reads
    assert len(granted) <= 4, f"{len(granted)} window updates for {messages} reads"
    assert sum(granted) >= DEFAULT_WINDOW_SIZE // 2  # the half window consumed was released


async def test_a_transfer_many_windows_long_read_in_small_pieces_completes():
    total = 24 * DEFAULT_WINDOW_SIZE
    received = trio.Event()

    async def reader(stream):
        got = 0
        while got < total:
            got += len(await stream.read(1000))
        await stream.write(b"k")
        received.set()

    async with a_stream_between_two_nodes(reader) as stream:
        with trio.fail_after(30):  # a sender left without credit would wait forever
            await stream.write(b"\x01" * total)
            await received.wait()
            assert await read_exactly(stream, 1) == b"k"
