"""Signed DHT records: what every node accepts, refuses, and keeps."""

import pytest

from lattice.core import codec
from lattice.core.identity import Identity
from lattice.core.netgroups import source_group
from lattice.core.records import (
    LOCAL,
    BadSignature,
    Expired,
    Malformed,
    Record,
    RecordLimits,
    RecordStore,
    StoreOutcome,
    TooLarge,
    address_value,
    merge_records,
    peer_key,
    provider_key,
    sign_record,
    user_key,
    validate_record,
)

NOW = 1_700_000_000.0
ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))


def rec(identity=ALICE, key="/v/model", value=None, ttl=60.0, now=NOW):
    return sign_record(identity, key, codec.pack(value if value is not None else {"x": 1}),
                       now + ttl)


def test_signed_record_round_trips_through_the_wire():
    r = rec()
    wire = codec.unpack(codec.pack(r.to_wire()))
    assert validate_record(wire, NOW) == r
    assert r.subkey == r.publisher == ALICE.peer_id
    assert r.unpack_value() == {"x": 1}


@pytest.mark.parametrize("field,value", [
    ("value", codec.pack({"x": 2})),
    ("key", "/v/other"),
    ("expires_at", NOW + 61.0),
])
def test_any_tampered_field_breaks_the_signature(field, value):
    wire = rec().to_wire() | {field: value}
    with pytest.raises(BadSignature):
        validate_record(wire, NOW)


def test_a_record_claiming_another_publisher_is_refused():
    wire = rec().to_wire() | {"publisher": BOB.peer_id, "subkey": BOB.peer_id}
    with pytest.raises(BadSignature):
        validate_record(wire, NOW)


def test_expired_and_too_far_future_records_are_refused():
    with pytest.raises(Expired):
        validate_record(rec(ttl=10.0), NOW + 10.0)
    limits = RecordLimits(max_ttl=3600.0, clock_skew=0.0)
    validate_record(rec(ttl=3600.0), NOW, limits)
    with pytest.raises(TooLarge):
        validate_record(rec(ttl=3601.0), NOW, limits)


def test_oversize_key_and_value_are_refused():
    limits = RecordLimits(max_key_bytes=32, max_value_bytes=100)
    with pytest.raises(TooLarge):
        validate_record(rec(key="/v/" + "k" * 40), NOW, limits)
    with pytest.raises(TooLarge):
        validate_record(rec(value=b"x" * 200), NOW, limits)


@pytest.mark.parametrize("mutate", [
    lambda w: {k: v for k, v in w.items() if k != "signature"},
    lambda w: w | {"extra": 1},
    lambda w: w | {"expires_at": int(w["expires_at"])},
    lambda w: w | {"expires_at": float("inf")},
    lambda w: w | {"value": "not bytes"},
    lambda w: w | {"subkey": "something-else"},
    lambda w: w | {"publisher": "not-a-peer-id", "subkey": "not-a-peer-id"},
    lambda w: w | {"key": "no-namespace"},
    lambda w: w | {"key": "/nope/x"},
    lambda w: w | {"value": b"\xc1"},  # never valid msgpack
    lambda w: [w],
])
def test_malformed_records_are_refused_before_any_crypto(mutate):
    with pytest.raises(Malformed):
        validate_record(mutate(rec().to_wire()), NOW)


def test_values_are_msgpack_never_pickle():
    import pickle
    r = sign_record(ALICE, "/v/p", pickle.dumps(object), NOW + 60)
    with pytest.raises(Malformed):
        validate_record(r, NOW)


def test_peer_records_only_by_the_peer_itself_and_only_addresses():
    mine = sign_record(ALICE, peer_key(ALICE.peer_id), address_value(["/ip4/127.0.0.1/tcp/1"]), NOW + 60)
    assert validate_record(mine, NOW) == mine
    forged = sign_record(BOB, peer_key(ALICE.peer_id), address_value([]), NOW + 60)
    with pytest.raises(Malformed):
        validate_record(forged, NOW)
    junk = sign_record(ALICE, peer_key(ALICE.peer_id), codec.pack({"addrs": [1]}), NOW + 60)
    with pytest.raises(Malformed):
        validate_record(junk, NOW)


