"""How a node shows itself and sees its peers: its member record in the replicated state
(name, version, reachability, addresses, capabilities, heartbeat), peer connect and
disconnect events published to local subscribers, peers' round-trip times, and which
connections the connection manager must keep.

Each `serve_*`/`measure_*`/`fan_out_*` here is a task of the node's nursery; a peer that
does not answer a ping costs only its RTT; anything else propagates.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from lattice.core.state import Change, LocalStateError, Set
from lattice.net import crdt_sync
from lattice.net.streams import CONNECTED, DISCONNECTED, PeerEvents
from latticed import __version__

if TYPE_CHECKING:
    from latticed.node import Node

log = logging.getLogger("latticed")


@dataclass(frozen=True)
class PresenceConfig:
    """How often we show ourselves and measure peers."""

    heartbeat_interval: float = 0.0
    """Our member record's heartbeat is refreshed this often, seconds; 0: only when the
    record is written. Liveness comes from [membership] (O(1) messages per daemon per
    second); a replicated heartbeat costs every daemon O(N)."""
    ping_interval: float = 0.0
    """Peers' round-trip time is re-measured by an echo stream this often, seconds; 0:
    never after the first (on connect). Yamux pings every connection itself (every
    `lattice.net.host.YAMUX_PING_INTERVAL_S`; `Libp2pNode.connections` shows it); an
    echo stream per peer every 15 s cost each daemon O(connections) stream setups, the
    largest share of its idle CPU at 96 daemons (issue 16)."""


def member_record(node: Node) -> dict[str, Any]:
    """Our whole member record, as of now (the heartbeat's first write)."""
    cfg = node.config
    return {
        "name": cfg["node.name"][:64],
        "version": __version__,
        **reachability(node),
        "capabilities": {"cpus": os.cpu_count() or 1,
                         "tasks": list(cfg["jobs.accept_tasks"])[:64]},
    }


def reachability(node: Node) -> dict[str, Any]:
    """The member-record fields that say how peers reach us."""
    reach = node.nat.status() if node.nat is not None else {}
    words = reach.get("reachability", "unknown")
    if words == "private" and reach.get("nat") not in (None, "unknown", "none"):
        words = f"private-{reach['nat']}"
    if node.nat is not None:
        addrs = node.nat.advertised_addrs()
    else:
        assert node.host is not None
        addrs = node.host.advertised_addrs()
    return {"reachability": words[:32], "addrs": list(addrs)[:16]}


def publish_reachability(node: Node) -> None:
    if node.sync is None:
        return
    try:
        changes: list[Change] = [Set("member/peer_id", node.identity.peer_id)]
        node.sync.write(changes + [Set(f"member/{k}", v) for k, v in reachability(node).items()])
    except LocalStateError as e:
        log.warning("could not publish reachability in our member record: %s", e)


async def serve_heartbeat(node: Node) -> None:
    assert node.store is not None and node.sync is not None
    await crdt_sync.serve_heartbeat(
        node.store, lambda: member_record(node),
        interval=node.config.build(PresenceConfig).heartbeat_interval, sync=node.sync)


def protected_peers(node: Node) -> set[str]:
    """Connections the connection manager never trims: our DHT neighbours (the k
    closest in the routing table), the sync mesh, relays holding a reservation for us,
    and the partners of the jobs we run."""
    out: set[str] = set()
    if node.dht is not None:
        out.update(node.dht.table.closest(node.dht.table.local_key))
    if node.sync is not None:
        out |= node.sync.hub.mesh_peers()
    if node.nat is not None:
        out.update(r.relay for r in node.nat.reservations.values())
    if node.jobs is not None:
        out |= node.jobs.partners()
    return out


async def fan_out_peer_events(node: Node, events: PeerEvents) -> None:
    """Peer connects and disconnects to the log and the local `peers` topic; a new peer
    gets its RTT measured at once."""
    with events:
        async with trio.open_nursery() as nursery:
            async for ev in events:
                if ev.kind == CONNECTED:
                    nursery.start_soon(measure_one, node, ev.peer_id)
                elif ev.kind != DISCONNECTED:
                    continue  # lagged: subscribers re-read peers.list on their own
                log.info("peer=%s %s (%s %s)", ev.peer_id, ev.kind, ev.direction, ev.addr)
                node.bus.publish("peers", {"event": ev.kind, "peer_id": ev.peer_id,
                                           "direction": ev.direction, "addr": ev.addr})


async def measure_one(node: Node, peer_id: str) -> None:
    assert node.host is not None
    await node.host.measure_rtt(peer_id)


async def measure_rtts(node: Node) -> None:
    """Re-measure each connected peer's RTT once per ping interval (> 0), spread over
    the interval: all at once, every node of a network pinged all its peers in the same
    instant, a burst of stream setups that delayed everything else."""
    host = node.host
    assert host is not None
    interval = node.config.build(PresenceConfig).ping_interval
    async with trio.open_nursery() as nursery:
        while True:
            peers = host.connected_peers()
            if not peers:
                await trio.sleep(interval)
                continue
            for peer_id in peers:
                await trio.sleep(interval / len(peers))
                nursery.start_soon(measure_one, node, peer_id)
