"""The trio driver of `/lattice/swim/1`: failure detection among connected peers.

Owns the I/O around `lattice.core.membership.Membership`: a probe round every probe
interval (a ``ping`` to one neighbour, answered by ``ack``), the inbound handler, the
neighbour set kept from the network's peer events, and handing each new neighbour our
table (``members``). What we send a neighbour goes on one stream we keep to it while
connected (its acks come back on it); a stream per probe cost both ends a stream
setup, a protocol negotiation and a close every few seconds, ~40 % of an idle
daemon's task steps (issue 16). Must not import libp2p: it talks to the network only
through `lattice.net.streams.PeerNetwork`, so it runs unchanged over the real host and
`lattice.testing.memnet`.

Failure policy: a probe that fails to connect, resets or stays silent is what the
machine detects (no ack by the probe timeout); a kept stream that fails or does not
take a message within the probe timeout is dropped, and the next message opens a new
one (a send that fails on a kept stream is tried once on a new one). A malformed
message is counted by the machine and its stream reset. At most ``max_in_flight``
sends run at once; beyond that a send is skipped (counted), never queued. At most
`MAX_INBOUND_PER_PEER` inbound streams per peer are served; a newer one resets the
oldest.
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
    recv_frame_or_eof,
    send_frame,
)

log = logging.getLogger("lattice.net.membership")

PROTOCOL = "/lattice/swim/1"
MAX_INBOUND_PER_PEER = 2
"""A peer's kept stream, and a new one it opens as it gives that up."""
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


class _Link:
    """Our stream to one neighbour (None until the first message, or after a failure)
    and the lock that keeps one message at a time on it."""

    def __init__(self) -> None:
        self.stream: Stream | None = None
        self.lock = trio.Lock()


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
        self._links: dict[str, _Link] = {}
        self._inbound_streams: dict[str, list[Stream]] = {}
        self.skipped = 0
        self.errors = 0
        self.streams_opened = 0

    def liveness(self, peer: str, now: float) -> tuple[bool | None, float | None]:
        return self.machine.liveness(peer, now)

    def statistics(self) -> dict[str, Any]:
        return {**self.machine.statistics(), "skipped_sends": self.skipped,
                "send_errors": self.errors, "streams_opened": self.streams_opened}

    async def say_bye(self, peers: list[str]) -> None:
        """Tell each of ``peers`` that we close our connection to it on purpose next
        (the connection manager's trim; `Membership.part`), at most the probe timeout
        each, all at once. Its close then costs no recheck on either side. A peer
        already gone is skipped: opening a stream to it would dial it again."""
        connected = set(self.network.connected_peers())
        async with trio.open_nursery() as nursery:
            for peer in peers:
                if peer not in connected:
                    continue
                self._in_flight += 1  # `_exchange` gives it back
                nursery.start_soon(self._exchange, peer, self.machine.part(peer))

    def _send(self, peer: str, msg: dict[str, Any]) -> None:
        if self._nursery is None or self._in_flight >= self.config.max_in_flight:
            self.skipped += 1
            return
        self._in_flight += 1
        self._nursery.start_soon(self._exchange, peer, msg)

    async def _exchange(self, peer: str, msg: dict[str, Any]) -> None:
        """Send ``msg`` on our stream to ``peer`` (a ping's ack comes back on it, read
        by `_read_replies`), opening one when there is none."""
        link = self._links.setdefault(peer, _Link())
        stream: Stream | None = None
        try:
            with trio.move_on_after(self.config.probe_timeout):
                async with link.lock:
                    for _ in range(2):
                        fresh = link.stream is None
                        stream = await self._stream_to(peer, link)
                        try:
                            await send_frame(stream, msg)
                            return
                        except PeerError:
                            await self._drop(link, stream)
                            if fresh:
                                raise
            # It did not take the message in time: a frame may be half sent, start over.
            self.errors += 1
            if stream is not None:
                await self._drop(link, stream)
        except PeerError as e:
            self.errors += 1
            log.debug("peer=%s membership %s failed: %s", peer, msg["t"], e)
        finally:
            self._in_flight -= 1
            if link.stream is None and not link.lock.locked():
                self._links.pop(peer, None)  # a link lives as long as its stream

    async def _stream_to(self, peer: str, link: _Link) -> Stream:
        if link.stream is None:
            link.stream = await self.network.open_stream(peer, PROTOCOL)
            self.streams_opened += 1
            assert self._nursery is not None
            self._nursery.start_soon(self._read_replies, link, link.stream)
        return link.stream

    async def _drop(self, link: _Link, stream: Stream) -> None:
        if link.stream is stream:
            link.stream = None
        await quietly(stream.reset)

    async def _read_replies(self, link: _Link, stream: Stream) -> None:
        """Acks to our pings, until the stream ends."""
        peer = stream.remote_peer_id
        try:
            while (reply := await recv_frame_or_eof(stream, max_bytes=MAX_MESSAGE_BYTES)) \
                    is not None:
                for target, msg in self.machine.handle(peer, reply, self._clock()):
                    self._send(target, msg)
        except MembershipError as e:
            log.info("peer=%s malformed membership reply: %s", peer, e)
        except PeerError as e:
            log.debug("peer=%s membership stream ended: %s", peer, e)
        await self._drop(link, stream)

    async def _inbound(self, stream: Stream) -> None:
        """Serve the messages of the peer's stream to us, answering pings on it."""
        peer = stream.remote_peer_id
        served = self._inbound_streams.setdefault(peer, [])
        served.append(stream)
        if len(served) > MAX_INBOUND_PER_PEER:
            await quietly(served.pop(0).reset)
        try:
            while (msg := await recv_frame_or_eof(stream, max_bytes=MAX_MESSAGE_BYTES)) \
                    is not None:
                for target, reply in self.machine.handle(peer, msg, self._clock()):
                    if target != peer:
                        self._send(target, reply)
                        continue
                    with trio.move_on_after(self.config.probe_timeout) as scope:
                        await send_frame(stream, reply)
                    if scope.cancelled_caught:
                        raise PeerError("the peer does not take our acks")
        except MembershipError as e:
            log.info("peer=%s malformed membership message: %s", peer, e)
            await quietly(stream.reset)
            return
        except PeerError as e:
            log.debug("peer=%s membership stream failed: %s", peer, e)
            await quietly(stream.reset)
            return
        finally:
            if stream in served:
                served.remove(stream)
            if not served and self._inbound_streams.get(peer) is served:
                del self._inbound_streams[peer]
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
                    link = self._links.pop(event.peer_id, None)
                    if link is not None and link.stream is not None:
                        await self._drop(link, link.stream)
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
