"""SWIM-style membership (`lattice.core.membership`), machines wired back to back."""

import random

import pytest

from lattice.core.codec import pack, unpack
from lattice.core.membership import DEAD, MAX_PIGGYBACK, SUSPECT, Membership, MembershipError


class Net:
    """Machines by name; messages delivered at once (through the wire encoding) unless
    the receiver is down."""

    def __init__(self, names, *, seed=0, **kw):
        rng = random.Random(seed)
        self.m = {n: Membership(n, rng=random.Random(rng.getrandbits(32)), **kw) for n in names}
        self.down = set()

    def link(self, a, b, now=0.0):
        self.m[a].add_neighbour(b, now)
        self.m[b].add_neighbour(a, now)

    def send(self, sender, out, now):
        queue = [(sender, target, msg) for target, msg in out]
        while queue:
            src, dst, msg = queue.pop(0)
            if dst in self.down:
                continue
            replies = self.m[dst].handle(src, unpack(pack(msg)), now)
            queue.extend((dst, t, r) for t, r in replies)

    def round(self, now):
        for name, machine in self.m.items():
            if name not in self.down:
                self.send(name, machine.tick(now), now)


def ring(n, **kw):
    net = Net([f"p{i}" for i in range(n)], **kw)
    for i in range(n):
        net.link(f"p{i}", f"p{(i + 1) % n}")
        net.link(f"p{i}", f"p{(i + 3) % n}")
    return net


def test_a_silent_neighbour_is_suspected_then_declared_dead_and_everyone_hears_it():
    net = ring(40, probe_interval=1.0, probe_timeout=0.5, suspicion_timeout=3.0)
    for t in range(5):
        net.round(float(t))
    # its neighbours saw it alive; nobody else tracks it (no news is no entry)
    assert {m.status("p7") for n, m in net.m.items() if n != "p7"} == {"alive", None}
    net.down.add("p7")
    t = 5.0
    while not all(m.status("p7") == DEAD for n, m in net.m.items() if n != "p7"):
        net.round(t)
        t += 1.0
        assert t < 60, {n: m.status("p7") for n, m in net.m.items()}
    # only p7's neighbours probe it; the other 35 heard it as a rumour
    assert sum(m.counts["declared_dead"] for m in net.m.values()) >= 1
    assert all(m.tracked() < 40 for m in net.m.values())


def test_a_suspected_member_that_is_alive_refutes_it_with_a_higher_incarnation():
    net = ring(12, probe_interval=1.0, probe_timeout=0.5, suspicion_timeout=4.0)
    net.round(0.0)
    net.down.add("p3")
    t = 1.0
    while not any(m.status("p3") == SUSPECT for m in net.m.values()):
        net.round(t)
        t += 1.0
    net.down.discard("p3")  # it was only slow
    for _ in range(12):
        net.round(t)
        t += 1.0
    assert net.m["p3"].incarnation >= 1 and net.m["p3"].counts["refuted"] >= 1
    assert all(m.status("p3") == "alive" for n, m in net.m.items() if n != "p3")
    alive, age = net.m["p4"].liveness("p3", t)
    assert alive and age is not None and age < 12


def test_a_member_still_held_dead_after_the_refutation_was_spent_is_told_again():
    """A refutation rides on a bounded number of messages; a neighbour that missed it
    (a loaded machine: suspicions everywhere, rumours crowding each message) keeps
    telling the member the stale news. The member must answer with its incarnation
    again, else the neighbour shows a live daemon dead until the entry expires."""
    net = Net(["a", "b", "c"])
    a, b = net.m["a"], net.m["b"]
    net.link("b", "c")
    b.handle("c", {"t": "ack", "n": 0, "g": [["b", SUSPECT, 0]]}, 0.0)
    assert b.incarnation == 1  # b refuted ...
    for t in range(40):  # ... and its refutation has ridden all the messages it gets
        net.round(float(t))
    a.handle("c", {"t": "ack", "n": 0, "g": [["b", DEAD, 0]]}, 40.0)  # a missed it
    assert a.status("b") == DEAD
    net.link("a", "b", 41.0)
    t = 41.0
    while a.status("b") != "alive":
        net.round(t)
        t += 1.0
        assert t < 50, "a never heard b's incarnation again"
    assert a.liveness("b", t)[0] is True
    assert b.incarnation == 1  # no new incarnation: the news was only stale


