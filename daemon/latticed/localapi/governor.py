"""The volunteer governor: `governor.pause`, `governor.resume`, `governor.stats`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lattice.api.errors import InvalidArgumentError, NotReadyError
from latticed.governor import Governor
from latticed.rpc_server import ClientConnection, Handler

if TYPE_CHECKING:
    from latticed.node import Node

MAX_PAUSE_S = 366 * 86400


def require_governor(node: Node) -> Governor:
    if node.governor is None:
        raise NotReadyError("the governor is still starting; retry in a moment")
    return node.governor


async def governor_pause(node: Node, client: ClientConnection, for_s: float | None,
                         reason: str) -> dict[str, Any]:
    if for_s is not None and not (0 < for_s <= MAX_PAUSE_S):  # NaN fails this too
        raise InvalidArgumentError("for_s must be in (0, 366 days] seconds")
    return require_governor(node).pause(for_s, reason)


async def governor_resume(node: Node, client: ClientConnection) -> dict[str, Any]:
    return require_governor(node).resume()


async def governor_stats(node: Node, client: ClientConnection) -> dict[str, Any]:
    return require_governor(node).statistics()


HANDLERS: dict[str, Handler] = {
    "governor.pause": governor_pause,
    "governor.resume": governor_resume,
    "governor.stats": governor_stats,
}
