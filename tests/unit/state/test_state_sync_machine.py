"""The sync protocol machine, two peers back to back with no network (h11 style)."""

import random

import pytest

from lattice.core.codec import pack, unpack
from lattice.core.identity import Identity
from lattice.core.state import Set, StateStore, SyncHub, SyncProtocolError
from lattice.core.state.sync import (
    MESH_DEGREE,
    MESH_HIGH,
    MESH_LOW,
    SessionRefused,
    encode_summary,
)

NOW = 100.0
ROOT = [0, bytes(8)]


class Peer:
    def __init__(self):
        self.identity = Identity.generate()
        self.store = StateStore(self.identity)
        self.hub = SyncHub(self.store, backoff_base=5.0, backoff_max=40.0)

    def write(self, name, value):
        return self.store.apply_local([Set(f"counters/{name}", value)], NOW)


def connect(a: Peer, b: Peer):
    sa = a.hub.open_session(b.identity.peer_id, initiator=True, session_id="s1", now=NOW)
    sb = b.hub.open_session(a.identity.peer_id, initiator=False, session_id=None, now=NOW)
    HUB_OF[id(sa)], HUB_OF[id(sb)] = a.hub, b.hub
    return sa, sb


HUB_OF = {}
"""The hub of each session `connect` made: `pump` delivers through it, as the driver."""


def pump(sa, sb, *, drop=lambda msg: False):
    """Deliver messages both ways until both sides are quiet; returns what was sent."""
    sent = []
    for _ in range(1000):
        progressed = False
        for src, dst in ((sa, sb), (sb, sa)):
            msg = src.next_message()
            if msg is not None:
                progressed = True
                sent.append(msg)
                if not drop(msg):
                    # through the wire encoding, and the hub as the driver does
                    HUB_OF[id(dst)].handle(dst, unpack(pack(msg)), NOW)
        if not progressed:
            return sent
    raise AssertionError("sessions never went quiet")


def test_first_sync_sends_each_side_exactly_what_the_other_lacks():
    a, b = Peer(), Peer()
    for i in range(1, 4):
        a.write("a", i)
    b.write("b", 1)
    sa, sb = connect(a, b)
    sent = pump(sa, sb)
    assert a.store.summary() == b.store.summary()
    assert a.store.counters() == b.store.counters() == {"a": 3, "b": 1}
    assert sa.envelopes_sent == 3 and sb.envelopes_sent == 1  # nothing echoed back
    assert [m["t"] for m in sent][:2] == ["hello", "hello"]
    assert all(m["sid"] == "s1" for m in sent)


def test_new_writes_are_pushed_to_open_sessions_and_forwarded_unchanged():
    a, b, c = Peer(), Peer(), Peer()
    ab, ba = connect(a, b)
    bc, cb = connect(b, c)
    pump(ab, ba)
    pump(bc, cb)
    env = a.write("x", 7)
    pump(ab, ba)
    sent = pump(bc, cb)
    assert c.store.counters() == {"x": 7}
    assert sent[0]["items"] == [env.raw]  # b relayed a's bytes, not a copy of its own


def test_new_envelopes_go_to_the_mesh_and_are_announced_to_the_rest():
    # b is connected to the author a and to ten others, with a mesh of MESH_DEGREE: a's
    # write reaches b, which pushes it to its other mesh sessions only (never back to
    # a); at the next tick it announces it to the rest, which pull it. Nobody gets it
    # twice, and b's own writes also go to its mesh alone.
    a, b = Peer(), Peer()
    others = [Peer() for _ in range(10)]
    ab, ba = connect(a, b)
    pump(ab, ba)
    assert ab.eager and ba.eager  # a grafted b; b took the graft
    links = []
    for c in others:
        bc, cb = connect(b, c)
        pump(bc, cb)
        links.append((bc, cb))
    assert b.hub.statistics()["mesh"] == MESH_DEGREE
    a.write("x", 1)
    msg = ab.next_message()
    b.hub.handle(ba, unpack(pack(msg)), NOW)
    assert b.store.counters() == {"x": 1} and not ba.has_pending()
    pushed = [cb for bc, cb in links if bc.has_pending()]
    assert len(pushed) == MESH_DEGREE - 1 and all(bc.eager for bc, cb in links if cb in pushed)
    for bc, cb in links:
        pump(bc, cb)
    assert sum(c.store.counters() == {"x": 1} for c in others) == MESH_DEGREE - 1
    b.hub.tick()  # the lazy sessions hear "have" and answer "want"
    sent = [m for bc, cb in links for m in pump(bc, cb)]
    assert all(c.store.counters() == {"x": 1} for c in others)
    assert sorted({m["t"] for m in sent}) == ["envelopes", "have", "want"]
    assert sum(cb.duplicates_received for _, cb in links) == 0
    b.write("y", 2)
    assert ba.has_pending() and sum(bc.has_pending() for bc, _ in links) == MESH_DEGREE - 1


