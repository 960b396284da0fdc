"""The store: what an author may write, what a peer accepts, and that rejects change nothing."""

import pytest
from pycrdt import Array, Doc, Map

from lattice.core.codec import canonical, pack, unpack
from lattice.core.identity import Identity
from lattice.core.jobs import TrainSpec, new_job_record
from lattice.core.state import Delete, LocalStateError, Set, StateLimits, StateStore
from lattice.core.state.envelope import KIND_SNAPSHOT, seal
from lattice.core.state.limits import MAX_AUTHOR_BYTES, MAX_VALUE_BYTES
from lattice.core.state.views import StatePathError

NOW = 1_000.0


def member(identity, name="n", beat=NOW):
    return [Set("member/peer_id", identity.peer_id), Set("member/name", name),
            Set("member/heartbeat", beat), Set("member/capabilities", {"cpus": 4, "tasks": ["t"]})]


def _nested(depth):
    value = "x"
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    return value


def snapshot_of(store):
    """Everything a user can observe of a store's state."""
    return store.get("", NOW), store.summary(), store.banned()


@pytest.fixture
def alice():
    return Identity.generate()


@pytest.fixture
def writer(alice):
    return StateStore(alice)


@pytest.fixture
def reader():
    return StateStore(Identity.generate())


def test_local_write_is_visible_locally_and_after_delivery(writer, reader, alice):
    job_id, record = new_job_record(TrainSpec(task="t"), alice.peer_id, "0123456789abcdef", NOW)
    envs = [writer.apply_local(member(alice, "alpha"), NOW),
            writer.apply_local([Set(f"jobs/{job_id}", record)], NOW)]
    for env in envs:
        assert reader.receive(env.raw, NOW, sender=alice.peer_id).status == "accepted"
    for store in (writer, reader):
        assert store.get(f"members/{alice.peer_id}/name", NOW) == "alpha"
        assert store.get(f"members/{alice.peer_id}/alive", NOW) is True
        assert store.get(f"jobs/{job_id}/status", NOW) == "submitted"
        assert store.get("members/" + alice.peer_id + "/capabilities/cpus", NOW) == 4
    assert reader.summary() == {alice.peer_id: 2}


def test_values_nested_deeper_than_the_limit_are_refused_locally(writer, alice):
    job = {"submitter": alice.peer_id, "a": _nested(7)}  # with the record: 8 levels
    writer.apply_local([Set("jobs/j1", job)], NOW)
    with pytest.raises(LocalStateError, match="nested deeper"):
        writer.apply_local([Set("jobs/j2", {"submitter": alice.peer_id, "a": _nested(8)})], NOW)
    with pytest.raises(LocalStateError, match="nested deeper"):  # not a RecursionError
        writer.apply_local([Set("jobs/j3", {"submitter": alice.peer_id, "a": _nested(990)})],
                           NOW)


def test_values_round_trip_exactly(writer, alice):
    value = {"submitter": alice.peer_id, "big": 2**60, "f": 0.5, "b": b"\x00\x01", "n": None,
             "nested": {"k": [1, "x"]}}
    writer.apply_local([Set("jobs/j1", value)], NOW)
    assert writer.get(f"authors/{alice.peer_id}/jobs/j1", NOW) == value


def test_unchanged_content_produces_no_envelope(writer, alice):
    assert writer.apply_local(member(alice), NOW) is not None
    assert writer.apply_local(member(alice), NOW) is None


def test_replay_is_a_counted_no_op(writer, reader, alice):
    env = writer.apply_local(member(alice), NOW)
    reader.receive(env.raw, NOW)
    before = snapshot_of(reader)
    result = reader.receive(env.raw, NOW, sender="someone")
    assert (result.status, result.penalize) == ("replayed", False)
    assert snapshot_of(reader) == before
    assert reader.statistics()["replayed"] == 1


def test_gap_is_buffered_then_applied_in_order(writer, reader, alice):
    e1 = writer.apply_local(member(alice), NOW)
    e2 = writer.apply_local([Set("member/name", "second")], NOW)
    e3 = writer.apply_local([Set("member/name", "third")], NOW)
    assert reader.receive(e3.raw, NOW).status == "buffered"
    assert reader.receive(e2.raw, NOW).status == "buffered"
    with pytest.raises(StatePathError):
        reader.get(f"members/{alice.peer_id}", NOW)
    result = reader.receive(e1.raw, NOW)
    assert [e.seq for e in result.accepted] == [1, 2, 3]
    assert reader.get(f"members/{alice.peer_id}/name", NOW) == "third"


