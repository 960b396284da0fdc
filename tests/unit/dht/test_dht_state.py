"""What a DHT node keeps across a restart (lattice.core.dht_state): the file round-trips,
and anything that is not ours or no longer valid is dropped, or refused as a whole."""

import pytest

from lattice.core import codec
from lattice.core.dht_state import DhtState, StateError, decode_state, encode_state
from lattice.core.identity import Identity
from lattice.core.records import RecordLimits, sign_record, user_key

NOW = 1_700_000_000.0
ME, OTHER = Identity(bytes(range(32))), Identity(bytes(range(1, 33)))
LIMITS = RecordLimits()


def record(identity=ME, ttl=60.0, key="/v/x"):
    return sign_record(identity, key, codec.pack(1), NOW + ttl)


def decode(data, now=NOW):
    return decode_state(data, now=now, publisher=ME.peer_id, limits=LIMITS, max_records=2)


def test_what_is_written_reads_back():
    state = DhtState([(OTHER.peer_id, ("/ip4/127.0.0.1/tcp/1",))], [record()], ["model-1"])
    assert decode(encode_state(state)) == state


def test_records_not_ours_expired_or_beyond_the_bound_are_dropped():
    mine = [record(key=user_key(str(i))) for i in range(3)]
    state = DhtState([], [record(OTHER), *mine], ["a", "", "b", "c"])
    got = decode(encode_state(state))
    assert got.records == mine[:1]  # the first two slots: OTHER's (dropped), then one of ours
    assert got.providing == ["a"]
    assert decode(encode_state(DhtState([], [record(ttl=10.0)], [])), now=NOW + 20).records == []


@pytest.mark.parametrize("data", [
    b"\xc1", codec.pack([1, 2]), codec.pack({"version": 2, "peers": [], "records": [], "providing": []}),
    codec.pack({"version": 1, "peers": [{"peer_id": "nope", "addrs": []}], "records": [], "providing": []}),
    codec.pack({"version": 1, "peers": [{"peer_id": ME.peer_id}], "records": [], "providing": []}),
])
def test_a_file_that_is_not_ours_is_refused_whole(data):
    with pytest.raises(StateError):
        decode(data)
