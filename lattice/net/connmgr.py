"""The connection manager's driver: keeps the connection count between water marks.

Owns the timing around `lattice.core.connections.choose_trims`: it learns when each
connection opened from the network's peer events, and trims when a new connection
takes the count above the high water mark (and every ``interval`` seconds, for
connections whose grace period ended since). Must not import libp2p: it closes
connections through `PeerNetwork.disconnect`.

Before closing, ``before_close`` is awaited with the peers chosen (the daemon has its
failure detector say ``bye`` to them, so neither side takes the close for a crash and
dials again to recheck).

Failure policy: a disconnect that fails (the peer is already gone) is ignored; what is
protected is asked of ``protected()`` at each trim, so it is always current.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from lattice.core.connections import WaterMarks, choose_trims
from lattice.net.streams import CONNECTED, DISCONNECTED, PeerError, PeerNetwork

log = logging.getLogger("lattice.net.connmgr")


class ConnectionManager:
    def __init__(self, network: PeerNetwork, marks: WaterMarks,
                 protected: Callable[[], set[str]], clock: Callable[[], float],
                 rng: random.Random,
                 before_close: Callable[[list[str]], Awaitable[None]] | None = None) -> None:
        self.network = network
        self.marks = marks
        self.protected = protected
        self.before_close = before_close
        self._clock = clock
        self._rng = rng
        self.opened: dict[str, float] = {}
        self.trimmed = 0
        self.trims = 0

    def statistics(self) -> dict[str, Any]:
        return {"connections": len(self.opened), "low_water": self.marks.low,
                "high_water": self.marks.high, "trimmed": self.trimmed,
                "trim_rounds": self.trims}

    async def trim(self) -> int:
        victims = choose_trims(self.opened, self.protected(), self.marks, self._clock(),
                               self._rng)
        if victims:
            self.trims += 1
            log.info("trimming %d of %d connections (high water %d)", len(victims),
                     len(self.opened), self.marks.high)
            if self.before_close is not None:
                await self.before_close(victims)
        for peer in victims:
            self.opened.pop(peer, None)
            try:
                await self.network.disconnect(peer)
            except PeerError as e:
                log.debug("peer=%s disconnect failed: %s", peer, e)
            self.trimmed += 1
        return len(victims)

    async def _track(self) -> None:
        with self.network.peer_events(buffer=1024) as events:
            now = self._clock()
            self.opened = {p: now for p in self.network.connected_peers()}
            async for event in events:
                if event.kind == CONNECTED:
                    self.opened.setdefault(event.peer_id, self._clock())
                    if len(self.opened) > self.marks.high:
                        await self.trim()
                elif event.kind == DISCONNECTED:
                    self.opened.pop(event.peer_id, None)
                else:  # lagged: read the truth once
                    now = self._clock()
                    self.opened = {p: self.opened.get(p, now)
                                   for p in self.network.connected_peers()}

    async def _periodic(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            await self.trim()


async def serve_connection_manager(network: PeerNetwork, marks: WaterMarks, *,
                                   protected: Callable[[], set[str]],
                                   clock: Callable[[], float] = time.time,
                                   rng: random.Random | None = None, interval: float = 10.0,
                                   before_close: Callable[[list[str]], Awaitable[None]]
                                   | None = None,
                                   task_status=trio.TASK_STATUS_IGNORED) -> None:
    manager = ConnectionManager(network, marks, protected, clock, rng or random.Random(),
                                before_close)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager._track)
        nursery.start_soon(manager._periodic, interval)
        task_status.started(manager)