def test_gap_buffer_is_bounded_and_overflow_blames_nobody(alice):
    writer = StateStore(alice)
    reader = StateStore(Identity.generate(), limits=StateLimits(max_gap_per_author=2))
    envs = [writer.apply_local([Set("counters/c", i)], NOW) for i in range(1, 5)]
    assert [reader.receive(e.raw, NOW).status for e in envs[1:]] == ["buffered", "buffered",
                                                                    "refused"]
    assert reader.statistics()["refused"] == {"gap_overflow": 1}
    reader.receive(envs[0].raw, NOW)
    assert reader.summary() == {alice.peer_id: 3}


def test_equivocation_bans_the_author_and_keeps_a_proof(alice, reader, forger):
    honest = StateStore(alice)
    e1 = honest.apply_local(member(alice), NOW)
    fork, _ = forger(alice, 1, {("member", "peer_id"): alice.peer_id,
                                ("member", "name"): "fork"})
    reader.receive(e1.raw, NOW)
    forwarded = reader.receive(fork.raw, NOW, sender="a-forwarder")
    assert (forwarded.status, forwarded.reason, forwarded.penalize) == (
        "rejected", "equivocation", False)
    assert forwarded.proof == (e1.raw, fork.raw)
    assert reader.members(NOW) == {}
    assert reader.summary() == {}
    assert alice.peer_id in reader.banned()
    assert reader.receive(e1.raw, NOW).status == "ignored"
    # a third peer that only ever saw the fork is convinced by the proof
    third = StateStore(Identity.generate())
    third.receive(fork.raw, NOW)
    assert third.receive_proof(*forwarded.proof, NOW).status == "accepted"
    assert third.members(NOW) == {}


def test_equivocation_sent_by_the_author_itself_penalizes_it(alice, reader, forger):
    a, _ = forger(alice, 1, {("counters", "c"): 1})
    b, _ = forger(alice, 1, {("counters", "c"): 2})
    reader.receive(a.raw, NOW)
    assert reader.receive(b.raw, NOW, sender=alice.peer_id).penalize is True


def test_invalid_proofs_are_rejected(alice, reader, forger):
    a = forger(alice, 1, {("counters", "c"): 1})
    b = forger(alice, 2, {("counters", "c"): 2}, after=a)
    c = forger(alice, 3, {("counters", "c"): 3}, after=b)
    other = forger(Identity.generate(), 1, {("counters", "c"): 1})
    for x, y in ((a, b), (a, a), (a, c), (a, other)):
        assert reader.receive_proof(x[0].raw, y[0].raw, NOW).reason == "bad_proof"
    assert reader.banned() == {}


def _tamper(raw: bytes) -> bytes:
    fields = unpack(raw)
    update = bytearray(fields["update"])
    update[-3] ^= 0xFF
    fields["update"] = bytes(update)
    return pack(fields)


def test_forged_tampered_and_oversized_envelopes_change_nothing(writer, reader, alice):
    reader.receive(writer.apply_local(member(alice), NOW).raw, NOW)
    before = snapshot_of(reader)
    good = writer.apply_local([Set("member/name", "renamed")], NOW)
    mallory = Identity.generate()
    forged = unpack(seal(mallory, 2, "delta", good.update, good.prev).raw)
    forged["author"] = alice.peer_id
    cases = {
        "bad_signature": [pack(forged), _tamper(good.raw)],
        "oversized": [b"\x00" * (300 * 1024)],
        "malformed": [b"\x92\x01\x02"],
    }
    for reason, raws in cases.items():
        for raw in raws:
            result = reader.receive(raw, NOW, sender=mallory.peer_id)
            assert (result.status, result.reason, result.penalize) == ("rejected", reason, True)
    assert snapshot_of(reader) == before
    assert reader.statistics()["rejected"] == {"bad_signature": 2, "oversized": 1, "malformed": 1}


