"""Routing table and lookup iterator, without any network.

A simulated network of pure routing tables answers lookups instantly, which is enough
to check convergence and count hops.
"""

import math
import random

import pytest

from lattice.core.identity import Identity
from lattice.core.kademlia import (
    FINISHED,
    WAITING,
    Lookup,
    Mode,
    ObserveStatus,
    RoutingTable,
    bucket_index,
    key_hash,
    peer_hash,
    random_target_in_bucket,
)


def ids(n, seed=0):
    rnd = random.Random(seed)
    return [Identity(rnd.randbytes(32)).peer_id for _ in range(n)]


PEERS = ids(400)
LOCAL = PEERS[0]


def test_client_mode_peers_never_enter_the_table():
    t = RoutingTable(LOCAL)
    assert t.observe(PEERS[1], Mode.CLIENT, 0.0).status is ObserveStatus.IGNORED
    assert PEERS[1] not in t
    assert t.observe(PEERS[2], Mode.SERVER, 0.0).status is ObserveStatus.ADDED
    # a server that turns client (lost reachability) is dropped
    assert t.observe(PEERS[2], Mode.CLIENT, 1.0).status is ObserveStatus.REMOVED
    assert len(t) == 0
    assert t.observe(LOCAL, Mode.SERVER, 0.0).status is ObserveStatus.IGNORED


def _same_bucket(local, n):
    """n peers that fall in one bucket of ``local`` (the far half of the key space)."""
    lk = peer_hash(local)
    return [p for p in PEERS[1:] if bucket_index(lk, peer_hash(p)) == 255][:n]


def test_full_bucket_caches_newcomers_and_pings_a_stale_head():
    k = 3
    t = RoutingTable(LOCAL, k=k, liveness_interval=30.0)
    a, b, c, d, e = _same_bucket(LOCAL, 5)
    for i, p in enumerate((a, b, c)):
        assert t.observe(p, Mode.SERVER, float(i)).status is ObserveStatus.ADDED
    # head seen recently: newcomer waits in the cache, nobody is pinged
    assert t.observe(d, Mode.SERVER, 10.0) == t.observe(d, Mode.SERVER, 10.0)
    assert t.observe(d, Mode.SERVER, 10.0).ping is None
    # head stale: ping it (once, until that ping is done)
    first = t.observe(e, Mode.SERVER, 100.0)
    assert first.status is ObserveStatus.CACHED and first.ping == a
    assert t.observe(d, Mode.SERVER, 100.0).ping is None
    # the head answered: it moves to the tail, the newcomer stays cached
    assert t.observe(a, Mode.SERVER, 101.0).status is ObserveStatus.UPDATED
    assert set(t.peers()) == {a, b, c}
    # a failed peer is replaced by the most recent replacement
    assert t.remove(b)
    assert set(t.peers()) == {a, c, d}
    assert t.remove(c)
    assert set(t.peers()) == {a, d, e}


def test_closest_orders_by_xor_distance():
    t = RoutingTable(LOCAL, k=20)
    for p in PEERS[1:200]:
        t.observe(p, Mode.SERVER, 0.0)
    target = key_hash("/v/x")
    got = t.closest(target, 5)
    assert got == sorted(t.peers(), key=lambda p: peer_hash(p) ^ target)[:5]
    assert len(got) == 5


def test_random_targets_land_in_their_bucket():
    lk = peer_hash(LOCAL)
    rnd = random.Random(1)
    for i in (0, 7, 200, 255):
        assert bucket_index(lk, random_target_in_bucket(lk, i, rnd.getrandbits(256))) == i


def test_lookup_asks_alpha_at_a_time_and_finishes_when_closest_answered():
    target = key_hash("/v/t")
    seeds = PEERS[1:10]
    lk = Lookup(target, seeds, local_peer_id=LOCAL, num_results=4, alpha=3)
    first = lk.next(0.0)
    ordered = sorted(seeds, key=lambda p: peer_hash(p) ^ target)
    assert first == ordered[:3]
    assert lk.next(0.0) is WAITING
    lk.on_success(first[0], [])
    assert lk.next(0.0) == [ordered[3]]
    for p in first[1:] + [ordered[3]]:
        lk.on_success(p, [])
    assert lk.next(0.0) is FINISHED
    assert lk.result() == ordered[:4]
    assert lk.hops == 1


