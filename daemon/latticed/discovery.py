"""How a node finds the network and stays in it: bootstrap peers kept connected, the
DHT started, joined, persisted across restarts and switched between server and client
mode as reachability changes, relays found through the DHT, LAN peers found by mDNS
fed to the DHT, and the bulk side channel's listener placed next to the host's.

Each `serve_*`/`keep_*` here is a task of the node's nursery; failure policy: a peer or
a DHT lookup failing is logged and retried; anything else propagates.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from lattice.core.kademlia import peer_hash
from lattice.core.records import RecordError
from lattice.net.bulk import BulkListener, serve_bulk_listener
from lattice.net.dht import DHTConfig, KademliaDHT, Mode, StateError, serve_dht
from lattice.net.streams import PeerError
from latticed import presence

if TYPE_CHECKING:
    from latticed.node import Node

log = logging.getLogger("latticed")



@dataclass(frozen=True)
class DiscoveryConfig:
    """How the node keeps itself in the network."""

    max_connections: int = 256
    """Peer connections kept at most."""
    bootstrap_retry_max: float = 30.0
    """Longest wait between redials of a lost bootstrap peer, seconds."""
    bootstrap_min_peers: int = 4
    """A lost bootstrap peer is redialed only while we hold fewer connections than this
    (as IPFS's bootstrapper): a daemon that has its peers does not need it, and a
    network bootstrapped off one daemon would otherwise redial it each time its
    connection manager trims them."""
    dht_mode: str = "auto"
    """server: answer DHT queries; client: only ask (for daemons that others cannot
    dial); auto: client once reachability says we are behind a NAT, server otherwise."""


@dataclass(frozen=True)
class SideChannelConfig:
    """The bulk side channel's listener (section ``[bulk]``)."""

    direct: bool = True
    """Move large tensors over an AES-GCM side channel (raw TCP, keys from the
    Noise-authenticated stream) instead of the libp2p stream."""
    port: int = 0
    """TCP port of the side channel (0: any free port)."""
    advertise: tuple[str, ...] = ()
    """IP addresses peers reach the side channel at (default: the listen addresses,
    0.0.0.0 replaced by the host's interface addresses)."""
    max_handshakes: int = 64
    """Side-channel connections waiting for their hello at once."""
    max_handshakes_per_ip: int = 4
    """Of those, from one source network (IPv4 /24, IPv6 /48)."""
    hello_timeout: float = 3.0
    """A side-channel connection that has not sent its 72-byte hello by then is closed."""


RELAY_KEY = "lattice:circuit-relay-v2"  # relays provide this name in the DHT
RELAY_DISCOVERY_INTERVAL_S = 60.0
"""A NATed node short of reservations looks for relays this often (its candidates age
out), and each node checks whether its announcement as a relay is still right; both
also happen at once when our reachability changes. The DHT republishes the
announcement itself."""
EARLY_SELF_LOOKUPS_S = (3.0, 10.0, 30.0)
DHT_PERSIST_INTERVAL_S = 300.0


# -- bootstrap peers -------------------------------------------------------------------


async def keep_bootstrap_peer(node: Node, addr: str,
                              dial_errors: tuple[type[BaseException], ...]) -> None:
    """Dial a bootstrap peer, and dial it again with exponential backoff whenever it is
    gone while we hold fewer than ``bootstrap_min_peers`` connections (the host's peer
    events tell when to look again)."""
    host = node.host
    assert host is not None
    peer_id = addr.rsplit("/p2p/", 1)[-1]
    backoff = 0.25
    config = node.config.build(DiscoveryConfig)
    with host.peer_events(buffer=16) as events:
        while True:
            peers = host.connected_peers()
            if peer_id in peers or len(peers) >= config.bootstrap_min_peers:
                backoff = 0.25
                async for event in events:  # until a peer drops (or we lost track)
                    if event.kind != "connected":
                        break
                continue
            try:
                await host.connect(addr)
                log.info("bootstrap peer=%s connected", peer_id)
                continue
            except dial_errors as e:
                log.warning("bootstrap peer=%s unreachable (%s); retry in %.1f s",
                            peer_id, e, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, config.bootstrap_retry_max)


# -- the DHT ---------------------------------------------------------------------------------


def _dht_state_path(node: Node) -> os.PathLike[str]:
    return node.config.state_dir / "dht.state"


async def start_dht(node: Node, nursery: trio.Nursery) -> KademliaDHT:
    """Serve the DHT, rejoining from the routing table and records saved by the last
    run (a corrupt file is logged and ignored), then bootstrap in the background."""
    cfg, host, network = node.config, node.host, node.network
    assert host is not None and network is not None
    mode = cfg.build(DiscoveryConfig).dht_mode
    config = cfg.build(DHTConfig, mode=Mode("server" if mode == "auto" else mode))
    path = _dht_state_path(node)
    try:
        with open(path, "rb") as f:
            state: bytes | None = f.read()
    except FileNotFoundError:
        state = None
    # over the governed network: its bytes are metered by protocol like every other
    # (not shaped: lookups keep the daemon in the network while transfers are paused)
    start = functools.partial(serve_dht, network, node.identity, config=config,
                              address_book=host, self_addrs=host.dialable_addrs,
                              source_ip=host.remote_ip)
    try:
        dht: KademliaDHT = await nursery.start(functools.partial(start, state=state))
    except StateError as e:
        log.warning("ignoring unreadable DHT state %s: %s", path, e)
        dht = await nursery.start(functools.partial(start, state=None))
    node.dht = dht
    nursery.start_soon(_dht_bootstrap_and_persist, node, dht)
    if mode == "auto":
        nursery.start_soon(_dht_mode_follows_reachability, node, dht)
    nursery.start_soon(_relays_through_dht, node, dht)
    return dht


def save_dht_state(node: Node) -> None:
    """Persist the routing table and records so a restart rejoins fast."""
    assert node.dht is not None
    path = node.config.state_dir / "dht.state"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(node.dht.export_state())
    os.replace(tmp, path)


async def _dht_bootstrap_and_persist(node: Node, dht: KademliaDHT) -> None:
    peers = []
    for addr in node.config["node.bootstrap"]:
        base, _, peer_id = addr.rpartition("/p2p/")
        peers.append((peer_id, [base]))
    # The bootstrap keepers dial in parallel; the DHT pings and looks itself up. The
    # first node of a network has nobody to ask: its bootstrap ends at once (and it
    # counts as joined; mDNS may add peers later).
    size = await dht.bootstrap(peers)
    if size:
        log.info("dht: routing table holds %d peers after bootstrap", size)
    # Peers that join after us only reach our table if we look again: a few early
    # self-lookups (cheap: they ask only the closest peers; the full random-walk refresh
    # waits refresh_interval, 10 min by default) fill the table while the network is
    # forming, and put us in our neighbours' tables.
    for delay in EARLY_SELF_LOOKUPS_S:
        await trio.sleep(delay)
        await dht.find_closest_peers(peer_hash(node.identity.peer_id))
    log.info("dht: routing table holds %d peers", dht.statistics()["routing_table_size"])
    while True:
        await trio.sleep(DHT_PERSIST_INTERVAL_S)
        save_dht_state(node)


async def _dht_mode_follows_reachability(node: Node, dht: KademliaDHT) -> None:
    """A node others cannot dial must not answer as a DHT server (its peers would keep
    it in their tables and time out on it); and members should see how we are
    reachable. Both follow the NAT manager's verdict."""
    nat = node.nat
    assert nat is not None
    while True:
        reach = nat.status()
        wanted = "client" if reach.get("reachability") == "private" else "server"
        if dht.statistics().get("mode") != wanted:
            log.info("dht: switching to %s mode (reachability %s)", wanted,
                     reach.get("reachability"))
            dht.set_mode(wanted)
        presence.publish_reachability(node)
        await nat.wait_reachability_change()


async def _relays_through_dht(node: Node, dht: KademliaDHT) -> None:
    """Relays announce themselves as providers of RELAY_KEY; nodes behind a NAT look
    them up, so relays are found beyond the bootstrap peers."""
    nat = node.nat
    assert nat is not None
    provided = False
    while True:
        try:
            if nat.relaying and not provided:
                await dht.provide(RELAY_KEY)
                provided = True
            elif not nat.relaying and provided:
                dht.unprovide(RELAY_KEY)
                provided = False
            # a lookup walks the DHT (about a query per DHT neighbour): only while we
            # lack reservations, not every minute of a NATed daemon's life
            if nat.needs_relays:
                found = await dht.find_providers(RELAY_KEY)
                nat.learn_relays([(p.peer_id, [a.split("/p2p/")[0] for a in p.addrs])
                                  for p in found])
        except (RecordError, PeerError) as e:
            log.warning("relay discovery through the DHT failed: %s", e)
        # A node that just became a relay (or learnt it is NATed) acts on it at once, not
        # up to a minute later: relays are found sooner, and the announcement joins the
        # start-up work instead of landing in what should be an idle daemon's first minute.
        with trio.move_on_after(RELAY_DISCOVERY_INTERVAL_S):
            await nat.wait_reachability_change()


async def lan_peer_found(node: Node, peer_id: str, addrs: list[str]) -> None:
    """A daemon found by mDNS joins our DHT routing table (on a LAN without any
    bootstrap peer it is how the DHT gets going); with a table still short of a bucket,
    we also look ourselves up through it."""
    dht = node.dht
    if dht is None:
        return
    if len(dht.table) < dht.config.k:
        size = await dht.bootstrap([(peer_id, addrs)])
        log.info("dht: routing table holds %d peers after meeting %s on the LAN",
                 size, peer_id)


# -- the bulk side channel -----------------------------------------------------------------


async def start_bulk_listener(node: Node, nursery: trio.Nursery) -> BulkListener | None:
    """The side channel for large tensors, bound next to the libp2p listener. With a
    wildcard listen address it advertises `[bulk] advertise`, else the host's interface
    addresses (as the DHT does); with none of those it stays off (tensors then go over
    the libp2p stream) rather than advertise what peers cannot reach."""
    cfg, host = node.config, node.host
    assert host is not None
    ips = []
    for addr in host.listen_addrs():
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            ips.append(parts[2])
    bind = ips[0] if ips else "127.0.0.1"
    side = cfg.build(SideChannelConfig)
    advertise_ips = list(side.advertise) or list(dict.fromkeys(
        a.split("/")[2] for a in host.dialable_addrs() if a.split("/")[1] in ("ip4", "ip6")))
    if not advertise_ips:
        log.warning("bulk side channel off: listening on a wildcard address and "
                    "[bulk] advertise is empty")
        return None
    port = side.port
    serve = functools.partial(serve_bulk_listener, max_handshakes=side.max_handshakes,
                              max_handshakes_per_ip=side.max_handshakes_per_ip,
                              hello_timeout=side.hello_timeout)
    if not side.advertise and bind not in ("0.0.0.0", "::"):
        listener: BulkListener = await nursery.start(functools.partial(serve, bind, port))
        return listener
    # wildcard bind: peers are told the configured IPs, so the port must be known up
    # front; with port 0, ask the OS for a free one first (a tiny race we accept)
    if port == 0:
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", 0))
            port = probe.getsockname()[1]
    listener = await nursery.start(functools.partial(
        serve, "0.0.0.0", port, advertise=[(ip, port) for ip in advertise_ips]))
    return listener
