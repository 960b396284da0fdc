"""The record of hole punches: why a peer is relayed, and when it is tried again."""

from __future__ import annotations

import itertools
import random

from lattice.core.holepunch import Done, HolePunchSession, PeerView
from lattice.net.nat.punch_history import MAX_PEERS, PunchHistory

CONE = PeerView("private", "cone", (("198.18.0.101", 4001),), "reject")
SYM = PeerView("private", "symmetric", (("198.18.0.102", 4001),), "drop")


def session(role: str = "initiator") -> HolePunchSession:
    s = HolePunchSession(role, CONE, now=0.0, session_id=b"\x01" * 8)
    s.theirs = SYM
    return s


def history() -> PunchHistory:
    return PunchHistory(retry_min=30.0, retry_max=1800.0, rng=random.Random(7))


def test_a_failed_punch_is_tried_again_later_and_later():
    h = history()
    delays = []
    now = 0.0
    for _ in range(8):
        at = h.record("p", session(), Done("failed", "no direct connection after punch, 2 "
                                                      "rounds"), elapsed=1.0, now=now,
                      wall=1000.0 + now, probes=None)
        delays.append(at - now)
        assert h.due(at - 0.001) == [] and h.due(at) == ["p"]
        now = at
    assert 27 <= delays[0] <= 33 and all(b > a for a, b in itertools.pairwise(delays[:5]))
    assert max(delays) <= 1800 * 1.1


def test_the_reason_says_whose_nat_what_was_tried_and_when_again():
    h = history()
    at = h.record("p", session(), Done("relayed", "their NAT is symmetric and our router "
                                                  "rejects unsolicited connections"),
                  elapsed=0.1, now=100.0, wall=5000.0, probes=None)
    why = h.why_relayed("p", wall=5000.0)
    assert why.startswith("their NAT is symmetric and our router rejects")
    assert "tried nothing" in why and f"again in {at - 100.0:.0f} s" in why
    assert "we: private, cone NAT, router rejects" in why
    assert "they: private, symmetric NAT, router drops" in why


def test_the_side_that_answered_leaves_the_retry_to_the_peer_and_direct_ends_it():
    h = history()
    assert h.record("p", session("responder"), Done("failed", "x"), elapsed=0, now=0,
                    wall=0, probes=None) is None
    assert "when the peer retries" in h.why_relayed("p", wall=0)
    h.record("q", session(), Done("failed", "x"), elapsed=0, now=0, wall=0, probes=None)
    h.record("q", session(), Done("direct", "direct connection up"), elapsed=0, now=1,
             wall=1, probes=None)
    assert h.why_relayed("q", wall=1) is None and h.next_due() is None


def test_records_are_bounded():
    h = history()
    for i in range(MAX_PEERS + 50):
        h.record(f"p{i}", session(), Done("failed", "x"), elapsed=0, now=0, wall=0, probes=None)
    assert len(h.records) == MAX_PEERS and "p0" not in h.records