def test_provider_records_are_signed_too():
    r = sign_record(ALICE, provider_key("blob-1"), address_value([]), NOW + 60)
    validate_record(r, NOW)
    with pytest.raises(BadSignature):
        validate_record(r.to_wire() | {"value": address_value(["/ip4/6.6.6.6/tcp/1"])}, NOW)


def test_store_keeps_one_record_per_publisher_and_the_newest_wins():
    store = RecordStore()
    old, new = rec(ttl=60.0, value=1), rec(ttl=120.0, value=2)
    assert store.put(old, NOW) is StoreOutcome.STORED
    assert store.put(new, NOW) is StoreOutcome.REPLACED
    assert store.put(old, NOW) is StoreOutcome.KEPT_EXISTING
    assert store.put(rec(BOB, value=3), NOW) is StoreOutcome.STORED
    got = store.get("/v/model", NOW)
    assert {r.publisher: r.unpack_value() for r in got} == {ALICE.peer_id: 2, BOB.peer_id: 3}
    assert len(store) == 2


def test_store_bounds_and_gc():
    store = RecordStore(max_per_key=1, max_total=2)
    assert store.put(rec(ALICE, ttl=60.0), NOW) is StoreOutcome.STORED
    # a full key keeps the longer-lived record
    assert store.put(rec(BOB, ttl=30.0), NOW) is StoreOutcome.FULL
    assert store.put(rec(BOB, ttl=90.0), NOW) is StoreOutcome.STORED
    assert [r.publisher for r in store.get("/v/model", NOW)] == [BOB.peer_id]
    assert store.put(rec(key="/v/a"), NOW) is StoreOutcome.STORED
    assert store.put(rec(key="/v/b"), NOW) is StoreOutcome.FULL
    assert store.get("/v/a", NOW + 61) == []
    assert store.gc(NOW + 61) == 1
    assert len(store) == 1
    assert store.gc(NOW + 91) == 1 and len(store) == 0


def test_merge_keeps_newest_per_publisher():
    a1, a2, b = rec(ttl=10.0, value=1), rec(ttl=20.0, value=2), rec(BOB, value=3)
    merged = merge_records([a2, b, a1, a2])
    assert {(r.publisher, r.unpack_value()) for r in merged} == {
        (ALICE.peer_id, 2), (BOB.peer_id, 3)}


def test_user_keys_live_in_the_values_namespace():
    assert user_key("hello") == "/v/hello"
    assert isinstance(rec(key=user_key("hello")), Record)


# -- quotas: one publisher or one network cannot shut others out -----------------------

SYBILS = [Identity(bytes([i]) * 32) for i in range(2, 40)]


def test_one_publisher_holds_at_most_its_quota():
    store = RecordStore(max_total=100, max_per_publisher=3)
    outcomes = [store.put(rec(key=f"/v/{i}"), NOW, "net-a") for i in range(5)]
    assert outcomes == [StoreOutcome.STORED] * 3 + [StoreOutcome.PUBLISHER_QUOTA] * 2
    assert store.put(rec(BOB, key="/v/0"), NOW, "net-a") is StoreOutcome.STORED


def test_one_network_of_sybils_holds_at_most_its_quota():
    store = RecordStore(max_total=100, max_per_source=10)
    outcomes = [store.put(rec(s, key=f"/v/{i}"), NOW, "net-a") for i, s in enumerate(SYBILS[:12])]
    assert outcomes.count(StoreOutcome.STORED) == 10
    assert outcomes[-2:] == [StoreOutcome.SOURCE_QUOTA] * 2
    assert store.put(rec(BOB), NOW, "net-b") is StoreOutcome.STORED
    assert store.statistics()["largest_source"] == 10


def test_a_full_store_makes_room_for_a_newcomer_from_the_biggest_source():
    store = RecordStore(max_total=10)
    for i, s in enumerate(SYBILS[:10]):
        assert store.put(rec(s, key=f"/v/{i}", ttl=3600.0 - i), NOW, "attacker") is StoreOutcome.STORED
    # honest publishers from another network get in, each evicting the attacker's
    # soonest-expiring record, until both hold an even share
    honest = [store.put(rec(s, key=f"/v/h{i}", ttl=60.0), NOW, "honest")
              for i, s in enumerate(SYBILS[20:27])]
    assert honest == [StoreOutcome.STORED] * 5 + [StoreOutcome.FULL] * 2
    assert len(store) == 10
    assert store.get("/v/9", NOW) == [] and store.get("/v/0", NOW) != []  # soonest went
    assert store.statistics()["largest_source"] == 5


