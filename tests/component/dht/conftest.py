"""A swarm of DHT nodes on the in-memory network, with virtual wall-clock time."""

from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from lattice.core.kademlia import Mode
from lattice.net.dht import DHTConfig, KademliaDHT, serve_dht
from lattice.testing.memnet import MemoryNetwork, MemoryPeer

T0 = 1_700_000_000.0


def wall_clock() -> float:
    """Unix time that advances with trio's (autojump) clock."""
    return T0 + trio.current_time()


@dataclass
class Swarm:
    nursery: trio.Nursery
    net: MemoryNetwork = field(default_factory=MemoryNetwork)
    nodes: list[KademliaDHT] = field(default_factory=list)
    peers: dict[str, MemoryPeer] = field(default_factory=dict)

    # peer id -> the IP its connections come from (the DHT's per-network quotas); a
    # peer not listed is unknown and charged on its own
    ips: dict[str, str] = field(default_factory=dict)

    async def add(self, *, config: DHTConfig = DHTConfig(), peer: MemoryPeer | None = None,
                  state: bytes | None = None) -> KademliaDHT:
        peer = peer or self.net.add_peer()
        await self.nursery.start(peer.serve)
        dht = await self.nursery.start(partial(
            serve_dht, peer, peer.identity, config=config, wall_clock=wall_clock,
            state=state, source_ip=self.ips.get))
        self.nodes.append(dht)
        self.peers[dht.peer_id] = peer
        return dht

    async def grow(self, n: int, *, config: DHTConfig = DHTConfig()) -> list[KademliaDHT]:
        """n nodes that each bootstrap off the first node of the swarm."""
        new = [await self.add(config=config) for _ in range(n)]
        seed = self.nodes[0]
        for dht in new:
            if dht is not seed:
                await dht.bootstrap([seed.peer_id])
        return new

    def servers(self) -> list[KademliaDHT]:
        return [d for d in self.nodes if d.mode is Mode.SERVER]


@pytest.fixture
def swarm(nursery):
    return Swarm(nursery)
