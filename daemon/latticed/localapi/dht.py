"""The DHT: `dht.put`, `dht.get`, `dht.provide`, `dht.find_providers`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lattice.api.errors import InvalidArgumentError, NotReadyError
from lattice.core.codec import DecodeError, unpack
from lattice.core.records import RecordError, user_key
from lattice.net.dht import KademliaDHT
from latticed.rpc_server import ClientConnection, Handler

if TYPE_CHECKING:
    from latticed.node import Node

MAX_TTL_S = 7 * 86400


def require_dht(node: Node) -> KademliaDHT:
    if node.dht is None:
        raise NotReadyError("the DHT is still starting; retry in a moment")
    return node.dht


def _key(key: str) -> str:
    return key if key.startswith("/") else user_key(key)


async def dht_put(node: Node, client: ClientConnection, key: str, value: Any,
                  ttl: float) -> dict[str, Any]:
    dht = require_dht(node)
    if not (0 < ttl <= MAX_TTL_S) or math.isnan(ttl):
        raise InvalidArgumentError(f"ttl must be in (0, {MAX_TTL_S}] seconds")
    try:
        result = await dht.put(_key(key), value, ttl)
    except RecordError as e:
        raise InvalidArgumentError(f"record refused: {e}") from None
    return {"key": result.record.key, "publisher": result.record.publisher,
            "expires_at": result.record.expires_at, "stored_at": len(result.stored_at),
            "hops": result.hops}


async def dht_get(node: Node, client: ClientConnection, key: str,
                  fresh: bool = False) -> dict[str, Any]:
    dht = require_dht(node)
    try:
        result = await dht.get_result(_key(key), fresh=fresh)
    except RecordError as e:
        raise InvalidArgumentError(f"bad key: {e}") from None
    records = []
    for r in result.records:
        try:
            value = unpack(r.value)
        except DecodeError:
            continue  # signed but not msgpack: not ours to show
        records.append({"publisher": r.publisher, "value": value, "expires_at": r.expires_at})
    return {"key": _key(key), "records": records, "hops": result.hops}


async def dht_provide(node: Node, client: ClientConnection, name: str) -> dict[str, Any]:
    try:
        result = await require_dht(node).provide(name)
    except RecordError as e:
        raise InvalidArgumentError(str(e)) from None
    return {"name": name, "stored_at": len(result.stored_at), "hops": result.hops}


async def dht_find_providers(node: Node, client: ClientConnection,
                             name: str) -> list[dict[str, Any]]:
    providers = await require_dht(node).find_providers(name)
    return [{"peer_id": p.peer_id, "addrs": p.addrs, "expires_at": p.expires_at}
            for p in providers]


HANDLERS: dict[str, Handler] = {
    "dht.put": dht_put,
    "dht.get": dht_get,
    "dht.provide": dht_provide,
    "dht.find_providers": dht_find_providers,
}
