"""A daemon keeps its bootstrap peer only while it has few others (`keep_bootstrap_peer`)."""

from types import SimpleNamespace

import trio

from lattice.net.streams import CONNECTED, DISCONNECTED, PeerEvent, PeerEventHub
from latticed import config as cfgmod
from latticed.discovery import keep_bootstrap_peer

BOOT = "12D3KooWBootstrapPeer"
ADDR = f"/ip4/198.18.0.1/tcp/4001/p2p/{BOOT}"


class FakeHost:
    """Connections by peer id, the peer events they make, and the dials asked of it."""

    def __init__(self) -> None:
        self.hub = PeerEventHub()
        self.peers: set[str] = set()
        self.dials = 0

    def connected_peers(self) -> list[str]:
        return sorted(self.peers)

    def peer_events(self, buffer: int = 64):
        return self.hub.subscribe(buffer)

    def up(self, peer: str) -> None:
        self.peers.add(peer)
        self.hub.publish(PeerEvent(CONNECTED, peer))

    def down(self, peer: str) -> None:
        self.peers.discard(peer)
        self.hub.publish(PeerEvent(DISCONNECTED, peer))

    async def connect(self, addr: str) -> None:
        self.dials += 1
        self.up(addr.rsplit("/p2p/", 1)[-1])


async def test_a_daemon_with_enough_peers_lets_its_bootstrap_peer_go_and_redials_when_short(
        nursery, autojump_clock, tmp_path):
    host = FakeHost()
    node = SimpleNamespace(host=host, config=cfgmod.load(config_file=None, flags={},
                                                         environ={}))
    nursery.start_soon(keep_bootstrap_peer, node, ADDR, (OSError,))
    await trio.sleep(1)
    assert host.dials == 1 and BOOT in host.peers  # alone: it dials at once
    for i in range(4):
        host.up(f"peer{i}")
    host.down(BOOT)  # the bootstrap's connection manager trimmed us
    await trio.sleep(120)
    assert host.dials == 1  # four other peers: no need of it, no redial to undo the trim
    host.down("peer0")
    await trio.sleep(1)
    assert host.dials == 2 and BOOT in host.peers  # down to three: back to the bootstrap
