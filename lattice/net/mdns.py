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
from typing import Any

import trio

from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.discovery.mdns.mdns import MDNSDiscovery

from lattice.net.host import PEER_ERRORS, Libp2pNode, is_unspecified

log = logging.getLogger("lattice.net.mdns")


async def serve_mdns(node: Libp2pNode, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run mDNS until cancelled. Failure policy: if zeroconf cannot start (no multicast
    interface, port 5353 unavailable), log once and return — LAN discovery is optional."""
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
        disc = await trio.to_thread.run_sync(start)
    except OSError as e:
        peerDiscovery.unregister_peer_discovered_handler(on_discovered)
        log.warning("mDNS unavailable (%s); LAN discovery is off", e)
        task_status.started()
        return
    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            async for peer_id, addrs in receive:
                if peer_id != node.peer_id and peer_id not in node.connected_peers():
                    nursery.start_soon(_dial, node, peer_id, addrs)
    finally:
        peerDiscovery.unregister_peer_discovered_handler(on_discovered)
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await trio.to_thread.run_sync(_stop, disc, abandon_on_cancel=True)


def _stop(disc: MDNSDiscovery) -> None:
    disc.broadcaster.unregister()
    disc.listener.stop()
    disc.zeroconf.close()


async def _dial(node: Libp2pNode, peer_id: str, addrs: list[str]) -> None:
    for addr in addrs:
        full = addr if "/p2p/" in addr else f"{addr}/p2p/{peer_id}"
        try:
            await node.connect(full, timeout=5)
            log.info("peer=%s found by mDNS at %s", peer_id, addr)
            return
        except PEER_ERRORS as e:
            log.debug("peer=%s mDNS address %s failed: %s", peer_id, addr, e)


def _first_tcp_port(addrs: list[str]) -> int:
    for a in addrs:
        parts = a.split("/")
        if "tcp" in parts:
            return int(parts[parts.index("tcp") + 1])
    return 4001
