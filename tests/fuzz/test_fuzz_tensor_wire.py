"""Fuzz: the tensor wire formats - `/lattice/bulk/1` control messages and headers, the
side-channel hello, and `/lattice/gossip-avg/1` messages and `arrays` headers. Whatever
a header parser accepts must allocate (numpy multiplies every dimension) within the
receiver's byte limit."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lattice.core import bulk_frames as bf
from lattice.core import gossip_messages as gm
from lattice.core.arrays import WIRE_DTYPES, ArrayFormatError, ArrayLimits, ArraySpec, parse_array_spec

from .conftest import FUZZ, msgpack_values, mutated

LIMITS = ArrayLimits(max_bytes=1 << 16, max_ndim=8)
dims = st.integers(0, 2**16) | st.sampled_from([0, 1, 2**31, 2**62, 2**64 - 1]) | st.booleans()
shapes = st.lists(dims, max_size=10) | msgpack_values


@FUZZ
@given(st.sampled_from(sorted(WIRE_DTYPES)) | msgpack_values, shapes,
       st.integers(-1, 2**17) | msgpack_values)
def test_an_array_spec_that_parses_allocates_within_the_limit(dtype, shape, nbytes):
    try:
        header = parse_array_spec({"dtype": dtype, "shape": shape, "nbytes": nbytes}, LIMITS)
    except ArrayFormatError:
        return
    array = np.empty(header.shape, dtype=np.dtype(header.dtype))
    assert array.nbytes == header.nbytes <= LIMITS.max_bytes
    assert len(header.shape) <= LIMITS.max_ndim


HELLO = bf.hello(bytes(range(32)), [ArraySpec("<f4", (2, 3), 24)])
CONTROL = [HELLO, bf.accept([("127.0.0.1", 4000)], 1 << 20), bf.reject("no"),
           bf.start("stream", 4096), bf.data(0, bytes(40)), bf.credit(1), bf.abort("why"),
           bf.DONE]
PARSERS = [bf.parse_hello, bf.parse_verdict, bf.parse_start, bf.parse_abort, bf.message_type,
           lambda m: bf.parse_data(m, 0, 40), lambda m: bf.parse_credit(m, 3)]


@FUZZ
@given(st.sampled_from(PARSERS),
       msgpack_values | st.one_of(*(mutated(m, m) for m in CONTROL)) | st.sampled_from(CONTROL))
def test_bulk_control_parsers_return_or_raise_bulk_format_error(parse, msg):
    try:
        parse(msg)
    except bf.BulkFormatError:
        pass


@FUZZ
@given(st.binary(max_size=100) | st.binary(min_size=64, max_size=64).map(lambda b: bf.CHANNEL_MAGIC + b))
def test_the_side_channel_hello_parses_only_its_72_bytes(data):
    try:
        cid, token = bf.parse_channel_hello(data)
    except bf.BulkFormatError:
        assert len(data) != bf.CHANNEL_HELLO_BYTES or not data.startswith(bf.CHANNEL_MAGIC)
        return
    assert len(cid) == len(token) == 32


OFFER = {"t": "offer", "v": 2, "job": "j" * 32, "xid": "x" * 32, "samples": 5, "codec": "none",
         "transports": ["bulk", "framed"]}
GOSSIP = [OFFER, {"t": "status", "v": 2, "job": "j", "xid": "x"},
          {"t": "accept", "xid": "x", "samples": 1, "transport": "framed"},
          {"t": "busy", "xid": "x", "reason": "exchange"}, {"t": "commit", "xid": "x"},
          {"t": "ack", "xid": "x"}, {"t": "abort", "xid": "x", "reason": "r"},
          {"t": "outcome", "xid": "x", "outcome": "committed"}]
KINDS = tuple(gm.FIELDS)


@FUZZ
@given(msgpack_values | st.one_of(*(mutated(m, m) for m in GOSSIP)), st.none() | st.just("x"))
def test_gossip_messages_parse_to_exactly_the_spec_fields_or_raise(msg, xid):
    try:
        out = gm.parse_message(msg, KINDS, xid)
    except gm.GossipFormatError:
        return
    assert set(out) == {"t", "xid", *gm.FIELDS[out["t"]]}
    for name, value in out.items():  # what the driver reads afterwards is well-typed
        if name in ("samples",):
            assert type(value) is int
        if name in ("transports",):
            assert all(isinstance(t, str) for t in value)


EXPECT = {"data": np.dtype(np.float32), "shape": np.dtype(np.int64)}


@st.composite
def items(draw):
    """Mostly self-consistent entries (nbytes = prod(shape) * itemsize, zero-length
    dimensions next to large ones), sometimes anything at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.tuples(msgpack_values, msgpack_values | st.fixed_dictionaries(
            {"dtype": msgpack_values, "shape": shapes, "nbytes": msgpack_values})).map(list))
    dtype = draw(st.sampled_from(sorted(WIRE_DTYPES)))
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 3]) | st.integers(0, 2**16), max_size=8))
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    nbytes = draw(st.just(nbytes) | st.integers(-1, 2**20))
    name = draw(st.sampled_from(["data", "shape", "x"]))
    return [name, {"dtype": dtype, "shape": shape, "nbytes": nbytes}]



@FUZZ
@given(st.lists(items(), max_size=4), st.booleans(), st.integers(1, 1 << 16))
def test_an_arrays_header_that_parses_allocates_within_the_limit(entries, strict, max_bytes):
    try:
        specs = gm.parse_array_header({"t": "arrays", "items": entries},
                                      expect=EXPECT if strict else None, max_bytes=max_bytes)
    except gm.GossipFormatError:
        return
    total = 0
    for _, spec in specs:
        total += np.empty(spec.shape, dtype=spec.numpy_dtype).nbytes
        assert math.prod(max(d, 1) for d in spec.shape) * spec.numpy_dtype.itemsize <= max_bytes
    assert total <= max_bytes
