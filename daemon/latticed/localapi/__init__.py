"""The local API's handlers, grouped by subsystem, in one table.

Each module here holds the handlers of one subsystem as plain async functions taking
the `Node` and the calling `ClientConnection` first, and a ``HANDLERS`` table mapping
RPC method names (`lattice.api.methods`) to them. `build_handlers` binds them to a
node for the RPC server, which refuses to start if a declared method has no handler
(or a handler no method) and enforces each method's declared access.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from latticed.localapi import attach, dht, governor, jobs, models, peers, state, system
from latticed.rpc_server import Handler

if TYPE_CHECKING:
    from latticed.node import Node

SUBSYSTEMS = (system, peers, state, dht, jobs, attach, models, governor)


def build_handlers(node: Node) -> dict[str, Handler]:
    table: dict[str, Handler] = {}
    for module in SUBSYSTEMS:
        for name, handler in module.HANDLERS.items():
            if name in table:
                raise RuntimeError(f"two handlers for {name}")
            table[name] = functools.partial(handler, node)
    return table
