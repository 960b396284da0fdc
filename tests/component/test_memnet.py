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


async def test_peers_hear_connects_and_disconnects_as_events(nursery):
    net = MemoryNetwork()
    a, b, c = net.add_peer(), net.add_peer(), net.add_peer()
    for p in (a, b, c):
        await nursery.start(p.serve)
    with a.peer_events() as a_events, b.peer_events() as b_events:
        await a.connect(b.peer_id)
        await a.connect(b.peer_id)  # already connected: no second event
        net.partition([a.peer_id], [b.peer_id, c.peer_id])
        net.heal()  # the cut connection comes back
        net.disconnect(b.peer_id)
        got_a = [await a_events.__aiter__().__anext__() for _ in range(4)]
        got_b = [await b_events.__aiter__().__anext__() for _ in range(4)]
    assert [(e.kind, e.peer_id) for e in got_a] == [
        ("connected", b.peer_id), ("disconnected", b.peer_id),
        ("connected", b.peer_id), ("disconnected", b.peer_id)]
    assert [(e.kind, e.peer_id, e.direction) for e in got_b[:1]] == [
        ("connected", a.peer_id, "inbound")]
    assert a.connected_peers() == []


async def test_a_subscriber_that_falls_behind_is_told_it_lagged(nursery):
    net = MemoryNetwork()
    hub_owner = net.add_peer()
    others = [net.add_peer() for _ in range(5)]
    for p in [hub_owner, *others]:
        await nursery.start(p.serve)
    with hub_owner.peer_events(buffer=2) as events:
        for p in others:
            await hub_owner.connect(p.peer_id)
        assert events.dropped == 3
        it = events.__aiter__()
        kinds = [(await it.__anext__()).kind for _ in range(2)]
        net.disconnect(others[0].peer_id)
        kinds += [(await it.__anext__()).kind for _ in range(2)]
    assert kinds == ["connected", "connected", "lagged", "disconnected"]


def test_a_seeded_network_replays_its_identities():
    first = [MemoryNetwork(seed=42).add_peer().peer_id for _ in range(2)]
    net = MemoryNetwork(seed=42)
    again = [net.add_peer().peer_id, net.add_peer().peer_id]
    assert first[0] == first[1] == again[0] != again[1]
    assert MemoryNetwork(seed=43).add_peer().peer_id != again[0]