def test_a_graft_beyond_the_high_degree_is_pruned_and_a_thin_mesh_grows_at_tick():
    hub_peer = Peer()
    peers = [Peer() for _ in range(MESH_HIGH + 2)]
    links = []
    for p in peers:  # every peer dials hub_peer and grafts it
        ps, hs = connect(p, hub_peer)
        pump(ps, hs)
        links.append((ps, hs))
    assert hub_peer.hub.statistics()["mesh"] == MESH_HIGH
    assert sum(ps.eager for ps, _ in links) == MESH_HIGH  # told of the prune
    for ps, hs in links[:MESH_HIGH - MESH_LOW + 1]:
        ps.set_mesh(False)  # they leave: hub_peer's mesh drops below MESH_LOW
        pump(ps, hs)
    assert hub_peer.hub.statistics()["mesh"] < MESH_LOW
    hub_peer.hub.tick()
    for ps, hs in links:
        pump(ps, hs)
    assert hub_peer.hub.statistics()["mesh"] == MESH_DEGREE


def test_a_gap_is_pulled_from_the_peer_that_pushed_past_it():
    a, b = Peer(), Peer()
    sa, sb = connect(a, b)
    pump(sa, sb)
    a.write("x", 1)
    pump(sa, sb, drop=lambda m: m["t"] == "envelopes")  # lost in flight
    a.write("x", 2)
    sent = pump(sa, sb)  # b buffers seq 2, asks for what precedes it
    assert b.store.counters() == {"x": 2}
    assert [m["t"] for m in sent] == ["envelopes", "want", "envelopes"]


def _shared_authors(n, *stores):
    for _ in range(n):
        author = Peer()
        env = author.write("n", 1)
        for store in stores:
            store.receive(env.raw, NOW)


def _wire_bytes(messages):
    return sum(len(pack(m)) for m in messages)


def test_reconciliation_costs_what_differs_not_what_is_held():
    a, b = Peer(), Peer()
    _shared_authors(300, a.store, b.store)
    sa, sb = connect(a, b)
    same = pump(sa, sb)  # equal fingerprints in the hellos: nothing more is said
    assert [m["t"] for m in same] == ["hello", "hello", "mesh"]
    sa.request_recon()
    assert [m["t"] for m in pump(sa, sb)] == ["recon"]
    for k in (1, 8):
        _shared_authors(k, a.store)
        sa.request_recon()
        sent = pump(sa, sb)
        assert b.store.summary() == a.store.summary()
        assert sa.envelopes_sent + sb.envelopes_sent == k * (k == 1) + (1 + 8) * (k == 8)
        full = len(pack(encode_summary(a.store)))
        assert _wire_bytes(m for m in sent if m["t"] == "recon") < full / 4, (k, full)


def test_catch_up_after_a_partition_exchanges_only_what_is_missing():
    a, b = Peer(), Peer()
    _shared_authors(200, a.store, b.store)
    _shared_authors(3, a.store)  # written while apart
    _shared_authors(2, b.store)
    b.write("b", 1)
    sa, sb = connect(a, b)
    pump(sa, sb)
    assert a.store.summary() == b.store.summary()
    assert sa.envelopes_sent == 3 and sb.envelopes_sent == 3


def test_a_full_summary_exchange_still_repairs_everything():
    a, b = Peer(), Peer()
    sa, sb = connect(a, b)
    pump(sa, sb)
    a.write("x", 1)
    pump(sa, sb, drop=lambda m: m["t"] == "envelopes")
    sb.request_summary()
    pump(sa, sb)
    assert b.store.counters() == {"x": 1}


def test_anti_entropy_repairs_what_a_lost_message_missed():
    a, b = Peer(), Peer()
    sa, sb = connect(a, b)
    pump(sa, sb)
    a.write("x", 1)
    pump(sa, sb, drop=lambda m: m["t"] == "envelopes")  # lost in flight
    assert b.store.counters() == {}
    sb.request_recon()
    pump(sa, sb)
    assert b.store.counters() == {"x": 1}


def test_batches_respect_the_byte_limit():
    a, b = Peer(), Peer()
    for i in range(1, 30):
        a.write("x", i)
    sa, sb = connect(a, b)
    assert sb.next_message() is None  # the acceptor cannot speak before the dialer's hello
    sb.handle(unpack(pack(sa.next_message())), NOW)
    sa.handle(unpack(pack(sb.next_message())), NOW)
    msg = sa.next_message(max_bytes=1000)
    while msg["t"] != "envelopes":  # the mesh graft, the reconciliation
        sb.handle(unpack(pack(msg)), NOW)
        msg = sa.next_message(max_bytes=1000)
    assert msg["t"] == "envelopes" and 1 <= len(msg["items"]) <= 5
    sb.handle(unpack(pack(msg)), NOW)
    pump(sa, sb)
    assert b.store.summary() == a.store.summary()


