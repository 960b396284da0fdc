"""Arrays arrive bit-exact over the side channel and over the fallback path, one way and
both ways at once, and the control stream stays usable afterwards."""

import socket

import numpy as np
import pytest
import trio

from lattice.core import bulk_frames as bf
from lattice.core.arrays import ArrayFormatError, ArrayLimits
from lattice.net.bulk import (
    BulkConfig,
    BulkHeaderError,
    BulkRejectedError,
    UnreachableChannels,
    exchange,
    exchange_arrays,
    push_array,
    receive_array,
    receive_arrays,
    send_array,
    send_arrays,
    serve_bulk,
    serve_bulk_listener,
)
from lattice.net.streams import recv_frame, send_frame

SMALL_CHUNKS = BulkConfig(chunk_bytes=4096, stream_chunk_bytes=1024)

ARRAYS = {
    "f32-vector": np.arange(100_003, dtype=np.float32),
    "f64-3d": np.random.default_rng(1).standard_normal((7, 11, 13)),
    "f16-matrix": np.ones((64, 33), dtype=np.float16) / 3,
    "i8": np.arange(-128, 128, dtype=np.int8),
    "u64": np.array([0, 1, 2**64 - 1], dtype=np.uint64),
    "i32-scalar": np.array(7, dtype=np.int32),
    "empty": np.zeros((0, 5), dtype=np.float32),
    "non-contiguous": np.arange(200, dtype=np.int16).reshape(10, 20)[:, ::3],
    "big-endian": np.arange(1000, dtype=">f4"),
}


async def transfer(a, b, array, *, listener=None, config=SMALL_CHUNKS, limits=ArrayLimits()):
    got = []
    async with trio.open_nursery() as n:
        async def receive():
            got.append(await receive_array(b, listener=listener, config=config, limits=limits))
        n.start_soon(receive)
        await send_array(a, array, config=config)
    return got[0]


def assert_same(received, sent):
    assert received.shape == sent.shape
    assert received.dtype == sent.dtype.newbyteorder("<")
    assert received.flags.c_contiguous and received.flags.writeable
    np.testing.assert_array_equal(received, sent)


@pytest.mark.parametrize("name", ARRAYS)
async def test_round_trip_over_the_side_channel(stream_pair, listener, name):
    a, b = await stream_pair()
    sent = ARRAYS[name]
    received = await transfer(a, b, sent, listener=listener)
    assert_same(received, sent)
    stats = listener.statistics()
    assert stats["authenticated"] == (1 if sent.nbytes else 0)
    assert stats["pending_sessions"] == 0


@pytest.mark.parametrize("name", ARRAYS)
async def test_round_trip_over_the_stream_when_no_channel_is_offered(stream_pair, name):
    a, b = await stream_pair()
    sent = ARRAYS[name]
    assert_same(await transfer(a, b, sent, listener=None), sent)


async def test_sender_can_refuse_the_side_channel(stream_pair, listener):
    a, b = await stream_pair()
    sent = ARRAYS["f32-vector"]
    config = BulkConfig(direct=False, stream_chunk_bytes=4096)
    assert_same(await transfer(a, b, sent, listener=listener, config=config), sent)
    assert listener.statistics()["authenticated"] == 0


@pytest.fixture
async def unreachable(nursery):
    """A listener advertising an address nobody listens on (NAT, firewall)."""
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()
    probe.close()
    return await nursery.start(lambda task_status: serve_bulk_listener(
        advertise=[dead], task_status=task_status))


async def test_unreachable_side_channel_falls_back_to_the_stream(stream_pair, unreachable):
    a, b = await stream_pair()
    sent = ARRAYS["f64-3d"]
    assert_same(await transfer(a, b, sent, listener=unreachable), sent)


async def test_an_offer_that_failed_once_goes_straight_to_the_stream(stream_pair, unreachable):
    # A peer behind a symmetric NAT offers the same unreachable address every round: the
    # sender remembers it instead of waiting out the connect timeout each time.
    memory = UnreachableChannels(retry_after=600.0)
    ours = np.arange(20_000, dtype=np.float32)
    for round_ in range(3):
        a, b = await stream_pair()
        got = {}
        async with trio.open_nursery() as n:
            async def side_b():
                # b sends to a, whose offer cannot be reached
                got["b"] = await exchange(b, [-ours], config=SMALL_CHUNKS, unreachable=memory)
            n.start_soon(side_b)
            got["a"] = await exchange(a, [ours], listener=unreachable, config=SMALL_CHUNKS)
        assert_same(got["b"][0], ours)
        assert_same(got["a"][0], -ours)
        assert memory.statistics() == {"unreachable_offers": 1, "skipped": round_}


