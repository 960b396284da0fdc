"""What a peer or the path can do wrong, each rejected with a typed error before the
receiver hands out any array; and a reader that pauses 10 s does not kill a transfer."""

import math
from functools import partial

import numpy as np
import pytest
import trio
import trio.testing

from lattice.core.arrays import ArrayLimits
from lattice.core.bulk_frames import CHANNEL_MAGIC
from lattice.net.bulk import (
    BulkAbortedError,
    BulkAuthError,
    BulkConfig,
    BulkHeaderError,
    BulkIntegrityError,
    BulkRejectedError,
    BulkStalledError,
    BulkTruncatedError,
    exchange_arrays,
    receive_array,
    send_array,
    serve_bulk_listener,
)
from lattice.net.streams import PeerError, RemoteProtocolError, StreamClosedError

CHUNK = 4096
SMALL = BulkConfig(chunk_bytes=CHUNK, stream_chunk_bytes=1024)
HELLO = 72  # side-channel hello: magic 8 + channel id 32 + token 32
PAYLOAD = np.arange(50_000, dtype=np.float32)  # 200 kB: 49 chunks of 4 KiB


async def run_both(send, receive):
    """Run sender and receiver; return (sender outcome, receiver outcome), each the
    result or the exception raised."""
    out = {}

    async def capture(key, fn):
        try:
            out[key] = await fn()
        except PeerError as e:
            out[key] = e

    async with trio.open_nursery() as n:
        n.start_soon(capture, "receiver", receive)
        n.start_soon(capture, "sender", send)
    return out["sender"], out["receiver"]


def transfer(a, b, array=PAYLOAD, *, listener=None, config=SMALL, limits=ArrayLimits(),
             on_received=None):
    return run_both(
        lambda: send_array(a, array, config=config),
        lambda: receive_array(b, listener=listener, config=config, limits=limits,
                              on_progress=on_received))


async def behind_proxy(listener, proxy, mutate):
    listener.addresses = [await proxy(listener.addresses[0], mutate)]


# -- the side channel -------------------------------------------------------------------


async def test_tampered_chunk_on_the_side_channel(stream_pair, listener, proxy, flip_byte_at):
    await behind_proxy(listener, proxy, flip_byte_at(HELLO + 3 * CHUNK + 100))
    a, b = await stream_pair()
    sent, received = await transfer(a, b, listener=listener)
    assert isinstance(received, BulkIntegrityError)
    assert isinstance(sent, BulkAbortedError) and "authentication" in sent.reason


async def test_wrong_token_on_the_side_channel(stream_pair, listener, proxy, flip_byte_at):
    await behind_proxy(listener, proxy, flip_byte_at(len(CHANNEL_MAGIC) + 32 + 5))
    a, b = await stream_pair()
    sent, received = await transfer(a, b, listener=listener)
    assert isinstance(received, BulkAuthError)
    assert isinstance(sent, BulkAbortedError)
    stats = listener.statistics()
    assert (stats["bad_token"], stats["authenticated"], stats["pending_sessions"]) == (1, 0, 0)


async def test_truncated_side_channel(stream_pair, listener, proxy, cut_at):
    await behind_proxy(listener, proxy, cut_at(HELLO + 10 * CHUNK))
    a, b = await stream_pair()
    sent, received = await transfer(a, b, listener=listener)
    assert isinstance(received, BulkTruncatedError)
    assert isinstance(sent, BulkAbortedError)


async def test_listener_drops_strangers(listener, autojump_clock):
    host, port = listener.addresses[0]
    for hello in (b"GET / HTTP/1.1\r\n" * 5, CHANNEL_MAGIC + bytes(64), b""):
        conn = await trio.open_tcp_stream(host, port)
        async with conn:
            await conn.send_all(hello)
            # closed by the listener: at once, or after its hello timeout for silence
            # (a reset when it closes with our unread bytes still queued)
            try:
                assert await conn.receive_some(100) == b""
            except trio.BrokenResourceError:
                pass
    stats = listener.statistics()
    assert (stats["bad_hello"], stats["unknown_session"]) == (2, 1)


# -- the fallback path ------------------------------------------------------------------


