"""Quotas (proto/crdt-sync.md, "Quotas"): what one peer may add per unit of time, the
global state budget, and which authors are evicted to make room (never one an honest
network needs). Refusals are local policy: they blame nobody."""

import pytest

from lattice.core.identity import Identity
from lattice.core.jobs import TrainSpec, new_job_record
from lattice.core.state import Set, StateLimits, StateStore
from lattice.core.state.limits import MAX_AUTHOR_BYTES
from lattice.core.state.quota import Allowance
from lattice.core.state.sync import SyncHub
from lattice.testing.hostile.state import Author

NOW = 10_000.0
MiB = 1 << 20


def member(author: Author, now: float = NOW) -> bytes:
    return author.member(now)


def fill(store: StateStore, author: Author, mib: float, now: float = NOW) -> list[str]:
    statuses = [store.receive(raw, now).status for raw in author.bulk(int(mib * MiB), now)]
    return statuses


def allowance(**kw) -> Allowance:
    args = dict(authors_per_s=1.0, authors_burst=2, bytes_per_s=1000.0, bytes_burst=10**7,
                now=NOW)
    args.update(kw)
    return Allowance(**args)


# -- the global budget and eviction ---------------------------------------------------------

def test_unreferenced_authors_are_evicted_largest_first_to_stay_within_the_budget():
    store = StateStore(Identity.generate(), limits=StateLimits(max_state_bytes=2 * MiB))
    honest = Author()
    store.receive(member(honest), NOW)
    evicted = []
    store.add_eviction_listener(evicted.append)
    big, small, newcomer = Author(snapshots=False), Author(snapshots=False), Author(snapshots=False)
    assert set(fill(store, big, 0.9)) == {"accepted"}
    assert set(fill(store, small, 0.5)) == {"accepted"}
    assert set(fill(store, newcomer, 0.9)) == {"accepted"}
    assert evicted == [big.peer_id]  # the largest unreferenced one made room
    stats = store.statistics()
    assert stats["held_bytes"] <= 2 * MiB and stats["evicted"] == 1
    assert set(store.summary()) == {honest.peer_id, small.peer_id, newcomer.peer_id}
    assert stats["refused"] == {}


