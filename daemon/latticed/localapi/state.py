"""The replicated state: `members.list`, `state.get`, `state.set`, `state.stats`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from lattice.api.errors import InvalidArgumentError, NotFoundError, NotReadyError
from lattice.core.state import Change, LocalStateError, Set, StatePathError, StateStore
from lattice.net.crdt_sync import CrdtSync
from latticed.rpc_server import ClientConnection, Handler

if TYPE_CHECKING:
    from latticed.node import Node


def require_store(node: Node) -> StateStore:
    if node.store is None:
        raise NotReadyError("the replicated state is still loading; retry in a moment")
    return node.store


def require_sync(node: Node) -> CrdtSync:
    if node.sync is None:
        raise NotReadyError("state sync is not running yet")
    return node.sync


async def wait_writable(node: Node) -> None:
    """Writes a caller will read back wait until our own history is confirmed
    (`CrdtSync.write`): at most `initial_sync_timeout` after a restart, never for a
    new identity."""
    if node.sync is not None:
        await node.sync.wait_writable()


async def members_list(node: Node, client: ClientConnection) -> dict[str, Any]:
    return require_store(node).members(time.time())


async def state_get(node: Node, client: ClientConnection, path: str) -> Any:
    try:
        return require_store(node).get(path, time.time())
    except StatePathError as e:
        raise NotFoundError(str(e)) from None


async def state_set(node: Node, client: ClientConnection, path: str,
                    value: Any) -> dict[str, Any]:
    sync = require_sync(node)
    changes: list[Change] = [Set(path, value)]
    if path.startswith("member/") and path != "member/peer_id":
        # a member record always names its author; before the first heartbeat it may
        # not yet, so say it in the same signed update
        changes.insert(0, Set("member/peer_id", node.identity.peer_id))
    await wait_writable(node)
    try:
        env = sync.write(changes)
    except LocalStateError as e:
        raise InvalidArgumentError(str(e)) from None
    return {"seq": env.seq if env is not None else None}


async def state_stats(node: Node, client: ClientConnection) -> dict[str, Any]:
    store = require_store(node)
    out: dict[str, Any] = {"store": store.statistics()}
    if node.sync is not None:
        out["sync"] = node.sync.statistics()
    if node.state_log is not None:
        out["log"] = node.state_log.statistics()
    if node.membership is not None:
        out["membership"] = node.membership.statistics()
    return out


HANDLERS: dict[str, Handler] = {
    "members.list": members_list,
    "state.get": state_get,
    "state.set": state_set,
    "state.stats": state_stats,
}
