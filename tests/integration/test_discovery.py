"""Discovery across real daemons: one bootstrap address is enough to find everyone,
records put anywhere are readable everywhere within log2(N)+2 hops, and survive churn."""

import json
import math
import random
import signal
import time

import pytest

import lattice
from lattice.client.localnet import LocalNet
from lattice.testing.daemons import run_cli, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_24_daemons_find_each_other_and_every_record_everywhere_then_survive_churn(tmp_path):
    n = 24
    bound = math.ceil(math.log2(n)) + 2
    rng = random.Random(3)
    with LocalNet(n, tmp_path / "net", log_level="warning", ready_timeout=90) as net:
        net.start()
        clients = [lattice.connect(node.socket, timeout=60) for node in net.nodes]
        try:
            # everyone bootstrapped off node 0 only; lookups fill the routing tables
            # (one deadline for all: on a loaded 2-core machine 24 daemons need a while)
            deadline = time.monotonic() + 150
            for i, c in enumerate(clients):
                wait_for(lambda: (dht := c.status()["dht"])["joined"]
                         and dht["routing_table_size"] >= n // 2,
                         max(1.0, deadline - time.monotonic()),
                         f"node {i} to join the DHT", interval=0.2,
                         detail=lambda: {k: c.status()["dht"].get(k) for k in (
                             "joined", "routing_table_size", "request_failures",
                             "requests_out", "inflight_out")})

            keys = {}
            for j in range(6):
                writer = rng.randrange(n)
                key = f"rec-{j}"
                r = clients[writer].dht_put(key, {"from": writer, "j": j}, 600)
                assert r["stored_at"] >= 3 and r["hops"] <= bound
                keys[key] = (writer, net.nodes[writer].peer_id)

            for key, (writer, publisher) in keys.items():
                for i, c in enumerate(clients):
                    # as users get it (a replica answers from its store), and --fresh
                    # over the network, where the hops are counted
                    for fresh in (False, True):
                        got = c.dht_get(key, fresh=fresh)
                        assert [rec["publisher"] for rec in got["records"]] == [publisher], \
                            (key, i, fresh)
                        assert got["records"][0]["value"]["from"] == writer
                        assert got["hops"] <= bound, f"{got['hops']} hops for {key} from node {i}"
                        assert fresh is False or got["hops"] >= 1

            # peer routing: any node resolves any other's addresses by peer id
            target = net.nodes[rng.randrange(1, n)]
            found = clients[rng.randrange(1, n)].find_peer(target.peer_id)
            assert target.addr.rsplit("/p2p/", 1)[0] in found["addrs"]

            # churn: kill a third of the nodes (not the bootstrap) without warning
            doomed = rng.sample(range(1, n), n // 3)
            for i in doomed:
                net.nodes[i].process.send_signal(signal.SIGKILL)
                net.nodes[i].process.wait()
            alive = [i for i in range(n) if i not in doomed]
            for key, (writer, publisher) in keys.items():
                for i in alive:
                    got = clients[i].dht_get(key)
                    assert [rec["publisher"] for rec in got["records"]] == [publisher], (key, i)
        finally:
            for c in clients:
                c.close()


def test_bad_records_are_refused(daemons):
    a = daemons()
    a.wait_running()
    with a.client() as c:
        with pytest.raises(lattice.LatticeError) as e:
            c.dht_put("big", "x" * 100_000, 60)
        assert type(e.value).__name__ == "InvalidArgumentError"
        with pytest.raises(lattice.LatticeError) as e:
            c.dht_put("forever", 1, 10 * 86400)
        assert "ttl" in str(e.value)
        with pytest.raises(lattice.LatticeError):
            c.dht_put("/nonsense-namespace/x", 1, 60)


def test_dht_get_from_the_shell_answers_from_a_replica_or_fresh_from_the_network(daemons):
    a = daemons("--no-mdns")
    a.wait_running()
    b = daemons("--no-mdns", "--bootstrap", a.addr())
    b.wait_running()
    # the put must find b in a's table for b to be a replica: wait for both sides
    for d, what in ((b, "b to know a"), (a, "a to know b")):
        with d.client() as c:
            wait_for(lambda: c.status()["dht"]["routing_table_size"] >= 1, 20, what)
    put = run_cli("dht", "put", "greeting", "hello", "--ttl", "600", socket=a.socket)
    assert put.returncode == 0, put.stderr
    # b is among the replicas (two nodes): its own store answers
    local = run_cli("dht", "get", "greeting", "--json", socket=b.socket)
    assert local.returncode == 0, local.stderr
    doc = json.loads(local.stdout)
    assert [r["value"] for r in doc["records"]] == ["hello"] and doc["hops"] == 0
    assert doc["records"][0]["publisher"] == a.peer_id()
    # --fresh asks a, one hop away
    fresh = run_cli("dht", "get", "greeting", "--fresh", "--json", socket=b.socket)
    assert fresh.returncode == 0, fresh.stderr
    doc = json.loads(fresh.stdout)
    assert [r["value"] for r in doc["records"]] == ["hello"] and doc["hops"] == 1
    # the human table names the publisher; an unknown key says so and exits 1
    table = run_cli("dht", "get", "greeting", socket=b.socket)
    assert table.returncode == 0 and a.peer_id() in table.stdout
    missing = run_cli("dht", "get", "nobody-wrote-this", socket=b.socket)
    assert missing.returncode == 1 and "no live records" in missing.stderr


def test_a_daemon_on_a_wildcard_address_announces_addresses_peers_can_dial(daemons):
    a = daemons("--no-mdns", "--listen", "/ip4/0.0.0.0/tcp/0")
    a.wait_running()
    with a.client() as ca:
        status = ca.status()
    port = next(x for x in status["listen_addrs"] if "/0.0.0.0/" in x).split("/")[4]
    advertised = [x.rsplit("/p2p/", 1)[0] for x in status["advertised_addrs"]]
    assert not any("/0.0.0.0/" in x for x in advertised), advertised
    # the wildcard listener is announced as this host's interface address(es)
    assert any(x.split("/")[4] == port for x in advertised), (port, advertised)
    # a peer that bootstraps off it (over loopback) learns the same addresses from its
    # DHT messages, never the wildcard
    b = daemons("--no-mdns", "--bootstrap", f"/ip4/127.0.0.1/tcp/{port}/p2p/{status['peer_id']}")
    b.wait_running()
    with b.client() as cb:
        wait_for(lambda: cb.status()["dht"]["routing_table_size"] >= 1, 20, "b to know a")
        found = cb.find_peer(status["peer_id"])["addrs"]
    assert set(advertised) <= set(found), (advertised, found)
    assert not any("/0.0.0.0/" in x for x in found), found


def test_dht_traffic_is_counted_by_protocol_with_every_other(tmp_path):
    # a volunteer's `status` (and the metrics endpoint) say what the DHT moved
    with LocalNet(2, tmp_path / "net", log_level="warning") as net:
        net.start()
        with lattice.connect(net.nodes[0].socket, timeout=60) as c:
            wait_for(lambda: c.status()["dht"]["routing_table_size"] >= 1, 60,
                     "the other daemon in the routing table", interval=0.2)
            assert c.dht_put("counted", "x" * 1000, 60)["stored_at"] >= 1
            kad = c.status()["transfers"]["bytes"]["/lattice/kad/1"]
        assert kad["out"] > 1000 and kad["in"] > 0
