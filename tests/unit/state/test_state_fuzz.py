"""Hostile bytes never crash the store and never change state unless they are valid."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lattice.core.codec import pack
from lattice.core.identity import Identity
from lattice.core.state import Set, StateStore
from lattice.core.state.envelope import seal

AUTHOR = Identity.generate()
_writer = StateStore(AUTHOR)
FIRST = _writer.apply_local([Set("member/peer_id", AUTHOR.peer_id),
                             Set("member/name", "x")], 0.0)
SECOND = _writer.apply_local([Set("jobs/j1", {"submitter": AUTHOR.peer_id})], 0.0)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_rejected_with_a_reason(raw):
    store = StateStore(Identity.generate())
    result = store.receive(raw, 0.0, sender="x")
    assert result.status == "rejected" and result.penalize and result.reason
    assert store.summary() == {}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255),
                          st.sampled_from(["set", "insert", "delete"])), min_size=1,
                max_size=4))
def test_signed_but_mangled_updates_are_applied_whole_or_not_at_all(edits):
    update = bytearray(SECOND.update)
    for pos, byte, op in edits:
        pos %= len(update) + 1
        if op == "insert":
            update.insert(pos, byte)
        elif update and pos < len(update):
            if op == "set":
                update[pos] = byte
            else:
                del update[pos]
    store = StateStore(Identity.generate())
    store.receive(FIRST.raw, 0.0)
    before = store.get("", 0.0)
    env = seal(AUTHOR, 2, "delta", bytes(update), FIRST.digest)
    result = store.receive(env.raw, 0.0)
    if result.status == "accepted":
        assert store.summary() == {AUTHOR.peer_id: 2}
    else:
        assert result.reason in ("malformed_update", "unsupported_update", "incomplete",
                                 "out_of_bounds")
        assert store.get("", 0.0) == before and store.summary() == {AUTHOR.peer_id: 1}


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "author", "seq", "kind", "prev", "update", "sig",
                                        "x"]),
                       st.one_of(st.integers(-2**63, 2**64 - 1), st.binary(max_size=40),
                                 st.text(max_size=60), st.none()), max_size=8))
def test_envelope_shaped_maps_are_rejected_not_raised(fields):
    store = StateStore(Identity.generate())
    assert store.receive(pack(fields), 0.0).status == "rejected"
