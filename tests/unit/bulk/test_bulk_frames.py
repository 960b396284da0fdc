"""The pure formats of /lattice/bulk/1: header limits, chunk geometry, the key schedule
(with the golden vector of proto/bulk.md) and control-message validation."""

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from lattice.core import bulk_frames as bf
from lattice.core.bulk_frames import ArrayHeader, BulkFormatError, BulkLimits

LIMITS = BulkLimits(max_bytes=1 << 20)


def wire(dtype="<f4", shape=(2, 3), nbytes=24):
    return {"dtype": dtype, "shape": list(shape), "nbytes": nbytes}


# -- headers ------------------------------------------------------------------------------


def test_a_consistent_header_is_accepted():
    assert bf.header_from_wire(wire(), LIMITS) == ArrayHeader("<f4", (2, 3), 24)
    assert bf.header_from_wire(wire("|u1", (), 1), LIMITS).shape == ()
    assert bf.header_from_wire(wire("<f8", (0, 7), 0), LIMITS).nbytes == 0


@pytest.mark.parametrize("bad, why", [
    (wire(dtype="|O8"), "not allowed"),
    (wire(dtype=">f4"), "not allowed"),
    (wire(dtype="float32"), "not allowed"),
    (wire(dtype="|b1", shape=(24,)), "not allowed"),
    (wire(shape=(2, 3), nbytes=25), "does not match"),
    (wire(shape=(-2, -3)), "non-negative"),
    (wire(shape=(True, 24)), "non-negative"),
    (wire(shape=(1,) * 9, nbytes=4), "at most 8"),
    (wire(shape=(1 << 20,), nbytes=4 << 20), "exceeds limit"),
    (wire(shape=(1 << 40, 1 << 40, 0), nbytes=0), "exceeds limit"),  # no overflow games
    ({**wire(), "extra": 1}, "exactly"),
    ([1, 2, 3], "exactly"),
])
def test_headers_outside_the_limits_are_refused(bad, why):
    with pytest.raises(BulkFormatError, match=why):
        bf.header_from_wire(bad, LIMITS)


# -- chunks ---------------------------------------------------------------------------------


@given(nbytes=st.integers(0, 10_000), chunk=st.integers(1, 3000))
def test_chunks_tile_the_array_exactly(nbytes, chunk):
    spans = [bf.chunk_span(i, nbytes, chunk) for i in range(bf.chunk_count(nbytes, chunk))]
    assert [s for s, _ in spans] == list(range(0, nbytes, chunk))
    assert all(0 < stop - start <= chunk for start, stop in spans)
    assert (spans[-1][1] if spans else 0) == nbytes


def test_chunk_sizes_are_bounded_per_mode():
    bf.check_chunk("direct", 1 << 20)
    bf.check_chunk("stream", 32 << 10)
    for mode, chunk in [("direct", 1024), ("direct", 64 << 20), ("stream", 4 << 20),
                        ("stream", 0), ("direct", True)]:
        with pytest.raises(BulkFormatError):
            bf.check_chunk(mode, chunk)


# -- keys -------------------------------------------------------------------------------------


def pair():
    a, b = bf.EphemeralKey(), bf.EphemeralKey()
    ha = bf.hello(a.public, ArrayHeader("<f4", (10,), 40))
    hb = bf.hello(b.public, ArrayHeader("<f4", (10,), 40))
    return a, b, ha, hb


def test_both_sides_derive_the_same_session_and_opposite_directions():
    a, b, ha, hb = pair()
    sid = bf.session_id(ha, hb)
    assert sid == bf.session_id(hb, ha)
    shared = a.exchange(b.public)
    assert shared == b.exchange(a.public)
    a_out, b_out = (bf.direction_keys(shared, sid, k.public) for k in (a, b))
    assert a_out != b_out
    assert len({a_out.data_key, a_out.token, a_out.channel_id, b_out.data_key}) == 4


def test_session_id_commits_to_the_headers():
    a, b, ha, hb = pair()
    changed = bf.hello(a.public, ArrayHeader("<f4", (5, 2), 40))
    assert bf.session_id(ha, hb) != bf.session_id(changed, hb)


def test_reflected_and_low_order_keys_are_refused():
    a = bf.EphemeralKey()
    with pytest.raises(BulkFormatError, match="echoed"):
        a.exchange(a.public)
    with pytest.raises(BulkFormatError, match="bad ephemeral key"):
        a.exchange(bytes(32))  # the all-zero point: shared secret would be zero


