"""docker/compose.lone.yaml: a network whose only public daemon is its bootstrap, every
volunteer at home, one behind a router that rejects (issue 15). With default settings
the bootstrap learns from the volunteers' dial-backs that it is public and relays for
them; they reserve on it, meet through it by peer id and punch to a direct connection.

Real containers and real time: each wait polls the daemons (`lattice … --json` through
`docker exec`) with a deadline.
"""

from __future__ import annotations

import functools

import pytest

from lattice.testing.daemons import wait_for

pytestmark = [pytest.mark.testnet, pytest.mark.slow]
poll = functools.partial(wait_for, interval=0.5)


def test_the_lone_bootstrap_learns_it_is_public_and_relays(lone_testnet):
    net = lone_testnet

    def public():
        r = net.lattice("bootstrap", "status")["reachability"]
        return r if r["reachability"] == "public" else None

    r = poll(public, 90, "the bootstrap to learn it is public")
    assert r["relay_service"]["active"] and r["reason"].startswith("dial-back by")

    def reserved(service):
        r = net.lattice(service, "status")["reachability"]
        return r if r["reachability"] == "private" and r["reservations"] else None

    boot = net.peer_id("bootstrap")
    x1 = poll(lambda: reserved("worker-x1"), 90, "worker-x1's relay slot")
    y1 = poll(lambda: reserved("worker-y1"), 90, "worker-y1's relay slot")
    assert x1["reservations"][0]["relay"] == y1["reservations"][0]["relay"] == boot
    assert x1["filtering"] == "reject" and y1["filtering"] == "drop"


def test_volunteers_meet_through_the_bootstrap_and_punch(lone_testnet):
    net = lone_testnet
    y1 = net.peer_id("worker-y1")

    def connection():
        row = next((p for p in net.lattice("worker-x1", "peers") if p["peer_id"] == y1), None)
        return None if row is None else row["connection"]

    def reserved():
        r = net.lattice("worker-x1", "status")["reachability"]
        return r["reservations"] and net.lattice("worker-y1", "status")["reachability"][
            "reservations"]

    poll(reserved, 90, "both workers' relay slots")
    out = net.run("worker-x1", "lattice", "peers", "connect", y1)
    assert out.returncode == 0, out.stderr
    poll(lambda: connection() == "direct", 30, "x1 -> y1 direct")
