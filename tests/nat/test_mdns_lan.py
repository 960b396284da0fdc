"""Daemons on one LAN find each other by mDNS, with no bootstrap peer (issue: "On a LAN,
mDNS finds local daemons without any bootstrap; on by default, `--no-mdns` turns it off").

natlab case `same_lan`: one home LAN (a router's switch: hosts reach each other directly,
multicast included) with hosts a, b, c, d and nothing public. Nobody is told about anyone.
a and b listen on the wildcard address (the shipped default, /ip4/0.0.0.0/tcp/4001: what
they announce must be their LAN address, not 0.0.0.0), c on its own address, d runs with
`--no-mdns`. Real network, real time: waits poll with deadlines (nothing to subscribe to).
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from lattice.testing.daemons import wait_for

pytestmark = pytest.mark.nat

CASE = "same_lan"
MDNS = ("224.0.0.251", 5353)
WILDCARD = "/ip4/0.0.0.0/tcp/4001"
# Measured: a, b and c are connected 1.4-2.4 s after all four report running (zeroconf
# probes for ~1.7 s before it announces); the bound leaves room for a loaded machine.
DISCOVERY_TIMEOUT = 15.0


def test_hosts_on_one_lan_reach_each_other_directly_multicast_included(natnet):
    """What the mDNS test stands on, with plain sockets: a home LAN passes a TCP
    connection between two of its hosts and a datagram to the mDNS group to all of them."""
    tb = natnet(CASE).tb
    a, b, c = tb.host("a"), tb.host("b"), tb.host("c")
    receivers = []
    for node in (b, c):
        r = node.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        r.bind(MDNS)  # the group address: unicast to the port does not count
        r.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                     struct.pack("4s4s", socket.inet_aton(MDNS[0]), socket.inet_aton(node.addr)))
        r.setblocking(False)
        receivers.append(r)
    sender = a.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(a.addr))
    heard: dict[int, tuple[bytes, str]] = {}

    def everyone_heard() -> bool:
        sender.sendto(b"lattice?", MDNS)  # datagrams may be lost: resend until heard
        for i, r in enumerate(receivers):
            try:
                data, (ip, _) = r.recvfrom(64)
                heard[i] = (data, ip)
            except BlockingIOError:
                pass
        return len(heard) == len(receivers)

    try:
        wait_for(everyone_heard, 5, "b and c hear a's datagram to the mDNS group", 0.05)
        assert set(heard.values()) == {(b"lattice?", a.addr)}

        listener = b.socket()
        listener.bind((b.addr, 7000))
        listener.listen(1)
        listener.settimeout(5)
        dialer = a.socket()
        dialer.settimeout(5)
        with listener, dialer:
            dialer.connect((b.addr, 7000))  # timed out before the router passed lan0 -> lan0
            conn, (ip, _) = listener.accept()
            conn.close()
        assert ip == a.addr
    finally:
        sender.close()
        for r in receivers:
            r.close()


def test_daemons_on_a_lan_find_each_other_by_mdns_and_not_one_with_no_mdns(natnet):
    net = natnet(CASE)
    finders = {"a": net.start("a", mdns=True, listen=WILDCARD),
               "b": net.start("b", mdns=True, listen=WILDCARD),
               "c": net.start("c", mdns=True)}
    quiet = net.start("d")  # --no-mdns, on the same LAN, reachable like the others
    everyone = [*finders.values(), quiet]
    for d in everyone:
        d.wait_running()
    running = time.monotonic()
    ids = {name: d.peer_id for name, d in finders.items()}

    def found_each_other() -> bool:
        # the whole window long: d finds nobody and nobody finds d
        seen = {d.name: {p["peer_id"]: p for p in d.peers()} for d in everyone}
        assert not seen["d"], f"d runs with --no-mdns but is connected to {list(seen['d'])}"
        assert not [n for n, s in seen.items() if quiet.peer_id in s], \
            f"d runs with --no-mdns but was found: {seen}"
        return all(set(ids.values()) - {ids[n]} <= set(seen[n]) for n in finders)

    net.wait_until(found_each_other, DISCOVERY_TIMEOUT,
                   "a, b and c each connected to the other two by mDNS", interval=0.2)
    took = time.monotonic() - running
    print(f"mDNS: a, b and c connected to each other {took:.1f} s after all were running")
    for name, d in finders.items():
        rows = {p["peer_id"]: p for p in d.peers()}
        for other in set(ids.values()) - {ids[name]}:
            assert rows[other]["connection"] == "direct", rows[other]

    # the peers mDNS found are the DHT's first peers: with no bootstrap anywhere, a value
    # put on a is read on c from the network
    for d in finders.values():
        net.wait_until(lambda d=d: d.status()["dht"]["routing_table_size"] >= 2, 15,
                       f"{d.name}'s DHT to hold the other two", interval=0.2)
    with finders["a"].client() as ca, finders["c"].client() as cc:
        assert ca.dht_put("lan-note", "hi from a", 600)["stored_at"] >= 1
        got = cc.dht_get("lan-note", fresh=True)
    assert [(r["publisher"], r["value"]) for r in got["records"]] == [(ids["a"], "hi from a")]

    # d stayed alone because it announces nothing, not because it cannot be reached
    with finders["a"].client() as c:
        c.connect_peer(quiet.addr, timeout=10)
    net.wait_until(lambda: quiet.peer_row(ids["a"]) is not None, 5, "d sees a after a dials it")
