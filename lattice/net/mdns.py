"""LAN discovery by mDNS: announce ourselves, dial daemons we hear about.

Wraps py-libp2p's zeroconf-based `MDNSDiscovery`, but not through `new_host(enable_mDNS=
True)`: that blocks `host.run()` for ~1.7 s while zeroconf probes, and only fills the
peerstore. Here the blocking zeroconf calls run in a worker thread after the daemon is
already up, and each discovered peer is dialed. zeroconf calls us from its own thread,
so discoveries cross into trio through the run's token and a bounded channel.

What we announce: our listen addresses, a wildcard bind (the default
``/ip4/0.0.0.0/tcp/4001``) expanded into this host's interface addresses. Handed the
host, py-libp2p's broadcaster announces the raw listen addresses, and 0.0.0.0 means "this
host" to whoever dials it: with the default config no daemon could reach another it
heard of. Observed (NAT-mapped) addresses are not announced: a LAN peer reaches us
directly, not through the router.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.discovery.mdns.mdns import MDNSDiscovery

from lattice.net.host import PEER_ERRORS, Libp2pNode, is_unspecified

log = logging.getLogger("lattice.net.mdns")


async def serve_mdns(node: Libp2pNode, *,
                     on_found: Callable[[str, list[str]], Awaitable[None]] | None = None,
                     redial_interval: float = 30.0, forget_after: float = 600.0,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run mDNS until cancelled: dial each daemon we hear of, and again every
    ``redial_interval`` while we are not connected to it (a LAN peer that restarted or
    dropped comes back without a new announcement); a peer unheard for
    ``forget_after`` seconds is forgotten. ``on_found(peer_id, addrs)`` runs after each
    successful dial (the daemon adds the peer to its DHT: on a LAN with no bootstrap,
    this is how the DHT gets its first peers). Failure policy: if zeroconf cannot start
    (no multicast interface, port 5353 unavailable), log once and return — LAN
    discovery is optional."""
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[tuple[str, list[str]]](64)

    def on_discovered(info: Any) -> None:  # zeroconf's thread
        addrs = [a for a in map(str, info.addrs) if not is_unspecified(a)]
        item = (info.peer_id.to_base58(), addrs)

        def deliver() -> None:
            try:
                send.send_nowait(item)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass  # a flood of announcements: later ones will repeat
        try:
            token.run_sync_soon(deliver)
        except trio.RunFinishedError:
            pass

    port = _first_tcp_port(node.listen_addrs())

    def start() -> MDNSDiscovery:
        # no host=: with it the broadcaster would announce host.get_transport_addrs()
        disc = MDNSDiscovery(node.host.get_network(), port=port,
                             listen_addrs=node.dialable_addrs())
        disc.broadcaster.register()
        return disc

    # registered before zeroconf starts: its browser reports peers already on the LAN
    # from inside the constructor
    peerDiscovery.register_peer_discovered_handler(on_discovered)
    try:
        disc = await trio.to_thread.run_sync(start, abandon_on_cancel=True)
    except OSError as e:
        peerDiscovery.unregister_peer_discovered_handler(on_discovered)
        log.warning("mDNS unavailable (%s); LAN discovery is off", e)
        task_status.started()
        return
    task_status.started()
    lan = LanPeers(node.peer_id, forget_after=forget_after)
    try:
        async with trio.open_nursery() as nursery:

            async def dial(peer_id: str, addrs: list[str]) -> None:
                if await _dial(node, peer_id, addrs) and on_found is not None:
                    await on_found(peer_id, addrs)

            async def redial_loop() -> None:
                while True:
                    await trio.sleep(redial_interval)
                    for peer_id, addrs in lan.to_dial(trio.current_time(),
                                                      node.connected_peers()):
                        nursery.start_soon(dial, peer_id, addrs)

            nursery.start_soon(redial_loop)
            async for peer_id, addrs in receive:
                if lan.heard(peer_id, addrs, trio.current_time()) \
                        and peer_id not in node.connected_peers():
                    nursery.start_soon(dial, peer_id, addrs)
    finally:
        peerDiscovery.unregister_peer_discovered_handler(on_discovered)
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await trio.to_thread.run_sync(_stop, disc, abandon_on_cancel=True)


class LanPeers:
    """The daemons heard on the LAN, bounded: peer id -> (addresses, when last heard)."""

    def __init__(self, me: str, *, forget_after: float, max_peers: int = 256) -> None:
        self.me = me
        self.forget_after = forget_after
        self.max_peers = max_peers
        self._peers: dict[str, tuple[list[str], float]] = {}

    def heard(self, peer_id: str, addrs: list[str], now: float) -> bool:
        """Note an announcement; False for our own or one without a dialable address."""
        if peer_id == self.me or not addrs:
            return False
        self._peers.pop(peer_id, None)
        self._peers[peer_id] = (addrs[:8], now)
        while len(self._peers) > self.max_peers:
            self._peers.pop(next(iter(self._peers)))  # the one heard longest ago
        return True

    def to_dial(self, now: float, connected: Iterable[str]) -> list[tuple[str, list[str]]]:
        """Peers heard recently that we are not connected to; forgets stale ones. A peer
        we are connected to counts as heard now (zeroconf tells us of a peer once, not
        while it stays)."""
        connected = set(connected)
        for peer_id, (addrs, t) in list(self._peers.items()):
            if peer_id in connected:
                self._peers[peer_id] = (addrs, now)
            elif now - t > self.forget_after:
                del self._peers[peer_id]
        return [(p, addrs) for p, (addrs, _) in self._peers.items() if p not in connected]


def _stop(disc: MDNSDiscovery) -> None:
    disc.broadcaster.unregister()
    disc.listener.stop()
    disc.zeroconf.close()


async def _dial(node: Libp2pNode, peer_id: str, addrs: list[str]) -> bool:
    for addr in addrs:
        full = addr if "/p2p/" in addr else f"{addr}/p2p/{peer_id}"
        try:
            await node.connect(full, timeout=5)
            log.info("peer=%s found by mDNS at %s", peer_id, addr)
            return True
        except PEER_ERRORS as e:
            log.debug("peer=%s mDNS address %s failed: %s", peer_id, addr, e)
    return False


def _first_tcp_port(addrs: list[str]) -> int:
    for a in addrs:
        parts = a.split("/")
        if "tcp" in parts:
            return int(parts[parts.index("tcp") + 1])
    return 4001
