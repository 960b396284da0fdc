"""Fuzz: the shared decoders - `codec.unpack`, stream framing (`streams.recv_frame`,
the DHT's buffered `_Framed`), and the local RPC framing (`FrameDecoder`, each method's
params check)."""

from __future__ import annotations

import struct

import trio
from hypothesis import given
from hypothesis import strategies as st

from lattice.api.errors import LatticeError
from lattice.api.framing import BadFrame, Frame, FrameDecoder, OversizedFrame, Unrecoverable, frame
from lattice.api.methods import METHODS
from lattice.core.codec import DEFAULT_MAX_DEPTH, DecodeError, canonical, check_depth, pack, unpack
from lattice.net.dht_client import FramedStream
from lattice.net.streams import PeerError, recv_frame, recv_frame_or_eof

from .conftest import FUZZ, comparable_values, msgpack_values

# raw bytes biased towards msgpack container headers, so nesting and truncation happen
msgpackish = st.lists(st.sampled_from([b"\x91", b"\x92", b"\x81", b"\xdc\x00\x02", b"\xc0",
                                       b"\xa1a", b"\xc4\x01x", b"\xd4\x01\x00", b"\xcf"])
                      | st.binary(max_size=4), max_size=80).map(b"".join)


def _safe_to_walk(value) -> None:
    """What handlers do with a decoded value must not raise: walk, print, re-encode."""
    check_depth(value, DEFAULT_MAX_DEPTH)
    repr(value)
    pack(value)
    canonical(value)


# nesting of any depth, msgpack's own limit (1024) included
deep = st.builds(lambda depth, inner, tail: inner * depth + tail, st.integers(0, 1100),
                 st.sampled_from([b"\x91", b"\x81\xa1k", b"\x92\xc0"]), st.binary(max_size=4))


@FUZZ
@given(st.binary(max_size=300) | msgpackish | deep)
def test_unpack_returns_a_walkable_value_or_raises_decode_error(data):
    try:
        value = unpack(data)
    except DecodeError:
        return
    _safe_to_walk(value)


@FUZZ
@given(comparable_values)
def test_unpack_round_trips_what_pack_makes(value):
    assert unpack(pack(value)) == value


class _Bytes:
    """A Stream that yields ``data`` in ``chunks``, then EOF."""

    remote_peer_id = "fuzz"
    protocol = "/fuzz"

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk = data, chunk

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        out, self.data = self.data[:min(n, self.chunk)], self.data[min(n, self.chunk):]
        return out


async def _all_frames(stream, read) -> list:
    out = []
    while True:
        try:
            msg = await read(stream)
        except PeerError:
            return out
        if msg is None:
            return out
        out.append(msg)


def _framed_stream(parts) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p if declared is None else
                    struct.pack(">I", declared) + p for p, declared in parts)


frames = st.lists(st.tuples(st.binary(max_size=40) | msgpackish,
                            st.none() | st.integers(0, 2**32 - 1)), max_size=6).map(_framed_stream)


@FUZZ
@given(frames | st.binary(max_size=200), st.integers(1, 64))
def test_stream_framing_yields_values_or_peer_errors_only(data, chunk):
    for read in (lambda s: recv_frame(s, max_bytes=4096),
                 lambda s: recv_frame_or_eof(s, max_bytes=4096),
                 lambda s: FramedStream(s).recv(4096)):
        for msg in trio.run(_all_frames, _Bytes(data, chunk), read):
            _safe_to_walk(msg)


@FUZZ
@given(frames | st.binary(max_size=200), st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_the_local_rpc_frame_decoder_never_raises_and_stays_bounded(data, cuts):
    decoder = FrameDecoder(max_frame=64)
    pos = 0
    for n in cuts * 20:
        for event in decoder.feed(data[pos:pos + n]):
            assert isinstance(event, (Frame, BadFrame, OversizedFrame, Unrecoverable))
            if isinstance(event, Frame):
                _safe_to_walk(event.value)
        assert decoder.buffered <= 64 + 4
        pos += n
        if pos >= len(data):
            break


@FUZZ
@given(st.lists(comparable_values, max_size=3), st.binary(max_size=30))
def test_the_local_rpc_decoder_stays_in_sync_after_garbage_and_oversized_frames(values, junk):
    decoder = FrameDecoder(max_frame=256)
    garbage = struct.pack(">I", len(junk) + 1) + b"\xc1" + junk  # never valid msgpack
    oversized = struct.pack(">I", 1000) + bytes(1000)
    stream = garbage + oversized + b"".join(frame(v) for v in values if len(pack(v)) <= 256)
    events = decoder.feed(stream)
    assert isinstance(events[0], BadFrame) and isinstance(events[1], OversizedFrame)
    assert [e.value for e in events[2:]] == [v for v in values if len(pack(v)) <= 256]


@FUZZ
@given(st.sampled_from(sorted(METHODS)), msgpack_values)
def test_every_methods_params_check_binds_or_says_invalid_params(name, params):
    try:
        kwargs = METHODS[name].bind(params)
    except LatticeError as e:
        assert e.code.name == "INVALID_PARAMS"
        return
    assert isinstance(kwargs, dict)