class TamperWrites:
    """Flips one byte near the end of the first large write (a data frame)."""

    def __init__(self, stream):
        self._s = stream
        self.remote_peer_id = stream.remote_peer_id
        self.done = False

    async def write(self, data):
        data = bytes(data)
        if not self.done and len(data) > 1000:
            self.done = True
            data = data[:-20] + bytes([data[-20] ^ 1]) + data[-19:]
        await self._s.write(data)

    def __getattr__(self, name):
        return getattr(self._s, name)


class EndReadsAfter:
    """Reports EOF once ``limit`` bytes were read, as if the connection dropped."""

    def __init__(self, stream, limit):
        self._s = stream
        self.remote_peer_id = stream.remote_peer_id
        self.left = limit

    async def read(self, max_bytes):
        if self.left <= 0:
            return b""
        data = await self._s.read(min(max_bytes, self.left))
        self.left -= len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._s, name)


async def test_tampered_chunk_on_the_stream(stream_pair):
    a, b = await stream_pair()
    sent, received = await transfer(TamperWrites(a), b)
    assert isinstance(received, BulkIntegrityError)
    assert isinstance(sent, BulkAbortedError)


async def test_truncated_stream(stream_pair):
    a, b = await stream_pair()
    sent, received = await transfer(a, EndReadsAfter(b, 20_000))
    assert isinstance(received, BulkTruncatedError)
    assert isinstance(sent, BulkAbortedError)


async def test_peer_vanishing_mid_transfer_fails_both_sides(stream_pair):
    a, b = await stream_pair()
    cut = trio.Event()

    async def crash_after_first_chunk(done, total):
        stream_pair.net.disconnect(b.remote_peer_id)  # the sender's host crashes
        cut.set()

    sent, received = await transfer(a, b, on_received=crash_after_first_chunk)
    assert cut.is_set()
    assert isinstance(sent, StreamClosedError)
    assert isinstance(received, StreamClosedError)


# -- headers ------------------------------------------------------------------------------


@pytest.mark.parametrize("offered, limits, why", [
    (np.zeros(1000, np.float32), ArrayLimits(max_bytes=3999), "exceeds limit"),
    (np.zeros(10, np.int64), ArrayLimits(dtypes=frozenset({"<f4"})), "not allowed"),
    (np.zeros((1,) * 9, np.float32), ArrayLimits(max_ndim=8), "at most 8"),
], ids=["oversize", "dtype", "ndim"])
async def test_headers_outside_limits_are_refused(stream_pair, listener, offered, limits, why):
    a, b = await stream_pair()
    sent, received = await transfer(a, b, offered, listener=listener, limits=limits)
    assert isinstance(received, BulkHeaderError) and why in str(received)
    assert isinstance(sent, BulkRejectedError) and why in sent.reason
    assert listener.statistics()["pending_sessions"] == 0


async def test_a_reused_buffer_refuses_an_array_of_another_shape(stream_pair, listener):
    a, b = await stream_pair()
    sent, received = await run_both(
        lambda: send_array(a, np.zeros(10, np.float32)),
        lambda: receive_array(b, listener=listener, out=np.empty(11, np.float32)))
    assert isinstance(received, BulkHeaderError) and isinstance(sent, BulkRejectedError)


async def test_exchange_refuses_a_model_of_another_shape(stream_pair, listener):
    a, b = await stream_pair()
    sent, received = await run_both(
        lambda: exchange_arrays(a, np.zeros(10, np.float32), listener=listener),
        lambda: exchange_arrays(b, np.zeros(11, np.float32), listener=listener))
    assert isinstance(sent, BulkHeaderError) and isinstance(received, BulkHeaderError)


async def test_receiving_from_a_peer_that_only_receives(stream_pair):
    a, b = await stream_pair()
    one, other = await run_both(lambda: receive_array(a), lambda: receive_array(b))
    assert isinstance(one, RemoteProtocolError) and "offered no array" in str(one)
    assert isinstance(other, RemoteProtocolError)


@pytest.mark.parametrize("array", [np.array([1 + 2j]), np.array([True]),
                                   np.array(["text"]), np.array([object()])],
                         ids=["complex", "bool", "str", "object"])