@pytest.mark.parametrize("entries", [
    pytest.param(lambda me, other: {("member", "peer_id"): other}, id="another-member-record"),
    pytest.param(lambda me, other: {("member", "name"): "no peer id"}, id="member-without-id"),
    pytest.param(lambda me, other: {("member", "admin"): True}, id="unknown-member-field"),
    pytest.param(lambda me, other: {("member", "peer_id"): me, ("member", "heartbeat"): "x"},
                 id="bad-heartbeat"),
    pytest.param(lambda me, other: {("jobs", "j1"): {"submitter": other}},
                 id="job-of-another-submitter"),
    pytest.param(lambda me, other: {("jobs", "j1"): {"submitter": me, "state": "done"}},
                 id="submitter-claims-done"),
    pytest.param(lambda me, other: {("participation", "j1"): {"state": "joined",
                                                              "job_state": "cancelled"}},
                 id="participant-cancels"),
    pytest.param(lambda me, other: {("models", "m1"): {"producer": other}},
                 id="model-of-another-producer"),
    pytest.param(lambda me, other: {("counters", "c"): -1}, id="negative-counter"),
    pytest.param(lambda me, other: {("secrets", "k"): 1}, id="unknown-root"),
    pytest.param(lambda me, other: {("jobs", "bad id/x"): {"submitter": me}}, id="bad-key"),
    pytest.param(lambda me, other: {("participation", "j1"): {"state": "joined",
                                                              "x": _nested(8)}},
                 id="value-nested-9-deep"),
])
def test_out_of_bounds_writes_are_rejected_and_change_nothing(alice, reader, forger, entries):
    bob = Identity.generate()
    first = forger(alice, 1, {("counters", "ok"): 1})
    reader.receive(first[0].raw, NOW)
    before = snapshot_of(reader)
    env, _ = forger(alice, 2, entries(alice.peer_id, bob.peer_id), after=first)
    result = reader.receive(env.raw, NOW, sender=alice.peer_id)
    assert (result.status, result.reason, result.penalize) == ("rejected", "out_of_bounds", True)
    assert snapshot_of(reader) == before
    assert reader.statistics()["rejected"] == {"out_of_bounds": 1}
    # the author's next valid write still applies at the same seq
    ok, _ = forger(alice, 2, {("counters", "ok"): 2}, after=first)
    assert reader.receive(ok.raw, NOW).status == "accepted"


def test_a_value_nested_900_deep_is_out_of_bounds_not_a_recursion_error(alice, reader,
                                                                         forger):
    # msgpack decodes it (its limit is ~1000 levels); walking it in Python would not
    value = pack({"state": "joined", "x": _nested(900)})
    env, _ = forger(alice, 1, {("participation", "j1"): value}, encode=False)
    result = reader.receive(env.raw, NOW, sender=alice.peer_id)
    assert (result.status, result.reason, result.penalize) == ("rejected", "out_of_bounds", True)
    assert "nested deeper" in result.detail and reader.summary() == {}


def test_hidden_and_unencoded_content_is_out_of_bounds(alice, reader):
    doc = Doc()
    doc.get("member", type=Array).append(b"hidden")
    list_env = seal(alice, 1, "delta", doc.get_update())
    doc2 = Doc()
    doc2.get("counters", type=Map)["c"] = 5  # a Yjs number, not encoded bytes
    raw_env = seal(alice, 1, "delta", doc2.get_update())
    doc3 = Doc()
    doc3.get("jobs", type=Map)["j1"] = Map({"submitter": canonical(alice.peer_id)})
    nested_env = seal(alice, 1, "delta", doc3.get_update())
    for env in (list_env, raw_env):
        assert reader.receive(env.raw, NOW).reason == "out_of_bounds"
    # a nested shared type is refused on the wire, before pycrdt decodes it
    assert reader.receive(nested_env.raw, NOW).reason == "unsupported_update"
    assert reader.summary() == {}


def test_undecodable_and_incomplete_updates_are_rejected(alice, reader, forger):
    garbage = seal(alice, 1, "delta", b"\xff\xff\xff")
    assert reader.receive(garbage.raw, NOW).reason == "malformed_update"
    first = forger(alice, 1, {("counters", "a"): 1})
    second, _ = forger(alice, 2, {("counters", "a"): 2}, after=first)
    # seq 2's items depend on seq 1's; presented as seq 1 they cannot integrate
    dependent = seal(alice, 1, "delta", second.update)
    assert reader.receive(dependent.raw, NOW).reason == "incomplete"
    assert reader.summary() == {}


def test_value_and_author_quota_are_enforced(alice, reader, forger):
    big = "x" * (MAX_VALUE_BYTES + 10)
    env, _ = forger(alice, 1, {("jobs", "j"): {"submitter": alice.peer_id, "blob": big}})
    assert reader.receive(env.raw, NOW).reason == "out_of_bounds"
    # many deltas without a snapshot: the author's retained bytes hit the quota
    last, seq, reason = None, 0, None
    chunk = "y" * (MAX_VALUE_BYTES - 100)
    while reason is None:
        seq += 1
        last = forger(alice, seq, {("counters", "c"): seq, ("jobs", "j"): {
            "submitter": alice.peer_id, "pad": chunk + str(seq)}}, after=last)
        reason = reader.receive(last[0].raw, NOW).reason
    assert reason == "quota"
    assert reader.statistics()["retained_bytes"] <= MAX_AUTHOR_BYTES


