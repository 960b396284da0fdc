"""What a developer gets from one compose command (docker/compose.yaml): a Lattice
network across real NAT routers that finds itself, shares its state, connects its
NATed workers directly where the NATs allow it, and trains a model together.

Real containers and real time: each wait polls the daemons (`lattice … --json` through
`docker exec`) with a deadline.
"""

from __future__ import annotations

import functools

import pytest

from lattice.testing.daemons import wait_for
from lattice.testing.testnet import DAEMONS, WORKERS

pytestmark = [pytest.mark.testnet, pytest.mark.slow]
# a condition inside the containers: no event crosses `docker exec`, so it is polled
poll = functools.partial(wait_for, interval=0.5)

NATS = {"worker-a1": "cone", "worker-a2": "cone", "worker-b1": "cone",
        "worker-c1": "symmetric"}
FILTERING = {"worker-a1": "drop", "worker-a2": "drop", "worker-b1": "reject",
             "worker-c1": "drop"}


# what each daemon should learn of its own reachability, and show as a member
EXPECTED = {"bootstrap": ("public", None), "relay": ("public", None),
            "worker-a1": ("private", "cone"), "worker-a2": ("private", "cone"),
            "worker-b1": ("private", "cone"), "worker-c1": ("private", "symmetric")}


def test_every_daemon_knows_how_it_is_reachable(testnet):
    def as_expected(service, r):
        reachability, nat = EXPECTED[service]
        return r["reachability"] == reachability and (
            nat is None or (r.get("nat") == nat and len(r.get("reservations") or ()) >= 1))

    def settled():
        reach = {s: testnet.lattice(s, "status")["reachability"] for s in DAEMONS}
        return reach if all(as_expected(s, r) for s, r in reach.items()) else None

    reach = poll(settled, 90, "public infrastructure, NATed workers with relay slots")
    for worker in WORKERS:
        assert reach[worker]["reachable_via"] == ["relay"]
        assert reach[worker]["filtering"] == FILTERING[worker]  # router-b rejects
        assert all("/p2p-circuit/" in r["addr"] for r in reach[worker]["reservations"])


def test_every_daemon_sees_every_member_by_name_and_reachability(testnet):
    # the fixture waited until every daemon listed every other one alive
    ids = {testnet.peer_id(s): s for s in DAEMONS}
    shown = {s: "-".join(filter(None, EXPECTED[s])) for s in DAEMONS}  # "private-cone"

    def as_shown_behind_the_symmetric_nat():
        members = testnet.lattice("worker-c1", "members")
        seen = {ids[p]: (m["name"], m["reachability"]) for p, m in members.items()}
        return seen == {s: (s, shown[s]) for s in DAEMONS}

    poll(as_shown_behind_the_symmetric_nat, 60, "member records with names and NATs")


def test_nated_workers_connect_by_peer_id_direct_where_the_nats_allow(testnet):
    b1, c1 = testnet.peer_id("worker-b1"), testnet.peer_id("worker-c1")

    def connection(service, peer):
        row = next((p for p in testnet.lattice(service, "peers") if p["peer_id"] == peer),
                   None)
        return None if row is None else row["connection"]

    # cone x cone, b1's router rejecting unsolicited SYNs with a RST: through a relay
    # first, then a hole punch
    out = testnet.run("worker-a1", "lattice", "peers", "connect", b1)
    assert out.returncode == 0 and b1 in out.stdout, out.stderr
    poll(lambda: connection("worker-a1", b1) == "direct", 15, "a1 -> b1 direct")
    peers_of_b1 = {p["peer_id"]: p for p in testnet.lattice("worker-b1", "peers")}
    assert peers_of_b1[testnet.peer_id("worker-a1")]["connection"] == "direct"

    # cone x symmetric: birthday probing (c1 opens many mappings, a1 probes for one)
    out = testnet.run("worker-a1", "lattice", "peers", "connect", c1)
    assert out.returncode == 0, out.stderr

    def c1_decided():
        recent = testnet.lattice("worker-c1", "status")["reachability"]["holepunch"]["recent"]
        return next((r for r in recent if r["peer"] == testnet.peer_id("worker-a1")), None)

    record = poll(c1_decided, 30, "c1's hole-punch session with a1")
    assert record["plan"] == "birthday", record
    poll(lambda: connection("worker-a1", c1) == "direct", 30, "a1 -> c1 direct")

    # one LAN, no router in between: found by mDNS, connected directly
    a2 = testnet.peer_id("worker-a2")
    poll(lambda: connection("worker-a1", a2) == "direct", 30, "a1 -> a2 on their LAN")


def test_the_workers_train_across_the_nats_and_the_model_is_fetched_behind_one(testnet):
    job = testnet.lattice("worker-b1", "jobs", "submit", "train", "--task", "digits-softmax",
                          "--min-peers", "4", "--steps", "60", "--seed", "3")
    job_id = job["job_id"]
    watched = testnet.run("worker-b1", "lattice", "jobs", "watch", job_id, timeout=300)
    assert watched.returncode == 0, watched.stdout + watched.stderr

    done = testnet.lattice("worker-c1", "jobs", "get", job_id)
    assert done["status"] == "done", done
    worker_ids = {testnet.peer_id(w) for w in WORKERS}
    assert set(done["participants"]) == worker_ids  # the symmetric-NAT worker included
    model_id = done["model"]
    model = done["models"][model_id]
    assert model["metrics"]["participants"] == 4 and model["missing"] == []
    assert model["metrics"]["accuracy"] > 0.85

    # any daemon fetches the model by id, verified against it, from behind its NAT
    out = testnet.run("worker-c1", "lattice", "models", "get", model_id, "-o", "/tmp/model.npz")
    assert out.returncode == 0, out.stderr
    check = testnet.run("worker-c1", "python3", "-c",
                        "import numpy; m = numpy.load('/tmp/model.npz'); "
                        "print(sum(a.size for a in m.values()))")
    assert check.returncode == 0 and int(check.stdout) > 0, check.stderr