def test_a_full_key_makes_room_for_a_newcomer_from_the_biggest_source():
    store = RecordStore(max_per_key=4, max_total=100)
    for s in SYBILS[:4]:
        assert store.put(rec(s, ttl=3600.0), NOW, "attacker") is StoreOutcome.STORED
    # shorter-lived than every attacker record, yet it gets in
    assert store.put(rec(BOB, ttl=60.0), NOW, "honest") is StoreOutcome.STORED
    assert BOB.peer_id in {r.publisher for r in store.get("/v/model", NOW)}
    assert len(store.get("/v/model", NOW)) == 4


def test_our_own_records_are_exempt_from_quotas_and_never_evicted():
    store = RecordStore(max_total=3, max_per_source=1, max_per_publisher=1)
    assert store.put(rec(key="/v/a"), NOW, LOCAL) is StoreOutcome.STORED
    assert store.put(rec(key="/v/b"), NOW, LOCAL) is StoreOutcome.STORED
    assert store.put(rec(BOB, key="/v/c"), NOW, "net-a") is StoreOutcome.STORED
    assert store.put(rec(SYBILS[0], key="/v/d"), NOW, "net-b") is StoreOutcome.FULL
    assert len(store) == 3 and store.get("/v/a", NOW) and store.get("/v/b", NOW)


def test_quota_counts_follow_expiry_and_replacement():
    store = RecordStore(max_total=100, max_per_source=2)
    assert store.put(rec(key="/v/a", ttl=10.0), NOW, "net-a") is StoreOutcome.STORED
    assert store.put(rec(BOB, key="/v/a", ttl=100.0), NOW, "net-a") is StoreOutcome.STORED
    # a newer version of a stored record replaces it in place, whoever delivers it
    assert store.put(rec(key="/v/a", ttl=20.0), NOW, "net-b") is StoreOutcome.REPLACED
    assert store.put(rec(SYBILS[0]), NOW, "net-a") is StoreOutcome.SOURCE_QUOTA
    assert store.gc(NOW + 30) == 1
    assert store.put(rec(SYBILS[0], now=NOW + 30), NOW + 30, "net-a") is StoreOutcome.STORED
    assert store.statistics() == {
        "stored": 2, "max_total": 100, "max_per_key": 64, "max_per_publisher": None,
        "max_per_source": 2, "sources": 1, "largest_source": 2, "publishers": 2}


@pytest.mark.parametrize("ip, group", [
    ("203.0.113.7", "203.0.113.0/24"),
    ("203.0.113.250", "203.0.113.0/24"),
    ("127.0.1.2", "127.0.1.0/24"),
    ("2001:db8:1:2::5", "2001:db8:1::/48"),
    ("::ffff:198.51.100.9", "198.51.100.0/24"),
    ("fe80::1%eth0", "fe80::/48"),
    ("relay:12D3KooWR", "relay:12D3KooWR"),  # everyone behind one relay shares it
    (None, "peer:12D3KooWX"),
])
def test_records_are_charged_to_the_network_they_came_from(ip, group):
    assert source_group(ip, "12D3KooWX") == group


def test_dropping_a_key_or_everything_keeps_the_quota_counts_right():
    store = RecordStore(max_total=10, max_per_source=2)
    assert store.put(rec(key="/v/a"), NOW, "net-a") is StoreOutcome.STORED
    assert store.put(rec(BOB, key="/v/a"), NOW, "net-a") is StoreOutcome.STORED
    assert store.put(rec(SYBILS[0], key="/v/b"), NOW, "net-a") is StoreOutcome.SOURCE_QUOTA
    assert store.drop("/v/a") == 2 and len(store) == 0
    assert store.put(rec(SYBILS[0], key="/v/b"), NOW, "net-a") is StoreOutcome.STORED
    store.clear()
    assert store.statistics()["stored"] == store.statistics()["sources"] == 0
