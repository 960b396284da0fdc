"""The in-memory network behaves like a stream network: framing, EOF, crashes."""

import pytest
import trio

from lattice.net.streams import PeerError, StreamClosedError, recv_frame, recv_frame_or_eof, send_frame
from lattice.testing.memnet import MemoryNetwork


async def test_framed_echo_and_clean_eof(nursery):
    net = MemoryNetwork()
    a, b = net.add_peer(), net.add_peer()

    async def echo(stream):
        while (msg := await recv_frame_or_eof(stream)) is not None:
            await send_frame(stream, {"echo": msg})

    b.set_stream_handler("/echo/1", echo)
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    s = await a.open_stream(b.peer_id, "/echo/1")
    await send_frame(s, [1, "two", b"\x03"])
    assert await recv_frame(s) == {"echo": [1, "two", b"\x03"]}
    await s.close_write()
    assert await recv_frame_or_eof(s) is None
    assert a.connected_peers() == [b.peer_id]


async def test_crashed_peer_resets_streams_and_refuses_new_ones(nursery):
    net = MemoryNetwork()
    a, b = net.add_peer(), net.add_peer()
    b.set_stream_handler("/sink/1", lambda s: trio.sleep_forever())
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    s = await a.open_stream(b.peer_id, "/sink/1")
    net.disconnect(b.peer_id)
    with pytest.raises(StreamClosedError):
        await recv_frame(s)
    with pytest.raises(PeerError):
        await a.open_stream(b.peer_id, "/sink/1")
    assert a.connected_peers() == []


async def test_a_stalled_peer_keeps_its_streams_but_answers_nothing_until_resumed(
        nursery, autojump_clock):
    net = MemoryNetwork()
    a, b = net.add_peer(), net.add_peer()

    async def echo(stream):
        while (msg := await recv_frame_or_eof(stream)) is not None:
            await send_frame(stream, msg)

    b.set_stream_handler("/echo/1", echo)
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    s = await a.open_stream(b.peer_id, "/echo/1")
    net.stall(b.peer_id)
    await send_frame(s, "hello?")
    with trio.move_on_after(1.0) as waited:
        await recv_frame(s)
    assert waited.cancelled_caught  # no answer, no error: the peer hangs
    net.resume(b.peer_id)
    assert await recv_frame(s) == "hello?"