def test_when_only_referenced_authors_are_left_new_bytes_are_refused_and_nothing_evicted():
    store = StateStore(Identity.generate(), limits=StateLimits(max_state_bytes=MiB))
    alive = Author(snapshots=False)
    store.receive(member(alive), NOW)  # a live member: needed, never evicted
    assert "accepted" in fill(store, alive, 0.95)
    sybil = Author(snapshots=False)
    results = [store.receive(raw, NOW) for raw in sybil.bulk(MiB // 2, NOW)]
    refused = [r for r in results if r.status == "refused"]
    # once one is refused, the sybil's later envelopes wait for it (out of order)
    assert refused and {r.status for r in results} <= {"accepted", "refused", "buffered"}
    assert store.statistics()["refused"] == {"state_budget": len(refused)}
    assert not any(r.penalize for r in results)  # a refusal blames nobody
    assert alive.peer_id in store.summary() and store.statistics()["evicted"] == 0
    assert store.statistics()["held_bytes"] <= MiB


def test_a_member_whose_heartbeat_went_stale_is_evictable_a_live_one_is_not():
    store = StateStore(Identity.generate(), limits=StateLimits(max_state_bytes=MiB,
                                                               heartbeat_timeout=60.0))
    old = Author(snapshots=False)
    store.receive(old.member(NOW - 600), NOW)  # last heard ten minutes ago
    fill(store, old, 0.9)
    newcomer = Author(snapshots=False)
    store.receive(newcomer.member(NOW), NOW)
    assert set(fill(store, newcomer, 0.5)) == {"accepted"}
    assert old.peer_id not in store.summary()


def test_the_authors_a_live_member_needs_are_kept():
    """A live participant needs its job's submitter (offline or not); a live
    submitter needs its roster."""
    store = StateStore(Identity.generate(), limits=StateLimits(max_state_bytes=MiB))
    submitter, worker, sybil = Author(), Author(), Author(snapshots=False)
    job_id, record = new_job_record(TrainSpec(task="t", min_peers=1), submitter.peer_id,
                                    "0123456789abcdef", NOW)
    store.receive(submitter.write([Set(f"jobs/{job_id}", {**record,
                                                          "roster": [worker.peer_id]})]), NOW)
    store.receive(worker.member(NOW), NOW)
    store.receive(worker.write([Set(f"participation/{job_id}", {"state": "running"})]), NOW)
    fill(store, sybil, 2 * MiB)  # pushes against the budget all along
    assert {submitter.peer_id, worker.peer_id} <= set(store.summary())
    assert store.jobs()[job_id]["participants"][worker.peer_id]["state"] == "running"


def test_a_connected_peers_own_author_is_never_evicted():
    store = StateStore(Identity.generate(), limits=StateLimits(max_state_bytes=MiB))
    peer = Author(snapshots=False)
    fill(store, peer, 0.9)  # no member record: unreferenced, but we run a session with it
    store.set_connected([peer.peer_id])
    statuses = fill(store, Author(snapshots=False), 0.5)
    assert "refused" in statuses and peer.peer_id in store.summary()


def test_authors_with_only_out_of_order_envelopes_are_evicted_before_any_other():
    store = StateStore(Identity.generate(), limits=StateLimits(max_authors=3))
    keep = Author()
    store.receive(keep.write([Set("counters/c", 1)]), NOW)
    ghost = Author()
    ghost.write([Set("counters/c", 1)])
    assert store.receive(ghost.write([Set("counters/c", 2)]), NOW).status == "buffered"
    third = Author()
    store.receive(third.write([Set("counters/c", 1)]), NOW)
    fourth = Author()
    assert store.receive(fourth.write([Set("counters/c", 1)]), NOW).status == "accepted"
    assert store.statistics()["gap_envelopes"] == 0 and store.statistics()["evicted"] == 1
    assert set(store.summary()) == {keep.peer_id, third.peer_id, fourth.peer_id}


def test_the_budget_never_counts_or_evicts_our_own_author():
    me = Identity.generate()
    store = StateStore(me, limits=StateLimits(max_state_bytes=MiB))
    for i in range(20):
        store.apply_local([Set("models/m", {"producer": me.peer_id, "pad": bytes([i]) * 60_000})],
                          NOW)
    stats = store.statistics()
    assert stats["retained_bytes"] > 100_000 and stats["held_bytes"] == 0


# -- what one peer may add per unit of time -------------------------------------------------------

def test_a_peer_may_introduce_new_authors_only_at_its_allowance():
    store = StateStore(Identity.generate())
    relay = Identity.generate().peer_id
    peer = allowance(authors_burst=2, authors_per_s=0.5)
    authors = [Author() for _ in range(3)]
    results = [store.receive(a.write([Set("counters/c", 1)]), NOW, sender=relay,
                             allowance=peer) for a in authors]
    assert [(r.status, r.reason, r.penalize) for r in results] == [
        ("accepted", None, False), ("accepted", None, False),
        ("refused", "peer_author_rate", False)]
    # its next envelope for an author we hold costs no author token
    assert store.receive(authors[0].write([Set("counters/c", 2)]), NOW, sender=relay,
                         allowance=peer).status == "accepted"
    # two seconds later the bucket holds one more author
    again = authors[2].store.missing_for({})[0].raw
    assert store.receive(again, NOW + 2.0, sender=relay, allowance=peer).status == "accepted"


def test_a_peers_own_author_needs_no_author_token():
    store = StateStore(Identity.generate())
    peer, relayed = Author(), Author()
    tokens = allowance(authors_burst=1, authors_per_s=0.0)
    assert store.receive(relayed.write([Set("counters/c", 1)]), NOW, sender=peer.peer_id,
                         allowance=tokens).status == "accepted"  # its one author token
    result = store.receive(peer.write([Set("counters/c", 1)]), NOW, sender=peer.peer_id,
                           allowance=tokens)
    assert result.status == "accepted"


def test_a_peer_may_add_bytes_only_at_its_allowance():
    store = StateStore(Identity.generate())
    sender = Author(snapshots=False)
    peer = allowance(bytes_burst=200_000, bytes_per_s=10_000.0)
    raws = sender.bulk(MiB // 2, NOW)
    results = [store.receive(raw, NOW, sender=sender.peer_id, allowance=peer) for raw in raws]
    accepted = [r for r in results if r.status == "accepted"]
    assert 1 <= len(accepted) <= 4 and results[-1].reason == "peer_byte_rate"
    assert not any(r.penalize for r in results)
    # what was refused is accepted once the allowance refilled
    later = NOW + 7.0
    nxt = raws[len(accepted)]
    assert store.receive(nxt, later, sender=sender.peer_id, allowance=peer).status == "accepted"


def test_an_envelope_larger_than_the_burst_still_passes_a_full_bucket():
    store = StateStore(Identity.generate())
    sender = Author(snapshots=False)
    peer = allowance(bytes_burst=1000, bytes_per_s=100.0)
    raw = sender.bulk(100_000, NOW)[0]
    assert len(raw) > 1000
    assert store.receive(raw, NOW, sender=sender.peer_id, allowance=peer).status == "accepted"


def test_a_peers_allowance_survives_its_reconnects():
    store = StateStore(Identity.generate(), limits=StateLimits(peer_authors_burst=1,
                                                               peer_authors_per_s=0.0))
    hub = SyncHub(store)
    relay = Identity.generate().peer_id
    first = hub.open_session(relay, initiator=True, session_id="s1", now=NOW)
    hub.close_session(first)
    second = hub.open_session(relay, initiator=True, session_id="s2", now=NOW)
    assert second.allowance is first.allowance
    other = hub.open_session(Identity.generate().peer_id, initiator=True, session_id="s3",
                             now=NOW)
    assert other.allowance is not first.allowance


@pytest.mark.parametrize("bad", [dict(max_state_bytes=MAX_AUTHOR_BYTES - 1),
                                 dict(peer_bytes_burst=0), dict(peer_authors_per_s=-1.0)])
def test_limits_that_could_never_admit_an_author_are_refused(bad):
    with pytest.raises(ValueError):
        StateLimits(**bad)


def test_anti_entropy_goes_first_to_a_refused_peer_once_its_allowance_refilled():
    import random

    store = StateStore(Identity.generate(), limits=StateLimits(peer_bytes_burst=100_000,
                                                               peer_bytes_per_s=10_000.0))
    hub = SyncHub(store)
    sessions = []
    for i in range(4):
        s = hub.open_session(Identity.generate().peer_id, initiator=True, session_id=f"s{i}",
                             now=NOW)
        s.handle({"t": "hello", "sid": f"s{i}", "v": 2, "summary": {}, "root": [0, bytes(8)],
                  "banned": []}, NOW)
        s.next_message()
        sessions.append(s)
    flooder = Author(snapshots=False)
    refused = sessions[0]
    refused.handle({"t": "envelopes", "sid": "s0", "items": flooder.bulk(300_000, NOW)}, NOW)
    assert refused.refused_since_summary
    rng = random.Random(1)
    # while its allowance is empty (a flood), it is not preferred...
    assert {hub.pick_anti_entropy(rng, NOW) for _ in range(50)} == set(sessions)
    # ...once refilled it is, until we offered it a reconciliation
    assert {hub.pick_anti_entropy(rng, NOW + 10.0) for _ in range(20)} == {refused}
    refused.request_recon()
    assert refused.next_message()["t"] == "recon" and not refused.refused_since_summary