def test_liveness_of_a_member_never_heard_of_is_unknown():
    m = Membership("me")
    assert m.liveness("stranger", 5.0) == (None, None)
    assert m.liveness("me", 5.0) == (True, 0.0)


@pytest.mark.parametrize("msg", [
    None, {"t": "ping"}, {"t": "ping", "n": 1, "g": "x"}, {"t": "pong", "n": 1, "g": []},
    {"t": "ack", "n": 1, "g": [["p", "zombie", 1]]}, {"t": "ack", "n": 1, "g": [["p", "alive", -1]]},
    {"t": "ack", "n": 1, "g": [["p", "alive", 1]] * (MAX_PIGGYBACK + 2)},
    {"t": "ack", "n": 1, "g": [["x" * 200, "alive", 1]]},
])
def test_malformed_messages_are_refused_and_counted(msg):
    m = Membership("me")
    with pytest.raises(MembershipError):
        m.handle("peer", msg, 0.0)
    assert m.counts["malformed"] == 1 and m.tracked() == 0


def test_what_a_member_holds_is_bounded_whatever_it_is_told():
    m = Membership("me", max_entries=64)
    for i in range(2000):
        m.handle("peer", {"t": "ack", "n": i, "g": [[f"x{i}", "dead", 1]]}, float(i))
        m.tick(float(i))  # rumours are sent on, then become forgettable
    assert m.tracked() <= 64 + 2 * MAX_PIGGYBACK


def test_every_neighbour_is_probed_once_per_round():
    m = Membership("me", rng=random.Random(1))
    for i in range(5):
        m.add_neighbour(f"n{i}", 0.0)
    targets = [m.tick(float(t))[0][0] for t in range(5)]
    assert sorted(targets) == [f"n{i}" for i in range(5)]


def test_a_neighbour_whose_connection_closed_is_probed_once_more_and_then_let_go():
    net = Net(["a", "b", "c"], probe_interval=1.0, probe_timeout=0.5, suspicion_timeout=2.0)
    net.link("a", "b")
    net.link("a", "c")
    net.down.add("b")  # b crashed: its connection closed
    net.m["a"].remove_neighbour("b")
    assert net.m["a"].tick(0.0)[0][0] == "b"
    for t in range(1, 5):
        net.round(float(t))
    assert net.m["a"].status("b") == DEAD and "b" not in net.m["a"].neighbours()


def test_a_connection_closed_on_purpose_is_not_probed_again_by_either_side():
    # a's connection manager trims its connection to b: a says bye, then closes. A
    # recheck probe would dial b again (on either side) and undo the trim.
    net = Net(["a", "b", "c"], probe_interval=1.0, probe_timeout=0.5, suspicion_timeout=2.0)
    net.link("a", "b")
    net.link("a", "c")
    net.link("b", "c")
    net.send("a", [("b", net.m["a"].part("b"))], 0.0)
    net.m["a"].remove_neighbour("b")
    net.m["b"].remove_neighbour("a")
    for t in range(1, 8):
        for name in ("a", "b"):
            other = "b" if name == "a" else "a"
            assert all(target != other for target, _ in net.m[name].tick(float(t)))
        net.round(float(t) + 0.5)
    # and nobody took the other for dead: both still alive everywhere
    assert net.m["a"].status("b") == "alive" and net.m["b"].status("a") == "alive"
    assert net.m["c"].status("a") == "alive" and net.m["b"].counts["byes"] == 1
    # a connection made again later and then lost without a bye is rechecked as before
    net.link("a", "b", now=9.0)
    net.m["a"].remove_neighbour("b")
    assert net.m["a"].tick(10.0)[0][0] == "b"


def test_a_late_joiner_learns_the_table_from_its_first_neighbour():
    net = ring(10, probe_interval=1.0, probe_timeout=0.5, suspicion_timeout=2.0)
    net.down.add("p5")
    t = 0.0
    while net.m["p4"].status("p5") != DEAD:
        net.round(t)
        t += 1.0
    late = Membership("late")
    late.handle("p4", unpack(pack(net.m["p4"].table())), t)
    assert late.status("p5") == DEAD and late.status("p4") == "alive"
    assert late.status("p3") == "alive"  # p4's neighbour
    # old news is not spread again (only that p4, new to it, is alive)
    assert [p for p, e in late._entries.items() if e.transmits] == ["p4"]
