"""Peers: `peers.list`, `peers.connect`, `peers.find`."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from lattice.api.errors import (
    InvalidArgumentError,
    NotFoundError,
    NotReadyError,
    PeerUnreachableError,
)
from lattice.core.identity import InvalidPeerId, public_key_from_peer_id
from lattice.net.dht import PeerNotFound
from latticed.localapi.dht import require_dht
from latticed.rpc_server import ClientConnection, Handler

if TYPE_CHECKING:
    from lattice.net.host import Libp2pNode
    from latticed.node import Node


def require_host(node: Node) -> Libp2pNode:
    if node.host is None:
        raise NotReadyError("the daemon is still starting; retry in a moment")
    return node.host


async def peers_list(node: Node, client: ClientConnection) -> list[dict[str, Any]]:
    rows = require_host(node).connections()
    if node.nat is not None:
        for row in rows:  # why a relayed peer is not direct (lattice.net.nat)
            if row["connection"] == "relayed":
                row["why_relayed"] = node.nat.why_relayed(row["peer_id"])
    return rows


async def peers_connect(node: Node, client: ClientConnection, addr: str,
                        timeout: float) -> dict[str, Any]:
    from lattice.net.host import BadDialTarget, DialError  # loaded: the host is up

    host = require_host(node)
    if not (0 < timeout <= 120) or math.isnan(timeout):
        raise InvalidArgumentError("timeout must be in (0, 120] seconds")
    t0 = time.perf_counter()
    try:
        peer_id = await (node.nat or host).connect(addr, timeout=timeout)
    except BadDialTarget as e:
        raise InvalidArgumentError(str(e)) from None
    except DialError as e:
        raise PeerUnreachableError(str(e)) from None
    return {"peer_id": peer_id, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}


async def peers_find(node: Node, client: ClientConnection, peer_id: str) -> dict[str, Any]:
    try:
        public_key_from_peer_id(peer_id)
    except InvalidPeerId as e:
        raise InvalidArgumentError(str(e)) from None
    try:
        addrs = await require_dht(node).find_peer(peer_id)
    except PeerNotFound:
        raise NotFoundError(f"no route to {peer_id} found in the DHT") from None
    return {"peer_id": peer_id, "addrs": addrs}


HANDLERS: dict[str, Handler] = {
    "peers.list": peers_list,
    "peers.connect": peers_connect,
    "peers.find": peers_find,
}