def test_an_invalid_envelope_ends_the_session_and_changes_nothing():
    a, b = Peer(), Peer()
    sa, sb = connect(a, b)
    pump(sa, sb)
    env = a.write("x", 1)
    fields = unpack(env.raw)
    fields["update"] = fields["update"][:-1] + b"\x01"
    with pytest.raises(SyncProtocolError) as info:
        sb.handle({"t": "envelopes", "sid": "s1", "items": [pack(fields)]}, NOW)
    assert info.value.reason == "bad_signature"
    assert b.store.summary() == {}


@pytest.mark.parametrize("msg, reason", [
    ({"t": "envelopes", "sid": "s1", "items": []}, "unexpected"),
    ({"t": "hello", "sid": "s1", "v": 1, "summary": {}, "banned": []}, "version"),
    ({"t": "hello", "sid": "s1", "v": 2, "summary": {"x": -1}, "root": ROOT, "banned": []},
     "malformed"),
    ({"t": "hello", "sid": "s1", "v": 2, "summary": {"x": [1, b"short"]}, "root": ROOT,
      "banned": []}, "malformed"),
    ({"t": "hello", "sid": "s1", "v": 2, "summary": {}, "root": ROOT, "banned": "x"},
     "malformed"),
    ({"t": "hello", "sid": "s1", "v": 2, "summary": {}, "root": [0, b"1"], "banned": []},
     "malformed"),
    ({"t": "hello", "sid": "s1", "v": 2, "summary": {}, "banned": []}, "malformed"),
    ({"t": "hello", "v": 2, "summary": {}, "root": ROOT, "banned": []}, "malformed"),
    (["hello"], "malformed"),
])
def test_protocol_violations_are_blamed_on_the_remote(msg, reason):
    a, b = Peer(), Peer()
    _, sb = connect(a, b)
    with pytest.raises(SyncProtocolError) as info:
        sb.handle(msg, NOW)
    assert info.value.reason == reason


def test_messages_after_hello_are_validated():
    a, b = Peer(), Peer()
    sa, sb = connect(a, b)
    pump(sa, sb)
    for msg in ({"t": "envelopes", "sid": "other", "items": []},
                {"t": "envelopes", "sid": "s1", "items": ["text"]},
                {"t": "summary", "sid": "s1", "summary": {}},
                {"t": "proof", "sid": "s1", "envelopes": [b"x"]},
                {"t": "hello", "sid": "s1", "v": 2, "summary": {}, "root": ROOT, "banned": []},
                {"t": "recon", "sid": "s1", "ranges": [[0, 1, 0, [0, bytes(8)]]]},
                {"t": "recon", "sid": "s1", "ranges": [[1, 3, 1, {"x": [1, bytes(8)]}]]},
                {"t": "recon", "sid": "s1", "ranges": [[0, 0, 7, {}]]},
                {"t": "recon", "sid": "s1", "ranges": [[0, 0, 0, [0, b"1"]]] * 1025},
                {"t": "have", "sid": "s1", "tips": {"x": -1}},
                {"t": "want", "sid": "s1", "seqs": ["x"]},
                {"t": "mesh", "sid": "s1", "on": 1},
                {"t": "gossip", "sid": "s1"}):
        with pytest.raises(SyncProtocolError):
            sb.handle(msg, NOW)


def test_equivocation_proofs_spread_to_peers_that_saw_only_one_fork(forger):
    mallory = Identity.generate()
    fork_a, _ = forger(mallory, 1, {("counters", "m"): 1})
    fork_b, _ = forger(mallory, 1, {("counters", "m"): 2})
    a, b, c = Peer(), Peer(), Peer()
    a.store.receive(fork_a.raw, NOW)
    b.store.receive(fork_b.raw, NOW)
    c.store.receive(fork_b.raw, NOW)
    ab, ba = connect(a, b)
    # same seq, different tips in the hellos: each sends its fork, both detect it
    pump(ab, ba)
    bc, cb = connect(b, c)
    pump(bc, cb)
    for peer in (a, b, c):
        assert mallory.peer_id in peer.store.banned()
        assert peer.store.counters() == {}


def test_penalties_back_off_exponentially_and_refuse_sessions():
    a = Peer()
    bad = Identity.generate().peer_id
    assert a.hub.penalize(bad, "bad_signature", NOW) == 5.0
    assert a.hub.penalize(bad, "bad_signature", NOW) == 10.0
    assert [a.hub.penalize(bad, "x", NOW) for _ in range(3)] == [20.0, 40.0, 40.0]
    with pytest.raises(SessionRefused):
        a.hub.open_session(bad, initiator=False, session_id=None, now=NOW + 39)
    assert a.hub.open_session(bad, initiator=False, session_id=None, now=NOW + 41)
    assert a.hub.statistics()["penalties"] == {"bad_signature": 2, "x": 3}


def test_sessions_per_peer_are_bounded():
    a = Peer()
    peer = Identity.generate().peer_id
    for _ in range(2):
        a.hub.open_session(peer, initiator=False, session_id=None, now=NOW)
    with pytest.raises(SessionRefused):
        a.hub.open_session(peer, initiator=False, session_id=None, now=NOW)
    assert a.hub.pick_anti_entropy(random.Random(0), 0.0) is None  # none is open yet
