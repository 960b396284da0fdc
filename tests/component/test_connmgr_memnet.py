"""The connection manager over the in-memory network: water marks, protected peers."""

import random

import trio

from lattice.core.connections import WaterMarks
from lattice.net.connmgr import serve_connection_manager
from lattice.net.membership import MembershipConfig, serve_membership
from lattice.testing.memnet import MemoryNetwork


async def test_a_crowded_daemon_trims_to_low_water_and_keeps_protected_peers(
        nursery, autojump_clock, lattice_seed):
    net = MemoryNetwork(seed=lattice_seed)
    hub = net.add_peer()
    await nursery.start(hub.serve)
    others = [net.add_peer() for _ in range(20)]
    protected = {others[0].peer_id, others[1].peer_id}
    manager = await nursery.start(lambda task_status: serve_connection_manager(
        hub, WaterMarks(low=6, high=10, grace=5.0), protected=lambda: protected,
        clock=trio.current_time, rng=random.Random(lattice_seed), interval=1.0,
        task_status=task_status))
    for peer in others:
        net.link_up(hub.peer_id, peer.peer_id)
    await trio.testing.wait_all_tasks_blocked()
    assert len(hub.connected_peers()) == 20  # all within their grace period
    await trio.sleep(7)
    assert len(hub.connected_peers()) == 6
    assert protected <= set(hub.connected_peers())
    assert manager.statistics()["trimmed"] == 14


async def test_trimmed_connections_stay_closed_and_their_peers_stay_alive(
        nursery, autojump_clock, lattice_seed):
    # The failure detector probes a peer once more after its connection closes (crashes
    # close connections too); over a real network that probe dials it again. After a
    # trim the hub says bye first, so neither side redials, and nobody is suspected.
    net = MemoryNetwork(seed=lattice_seed)
    peers = [net.add_peer() for _ in range(13)]
    detectors = await _serve_with_detectors(nursery, peers, lattice_seed)
    hub, others = peers[0], peers[1:]
    manager = await nursery.start(lambda task_status: serve_connection_manager(
        hub, WaterMarks(low=4, high=8, grace=5.0), protected=set, clock=trio.current_time,
        rng=random.Random(lattice_seed), interval=1.0, before_close=detectors[0].say_bye,
        task_status=task_status))
    for peer in others:
        net.link_up(hub.peer_id, peer.peer_id)
    await trio.sleep(7)
    assert len(hub.connected_peers()) == 4 and manager.statistics()["trimmed"] == 8
    await trio.sleep(60)  # twenty probe rounds of every detector
    assert len(hub.connected_peers()) == 4 and manager.statistics()["trim_rounds"] == 1
    for detector in detectors:
        assert detector.statistics()["suspected"] == 0
    assert sum(d.statistics()["byes"] for d in detectors) == 8


async def test_a_bye_to_a_peer_already_gone_does_not_dial_it_again(
        nursery, autojump_clock, lattice_seed):
    # The trim chose it, then its connection closed before the bye went out: opening a
    # stream to say bye would dial it again only to close the new connection.
    net = MemoryNetwork(seed=lattice_seed)
    hub, gone, kept = net.add_peer(), net.add_peer(), net.add_peer()
    detectors = await _serve_with_detectors(nursery, [hub, gone, kept], lattice_seed)
    net.link_up(hub.peer_id, gone.peer_id)
    net.link_up(hub.peer_id, kept.peer_id)
    await hub.disconnect(gone.peer_id)
    await detectors[0].say_bye([gone.peer_id, kept.peer_id])
    await trio.testing.wait_all_tasks_blocked()
    assert detectors[1].statistics()["byes"] == 0
    assert detectors[2].statistics()["byes"] == 1


async def _serve_with_detectors(nursery, peers, seed):
    """Serve each peer with a fast failure detector (1 s probes); returns the detectors."""
    detectors = []
    for i, peer in enumerate(peers):
        await nursery.start(peer.serve)
        detectors.append(await nursery.start(lambda task_status, p=peer, k=i: serve_membership(
            p, config=MembershipConfig(probe_interval=1.0, probe_timeout=0.5,
                                       suspicion_timeout=3.0),
            clock=trio.current_time, rng=random.Random(seed + k), task_status=task_status)))
    return detectors
