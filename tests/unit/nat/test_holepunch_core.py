"""The hole-punch core: NAT classification, the decision table, and two sessions talking
back to back with no network (h11-style), time passed in by hand."""

from __future__ import annotations

import dataclasses

import pytest

from lattice.core import holepunch as hp
from lattice.core.codec import pack, unpack
from lattice.core.holepunch import (
    DEFAULT_BIRTHDAY,
    Birthday,
    Closed,
    Dial,
    DirectUp,
    Done,
    HolePunchProtocolError,
    HolePunchSession,
    Observation,
    PeerView,
    Prime,
    Primed,
    Probe,
    Received,
    Send,
    Start,
    Timer,
    classify_nat,
    decide,
)

LISTEN = 4001
WAN_A, WAN_B = "198.18.0.101", "198.18.0.102"


def obs(observer: str, local_port: int, observed: tuple[str, int], local_ip="198.19.1.10"):
    return Observation(observer, (local_ip, local_port), observed)


# -- classify_nat ------------------------------------------------------------------------

def test_no_observations_is_unknown():
    view = classify_nat(LISTEN, [])
    assert view.kind == "unknown" and view.addrs == ()


def test_public_host_sees_its_own_address():
    view = classify_nat(LISTEN, [obs("r", LISTEN, ("198.18.0.12", LISTEN), "198.18.0.12"),
                                 obs("b", LISTEN, ("198.18.0.12", LISTEN), "198.18.0.12")])
    assert view.kind == "none" and view.addrs == (("198.18.0.12", LISTEN),)


def test_two_observers_one_mapping_is_cone_and_punchable():
    view = classify_nat(LISTEN, [obs("boot", LISTEN, (WAN_A, LISTEN)),
                                 obs("relay", LISTEN, (WAN_A, LISTEN))])
    assert view.kind == "cone" and view.addrs == ((WAN_A, LISTEN),)


def test_endpoint_independent_but_port_changing_nat_is_still_cone():
    view = classify_nat(LISTEN, [obs("boot", LISTEN, (WAN_A, 61000)),
                                 obs("relay", LISTEN, (WAN_A, 61000))])
    assert view.kind == "cone" and view.addrs == ((WAN_A, 61000),)


def test_different_mappings_per_observer_is_symmetric_and_only_the_ip_is_of_use():
    view = classify_nat(LISTEN, [obs("boot", LISTEN, (WAN_A, 40123)),
                                 obs("relay", LISTEN, (WAN_A, 51999))])
    assert view.kind == "symmetric" and {ip for ip, _ in view.addrs} == {WAN_A}


def test_one_observer_port_kept_is_cone_port_changed_is_unknown_but_worth_a_try():
    assert classify_nat(LISTEN, [obs("boot", LISTEN, (WAN_A, LISTEN))]).kind == "cone"
    view = classify_nat(LISTEN, [obs("boot", LISTEN, (WAN_A, 40123))])
    assert view.kind == "unknown" and view.addrs == ((WAN_A, 40123),)


def test_only_listen_port_observations_say_where_the_listen_port_maps():
    # an ephemeral-port connection (a fallback dial) tells us there is a NAT, no more
    view = classify_nat(LISTEN, [obs("boot", 50505, (WAN_A, 50505))])
    assert view.kind == "unknown" and view.addrs == ()


# -- decide --------------------------------------------------------------------------------

