"""The connection manager over the in-memory network: water marks, protected peers."""

import random

import trio

from lattice.core.connections import WaterMarks
from lattice.net.connmgr import serve_connection_manager
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