async def test_unsupported_dtypes_are_our_error_before_any_io(array):
    class NoIO:
        remote_peer_id = "nobody"

    with pytest.raises(ValueError, match="cannot send dtype"):
        await send_array(NoIO(), array)


# -- a reader that pauses -------------------------------------------------------------


def pause_once(seconds, log):
    async def on_progress(done, total):
        if not log:
            log.append(trio.current_time())
            await trio.sleep(seconds)
    return on_progress


async def test_yamux_like_stream_resets_a_writer_whose_reader_pauses(windowed_pair,
                                                                      autojump_clock):
    # The hazard the fallback credit exists for: a naive 1 MiB write with the reader
    # away for 10 s dies after 5 s, as py-libp2p's Yamux does.
    a, b = windowed_pair()
    with pytest.raises(StreamClosedError, match="5 seconds"):
        await a.write(bytes(1 << 20))  # nobody reads b
    assert trio.current_time() == pytest.approx(5.0)


async def test_fallback_survives_a_reader_pausing_10_s(windowed_pair, autojump_clock):
    # Twice the default 8 MiB credit window: the sender ends up waiting on our credit
    # (no timer but idle_timeout) while the consumer sleeps, not inside Yamux's window.
    array = np.arange(4 << 20, dtype=np.float32)
    a, b = windowed_pair()
    paused, sender_at_resume = [], []
    sent_so_far = [0]

    async def on_sent(done, total):
        sent_so_far[0] = done

    async def on_received(done, total):
        if not paused:
            paused.append(trio.current_time())
            await trio.sleep(10)
            sender_at_resume.append(sent_so_far[0])

    sent, received = await run_both(
        lambda: send_array(a, array, on_progress=on_sent),
        lambda: receive_array(b, on_progress=on_received))
    assert sent is None
    np.testing.assert_array_equal(received, array)
    assert trio.current_time() >= paused[0] + 10
    assert sender_at_resume[0] < array.nbytes


async def test_side_channel_survives_a_reader_pausing_10_s(stream_pair, listener,
                                                           autojump_clock):
    # Big enough to fill both socket buffers, so the sender is held back by TCP while the
    # reader sleeps (it has sent less than everything when the reader resumes). No idle
    # timeout: with real sockets the autojump clock may leap to any pending deadline in a
    # momentary all-idle gap, so the pause must be the only one; that the default 60 s
    # idle timeout is what bounds a pause is shown by the stall test below.
    array = np.arange(8 << 20, dtype=np.float32)  # 32 MiB
    config = BulkConfig(idle_timeout=math.inf)
    a, b = await stream_pair()
    paused, sender_at_resume = [], []
    sent_so_far = [0]

    async def on_sent(done, total):
        sent_so_far[0] = done

    async def on_received(done, total):
        if not paused:
            paused.append(trio.current_time())
            await trio.sleep(10)
            sender_at_resume.append(sent_so_far[0])

    sent, received = await run_both(
        lambda: send_array(a, array, config=config, on_progress=on_sent),
        lambda: receive_array(b, listener=listener, config=config, on_progress=on_received))
    assert sent is None
    np.testing.assert_array_equal(received, array)
    assert trio.current_time() >= paused[0] + 10
    assert sender_at_resume[0] < array.nbytes


@pytest.mark.parametrize("direct", [True, False], ids=["side-channel", "stream"])
async def test_a_reader_gone_silent_stalls_the_sender_after_idle_timeout(
        stream_pair, listener, autojump_clock, direct):
    array = np.arange((8 if direct else 4) << 20, dtype=np.float32)
    config = BulkConfig(idle_timeout=30)
    a, b = await stream_pair()
    forever = trio.Event()

    async def hang(done, total):
        await forever.wait()

    start = trio.current_time()
    sent, received = await run_both(
        lambda: send_array(a, array, config=config),
        lambda: receive_array(b, listener=listener if direct else None, config=config,
                              on_progress=hang))
    assert isinstance(sent, BulkStalledError)
    assert trio.current_time() - start == pytest.approx(30, abs=1)
    # the sender said why before leaving, which ends the hung receiver too
    assert isinstance(received, BulkAbortedError) and "no progress" in received.reason