ALL = ("lan", "birthday")
PUB = PeerView("public", "none", (("198.18.0.12", LISTEN),), caps=ALL)
CONE = PeerView("private", "cone", ((WAN_A, LISTEN),), "drop", (("198.19.1.10", LISTEN),), ALL)
CONE_B = PeerView("private", "cone", ((WAN_B, LISTEN),), "drop", (("198.19.2.10", LISTEN),), ALL)
SYM = PeerView("private", "symmetric", ((WAN_B, 40123), (WAN_B, 51999)), caps=ALL)
SYM_A = PeerView("private", "symmetric", ((WAN_A, 40999),), caps=ALL)
FIREWALLED = PeerView("private", "none", (("198.18.0.12", LISTEN),), caps=ALL)
NOTHING = PeerView("unknown", "unknown", (), caps=ALL)
# a port forward or a full-cone NAT: reachable, but through a NAT (it punches)
FORWARDED = PeerView("public", "cone", ((WAN_B, LISTEN),), "open", caps=ALL)
SAME_NAT = PeerView("private", "cone", ((WAN_A, 4002),), "drop", (("198.19.1.11", 4002),), ALL)
REJECTING = PeerView("private", "cone", ((WAN_A, LISTEN),), "reject", caps=ALL)
OLD = PeerView("private", "cone", ((WAN_B, LISTEN),))  # a v1 peer: no caps


@pytest.mark.parametrize(("initiator", "responder", "plan"), [
    (CONE, PUB, "initiator_dials"),
    (SYM, PUB, "initiator_dials"),  # a symmetric NAT still dials out fine
    (PUB, SYM, "responder_dials"),
    (PUB, CONE, "responder_dials"),
    (CONE, CONE_B, "punch"),
    (CONE, FIREWALLED, "punch"),
    (CONE_B, FORWARDED, "punch"),
    (REJECTING, CONE_B, "punch"),
    (CONE, SAME_NAT, "lan"),
    (SAME_NAT, CONE, "lan"),
    (CONE, SYM, "birthday"),
    (SYM, CONE, "birthday"),
    (REJECTING, SYM, None),  # the cone side's router would reset the primer's SYNs
    (SYM_A, SYM, None),
    (CONE, NOTHING, None),
    (CONE, dataclasses.replace(SYM, caps=("lan",)), None),  # birthday off on one side
    (OLD, dataclasses.replace(SAME_NAT, addrs=((WAN_B, 4002),)), "punch"),  # no lan cap
])
def test_decision_table(initiator, responder, plan):
    d = decide(initiator, responder)
    assert d.plan == plan and d.reason


def test_the_symmetric_side_primes_and_the_other_probes():
    assert decide(CONE, SYM).primer == "responder"
    assert decide(SYM, CONE).primer == "initiator"


@pytest.mark.parametrize(("initiator", "responder", "words"), [
    (SYM_A, SYM, "both NATs are symmetric"),
    (REJECTING, SYM, "their NAT is symmetric and our router rejects"),
    (CONE, NOTHING, "no observed public address for them"),
])
def test_a_decision_to_stay_relayed_says_whose_nat_and_why(initiator, responder, words):
    assert words in decide(initiator, responder).reason


# -- two sessions back to back -----------------------------------------------------------

class Pair:
    """Wire an initiator and a responder together; deliver messages instantly."""

    def __init__(self, ours_b: PeerView, ours_a: PeerView) -> None:
        self.b = HolePunchSession("initiator", ours_b, session_id=b"\x01" * 8, now=0.0)
        self.a = HolePunchSession("responder", ours_a, now=0.0)
        self.dials: dict[str, list[Dial]] = {"a": [], "b": []}
        self.done: dict[str, Done] = {}

    def run(self, side: str, actions, now):
        other = "a" if side == "b" else "b"
        for act in actions:
            if isinstance(act, Send):
                # through the codec, like the wire
                msg = unpack(pack(act.msg), max_bytes=hp.MAX_MESSAGE)
                self.run(other, getattr(self, other).handle(Received(msg), now), now)
            elif isinstance(act, Dial):
                self.dials[side].append(act)
            elif isinstance(act, Done):
                self.done[side] = act


