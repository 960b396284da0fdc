"""The sync protocol machine, two peers back to back with no network (h11 style)."""

import random

import pytest

from lattice.core.codec import pack, unpack
from lattice.core.identity import Identity
from lattice.core.state import Set, StateStore, SyncHub, SyncProtocolError
from lattice.core.state.sync import FORWARD_FANOUT, SessionRefused

NOW = 100.0


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
    return sa, sb


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
                    dst.handle(unpack(pack(msg)), NOW)  # through the wire encoding
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


def test_a_received_envelope_is_forwarded_to_a_few_sessions_our_own_writes_to_all():
    # b is connected to the author a and to ten others: a's write reaches b, which
    # passes it on to FORWARD_FANOUT of the ten (never back to a); b's own write goes
    # to all eleven. Forwarding everything everywhere is O(N^2) in a full mesh.
    a, b = Peer(), Peer()
    others = [Peer() for _ in range(10)]
    ab, ba = connect(a, b)
    pump(ab, ba)
    links = []
    for c in others:
        bc, cb = connect(b, c)
        pump(bc, cb)
        links.append((bc, cb))
    a.write("x", 1)
    msg = ab.next_message()
    b.hub.handle(ba, unpack(pack(msg)), NOW)
    assert b.store.counters() == {"x": 1} and not ba.has_pending()
    forwarded = [cb for bc, cb in links if bc.has_pending()]
    assert len(forwarded) == FORWARD_FANOUT
    for bc, cb in links:
        pump(bc, cb)
    assert sum(c.store.counters() == {"x": 1} for c in others) == FORWARD_FANOUT
    # the rest learn it from anti-entropy with b
    for bc, cb in links:
        cb.request_summary()
        pump(bc, cb)
    assert all(c.store.counters() == {"x": 1} for c in others)
    b.write("y", 2)
    assert ba.has_pending() and all(bc.has_pending() for bc, _ in links)


def test_peers_the_author_reaches_itself_are_not_forwarded_to():
    # a has sessions with b, c, d; b with a, c, d and f, which a does not know. a's
    # write reaches b with a's current peer list, so b forwards it to f alone: c and d
    # have it from a already. In a full mesh nothing is forwarded at all.
    a, b, c, d, f = (Peer() for _ in range(5))
    ab, ba = connect(a, b)
    pump(ab, ba)  # a's hello named no other peers: it had none yet
    for x in (c, d):
        pump(*connect(a, x))
    links = {}
    for x in (c, d, f):
        bx, xb = connect(b, x)
        pump(bx, xb)
        links[x] = (bx, xb)
    a.write("x", 1)
    msg = ab.next_message()
    assert sorted(msg["peers"]) == sorted(x.identity.peer_id for x in (c, d))
    b.hub.handle(ba, unpack(pack(msg)), NOW)
    assert [x for x, (bx, _) in links.items() if bx.has_pending()] == [f]
    assert ab.next_message() is None  # told once; the next messages do not repeat it
    pump(*links[f])
    # a's envelope coming to b through c (anti-entropy) is not sent back to its author
    a.write("x", 2)
    ca, ac = next((s, t) for s in c.hub.sessions.values() for t in a.hub.sessions.values()
                  if s.remote_peer == a.identity.peer_id and t.remote_peer == c.identity.peer_id)
    pump(ac, ca)
    bc, cb = links[c]
    bc.request_summary()
    pump(bc, cb)
    assert b.store.counters() == {"x": 2}
    assert not ba.has_pending() and links[f][0].has_pending() and not links[d][0].has_pending()


def test_anti_entropy_repairs_what_a_lost_message_missed():
    a, b = Peer(), Peer()
    sa, sb = connect(a, b)
    pump(sa, sb)
    a.write("x", 1)
    pump(sa, sb, drop=lambda m: m["t"] == "envelopes")  # lost in flight
    assert b.store.counters() == {}
    sb.request_summary()
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
    ({"t": "hello", "sid": "s1", "v": 2, "summary": {}, "banned": []}, "version"),
    ({"t": "hello", "sid": "s1", "v": 1, "summary": {"x": -1}, "banned": []}, "malformed"),
    ({"t": "hello", "sid": "s1", "v": 1, "summary": {"x": [1, b"short"]}, "banned": []},
     "malformed"),
    ({"t": "hello", "sid": "s1", "v": 1, "summary": {}, "banned": "x"}, "malformed"),
    ({"t": "hello", "v": 1, "summary": {}, "banned": []}, "malformed"),
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
                {"t": "hello", "sid": "s1", "v": 1, "summary": {}, "banned": []},
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
