"""Real `latticed` daemons across real NATs (issue 4): reachability, relays, hole punching.

Each case builds the natlab testbed (a public bootstrap and relay, peers a and b behind
kernel NAT routers), starts one daemon per host, and checks what a user relies on:
- `lattice status` says public for the relay and private (with the NAT kind) for NATed
  daemons, and NATed daemons hold relay reservations (found through the bootstrap peer);
- a reaches b by peer id alone: first through a relay, then directly where the NATs
  allow it (cone x cone, public x cone), relayed where they do not (any symmetric side),
  and once direct, no relay carries a circuit for them any more;
- data flows between a and b over that connection: with every other daemon that could
  carry it stopped, a write on one is seen on the other.
Real network, real time: waits poll status with deadlines (nothing to subscribe to).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lattice.api.errors import PeerUnreachableError
from lattice.testing.daemons import wait_for as wait_until

pytestmark = pytest.mark.nat

CASES = {
    # case: ((a's reachability, a's nat), (b's ...), expected a<->b connection, b's plan)
    "public_x_cone": (("public", "none"), ("private", "cone"), "direct", None),
    "nat_cone_x_cone": (("private", "cone"), ("private", "cone"), "direct", "punch"),
    # routers that answer unsolicited SYNs (a RST; ICMP port unreachable) instead of
    # dropping them: the punch needs both SYNs out within one one-way delay
    "nat_cone_x_cone_rst": (("private", "cone"), ("private", "cone"), "direct", "punch"),
    "nat_cone_x_cone_icmp": (("private", "cone"), ("private", "cone"), "direct", "punch"),
    # a's NAT lets in new connections to its mapped port (from anyone; from addresses a
    # sent to): a dial-back from a peer a talked to lands, so a looks public, but it is
    # translated, so b punches rather than dials it one-sidedly
    "nat_fullcone_x_cone": (("public", "cone"), ("private", "cone"), "direct", "punch"),
    "nat_restricted_x_cone": (("public", "cone"), ("private", "cone"), "direct", "punch"),
    # a behind a home router behind a carrier-grade NAT
    "double_nat_x_cone": (("private", "cone"), ("private", "cone"), "direct", "punch"),
    "nat_cone_x_symmetric": (("private", "cone"), ("private", "symmetric"), "direct", "birthday"),
    "nat_cone_x_symmetric_rst": (("private", "cone"), ("private", "symmetric"), "relayed",
                                 "rejects unsolicited connections"),
    "nat_symmetric_x_symmetric": (("private", "symmetric"), ("private", "symmetric"), "relayed",
                                  "both NATs are symmetric"),
}


def _reached(d, reach: str, nat: str, reservations: int = 2):
    r = d.reach()
    if r.get("reachability") != reach or r.get("nat") != nat:
        return None
    if reach == "private" and len(r["reservations"]) < reservations:
        return None  # a slot on both public daemons (nat.max_relays = 2)
    return r


@pytest.mark.parametrize("case", list(CASES))
def test_daemons_reach_each_other_by_peer_id_across_nats(natnet, case):
    (a_reach, a_nat), (b_reach, b_nat), expect, how = CASES[case]
    net = natnet(case)
    # A public a is a relay too: started first, b would reserve a slot on it and so be
    # connected to it directly before the test asks. Later, b's slots are elsewhere.
    d = net.start_case(later=("a",) if a_reach == "public" else ())
    boot, relay, a, b = d["bootstrap"], d["relay"], d["a"], d["b"]
    wait = net.wait_until

    r = wait(lambda: _reached(relay, "public", "none"), 20, "relay: reachability public")
    assert r["relay_service"]["active"] and r["reachable_via"] == ["direct"]
    ra = wait(lambda: _reached(a, a_reach, a_nat), 20, f"a: {a_reach}/{a_nat}")
    rb = wait(lambda: _reached(b, b_reach, b_nat), 20, f"b: {b_reach}/{b_nat}")
    assert "relay" in rb["reachable_via"] and rb["observed_addrs"]
    if a_reach == "private":
        assert "relay" in ra["reachable_via"]
    # b was told only the bootstrap peer; its other relay it found through it
    public = {boot.peer_id, relay.peer_id} | ({a.peer_id} if a_reach == "public" else set())
    reserved = {res["relay"] for res in rb["reservations"]}
    assert len(reserved) == 2 and reserved <= public and reserved - {boot.peer_id}

    with a.client() as c:
        took = c.connect_peer(b.peer_id, timeout=10)["elapsed_ms"]
    assert took < 3000, f"first (relayed) connection took {took:.0f} ms"

    if expect == "direct":
        # birthday probing: ~1 s priming, ~2 s probing (proto/holepunch.md)
        within = 12 if how == "birthday" else 5
        wait(lambda: (a.peer_row(b.peer_id) or {}).get("connection") == "direct", within,
             "a sees a direct connection to b")
        wait(lambda: (b.peer_row(a.peer_id) or {}).get("connection") == "direct", 3,
             "b sees a direct connection to a")
        # the relay carries nothing for them afterwards: the relayed connection drains
        # for up to 5 s (holepunch relay_drain_s), then closes and the relay notices;
        # the bound leaves room for a loaded 2-core machine
        wait(lambda: all(x.reach()["relay_service"]["circuits"] == 0 for x in (boot, relay)),
             20, "relayed connection retired")
        punch = b.reach()["holepunch"]
        assert punch["failed"] == 0
        if a_reach == "private":
            # between two NATs only a punch makes it direct; with a public a, b may
            # simply have dialed a already (its DHT lookups do), which is as good
            assert punch["direct"] >= 1
            assert punch["recent"][0]["plan"] == how, punch["recent"][0]
        carriers = []
    else:
        wait(lambda: b.reach()["holepunch"]["relayed"] >= 1, 5, "b to decide to stay relayed")
        row = a.peer_row(b.peer_id)
        assert row is not None and row["connection"] == "relayed"
        # both say why, and when they try again (a once b's cancel has reached it)
        row = wait_until(lambda: (r := a.peer_row(b.peer_id)) and how in r["why_relayed"]
                         and r, 5, "a to say why it is relayed")
        assert "tried nothing" in row["why_relayed"]
        assert how in b.peer_row(a.peer_id)["why_relayed"]
        assert "again in" in b.peer_row(a.peer_id)["why_relayed"]
        assert how in b.reach()["relayed_peers"][a.peer_id]
        carriers = [x for x in (boot, relay) if x.reach()["relay_service"]["circuits"] >= 1]
        assert carriers, "a relay must carry the a<->b circuit"
    # a stream carries data between a and b, over the connection above only
    for x in (boot, relay):
        if x not in carriers:
            x.proc.terminate()
            x.proc.wait(10)
    token = os.urandom(4).hex()
    with a.client() as c:
        c.state_set(f"counters/{case}-{token}", 7)
    with b.client() as c:
        wait(lambda: c.state_get("counters").get(f"{case}-{token}") == 7, 10,
             "b to see a's write", detail=lambda: {x.name: _sync_sessions(x) for x in (a, b)})
    row = b.peer_row(a.peer_id)
    assert row is not None and row["connection"] == expect


def _direct(a, b, timeout: float = 10.0) -> None:
    a_row = lambda: (a.peer_row(b.peer_id) or {}).get("connection")  # noqa: E731
    wait_until(lambda: a_row() == "direct", timeout, f"{a.name} -> {b.name} direct")


@pytest.mark.parametrize("case", ["same_nat", "same_nat_hairpin"])
def test_two_volunteers_behind_one_nat_connect_directly_without_mdns(natnet, case):
    # one home router, mDNS off: they meet by peer id through the relay and find that
    # they share a public IP, so b dials a's LAN address (hairpin or not)
    net = natnet(case)
    boot = net.start("bootstrap")
    boot.wait_running()
    relay = net.start("relay", bootstrap=[boot.addr])
    a = net.start("a", bootstrap=[boot.addr])
    b = net.start("b", bootstrap=[boot.addr], listen=f"/ip4/{net.tb.host('b').addr}/tcp/4002")
    for d in (relay, a, b):
        d.wait_running()
    wait_until(lambda: _reached(b, "private", "cone", 1) and _reached(a, "private", "cone", 1),
               30, "a and b private with a relay")
    with a.client() as c:
        c.connect_peer(b.peer_id, timeout=10)
    _direct(a, b)
    row = a.peer_row(b.peer_id)
    assert row["addrs"][0].split("/")[2] == net.tb.host("b").addr  # b's LAN address


@pytest.mark.parametrize("case", ["lone_bootstrap", "lone_bootstrap_rst"])
def test_a_network_whose_only_public_daemon_is_its_bootstrap(natnet, case):
    # issue 15: the bootstrap learns it is public from the NATed volunteers' dial-backs,
    # relays for them with default settings, and they meet and punch through it
    net = natnet(case)
    boot = net.start("bootstrap")
    boot.wait_running()
    a, b = net.start("a", bootstrap=[boot.addr]), net.start("b", bootstrap=[boot.addr])
    a.wait_running()
    b.wait_running()
    r = wait_until(lambda: _reached(boot, "public", "none"), 30, "bootstrap public")
    assert r["relay_service"]["active"] and r["reason"].startswith("dial-back by")
    for d in (a, b):
        wait_until(lambda d=d: _reached(d, "private", "cone", 1), 30, f"{d.name} reserved")
        assert d.reach()["reservations"][0]["relay"] == boot.peer_id
    with a.client() as c:
        c.connect_peer(b.peer_id, timeout=10)
    _direct(a, b)
    wait_until(lambda: boot.reach()["relay_service"]["circuits"] == 0, 20,
               "relayed connection retired")


def test_with_no_public_node_a_reachable_volunteer_relays_else_they_say_why(natnet):
    net = natnet("none_public")
    _a, b, c = (net.tb.host(n) for n in "abc")
    # nobody to relay yet: a cannot reach b, and says exactly why
    da = net.start("a", bootstrap=[f"/ip4/{b.public_ip}/tcp/4001/p2p/{_peer_id_of(net, 'b')}"])
    db = net.daemons["b"]
    da.wait_running()
    with da.client() as cl:
        with pytest.raises(PeerUnreachableError, match="no relay known"):
            cl.connect_peer(db.peer_id, timeout=3)
    # c forwarded its port on its router: the others' dial-backs reach it, so it relays
    dc = net.start("c")
    dc.wait_running()
    c_addr = f"/ip4/{c.public_ip}/tcp/4001/p2p/{dc.peer_id}"
    for d in (da, db):
        with d.client() as cl:
            cl.connect_peer(c_addr, timeout=10)
    wait_until(lambda: _reached(dc, "public", "cone"), 30, "c public through its port forward")
    for d in (da, db):
        wait_until(lambda d=d: _reached(d, "private", "cone", 1), 30, f"{d.name} reserved on c")
    with da.client() as cl:
        cl.connect_peer(db.peer_id, timeout=10)
    _direct(da, db)


def _peer_id_of(net, name: str) -> str:
    """Start ``name`` (no bootstrap) and return its peer id."""
    d = net.start(name)
    d.wait_running()
    return d.peer_id


def test_lattice_status_shows_reachability_and_relay_service(natnet):
    net = natnet("public_x_cone")
    boot = net.start("bootstrap")
    boot.wait_running()
    relay = net.start("relay", bootstrap=[boot.addr])
    b = net.start("b", bootstrap=[boot.addr])
    relay.wait_running()
    b.wait_running()
    net.wait_until(lambda: _reached(relay, "public", "none"), 20, "relay public")
    net.wait_until(lambda: _reached(b, "private", "cone", 1), 20, "b private, with a relay")
    out = subprocess.run([sys.executable, "-m", "lattice.cli", "--socket", str(relay.socket),
                          "status"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("reachable "))
    assert "public" in line and "via direct" in line
    assert any(x.startswith("relaying ") for x in out.stdout.splitlines())
    out = subprocess.run([sys.executable, "-m", "lattice.cli", "--socket", str(b.socket),
                          "status"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("reachable "))
    assert "private (behind a cone NAT that drops)" in line and "via relay" in line


def test_upnp_with_no_gateway_finds_none_and_says_so(natnet):
    # the testbed has no UPnP gateway: discovery's multicast stays in b's namespace
    from lattice.net.nat.upnp import upnp_map

    net = natnet("public_x_cone")
    assert net.tb.host("b").call(lambda: upnp_map(4001)) == ("none", None,
                                                              "no UPnP gateway found")


def _sync_sessions(daemon) -> dict:
    """What a daemon's replication says of its sessions, for a failure message."""
    with daemon.client() as c:
        sync = c.state_stats()["sync"]["sync"]
    return {"sessions": sync.get("sessions"), "failed_dials": sync.get("failed_dials"),
            "peers": daemon.peers()}