async def test_an_unreachable_first_address_does_not_delay_the_side_channel(stream_pair,
                                                                           listener):
    # A loopback listener that never accepts, its queue full: Linux drops further SYNs,
    # so a connect there hangs like one to a filtered address.
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(black_hole.getsockname())
        fillers.append(filler)
    listener.addresses = [black_hole.getsockname(), *listener.addresses]
    a, b = await stream_pair()
    sent = ARRAYS["f32-vector"]
    start = trio.current_time()
    assert_same(await transfer(a, b, sent, listener=listener), sent)
    assert listener.statistics()["authenticated"] == 1
    assert trio.current_time() - start < 2.0  # well under the 3 s connect timeout
    for sock in (black_hole, *fillers):
        sock.close()


async def test_listener_at_its_session_limit_offers_no_channel(stream_pair, nursery):
    full = await nursery.start(lambda task_status: serve_bulk_listener(
        max_sessions=0, task_status=task_status))
    a, b = await stream_pair()
    sent = ARRAYS["f32-vector"]
    assert_same(await transfer(a, b, sent, listener=full), sent)
    assert full.statistics()["authenticated"] == 0


@pytest.mark.parametrize("direct", [True, False], ids=["side-channel", "stream"])
async def test_exchange_moves_both_arrays_at_once(stream_pair, listener, direct):
    a, b = await stream_pair()
    ours = np.random.default_rng(2).standard_normal(50_000).astype(np.float32)
    theirs = -ours
    got = {}
    chan = listener if direct else None
    async with trio.open_nursery() as n:
        async def side_b():
            got["b"] = await exchange_arrays(b, theirs, listener=chan, config=SMALL_CHUNKS)
        n.start_soon(side_b)
        got["a"] = await exchange_arrays(a, ours, listener=chan, config=SMALL_CHUNKS)
    assert_same(got["a"], theirs)
    assert_same(got["b"], ours)
    assert listener.statistics()["authenticated"] == (2 if direct else 0)


async def test_exchange_with_one_direction_on_each_path(stream_pair, listener):
    # only b offers a side channel: a -> b goes direct, b -> a over the stream
    a, b = await stream_pair()
    ours, theirs = np.arange(30_000, dtype=np.float32), -np.arange(30_000, dtype=np.float32)
    got = {}
    async with trio.open_nursery() as n:
        async def side_b():
            got["b"] = await exchange_arrays(b, theirs, listener=listener, config=SMALL_CHUNKS)
        n.start_soon(side_b)
        got["a"] = await exchange_arrays(a, ours, listener=None, config=SMALL_CHUNKS)
    assert_same(got["a"], theirs)
    assert_same(got["b"], ours)
    assert listener.statistics()["authenticated"] == 1


async def test_control_stream_stays_usable_after_a_transfer(stream_pair, listener):
    # gossip averaging runs an exchange inside its own protocol, then commits on it
    a, b = await stream_pair()
    async with trio.open_nursery() as n:
        async def side_b():
            await exchange_arrays(b, np.ones(10), listener=listener)
            assert await recv_frame(b) == {"commit": 1}
            await send_frame(b, {"ok": True})
        n.start_soon(side_b)
        await exchange_arrays(a, np.zeros(10), listener=listener)
        await send_frame(a, {"commit": 1})
        assert await recv_frame(a) == {"ok": True}


async def test_progress_reports_every_chunk_up_to_the_total(stream_pair, listener):
    a, b = await stream_pair()
    sent = np.arange(10_000, dtype=np.float32)  # 40000 bytes = 10 chunks of 4096
    seen_sent, seen_received = [], []

    async def on_sent(done, total):
        seen_sent.append((done, total))

    async def on_received(done, total):
        seen_received.append((done, total))

    async with trio.open_nursery() as n:
        async def receive():
            await receive_array(b, listener=listener, config=SMALL_CHUNKS,
                                on_progress=on_received)
        n.start_soon(receive)
        await send_array(a, sent, config=SMALL_CHUNKS, on_progress=on_sent)
    for seen in (seen_sent, seen_received):
        assert len(seen) == 10
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        assert seen[-1] == (40_000, 40_000)


async def test_push_array_to_a_serving_peer(stream_pair, listener):
    net = stream_pair.net
    a, b = list(net.peers.values())
    inbox_send, inbox_recv = trio.open_memory_channel(1)

    async def on_arrays(peer_id, arrays):
        await inbox_send.send((peer_id, arrays))

    serve_bulk(b, on_arrays, listener=listener)
    sent = ARRAYS["f64-3d"]
    await push_array(a, b.peer_id, sent)
    peer_id, (received,) = await inbox_recv.receive()
    assert peer_id == a.peer_id
    assert_same(received, sent)


