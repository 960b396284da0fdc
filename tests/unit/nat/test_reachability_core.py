"""Reachability verdicts from dial-backs: results from a fresh connection by another
peer count (the observer dials back itself), recent ones decide, failures say how our
router filters, and probing backs off while nothing is known."""

from __future__ import annotations

from lattice.core.holepunch import NatView
from lattice.core.reachability import DialBack, ReachabilityTracker

ME, OBS = "me", "observer"
ADDR = ("198.18.0.12", 4001)
CONE = NatView("cone", (("198.18.0.101", 4001),), "")


def test_success_from_the_observer_makes_us_public_with_the_address_it_reached():
    # the lone public bootstrap: its only observers are NATed peers, which dial out
    t = ReachabilityTracker(ME)
    assert t.record(DialBack(OBS, OBS, ADDR, True, 10.0), 10.0)
    v = t.verdict(NatView("none", (ADDR,), ""), 10.0)
    assert v.reachability == "public" and v.public_addrs == (ADDR,) and v.nat == "none"
    assert v.filtering == "open"


def test_failure_makes_us_private_keeps_the_nat_kind_and_says_how_the_router_filters():
    for error, filtering in (("timeout", "drop"), ("refused", "reject"),
                             ("unreachable", "reject"), ("handshake", "unknown")):
        t = ReachabilityTracker(ME)
        t.record(DialBack(OBS, OBS, ADDR, False, 10.0, error), 10.0)
        v = t.verdict(CONE, 10.0)
        assert (v.reachability, v.nat, v.filtering) == ("private", "cone", filtering), error
        assert error in v.reason


def test_a_dial_back_by_us_or_by_nobody_does_not_count():
    t = ReachabilityTracker(ME)
    assert not t.record(DialBack(OBS, ME, ADDR, True, 1.0), 1.0)
    assert not t.record(DialBack(OBS, "", ADDR, True, 1.0), 1.0)
    assert not t.record(DialBack(OBS, OBS, ADDR, False, 1.0, "bogus"), 1.0)
    assert t.verdict(CONE, 1.0).reachability == "unknown" and t.rejected == 3


def test_recent_results_decide_and_old_ones_expire():
    t = ReachabilityTracker(ME, result_ttl=100.0)
    t.record(DialBack(OBS, OBS, ADDR, True, 0.0), 0.0)
    for i in range(3):  # the firewall went up: three failures since
        t.record(DialBack(f"o{i}", f"o{i}", ADDR, False, 50.0 + i), 50.0 + i)
    assert t.verdict(CONE, 60.0).reachability == "private"
    t2 = ReachabilityTracker(ME, result_ttl=100.0)
    t2.record(DialBack(OBS, OBS, ADDR, True, 0.0), 0.0)
    assert t2.verdict(CONE, 50.0).reachability == "public"
    assert t2.verdict(CONE, 150.0).reachability == "unknown"


def test_probing_backs_off_while_unknown_and_rechecks_once_known():
    t = ReachabilityTracker(ME, retry_min=1.0, retry_max=8.0, recheck=600.0)
    assert t.probe_due(0.0)
    waits = []
    now = 0.0
    for _ in range(6):
        t.no_result(now)
        waits.append(t.next_probe_at() - now)
        now = t.next_probe_at()
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    t.record(DialBack(OBS, OBS, ADDR, False, now), now)
    assert t.next_probe_at() == now + 600.0
    t.probe_now()
    assert t.probe_due(now)


def test_results_are_bounded():
    t = ReachabilityTracker(ME)
    for i in range(1000):
        t.record(DialBack(f"o{i}", f"o{i}", ADDR, False, float(i)), float(i))
    assert len(t.results) <= 16


def test_a_lan_peers_dial_back_counts_only_until_someone_outside_sees_us():
    from lattice.core.holepunch import Observation
    from lattice.core.reachability import dialback_candidates

    lan_ip, wan = ("198.19.1.10", 4001), ("198.18.0.101", 4001)
    lan_peer = Observation("lanpeer", lan_ip, lan_ip)  # mDNS: sees our own address
    boot = Observation("boot", lan_ip, wan)  # outside our NAT: sees the mapping
    assert dialback_candidates(4001, [lan_peer]) == (lan_ip,)
    assert dialback_candidates(4001, [lan_peer, boot]) == (wan,)
    t = ReachabilityTracker(ME)
    t.record(DialBack("lanpeer", "lanpeer", lan_ip, True, 1.0), 1.0)
    assert t.verdict(CONE, 1.0, dialback_candidates(4001, [lan_peer])).reachability == "public"
    # once the bootstrap has seen our NAT's mapping, the LAN dial-back no longer counts
    assert t.verdict(CONE, 2.0, dialback_candidates(4001, [lan_peer, boot])).reachability \
        == "unknown"
