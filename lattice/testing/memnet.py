"""An in-memory `PeerNetwork`: many fake peers in one trio run, no sockets.

Streams are pairs of bounded trio memory channels carrying byte chunks. Two peers are
*connected* from the first stream between them (or `MemoryPeer.connect`) until one goes
offline or a partition cuts them; each side gets the `PeerEvent`s a real host emits. A
peer can be taken offline (`MemoryNetwork.disconnect`) to simulate a crash: its open
streams are reset and new streams to or from it fail with `PeerError`. A peer can also be
stalled (`MemoryNetwork.stall`), like a hung process: streams open, nothing arrives.

Replayable: ``MemoryNetwork(seed=S)`` derives every peer's identity from ``S`` (and
`MemoryNetwork.rng` is there for the test's own randomness), so a failing test run is
reproduced by its seed.
"""

from __future__ import annotations

import random

import trio

from lattice.core.identity import Identity
from lattice.net.streams import (
    CONNECTED,
    DISCONNECTED,
    PeerError,
    PeerEvent,
    PeerEventHub,
    PeerEvents,
    StreamClosedError,
    StreamHandler,
)

_CHANNEL_DEPTH = 64


class MemoryStream:
    def __init__(self, protocol: str, remote_peer_id: str,
                 send: trio.MemorySendChannel, recv: trio.MemoryReceiveChannel,
                 link: _Link, net: MemoryNetwork, owner: str) -> None:
        self.protocol = protocol
        self.remote_peer_id = remote_peer_id
        self._send = send
        self._recv = recv
        self._pending = b""
        self._link = link
        self._net = net
        self._owner = owner

    async def read(self, max_bytes: int) -> bytes:
        while self._net.stalled(self._owner) or self._net.stalled(self.remote_peer_id):
            await self._net.wait_resumed()
        if not self._pending:
            try:
                self._pending = await self._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                if self._link.reset:
                    raise StreamClosedError("stream reset") from None
                return b""
        chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return chunk

    async def write(self, data: bytes | memoryview) -> None:
        if self._link.reset:
            raise StreamClosedError("stream reset")
        try:
            await self._send.send(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise StreamClosedError("stream closed by remote") from None

    async def close_write(self) -> None:
        await self._send.aclose()

    async def close(self) -> None:
        await self._send.aclose()

    async def reset(self) -> None:
        self._link.reset = True
        await self._send.aclose()
        await self._recv.aclose()


class _Link:
    reset = False


class MemoryPeer:
    """One fake peer: implements `lattice.net.streams.PeerNetwork`."""

    def __init__(self, net: MemoryNetwork, identity: Identity) -> None:
        self._net = net
        self.identity = identity
        self._handlers: dict[str, StreamHandler] = {}
        self._nursery: trio.Nursery | None = None
        self.streams: list[MemoryStream] = []
        self.events = PeerEventHub()

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

    def connected_peers(self) -> list[str]:
        return self._net.neighbours(self.peer_id)

    def peer_events(self, *, buffer: int = 64) -> PeerEvents:
        return self.events.subscribe(buffer)

    async def connect(self, peer_id: str) -> None:
        """Connect to ``peer_id`` without opening a stream (a dial)."""
        await trio.lowlevel.checkpoint()
        if peer_id not in self._net.peers or not self._net.reachable(self.peer_id, peer_id):
            raise PeerError(f"cannot reach {peer_id}")
        self._net.link_up(self.peer_id, peer_id)

    async def disconnect(self, peer_id: str) -> None:
        """Close the link to ``peer_id`` (its open streams are reset)."""
        await trio.lowlevel.checkpoint()
        pair = {self.peer_id, peer_id}
        self._net._reset_streams(lambda s, owner: {owner, s.remote_peer_id} == pair)
        self._net._links_down(lambda a, b: {a, b} == pair)

    async def open_stream(self, peer_id: str, protocol: str, *, route: bool = True) -> MemoryStream:
        await trio.lowlevel.checkpoint()
        remote = self._net.peers.get(peer_id)
        if remote is None or not self._net.reachable(self.peer_id, peer_id):
            raise PeerError(f"cannot reach {peer_id}")
        handler = remote._handlers.get(protocol)
        if handler is None or remote._nursery is None:
            raise PeerError(f"{peer_id} does not speak {protocol}")
        self._net.link_up(self.peer_id, peer_id)
        a_send, b_recv = trio.open_memory_channel[bytes](_CHANNEL_DEPTH)
        b_send, a_recv = trio.open_memory_channel[bytes](_CHANNEL_DEPTH)
        link = _Link()
        ours = MemoryStream(protocol, peer_id, a_send, a_recv, link, self._net, self.peer_id)
        theirs = MemoryStream(protocol, self.peer_id, b_send, b_recv, link, self._net, peer_id)
        self.streams.append(ours)
        remote.streams.append(theirs)
        remote._nursery.start_soon(remote._run_handler, handler, theirs)
        return ours

    async def _run_handler(self, handler: StreamHandler, stream: MemoryStream) -> None:
        try:
            await handler(stream)
        except PeerError:
            pass  # a vanished peer ends only its own exchange
        finally:
            await stream.close()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept inbound streams until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()


class MemoryNetwork:
    """A set of fake peers. Every pair can reach each other unless cut apart."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        """Randomness for the test (identities, nonces): replayed with the seed."""
        self.peers: dict[str, MemoryPeer] = {}
        self.links: set[frozenset[str]] = set()
        self._offline: set[str] = set()
        self._stalled: set[str] = set()
        self._resumed = trio.Event()
        self._partition: dict[str, int] | None = None
        self._cut: set[frozenset[str]] = set()

    def add_peer(self, identity: Identity | None = None) -> MemoryPeer:
        """A new peer; without ``identity``, one derived from the network's seed (fresh
        randomness when the network has none)."""
        if identity is None:
            identity = Identity.generate(self.rng if self.seed is not None else None)
        peer = MemoryPeer(self, identity)
        self.peers[peer.peer_id] = peer
        return peer

    def link_up(self, a: str, b: str) -> None:
        link = frozenset((a, b))
        if link in self.links:
            return
        self.links.add(link)
        self.peers[a].events.publish(PeerEvent(CONNECTED, b, "outbound"))
        self.peers[b].events.publish(PeerEvent(CONNECTED, a, "inbound"))

    def _links_down(self, predicate) -> None:
        """Drop the links ``predicate(a, b)`` cuts; both ends hear of it."""
        for link in [link for link in self.links if predicate(*sorted(link))]:
            self.links.discard(link)
            a, b = sorted(link)
            self.peers[a].events.publish(PeerEvent(DISCONNECTED, b))
            self.peers[b].events.publish(PeerEvent(DISCONNECTED, a))

    def reachable(self, a: str, b: str) -> bool:
        if a in self._offline or b in self._offline:
            return False
        if self._partition is not None:
            return self._partition.get(a) == self._partition.get(b)
        return True

    def neighbours(self, peer_id: str) -> list[str]:
        out = []
        for link in self.links:
            if peer_id in link:
                (other,) = link - {peer_id}
                if self.reachable(peer_id, other):
                    out.append(other)
        return sorted(out)

    def disconnect(self, peer_id: str) -> None:
        """Take a peer offline (crash): its links go and its open streams are reset."""
        self._offline.add(peer_id)
        self._reset_streams(lambda s, owner: owner == peer_id or s.remote_peer_id == peer_id)
        self._links_down(lambda a, b: peer_id in (a, b))

    def reconnect(self, peer_id: str) -> None:
        self._offline.discard(peer_id)

    def stall(self, peer_id: str) -> None:
        """Freeze a peer, like a hung process: its connections stay up and streams to
        it open, but nothing it sends or is sent arrives until `resume`."""
        self._stalled.add(peer_id)

    def resume(self, peer_id: str) -> None:
        self._stalled.discard(peer_id)
        self._resumed.set()
        self._resumed = trio.Event()

    def stalled(self, peer_id: str) -> bool:
        return peer_id in self._stalled

    async def wait_resumed(self) -> None:
        await self._resumed.wait()

    def partition(self, *groups: list[str]) -> None:
        """Cut the network into groups that cannot reach each other."""
        self._partition = {p: i for i, group in enumerate(groups) for p in group}
        self._reset_streams(
            lambda s, owner: not self.reachable(owner, s.remote_peer_id))
        self._cut = {link for link in self.links if not self.reachable(*link)}
        self._links_down(lambda a, b: not self.reachable(a, b))

    def heal(self) -> None:
        """End the partition; the connections it cut come back (as a host's keepers
        would redial them), each end told by a ``connected`` event."""
        self._partition = None
        cut, self._cut = self._cut, set()
        for a, b in (sorted(link) for link in cut):
            if self.reachable(a, b):
                self.link_up(a, b)

    def _reset_streams(self, predicate) -> None:
        for owner, peer in self.peers.items():
            for s in peer.streams:
                if predicate(s, owner):
                    s._link.reset = True
                    s._send.close()
                    s._recv.close()
            peer.streams = [s for s in peer.streams if not s._link.reset]