async def test_receiving_into_a_reused_buffer(stream_pair, listener):
    a, b = await stream_pair()
    out = np.empty(50_000, np.float32)
    for sent in (np.arange(50_000, dtype=np.float32), -np.arange(50_000, dtype=np.float32)):
        got = []
        async with trio.open_nursery() as n:
            async def receive():
                got.append(await receive_array(b, listener=listener, out=out))
            n.start_soon(receive)
            await send_array(a, sent)
        assert got[0] is out
        np.testing.assert_array_equal(out, sent)


async def test_exchange_into_a_reused_buffer(stream_pair, listener):
    a, b = await stream_pair()
    out_a, out_b = np.empty(1000), np.empty(1000)
    async with trio.open_nursery() as n:
        async def side_b():
            assert await exchange_arrays(b, np.ones(1000), listener=listener, out=out_b) is out_b
        n.start_soon(side_b)
        assert await exchange_arrays(a, np.zeros(1000), listener=listener, out=out_a) is out_a
    assert (out_a == 1).all() and (out_b == 0).all()
    with pytest.raises(ValueError, match="out is"):
        await exchange_arrays(a, np.zeros(1000), out=np.empty(999))


# -- one session, many arrays ----------------------------------------------------------------

SET = [ARRAYS["f32-vector"], ARRAYS["empty"], ARRAYS["u64"], ARRAYS["f16-matrix"],
       ARRAYS["big-endian"]]


@pytest.fixture
def key_agreements(monkeypatch):
    """How many ephemeral keys (one per side per session) were made."""
    made = []
    real = bf.EphemeralKey

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bf, "EphemeralKey", counting)
    return made


@pytest.mark.parametrize("direct", [True, False], ids=["side-channel", "stream"])
async def test_one_session_carries_every_array_of_an_exchange(stream_pair, listener, direct,
                                                               key_agreements):
    a, b = await stream_pair()
    ours, theirs = SET, [np.flip(x).copy() if x.ndim else x for x in reversed(SET)]
    got = {}
    chan = listener if direct else None
    async with trio.open_nursery() as n:
        async def side_b():
            got["b"] = await exchange(b, theirs, listener=chan, config=SMALL_CHUNKS)
        n.start_soon(side_b)
        got["a"] = await exchange(a, ours, listener=chan, config=SMALL_CHUNKS)
    for received, sent in [*zip(got["a"], theirs), *zip(got["b"], ours)]:
        assert_same(received, sent)
    assert len(key_agreements) == 2  # one key agreement for the exchange, one per side
    assert listener.statistics()["authenticated"] == (2 if direct else 0)
    await send_frame(a, {"t": "after"})  # the control stream is still at a frame boundary
    assert await recv_frame(b) == {"t": "after"}


async def test_a_set_of_arrays_counts_against_the_limit_as_a_whole(stream_pair, listener):
    a, b = await stream_pair()
    arrays = [np.zeros(1000, np.float32)] * 3  # 4000 bytes each, 12000 together
    outcome = {}
    async with trio.open_nursery() as n:
        async def receive():
            try:
                await receive_arrays(b, listener=listener, limits=ArrayLimits(max_bytes=10_000))
            except BulkHeaderError as e:
                outcome["receiver"] = e
        n.start_soon(receive)
        with pytest.raises(BulkRejectedError, match="exceed limit 10000"):
            await send_arrays(a, arrays)
    assert "exceed limit" in str(outcome["receiver"])
    assert listener.statistics()["pending_sessions"] == 0


async def test_the_receiver_decides_what_it_takes(stream_pair):
    a, b = await stream_pair()

    def only_floats(specs):
        if any(s.dtype != "<f4" for s in specs):
            raise ArrayFormatError("floats only")

    outcome = {}
    async with trio.open_nursery() as n:
        async def receive():
            try:
                await receive_arrays(b, check=only_floats)
            except BulkHeaderError as e:
                outcome["receiver"] = e
        n.start_soon(receive)
        with pytest.raises(BulkRejectedError, match="floats only"):
            await send_arrays(a, [np.zeros(3, np.float32), np.zeros(3, np.int8)])
    assert "floats only" in str(outcome["receiver"])


async def test_more_arrays_than_a_session_carries_is_our_error(stream_pair):
    a, _ = await stream_pair()
    with pytest.raises(ValueError, match="1 to 16 arrays"):
        await send_arrays(a, [np.zeros(1, np.float32)] * 17)