class BirthdayPair(Pair):
    """`Pair`, recording Prime and Probe actions too."""

    def __init__(self, ours_b: PeerView, ours_a: PeerView, *, b_limits=DEFAULT_BIRTHDAY,
                 a_limits=DEFAULT_BIRTHDAY) -> None:
        super().__init__(ours_b, ours_a)
        self.b = HolePunchSession("initiator", ours_b, session_id=b"\x01" * 8, now=0.0,
                                  birthday=b_limits)
        self.a = HolePunchSession("responder", ours_a, now=0.0, birthday=a_limits)
        self.primes: dict[str, list[Prime]] = {"a": [], "b": []}
        self.probes: dict[str, list[Probe]] = {"a": [], "b": []}

    def run(self, side, actions, now):
        rest = []
        for act in actions:
            if isinstance(act, Prime):
                self.primes[side].append(act)
            elif isinstance(act, Probe):
                self.probes[side].append(act)
            else:
                rest.append(act)
        super().run(side, rest, now)


@pytest.mark.parametrize(("b", "a", "primer"), [(CONE, SYM, "a"), (SYM, CONE, "b")])
def test_birthday_the_symmetric_side_primes_then_the_cone_side_probes_its_ip(b, a, primer):
    p = BirthdayPair(b, a, b_limits=Birthday(256, 1024, 500.0),
                     a_limits=Birthday(128, 2048, 1000.0))
    prober = "b" if primer == "a" else "a"
    p.run("b", p.b.handle(Start(), 0.0), 0.0)
    (prime,) = p.primes[primer]
    cone = b if primer == "a" else a
    # each side is held to its own limits: a primer A to its 128 ports
    assert prime.target == cone.addrs[0] and prime.rate == 500.0
    assert prime.ports == (128 if primer == "a" else 256)
    assert p.probes[prober] == []  # not before the primer's SYNs are out
    session = getattr(p, primer)
    p.run(primer, session.handle(Primed(), 0.3), 0.3)
    (probe,) = p.probes[prober]
    sym = a if primer == "a" else b
    assert probe.ips == (sym.addrs[0][0],) and probe.count == 1024 and probe.rate == 500.0
    assert probe.until == pytest.approx(0.3 + 1024 / 500.0 + hp.ROUND_TIMEOUT)
    for side in ("a", "b"):
        p.run(side, getattr(p, side).handle(DirectUp(), 1.0), 1.0)
    assert {d.outcome for d in p.done.values()} == {"direct"}
    assert p.b.tried == "birthday, 1 round"


def test_a_birthday_asked_beyond_our_limits_is_clamped_to_them():
    a = HolePunchSession("responder", SYM, now=0.0, birthday=Birthday(64, 256, 100.0))
    a.handle(Received({"type": "connect", "id": b"\x05" * 8, "round": 0, **hp.encode_view(CONE)}), 0)
    (prime,) = a.handle(Received({"type": "sync", "id": b"\x05" * 8, "round": 0,
                                  "plan": "birthday", "primer": "responder",
                                  "ports": 10**6, "probes": 10**9, "rate": 1e9}), 0.0)
    assert (prime.ports, prime.rate) == (64, 100.0)


def test_lan_plan_dials_the_lan_address_first_then_the_public_one():
    p = Pair(SAME_NAT, CONE)
    p.run("b", p.b.handle(Start(), 0.0), 0.0)
    (dial,) = p.dials["b"]
    assert dial.addrs == CONE.local + CONE.addrs and dial.noise_initiator
    assert p.dials["a"] == []


def test_cone_x_cone_punches_with_fixed_noise_roles_and_rtt_half_delay():
    p = Pair(CONE, CONE_B)
    p.run("b", p.b.handle(Start(), 10.0), 10.0)
    # instant delivery: rtt 0; both dial now, B as Noise initiator, A as responder
    (db,), (da,) = p.dials["b"], p.dials["a"]
    assert db.noise_initiator and not da.noise_initiator
    assert db.addrs == CONE_B.addrs and da.addrs == CONE.addrs
    p.run("b", p.b.handle(DirectUp(), 10.05), 10.05)
    p.run("a", p.a.handle(DirectUp(), 10.05), 10.05)
    assert p.done == {"a": Done("direct", "direct connection up"),
                      "b": Done("direct", "direct connection up")}