def test_golden_vector_of_proto_bulk_md():
    a = bf.EphemeralKey.from_private_bytes(bytes(range(32)))
    b = bf.EphemeralKey.from_private_bytes(bytes(range(32, 64)))
    ha = bf.hello(a.public, ArrayHeader("<f4", (2, 3), 24))
    hb = bf.hello(b.public, None)
    sid = bf.session_id(ha, hb)
    keys = bf.direction_keys(a.exchange(b.public), sid, a.public)
    assert a.public.hex() == "8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f"
    assert sid.hex() == "f34acd2b771b0d181fe7a3180b7e01b37c412fdf325def3ee45e57cc9de813ab"
    assert keys.data_key.hex() == (
        "21da4382de7c230105238982c2786e1c9f4467c7d670d19445d6728cb102dca7")
    assert keys.channel_id.hex() == (
        "454b9cf462ca71c15c9f3ae05808539fd4c3f4cac4d0b8b70083710bc737b847")
    assert keys.token.hex() == (
        "8e9eb8b0c611b6f8436d7c48c6c3d343504cc3bbfaedf7bc1095412608defa6f")
    sealed = AESGCM(keys.data_key).encrypt(bf.nonce(0), bytes(range(24)), None)
    assert sealed.hex() == ("efdb3e0719e7377c8adf2f32a9bb033c9412faba0631df27"
                            "69c7a3178597cfa01e61447228f2a49e")


def test_channel_hello_round_trips_and_rejects_strangers():
    keys = bf.DirectionKeys(b"k" * 32, b"c" * 32, b"t" * 32)
    hello = bf.channel_hello(keys)
    assert len(hello) == bf.CHANNEL_HELLO_BYTES
    assert bf.parse_channel_hello(hello) == (b"c" * 32, b"t" * 32)
    for bad in (b"", hello[:-1], b"X" + hello[1:], hello + b"x"):
        with pytest.raises(BulkFormatError):
            bf.parse_channel_hello(bad)
    assert bf.token_matches(b"t" * 32, b"t" * 32)
    assert not bf.token_matches(b"t" * 32, b"u" * 32)


# -- control messages ----------------------------------------------------------------------


def test_hello_is_checked_for_structure_only():
    h = bf.parse_hello(bf.hello(b"e" * 32, None))
    assert (h.epk, h.send) == (b"e" * 32, None)
    for bad in ({"t": "hello", "v": 2, "epk": b"e" * 32, "send": None},
                {"t": "hello", "v": 1, "epk": b"e" * 31, "send": None},
                {"t": "accept", "addrs": [], "window": 4096}, "hello"):
        with pytest.raises(BulkFormatError):
            bf.parse_hello(bad)


def test_verdicts():
    v = bf.parse_verdict(bf.accept([("127.0.0.1", 4001)], 96 << 10))
    assert (v.accepted, v.addrs, v.window) == (True, [("127.0.0.1", 4001)], 96 << 10)
    r = bf.parse_verdict(bf.reject("too big" * 100))
    assert not r.accepted and len(r.reason) == bf.MAX_REASON_CHARS
    for bad in (bf.accept([("127.0.0.1", 0)], 4096), bf.accept([("", 1)], 4096),
                bf.accept([("h", 1)] * 9, 4096), bf.accept([], 10),
                {"t": "accept", "addrs": [["h", "1"]], "window": 4096},
                {"t": "reject", "reason": 5}):
        with pytest.raises(BulkFormatError):
            bf.parse_verdict(bad)


def test_start_data_credit():
    assert bf.parse_start(bf.start("direct", 1 << 20)) == ("direct", 1 << 20)
    with pytest.raises(BulkFormatError, match="mode"):
        bf.parse_start(bf.start("carrier-pigeon", 1 << 20))
    assert bf.parse_data(bf.data(3, b"x" * 20), 3, 20) == b"x" * 20
    with pytest.raises(BulkFormatError, match="out of order"):
        bf.parse_data(bf.data(4, b"x" * 20), 3, 20)
    with pytest.raises(BulkFormatError, match="length"):
        bf.parse_data(bf.data(3, b"x" * 21), 3, 20)
    assert bf.parse_credit(bf.credit(5), sent=5) == 5
    with pytest.raises(BulkFormatError, match="never sent"):
        bf.parse_credit(bf.credit(6), sent=5)
    assert bf.parse_abort(bf.abort("why")) == "why"