# -- the handler boundary: a parser choking on peer input is the peer's fault ---------------

PARSERS = ["bulk_frames.parse_hello", "bulk_frames.session_id", "arrays.parse_array_spec",
           "bulk_frames.parse_verdict", "bulk_frames.message_type", "bulk_frames.parse_start",
           "bulk_frames.parse_data"]
PEER_ERRORS = [ValueError, RecursionError, KeyError, OverflowError, TypeError]


@pytest.mark.parametrize("error", PEER_ERRORS)
@pytest.mark.parametrize("parser", PARSERS)
async def test_an_exception_inside_any_parser_becomes_a_peer_error(stream_pair, monkeypatch,
                                                                     parser, error):
    def boom(*args, **kwargs):
        raise error("injected")

    module, name = parser.split(".")
    target = "lattice.net.bulk_session" if module == "arrays" else f"lattice.core.{module}"
    monkeypatch.setattr(f"{target}.{name}", boom)
    a, b = await stream_pair()
    # run_both lets only PeerErrors through: anything else would fail this test
    sent, received = await transfer(a, b)
    assert isinstance(sent, PeerError) and isinstance(received, PeerError)
    assert isinstance(sent, RemoteProtocolError) or isinstance(received, RemoteProtocolError)


async def test_a_zero_length_dimension_cannot_smuggle_a_huge_extent(stream_pair, monkeypatch):
    a, b = await stream_pair()
    lie = {"dtype": "<f4", "shape": [0, 2**40, 2**40], "nbytes": 0}
    monkeypatch.setattr("lattice.core.arrays.ArraySpec.to_wire", lambda self: lie)
    sent, received = await transfer(a, b, np.zeros(0, np.float32))
    assert isinstance(received, BulkHeaderError) and "exceeds limit" in str(received)
    assert isinstance(sent, BulkRejectedError)


@pytest.mark.parametrize("error", PEER_ERRORS)
async def test_the_listener_survives_a_choking_hello_parser(stream_pair, listener, monkeypatch,
                                                           error):
    def boom(*args, **kwargs):
        raise error("injected")

    host, port = listener.addresses[0]
    monkeypatch.setattr("lattice.core.bulk_frames.parse_channel_hello", boom)
    async with await trio.open_tcp_stream(host, port) as conn:
        await conn.send_all(CHANNEL_MAGIC + bytes(64))
        try:
            assert await conn.receive_some(100) == b""
        except trio.BrokenResourceError:
            pass
    monkeypatch.undo()
    assert listener.statistics()["bad_hello"] == 1
    a, b = await stream_pair()  # and it serves the next transfer over the side channel
    sent, received = await transfer(a, b, listener=listener)
    assert sent is None and np.array_equal(received, PAYLOAD)
    assert listener.statistics()["authenticated"] == 1


# -- the listener's handshake slots: bounded per source network, and short-lived -----------


async def test_idle_connections_from_one_network_take_only_their_share(stream_pair, nursery,
                                                                       autojump_clock):
    listener = await nursery.start(partial(serve_bulk_listener, max_handshakes=8,
                                           max_handshakes_per_ip=3, hello_timeout=2.0))
    host, port = listener.addresses[0]
    idle = [await trio.open_tcp_stream(host, port, local_address=f"127.0.1.{i + 2}")
            for i in range(10)]  # one /24: one source network
    await trio.testing.wait_all_tasks_blocked()
    stats = listener.statistics()
    assert (stats["handshaking"], stats["refused_ip_busy"]) == (3, 7)
    # an honest transfer from another network still gets a slot and its side channel
    a, b = await stream_pair()
    sent, received = await transfer(a, b, listener=listener)
    assert sent is None and np.array_equal(received, PAYLOAD)
    assert listener.statistics()["authenticated"] == 1
    # and the idle ones are dropped after the hello timeout
    await trio.sleep(2.5)
    assert listener.statistics()["hello_timeouts"] == 3
    assert listener.statistics()["handshaking"] == 0
    for conn in idle:
        await conn.aclose()
