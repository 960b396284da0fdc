"""The pure formats of /lattice/bulk/2: chunk geometry across a session's arrays, the
key schedule (with the golden vector of proto/bulk.md) and control-message validation.
Array specs themselves: tests/unit/core/test_arrays.py."""

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from lattice.core import bulk_frames as bf
from lattice.core.arrays import ArraySpec
from lattice.core.bulk_frames import BulkFormatError

# -- chunks ---------------------------------------------------------------------------------


@given(nbytes=st.integers(0, 10_000), chunk=st.integers(1, 3000))
def test_chunks_tile_the_array_exactly(nbytes, chunk):
    spans = [bf.chunk_span(i, nbytes, chunk) for i in range(bf.chunk_count(nbytes, chunk))]
    assert [s for s, _ in spans] == list(range(0, nbytes, chunk))
    assert all(0 < stop - start <= chunk for start, stop in spans)
    assert (spans[-1][1] if spans else 0) == nbytes


@given(sizes=st.lists(st.integers(0, 5_000), max_size=5), chunk=st.integers(1, 3000))
def test_a_sessions_chunks_are_numbered_across_its_arrays_and_tile_each(sizes, chunk):
    spans = list(bf.chunk_spans(sizes, chunk))
    assert [n for n, *_ in spans] == list(range(bf.total_chunks(sizes, chunk)))
    for index, nbytes in enumerate(sizes):
        mine = [(start, stop) for _, i, start, stop in spans if i == index]
        assert mine == [bf.chunk_span(c, nbytes, chunk) for c in range(bf.chunk_count(nbytes, chunk))]


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
    ha = bf.hello(a.public, [ArraySpec("<f4", (10,), 40)])
    hb = bf.hello(b.public, [ArraySpec("<f4", (10,), 40)])
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


def test_session_id_commits_to_the_array_specs():
    a, b, ha, hb = pair()
    for changed in ([ArraySpec("<f4", (5, 2), 40)],
                    [ArraySpec("<f4", (10,), 40), ArraySpec("|u1", (0,), 0)]):
        assert bf.session_id(ha, hb) != bf.session_id(bf.hello(a.public, changed), hb)


def test_reflected_and_low_order_keys_are_refused():
    a = bf.EphemeralKey()
    with pytest.raises(BulkFormatError, match="echoed"):
        a.exchange(a.public)
    with pytest.raises(BulkFormatError, match="bad ephemeral key"):
        a.exchange(bytes(32))  # the all-zero point: shared secret would be zero


def test_golden_vector_of_proto_bulk_md():
    a = bf.EphemeralKey.from_private_bytes(bytes(range(32)))
    b = bf.EphemeralKey.from_private_bytes(bytes(range(32, 64)))
    ha = bf.hello(a.public, [ArraySpec("<f4", (2, 3), 24), ArraySpec("<i8", (1,), 8)])
    hb = bf.hello(b.public, None)
    sid = bf.session_id(ha, hb)
    keys = bf.direction_keys(a.exchange(b.public), sid, a.public)
    assert a.public.hex() == "8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f"
    assert sid.hex() == "31abbf533b871cd6fe04a30b8c036a40abf2e4e0cc10f221a28663c9b0ed8d13"
    assert keys.data_key.hex() == (
        "f847793ebd830c8248a9e046f031a4bc172638d6f88506a5fd6cda620b7dc876")
    assert keys.channel_id.hex() == (
        "c74b1cb7e633bacf2fa69332c7a806da840e6f783e6ffe6a21d2284f73bdef6f")
    assert keys.token.hex() == (
        "5edc044d8b143757ee96a0f57ccac3f1e1cf2c673cc779f395d4e6e99f63e58a")
    aead = AESGCM(keys.data_key)
    # the first array is chunk 0; the second array's first chunk is number 1
    assert aead.encrypt(bf.nonce(0), bytes(range(24)), None).hex() == (
        "f1bdf93d47de257dd534708c16aa70cc302caa38957cf3d6d5653ebf78acf999b0eb9780245bf430")
    assert aead.encrypt(bf.nonce(1), bytes(range(8)), None).hex() == (
        "1a8b272c79948e892ad58d163fdc113b5462b69bf54e31fd")


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
    assert bf.parse_hello({**bf.hello(b"e" * 32, None), "send": ["anything"]}).send == ["anything"]
    for bad in ({"t": "hello", "v": 1, "epk": b"e" * 32, "send": None},
                {"t": "hello", "v": 2, "epk": b"e" * 31, "send": None},
                {"t": "hello", "v": 2, "epk": b"e" * 32, "send": []},
                {"t": "hello", "v": 2, "epk": b"e" * 32, "send": [{}] * 17},
                {"t": "hello", "v": 2, "epk": b"e" * 32, "send": {"dtype": "<f4"}},
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