def test_lookup_timeouts_free_slots_and_failures_are_skipped():
    target = key_hash("/v/t")
    seeds = PEERS[1:8]
    lk = Lookup(target, seeds, local_peer_id=LOCAL, num_results=3, alpha=2,
                request_timeout=5.0)
    a, b = lk.next(0.0)
    lk.on_failure(a)
    (c,) = lk.next(1.0)
    assert lk.next(1.0) is WAITING
    assert lk.next_deadline() == 5.0
    # b times out: its slot goes to the next candidate, a late answer still counts
    d_e = lk.next(5.0)
    assert len(d_e) == 1
    lk.on_success(b, [])
    lk.on_success(c, [])
    lk.on_success(d_e[0], [])
    assert lk.next(6.0) is FINISHED
    assert a not in lk.result() and b in lk.result()


def test_stalled_lookup_widens_to_num_results():
    target = key_hash("/v/s")
    seeds = PEERS[1:30]
    lk = Lookup(target, seeds, local_peer_id=LOCAL, num_results=10, alpha=2)
    a, b = lk.next(0.0)
    closer = next(p for p in PEERS[30:] if peer_hash(p) ^ target < peer_hash(a) ^ target)
    lk.on_success(a, [closer])
    assert lk.next(0.0) == [closer]  # progress: still alpha in flight
    lk.on_success(b, [])
    lk.on_success(closer, [])
    # alpha answers in a row with nobody closer: stalled, the rest of the num_results
    # closest are asked at once
    assert len(lk.next(0.0)) == 10 - 3


def test_lookup_asks_no_one_beyond_the_closest_it_needs():
    target = key_hash("/v/q")
    seeds = PEERS[1:30]
    lk = Lookup(target, seeds, local_peer_id=LOCAL, num_results=3, alpha=3)
    first = lk.next(0.0)
    assert len(first) == 3
    lk.on_success(first[0], [])
    assert lk.next(0.0) is WAITING  # the two others in flight suffice
    lk.on_failure(first[1])
    (replacement,) = lk.next(0.0)  # a failure frees a place among the closest
    assert replacement not in first
    lk.on_success(first[2], [])
    lk.on_success(replacement, [])
    assert lk.next(0.0) is FINISHED and lk.requests_sent == 4


def test_lookup_bounds_its_candidates():
    lk = Lookup(key_hash("/v/b"), [], local_peer_id=LOCAL, num_results=4, max_candidates=10)
    lk2 = Lookup(key_hash("/v/b"), PEERS[1:3], local_peer_id=LOCAL, num_results=4,
                 max_candidates=10)
    (p, q) = lk2.next(0.0)[:2]
    lk2.on_success(p, PEERS[3:200])
    assert sum(1 for x in PEERS if lk2.knows(x)) <= 10
    assert lk.next(0.0) is FINISHED  # nothing to ask


class SimNetwork:
    """Every node's table holds what it would after hearing from everyone once."""

    def __init__(self, n, k, seed=0):
        self.peers = ids(n, seed)
        self.tables = {p: RoutingTable(p, k=k) for p in self.peers}
        rnd = random.Random(seed)
        for p, t in self.tables.items():
            others = [q for q in self.peers if q != p]
            rnd.shuffle(others)
            for q in others:
                t.observe(q, Mode.SERVER, 0.0)

    def lookup(self, start, target, k):
        t = self.tables[start]
        lk = Lookup(target, t.closest(target, k), local_peer_id=start, num_results=k)
        while (step := lk.next(0.0)) is not FINISHED:
            assert step is not WAITING  # every request is answered at once
            for p in step:
                lk.on_success(p, self.tables[p].closest(target, k))
        return lk


@pytest.mark.parametrize("n,k", [(256, 4), (256, 20)])
def test_simulated_lookups_converge_within_log_n_hops(n, k):
    sim = SimNetwork(n, k)
    rnd = random.Random(7)
    bound = math.ceil(math.log2(n)) + 2
    worst = 0
    for i in range(40):
        start = rnd.choice(sim.peers)
        target = key_hash(f"/v/key-{i}")
        lk = sim.lookup(start, target, k)
        truth = sorted((p for p in sim.peers if p != start), key=lambda p: peer_hash(p) ^ target)
        assert lk.result() == truth[:k]
        worst = max(worst, lk.hops)
    assert 1 <= worst <= bound


def test_small_networks_are_asked_in_one_round():
    # knowing fewer candidates than results wanted, all must be asked anyway: at once
    lk = Lookup(key_hash("/v/small"), PEERS[1:8], local_peer_id=LOCAL, num_results=20, alpha=3)
    first = lk.next(0.0)
    assert sorted(first) == sorted(PEERS[1:8])
    for p in first:
        lk.on_success(p, [])
    assert lk.next(0.0) is FINISHED