def test_initiator_waits_half_the_measured_rtt_before_dialing():
    b = HolePunchSession("initiator", CONE, session_id=b"\x02" * 8, now=100.0)
    a = HolePunchSession("responder", CONE_B, now=100.0)
    (connect,) = b.handle(Start(), 100.0)
    (reply,) = a.handle(Received(connect.msg), 100.02)
    sync, dial = b.handle(Received(reply.msg), 100.04)  # rtt = 40 ms
    assert sync.msg["plan"] == "punch"
    assert dial.at == pytest.approx(100.06) and dial.until == pytest.approx(100.06 + hp.ROUND_TIMEOUT)
    (adial,) = a.handle(Received(sync.msg), 100.06)
    assert adial.at == pytest.approx(100.06)  # both SYNs leave at the same moment


def test_public_responder_is_dialed_by_the_initiator_only():
    p = Pair(CONE, PUB)
    p.run("b", p.b.handle(Start(), 0.0), 0.0)
    assert [d.noise_initiator for d in p.dials["b"]] == [True] and p.dials["a"] == []


def test_public_initiator_is_dialed_by_the_responder_as_an_ordinary_dial():
    p = Pair(PUB, SYM)
    p.run("b", p.b.handle(Start(), 0.0), 0.0)
    assert p.dials["b"] == [] and [d.noise_initiator for d in p.dials["a"]] == [True]


@pytest.mark.parametrize(("b", "a"), [(SYM_A, SYM),
                                      (CONE, dataclasses.replace(SYM, caps=())),
                                      (dataclasses.replace(SYM_A, caps=()), CONE_B)])
def test_symmetric_nat_stays_relayed_at_once_with_the_reason_on_both_sides(b, a):
    p = Pair(b, a)
    p.run("b", p.b.handle(Start(), 0.0), 0.0)
    assert p.dials == {"a": [], "b": []}
    assert p.done["b"].outcome == p.done["a"].outcome == "relayed"
    assert "symmetric" in p.done["b"].reason and "symmetric" in p.done["a"].reason


def test_a_failed_round_is_retried_then_the_session_gives_up():
    p = Pair(CONE, CONE_B)
    t = 0.0
    p.run("b", p.b.handle(Start(), t), t)
    for _ in range(hp.MAX_ROUNDS - 1):
        t = p.b.deadline
        p.run("b", p.b.handle(Timer(), t), t)  # next round: connect again
    assert len(p.dials["b"]) == len(p.dials["a"]) == hp.MAX_ROUNDS
    p.run("b", p.b.handle(Timer(), p.b.deadline), p.b.deadline)
    assert p.done["b"].outcome == "failed"
    p.run("a", p.a.handle(Timer(), p.a.deadline), p.a.deadline)
    assert p.done["a"].outcome == "failed"


def test_timer_before_the_deadline_does_nothing():
    b = HolePunchSession("initiator", CONE, session_id=b"\x03" * 8, now=0.0)
    b.handle(Start(), 0.0)
    assert b.handle(Timer(), 0.5) == [] and not b.done
    assert b.handle(Timer(), hp.EXCHANGE_TIMEOUT) == [Done("failed", "the exchange timed out")]


def test_a_responder_that_hears_nothing_gives_up():
    a = HolePunchSession("responder", CONE, now=5.0)
    assert a.deadline == 5.0 + hp.EXCHANGE_TIMEOUT
    assert a.handle(Timer(), a.deadline)[0].outcome == "failed"


def test_closed_stream_ends_the_session_and_later_events_are_ignored():
    a = HolePunchSession("responder", CONE, now=0.0)
    assert a.handle(Closed(), 0.0)[0].outcome == "failed"
    assert a.handle(DirectUp(), 0.1) == []