def test_local_writes_that_break_the_rules_raise_and_change_nothing(writer, alice):
    writer.apply_local(member(alice), NOW)
    before = snapshot_of(writer)
    other = Identity.generate().peer_id
    for changes in ([Set("member/peer_id", other)],
                    [Set("jobs/j1", {"submitter": other})],
                    [Set("nowhere/x", 1)],
                    [Set("member", 1)],
                    [Set("jobs/j1", {"submitter": alice.peer_id, "pad": "x" * MAX_VALUE_BYTES})]):
        with pytest.raises(LocalStateError):
            writer.apply_local(changes, NOW)
    assert snapshot_of(writer) == before


def test_delete_removes_a_record_everywhere(writer, reader, alice):
    for env in (writer.apply_local([Set("jobs/j1", {"submitter": alice.peer_id})], NOW),
                writer.apply_local([Delete("jobs/j1")], NOW)):
        reader.receive(env.raw, NOW)
    assert reader.jobs() == {} and writer.jobs() == {}


def test_snapshots_bound_the_log_and_late_peers_jump_to_them(alice):
    writer = StateStore(alice, limits=StateLimits(snapshot_min_bytes=2048))
    envs = [writer.apply_local(member(alice, beat=float(i)), NOW) for i in range(200)]
    stats = writer.statistics()
    assert stats["snapshots"] >= 5
    assert stats["retained_bytes"] <= 2 * 2048 + 1024
    late = StateStore(Identity.generate())
    for env in writer.missing_for({}):
        assert late.receive(env.raw, NOW).status == "accepted"
    assert late.get(f"members/{alice.peer_id}/heartbeat", NOW) == 199.0
    # an early peer that saw every envelope agrees
    early = StateStore(Identity.generate())
    for env in envs:
        early.receive(env.raw, NOW)
    assert early.get("", NOW) == late.get("", NOW)
    # envelopes older than a peer's snapshot are stale no-ops
    assert late.receive(envs[0].raw, NOW).status == "stale"


def test_missing_for_sends_exactly_what_the_summary_lacks(writer, alice):
    envs = [writer.apply_local([Set("counters/c", i)], NOW) for i in range(1, 6)]
    assert [e.seq for e in writer.missing_for({alice.peer_id: 3})] == [4, 5]
    assert writer.missing_for({alice.peer_id: 5}) == []
    assert [e.seq for e in writer.missing_for({}, max_bytes=1)] == [1]
    assert envs[0].raw == writer.missing_for({})[0].raw  # forwarded byte for byte


def test_change_events_name_the_merged_path(writer, reader, alice):
    events = []
    reader.subscribe(events.append)
    for env in (writer.apply_local(member(alice), NOW),
                writer.apply_local([Set("participation/j9", {"state": "joined", "samples": 5})],
                                   NOW)):
        reader.receive(env.raw, NOW)
    assert [e.path for e in events] == [f"members/{alice.peer_id}", "jobs/j9"]
    assert events[0].value["name"] == "n" and events[1].value is None  # no spec yet


def test_too_many_authors_are_refused_without_blame():
    reader = StateStore(Identity.generate(), limits=StateLimits(max_authors=2))
    results = []
    for _ in range(3):
        someone = Identity.generate()  # live members: none may be evicted for another
        results.append(StateStore(someone).apply_local(member(someone), NOW))
    statuses = [reader.receive(e.raw, NOW) for e in results]
    assert [(r.status, r.reason, r.penalize) for r in statuses] == [
        ("accepted", None, False), ("accepted", None, False),
        ("refused", "too_many_authors", False)]


def test_snapshot_kind_from_an_empty_doc_is_a_valid_first_envelope(alice, reader):
    doc = Doc()
    doc.get("counters", type=Map)["c"] = canonical(3)
    env = seal(alice, 5, KIND_SNAPSHOT, doc.get_update(), b"\x01" * 32)
    assert reader.receive(env.raw, NOW).status == "accepted"
    assert reader.summary() == {alice.peer_id: 5} and reader.counters() == {"c": 3}


def test_an_envelope_building_on_another_history_is_equivocation(alice, reader, forger):
    first = forger(alice, 1, {("counters", "c"): 1})
    other_first = forger(alice, 1, {("counters", "c"): 9})
    second_of_other = forger(alice, 2, {("counters", "c"): 10}, after=other_first)
    reader.receive(first[0].raw, NOW)
    result = reader.receive(second_of_other[0].raw, NOW, sender="forwarder")
    assert (result.reason, result.penalize) == ("equivocation", False)
    assert result.proof == (first[0].raw, second_of_other[0].raw)
    assert alice.peer_id in reader.banned() and reader.counters() == {}
    elsewhere = StateStore(Identity.generate())
    assert elsewhere.receive_proof(*result.proof, NOW).status == "accepted"
