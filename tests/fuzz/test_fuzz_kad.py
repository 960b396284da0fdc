"""Fuzz: `/lattice/kad/1` messages and signed records - what a DHT node parses from any
peer - and the record store's quotas under any sequence of puts."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from lattice.core import codec
from lattice.core.identity import Identity
from lattice.core.kademlia import (
    MalformedMessage,
    Message,
    Mode,
    PeerInfo,
    make_message,
    parse_message,
)
from lattice.core.records import (
    LOCAL,
    Record,
    RecordError,
    RecordStore,
    StoreOutcome,
    sign_record,
    validate_record,
)

from .conftest import FUZZ, msgpack_values, mutated

NOW = 1_700_000_000.0
ME = Identity(bytes(range(32)))
SENDER = PeerInfo(ME.peer_id, ("/ip4/127.0.0.1/tcp/1",), Mode.SERVER)
RECORD = sign_record(ME, "/v/fuzz", codec.pack({"x": 1}), NOW + 60)
VALID = [
    make_message("PING", 1, False, SENDER),
    make_message("FIND_NODE", 2, False, SENDER, target=bytes(32)),
    make_message("GET_VALUE", 3, False, SENDER, key="/v/fuzz"),
    make_message("PUT_VALUE", 4, False, SENDER, record=RECORD.to_wire()),
    make_message("GET_VALUE", 3, True, SENDER, records=[RECORD.to_wire()], closer=[SENDER]),
    make_message("PUT_VALUE", 4, True, SENDER, ok=False, reason="store_full"),
]
near_misses = st.one_of(*(mutated(m.to_wire(), m.to_wire()) for m in VALID))


@FUZZ
@given(msgpack_values | near_misses)
def test_parse_message_returns_a_message_or_raises_malformed(raw):
    try:
        msg = parse_message(raw)
    except MalformedMessage:
        return
    assert isinstance(msg, Message)
    assert parse_message(msg.to_wire()) == msg  # what we accept, we could have sent


@FUZZ
@given(st.sampled_from(VALID))
def test_every_message_we_send_parses_back(msg):
    assert parse_message(codec.unpack(codec.pack(msg.to_wire()))) == msg


record_misses = mutated(RECORD.to_wire(), RECORD.to_wire())


@FUZZ
@given(msgpack_values | record_misses)
def test_validate_record_accepts_only_what_was_signed(raw):
    try:
        record = validate_record(raw, NOW)
    except RecordError:
        return
    assert record == RECORD  # the only signed record in play


SOURCES = [LOCAL, "a", "b", "c", "d"]
PUBLISHERS = [Identity(bytes([i]) * 32) for i in range(1, 7)]
SIGNED = {(p.peer_id, k, t): sign_record(p, f"/v/{k}", codec.pack(k), NOW + t)
          for p in PUBLISHERS for k in range(4) for t in (10.0, 20.0)}
puts = st.lists(st.tuples(st.sampled_from(sorted(SIGNED)), st.sampled_from(SOURCES)),
                max_size=60)


@FUZZ
@given(puts, st.integers(2, 12), st.integers(1, 4), st.integers(1, 8), st.integers(1, 8))
def test_the_record_store_keeps_every_quota_whatever_arrives(seq, total, per_key, per_pub, per_src):
    store = RecordStore(max_total=total, max_per_key=per_key, max_per_publisher=per_pub,
                        max_per_source=per_src)
    where: dict[tuple[str, str], str | None] = {}
    by_source: Counter[str] = Counter()
    for slot, source in seq:
        record: Record = SIGNED[slot]
        key_full = len(store.get(record.key, NOW)) >= per_key
        outcome = store.put(record, NOW, source)
        if outcome is StoreOutcome.STORED:
            where[(record.key, record.publisher)] = source
        held = {(r.key, r.publisher) for r in store.all_records()}
        where = {s: src for s, src in where.items() if s in held}
        assert len(store) == len(held) <= total
        by_source = Counter(src for src in where.values() if src is not LOCAL)
        assert all(n <= per_src for n in by_source.values())
        by_key = Counter(k for k, _ in held)
        assert all(n <= per_key for n in by_key.values())
        if (outcome is StoreOutcome.FULL and source is not LOCAL and not key_full
                and len(store) >= total):
            # refused for lack of room only while the shares are even (max-min fair)
            biggest = max(by_source.values(), default=0)
            assert biggest < by_source.get(source, 0) + 2
    stats = store.statistics()
    assert stats["stored"] == len(store) and stats["sources"] == len(by_source)