@pytest.mark.parametrize("msg", [
    "not a map",
    {"type": "sync", "id": b"\x01" * 8, "round": 0, "plan": "punch"},  # sync before connect
    {"type": "connect", "id": b"short", "round": 0, "reach": "private", "nat": "cone", "addrs": []},
    {"type": "connect", "id": b"\x01" * 8, "round": 5, "reach": "private", "nat": "cone", "addrs": []},
    {"type": "connect", "id": b"\x01" * 8, "round": 0, "reach": "maybe", "nat": "cone", "addrs": []},
    {"type": "connect", "id": b"\x01" * 8, "round": 0, "reach": "private", "nat": "cone",
     "addrs": [["1.2.3.4", 1]] * (hp.MAX_ADDRS + 1)},
    {"type": "hello"},
    {"type": "primed", "id": b"\x01" * 8, "round": 0},  # primed out of the blue
    {"type": "connect", "id": b"\x01" * 8, "round": 0, "reach": "private", "nat": "cone",
     "addrs": [], "filtering": "sometimes"},
    {"type": "connect", "id": b"\x01" * 8, "round": 0, "reach": "private", "nat": "cone",
     "addrs": [], "local": [["10.0.0.1", 1]] * (hp.MAX_LOCAL_ADDRS + 1)},
])
def test_malformed_or_unexpected_messages_are_the_peers_fault(msg):
    a = HolePunchSession("responder", CONE, now=0.0)
    with pytest.raises(HolePunchProtocolError):
        a.handle(Received(msg), 0.0)


def test_sync_with_an_unknown_plan_or_nothing_to_dial_is_refused():
    a = HolePunchSession("responder", CONE, now=0.0)
    a.handle(Received({"type": "connect", "id": b"\x04" * 8, "round": 0, **hp.encode_view(NOTHING)}), 0)
    with pytest.raises(HolePunchProtocolError):
        a.handle(Received({"type": "sync", "id": b"\x04" * 8, "round": 0, "plan": "punch"}), 0)


@pytest.mark.parametrize("extra", [
    {"primer": "nobody", "ports": 1, "probes": 1, "rate": 1},
    {"primer": "responder", "ports": 0, "probes": 1, "rate": 1},
    {"primer": "responder", "ports": 1, "probes": "many", "rate": 1},
    {"primer": "responder", "ports": 1, "probes": 1, "rate": True},
])
def test_a_malformed_birthday_sync_is_refused(extra):
    a = HolePunchSession("responder", SYM, now=0.0)
    a.handle(Received({"type": "connect", "id": b"\x06" * 8, "round": 0, **hp.encode_view(CONE)}), 0)
    with pytest.raises(HolePunchProtocolError):
        a.handle(Received({"type": "sync", "id": b"\x06" * 8, "round": 0, "plan": "birthday",
                           **extra}), 0.0)


def test_bad_addresses_from_a_peer_are_dropped_not_dialed():
    view = hp.decode_view({"reach": "private", "nat": "cone", "addrs": [
        ["0.0.0.0", 4001], ["224.0.0.1", 4001], ["198.18.0.101", 0], ["nonsense", 1],
        ["198.18.0.101", 4001], ["198.18.0.101", 4001], "x", ["::1", 5]]})
    assert view.addrs == (("198.18.0.101", 4001), ("::1", 5))


def test_largest_message_fits_the_frame_limit():
    big = PeerView("private", "unknown", tuple(("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
                                               for _ in range(hp.MAX_ADDRS)))
    msg = {"type": "connect", "id": b"\xff" * 8, "round": hp.MAX_ROUNDS - 1, **hp.encode_view(big)}
    assert len(pack(msg)) < hp.MAX_MESSAGE
    cancel = {"type": "cancel", "id": b"\xff" * 8, "reason": "x" * hp.MAX_REASON_CHARS}
    assert len(pack(cancel)) < hp.MAX_MESSAGE


def test_each_side_words_the_reason_from_its_own_side():
    p = Pair(REJECTING, SYM)  # b: cone behind a rejecting router; a: symmetric
    p.run("b", p.b.handle(Start(), 0.0), 0.0)
    assert p.done["b"].reason.startswith("their NAT is symmetric and our router rejects")
    assert p.done["a"].reason.startswith("our NAT is symmetric and their router rejects")
