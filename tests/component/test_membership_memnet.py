"""Failure detection over the in-memory network, seen through the members view."""

import random

import trio

from lattice.core.state import Set, StateLimits, StateStore
from lattice.net.membership import MembershipConfig, serve_membership
from lattice.testing.memnet import MemoryNetwork

CONFIG = MembershipConfig(probe_interval=1.0, probe_timeout=0.5, suspicion_timeout=3.0)


async def start(nursery, net, n, seed):
    peers, services = [], []
    for _ in range(n):
        peer = net.add_peer()
        await nursery.start(peer.serve)
        peers.append(peer)
    for i, peer in enumerate(peers):  # a ring with chords: not everyone is a neighbour
        for j in (1, 2):
            net.link_up(peer.peer_id, peers[(i + j) % n].peer_id)
    for i, peer in enumerate(peers):
        services.append(await nursery.start(
            lambda task_status, p=peer, k=i: serve_membership(
                p, config=CONFIG, clock=trio.current_time, rng=random.Random(seed + k),
                task_status=task_status)))
    return peers, services


async def seen_by_the_others(services, index, victim, status):
    """Every detector but the victim's own (``index``) says ``status`` of it, within
    40 s of virtual time (polled: the detectors publish no event per peer)."""
    with trio.fail_after(40):
        while not all(s.machine.status(victim) == status
                      for k, s in enumerate(services) if k != index):
            await trio.sleep(0.5)


async def test_a_hung_daemon_is_declared_dead_everywhere_and_alive_again_when_it_answers(
        nursery, autojump_clock, lattice_seed):
    net = MemoryNetwork(seed=lattice_seed)
    peers, services = await start(nursery, net, 8, lattice_seed)
    await trio.sleep(5)
    victim = peers[3].peer_id
    # a store whose members view takes liveness from the detector
    store = StateStore(peers[0].identity, limits=StateLimits(heartbeat_timeout=1.0))
    store.set_liveness(services[0].liveness)
    record = StateStore(peers[3].identity)
    env = record.apply_local([Set("member/peer_id", victim), Set("member/heartbeat", 0.0)],
                             trio.current_time())
    store.receive(env.raw, trio.current_time())
    # its heartbeat is stale, but the detector has news: alive
    assert store.members(trio.current_time())[victim]["alive"]
    net.stall(victim)
    await seen_by_the_others(services, 3, victim, "dead")
    assert not store.members(trio.current_time())[victim]["alive"]
    net.resume(victim)
    await seen_by_the_others(services, 3, victim, "alive")
    assert services[3].machine.incarnation >= 1  # it refuted its death
    member = store.members(trio.current_time())[victim]
    assert member["alive"] and member["age"] < 20


async def test_a_crashed_daemon_whose_connections_closed_is_declared_dead(
        nursery, autojump_clock, lattice_seed):
    net = MemoryNetwork(seed=lattice_seed)
    peers, services = await start(nursery, net, 6, lattice_seed)
    await trio.sleep(3)
    victim = peers[2].peer_id
    net.disconnect(victim)
    await seen_by_the_others(services, 2, victim, "dead")
    assert all(victim not in s.machine.neighbours() for k, s in enumerate(services) if k != 2)


async def test_a_malformed_probe_is_counted_and_the_service_keeps_going(
        nursery, autojump_clock, lattice_seed):
    from lattice.net.membership import PROTOCOL
    from lattice.net.streams import PeerError, recv_frame_or_eof, send_frame

    net = MemoryNetwork(seed=lattice_seed)
    peers, services = await start(nursery, net, 3, lattice_seed)
    stream = await peers[1].open_stream(peers[0].peer_id, PROTOCOL)
    await send_frame(stream, {"t": "ping", "n": "x", "g": []})
    try:
        assert await recv_frame_or_eof(stream) is None
    except PeerError:
        pass  # reset: the expected answer
    assert services[0].machine.counts["malformed"] == 1
    await trio.sleep(5)
    assert services[0].machine.counts["acks"] > 0


async def test_probes_ride_one_kept_stream_per_neighbour_and_a_lost_one_is_replaced(
        nursery, autojump_clock, lattice_seed):
    from lattice.net.membership import PROTOCOL

    net = MemoryNetwork(seed=lattice_seed)
    peers, services = await start(nursery, net, 6, lattice_seed)
    await trio.sleep(30)  # 30 probe rounds: each neighbour probed 7-8 times
    for s in services:
        assert s.machine.counts["pings"] >= 25
        # one stream to each neighbour, not one per message (table + probes)
        assert s.streams_opened == len(s.machine.neighbours())
        # (a probe sent while the services were starting may have gone unanswered)
        assert all(s.machine.status(p.peer_id) == "alive" for p in peers)
    opened = [s.streams_opened for s in services]
    suspected = [s.machine.counts["suspected"] for s in services]
    for stream in [s for s in peers[0].streams if s.protocol == PROTOCOL]:
        await stream.reset()  # every membership stream of one daemon, both ways
    await trio.sleep(30)
    assert [s.machine.counts["suspected"] for s in services] == suspected
    assert all(s.machine.status(peers[0].peer_id) == "alive" for s in services[1:])
    assert sum(s.streams_opened for s in services) > sum(opened)  # replaced, not given up
