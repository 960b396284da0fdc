"""The Yjs pre-scan: every update our writers make passes, everything our documents
never hold is refused before pycrdt sees it, and hostile bytes only ever raise
UpdateError (never recurse, never run longer than the update is long)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from lattice.core.identity import Identity
from lattice.core.state import Delete, Set, StateLimits, StateStore
from lattice.core.state.document import apply_checked, write_delta, write_snapshot
from lattice.core.state.update_scan import UpdateError, check_update
from lattice.testing.hostile.state import (
    nested_array_envelope,
    nested_array_update,
    nested_type_update,
    varstring,
    varuint,
)

ME = Identity.generate()


def refused(update: bytes) -> str:
    with pytest.raises(UpdateError) as e:
        check_update(update)
    return e.value.reason


# -- honest updates pass -------------------------------------------------------------------

_keys = st.sampled_from(["a", "b", "c", "job-1", "x" * 100])
_values = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
                    st.binary(max_size=300), st.text(max_size=50), st.none(),
                    st.lists(st.integers(-2**63, 2**63 - 1), max_size=4),
                    st.dictionaries(st.text(max_size=5), st.integers(0, 99), max_size=3))
_change = st.one_of(
    st.builds(lambda k, v: Set(f"counters/{k}", v), _keys, st.integers(0, 2**53)),
    st.builds(lambda k, v: Set(f"participation/{k}", {"state": "joined", "v": v}), _keys,
              _values),
    st.builds(lambda k: Delete(f"participation/{k}"), _keys),
    st.builds(lambda k: Delete(f"counters/{k}"), _keys),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_change, min_size=1, max_size=6), min_size=1, max_size=12))
def test_every_envelope_an_honest_author_writes_passes(batches):
    """Deltas, deletes and the snapshots a small snapshot threshold forces."""
    writer = StateStore(ME, limits=StateLimits(snapshot_min_bytes=256))
    for changes in batches:
        env = writer.apply_local(changes, 0.0)
        if env is not None:
            check_update(env.update)
    whole = Doc()
    for env in writer.envelopes_after(ME.peer_id, 0):
        whole.apply_update(env.update)
    check_update(whole.get_update())  # the whole document, as a snapshot would carry it


def test_snapshots_deletes_and_overwrites_pass():
    doc = Doc(client_id=7)
    updates = [write_delta(None, [Set("member/peer_id", ME.peer_id)], 7)]
    doc.apply_update(updates[0])
    for i in range(5):
        update = write_delta(doc, [Set("member/name", f"n{i}"), Set(f"counters/c{i}", i),
                                   Delete(f"counters/c{i - 1}")], 7)
        doc.apply_update(update)
        updates.append(update)
    updates.append(write_snapshot({"member": {"peer_id": ME.peer_id}, "counters": {"c": 1}}, 7))
    updates.append(doc.get_update())
    updates.append(Doc().get_update())  # the empty update
    for update in updates:
        check_update(update)


# -- what our documents never hold is refused -----------------------------------------------

def test_the_30000_deep_array_that_crashed_pycrdt_is_refused_without_recursion():
    update = nested_array_update(30_000)
    assert len(update) < 256 * 1024
    assert refused(update) == "unsupported_update"
    # deeper than any stack, in a fraction of a second: the scan does not recurse
    assert refused(nested_array_update(2_000_000)) == "unsupported_update"


def test_the_store_refuses_the_crashing_envelope_and_blames_its_sender():
    mallory = Identity.generate()
    store = StateStore(ME)
    result = store.receive(nested_array_envelope(mallory), 0.0, sender=mallory.peer_id)
    assert (result.status, result.reason, result.penalize) == (
        "rejected", "unsupported_update", True)
    assert store.summary() == {} and store.statistics()["rejected"] == {"unsupported_update": 1}


def test_nested_shared_types_are_refused():
    assert refused(nested_type_update(30_000)) == "unsupported_update"
    assert refused(nested_type_update(1)) == "unsupported_update"  # even one


@pytest.mark.parametrize("build", [
    lambda d: d.get("member", type=Map).__setitem__("k", Array([1])),
    lambda d: d.get("member", type=Map).__setitem__("k", Map({"a": b"x"})),
    lambda d: d.get("member", type=Map).__setitem__("k", Text("hi")),
    lambda d: d.get("member", type=Map).__setitem__("k", [1, [2]]),
    lambda d: d.get("member", type=Map).__setitem__("k", {"nested": b"x"}),
    lambda d: d.get("member", type=Text).__iadd__("text in a root"),
], ids=["array", "map", "text", "nested-list-value", "nested-map-value", "text-root"])
def test_content_our_documents_never_hold_is_refused(build):
    doc = Doc()
    with doc.transaction():
        build(doc)
    assert refused(doc.get_update()) == "unsupported_update"


def test_scalar_values_pass_the_scan_and_are_left_to_the_schema():
    doc = Doc()
    doc.get("member", type=Map)["name"] = "a string, not bytes"
    check_update(doc.get_update())  # structure is fine; read_content refuses the value


# -- hostile bytes: bounded, typed --------------------------------------------------------------

@pytest.mark.parametrize("update,reason", [
    (b"", "malformed_update"),
    (varuint(2**50) + b"\x00", "malformed_update"),                 # 2^50 clients announced
    (b"\x01" + varuint(2**40) + b"\x01\x00\x00", "malformed_update"),  # 2^40 structs
    (b"\x00" + varuint(2**40), "malformed_update"),                 # 2^40 deletes
    (b"\x00\x00\x00", "malformed_update"),                          # trailing bytes
    (b"\xff" * 20, "malformed_update"),                             # an endless varint
    (b"\x01\x01\x05" + varuint(2**32) + b"\x00\x01\x00", "malformed_update"),  # clock > u32
    (b"\x01\x01\x05\x00\x00\x00\x00", "malformed_update"),          # a GC of length 0
    (b"\x01\x01\x05\x00\x21\x01" + varstring("member") + b"\x01\xff\x01\x00",
     "malformed_update"),                                            # a key that is not UTF-8
    (b"\x01\x01\x05\x00\x1f\x00", "malformed_update"),              # unknown content kind
])
def test_malformed_updates_are_refused_cheaply(update, reason):
    assert refused(update) == reason


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_raise_only_update_error(data):
    try:
        check_update(data)
    except UpdateError as e:
        assert e.reason in ("malformed_update", "unsupported_update")


_HONEST = StateStore(ME)
_HONEST_BASE = Doc()
_HONEST_BASE.apply_update(_HONEST.apply_local(
    [Set("member/peer_id", ME.peer_id), Set("member/name", "x"), Set("counters/a", 1)],
    0.0).update)
_HONEST_UPDATE = _HONEST.apply_local([Set("member/name", "y"), Delete("counters/a"),
                                      Set("participation/j", {"state": "joined"})], 0.0).update


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255),
                          st.sampled_from(["set", "insert", "delete"])), min_size=1,
                max_size=6))
def test_whatever_passes_the_scan_pycrdt_applies_or_refuses_with_a_value_error(edits):
    """Mutations of an honest update: the scan raises only UpdateError, and what it
    lets through never crashes pycrdt (apply_checked turns its errors into UpdateError)."""
    update = bytearray(_HONEST_UPDATE)
    for pos, byte, op in edits:
        pos %= len(update) + 1
        if op == "insert":
            update.insert(pos, byte)
        elif pos < len(update):
            if op == "set":
                update[pos] = byte
            else:
                del update[pos]
    try:
        check_update(bytes(update))
    except UpdateError:
        return
    try:
        apply_checked(_HONEST_BASE, bytes(update))
    except UpdateError:
        pass
