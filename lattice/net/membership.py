"""The trio driver of `/lattice/swim/1`: failure detection among connected peers.

Owns the I/O around `lattice.core.membership.Membership`: a probe round every probe
interval (one ``ping`` stream to one neighbour, answered by ``ack`` on the same
stream), the inbound handler, the neighbour set kept from the network's peer events,
and handing each new neighbour our table (``members``). Must not import libp2p: it
talks to the network only through `lattice.net.streams.PeerNetwork`, so it runs
unchanged over the real host and `lattice.testing.memnet`.

Failure policy: a probe that fails to connect, resets or stays silent is what the
machine detects (no ack by the probe timeout); a malformed message is counted by the
machine and its stream reset. At most ``max_in_flight`` sends run at once; beyond that
a send is skipped (counted), never queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from lattice.core.membership import MAX_TABLE, Membership, MembershipError
from lattice.net.streams import (
    CONNECTED,
    DISCONNECTED,
    PeerError,
    PeerNetwork,
    Stream,
    quietly,
    recv_frame,
    recv_frame_or_eof,
    send_frame,
)

log = logging.getLogger("lattice.net.membership")

PROTOCOL = "/lattice/swim/1"
MAX_MESSAGE_BYTES = 64 + MAX_TABLE * 180
"""A ``members`` table of MAX_TABLE rows of a peer id, a status and an incarnation."""


@dataclass(frozen=True)
class MembershipConfig:
    """Daemon config section ``[membership]``."""

    probe_interval: float = 3.0
    """One connected peer is probed this often, seconds (SWIM's protocol period)."""
    probe_timeout: float = 2.0
    """A probe unanswered this long makes its peer suspect, seconds."""
    suspicion_timeout: float = 15.0
    """A suspect that does not refute within this is declared dead, seconds."""
    max_entries: int = 4096
    """Members whose liveness we track (neighbours are never forgotten)."""
    max_in_flight: int = 16
    """Membership messages being sent at once; beyond it one is skipped (counted)."""


class MembershipService:
    """The running service (what `serve_membership` hands back)."""

    def __init__(self, network: PeerNetwork, machine: Membership, config: MembershipConfig,
                 clock: Callable[[], float]) -> None:
        self.network = network
        self.machine = machine
        self.config = config
        self._clock = clock
        self._nursery: trio.Nursery | None = None
        self._in_flight = 0
        self.skipped = 0
        self.errors = 0

    def liveness(self, peer: str, now: float) -> tuple[bool | None, float | None]:
        return self.machine.liveness(peer, now)

    def statistics(self) -> dict[str, Any]:
        return {**self.machine.statistics(), "skipped_sends": self.skipped,
                "send_errors": self.errors}

    def _send(self, peer: str, msg: dict[str, Any]) -> None:
        if self._nursery is None or self._in_flight >= self.config.max_in_flight:
            self.skipped += 1
            return
        self._in_flight += 1
        self._nursery.start_soon(self._exchange, peer, msg)

    async def _exchange(self, peer: str, msg: dict[str, Any]) -> None:
        """Send ``msg`` on a new stream; a ping's ack comes back on it."""
        try:
            with trio.move_on_after(self.config.probe_timeout + 1.0):
                stream = await self.network.open_stream(peer, PROTOCOL)
                try:
                    await send_frame(stream, msg)
                    if msg["t"] == "ping":
                        reply = await recv_frame_or_eof(stream, max_bytes=MAX_MESSAGE_BYTES)
                        if reply is not None:
                            self.machine.handle(peer, reply, self._clock())
                finally:
                    await quietly(stream.close)
        except (PeerError, MembershipError) as e:
            self.errors += 1
            log.debug("peer=%s membership %s failed: %s", peer, msg["t"], e)
        finally:
            self._in_flight -= 1

    async def _inbound(self, stream: Stream) -> None:
        peer = stream.remote_peer_id
        try:
            with trio.move_on_after(self.config.probe_timeout + 1.0):
                msg = await recv_frame(stream, max_bytes=MAX_MESSAGE_BYTES)
                for target, reply in self.machine.handle(peer, msg, self._clock()):
                    if target == peer:
                        await send_frame(stream, reply)
        except MembershipError as e:
            log.info("peer=%s malformed membership message: %s", peer, e)
            await quietly(stream.reset)
            return
        except PeerError as e:
            log.debug("peer=%s membership stream failed: %s", peer, e)
        await quietly(stream.close)

    async def _probe_loop(self) -> None:
        while True:
            for target, msg in self.machine.tick(self._clock()):
                self._send(target, msg)
            await trio.sleep(self.config.probe_interval)

    async def _track_neighbours(self) -> None:
        with self.network.peer_events(buffer=256) as events:
            for peer in self.network.connected_peers():
                self._neighbour(peer)
            async for event in events:
                if event.kind == CONNECTED:
                    self._neighbour(event.peer_id)
                elif event.kind == DISCONNECTED:
                    self.machine.remove_neighbour(event.peer_id)
                else:  # lagged: read the truth once
                    for peer in self.network.connected_peers():
                        if peer not in self.machine.neighbours():
                            self._neighbour(peer)

    def _neighbour(self, peer: str) -> None:
        if peer not in self.machine.neighbours():
            self.machine.add_neighbour(peer, self._clock())
            self._send(peer, self.machine.table())


async def serve_membership(network: PeerNetwork, *, config: MembershipConfig = MembershipConfig(),
                           clock: Callable[[], float] = time.time,
                           rng: Any = None,
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run failure detection among connected peers until cancelled; hands back the
    `MembershipService` (its `liveness` is what `StateStore.set_liveness` takes)."""
    machine = Membership(network.peer_id, rng=rng, probe_interval=config.probe_interval,
                         probe_timeout=config.probe_timeout,
                         suspicion_timeout=config.suspicion_timeout,
                         max_entries=config.max_entries)
    service = MembershipService(network, machine, config, clock)
    async with trio.open_nursery() as nursery:
        service._nursery = nursery
        network.set_stream_handler(PROTOCOL, service._inbound)
        nursery.start_soon(service._track_neighbours)
        nursery.start_soon(service._probe_loop)
        task_status.started(service)
        try:
            await trio.sleep_forever()
        finally:
            service._nursery = None
