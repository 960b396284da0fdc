"""Fuzz: `/lattice/blob/1` requests and answers, and the signed CRDT envelope decoder
(`open_envelope`): typed errors only, and what parses is what the driver may use."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lattice.core.identity import Identity
from lattice.core.state.envelope import EnvelopeError, open_envelope, seal
from lattice.net.blob import MAX_INT, BlobFormatError, Request, parse_reply, parse_request

from .conftest import FUZZ, msgpack_values, mutated

BID = "ab" * 32
REQUESTS = [{"t": "have", "v": 1, "rid": 0, "id": BID},
            {"t": "get", "v": 1, "rid": 1, "id": BID, "offset": 0, "length": 10}]
REPLIES = [{"t": "have", "rid": 0, "size": 10}, {"t": "missing", "rid": 0},
           {"t": "data", "rid": 0, "offset": 0, "length": 10}, {"t": "error", "rid": 0, "reason": "busy"}]


@FUZZ
@given(msgpack_values | st.one_of(*(mutated(m, m) for m in REQUESTS)))
def test_blob_requests_parse_to_well_typed_fields_or_raise(msg):
    try:
        request = parse_request(msg)
    except BlobFormatError:
        return
    assert isinstance(request, Request) and request.t in ("have", "get")
    assert all(type(v) is int and -1 <= v <= MAX_INT
               for v in (request.rid, request.offset, request.length))


@FUZZ
@given(msgpack_values | st.one_of(*(mutated(m, m) for m in REPLIES)))
def test_blob_replies_parse_or_raise(msg):
    try:
        reply = parse_reply(msg, ("have", "missing", "data", "error"), 0, 1 << 20)
    except BlobFormatError:
        return
    if reply["t"] == "have":
        assert type(reply["size"]) is int and 0 <= reply["size"] <= 1 << 20


AUTHOR = Identity(bytes(range(32)))
SEALED = seal(AUTHOR, 1, "delta", b"\x00\x01\x02").raw


@FUZZ
@given(st.binary(max_size=300) | st.builds(lambda b, i, x: b[:i] + bytes([x]) + b[i + 1:],
                                           st.just(SEALED), st.integers(0, len(SEALED) - 1),
                                           st.integers(0, 255)))
def test_envelopes_open_or_raise_envelope_error(raw):
    try:
        env = open_envelope(raw)
    except EnvelopeError:
        return
    assert env.raw == raw and env.author == AUTHOR.peer_id
