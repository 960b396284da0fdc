"""The DHT's outbound side: one request, one answer, over pooled streams
(`/lattice/kad/1`, proto/dht.md "Messages").

Owns `KadClient` (the in-flight bound, the request deadline, a pool of idle streams
reused per peer, the retry of a stream that turns out closed), `FramedStream` (frames
read with one buffered read each) and `discard`. It decides nothing about peers: a
failure is raised, typed, for `lattice.net.dht` to act on. Must not import libp2p.

Failure policy: `request` raises `RequestTimedOut` after ``request_timeout``,
`RemoteProtocolError` for an answer that does not decode, does not match the request
or comes from someone else (the stream is reset), and `PeerError` when the peer is
unreachable or the stream ends; our own cancellation propagates. Streams that failed
are discarded, never pooled.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, OrderedDict
from typing import Any

import trio

from lattice.core import codec
from lattice.core.kademlia import PROTOCOL_ID, Message, parse_message
from lattice.net.streams import (
    PeerError,
    PeerNetwork,
    RemoteProtocolError,
    Stream,
    StreamClosedError,
    parse_peer_input,
    send_frame,
)

log = logging.getLogger("lattice.net.dht")

_LEN = struct.Struct(">I")
_READ_CHUNK = 64 * 1024
_MAX_POOLED_PER_PEER = 2


class RequestTimedOut(StreamClosedError):
    """A request got no answer within `DHTConfig.request_timeout`."""


class FramedStream:
    """A stream with a read buffer, framed as in `lattice.net.streams`.

    `streams.recv_frame` reads the 4-byte header and the body separately; over
    py-libp2p's yamux every read sends a window update, so one read per frame halves
    the frames a request/response costs. Buffered bytes never outlive an exchange:
    a peer that sends more than one answer breaks the protocol.
    """

    __slots__ = ("stream", "_buf")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    @property
    def remote_peer_id(self) -> str:
        return self.stream.remote_peer_id

    @property
    def idle(self) -> bool:
        return not self._buf

    async def send(self, message: Any) -> None:
        await send_frame(self.stream, message)

    async def recv(self, max_bytes: int) -> Any | None:
        """The next message; None at a clean EOF between frames. Raises
        StreamClosedError (EOF mid-frame, reset) or RemoteProtocolError."""
        while True:
            if len(self._buf) >= _LEN.size:
                (length,) = _LEN.unpack_from(self._buf)
                if length > max_bytes:
                    raise RemoteProtocolError(f"frame of {length} bytes exceeds {max_bytes}")
                end = _LEN.size + length
                if len(self._buf) >= end:
                    body = bytes(self._buf[_LEN.size:end])
                    del self._buf[:end]
                    try:
                        return codec.unpack(body, max_bytes=max_bytes)
                    except codec.DecodeError as e:
                        raise RemoteProtocolError(str(e)) from None
                want = end - len(self._buf)
            else:
                want = _LEN.size - len(self._buf)
            chunk = await self.stream.read(max(want, _READ_CHUNK))
            if not chunk:
                if self._buf:
                    raise StreamClosedError(f"stream ended inside a frame ({len(self._buf)} bytes)")
                return None
            self._buf += chunk

    async def close(self) -> None:
        await self.stream.close()

    async def reset(self) -> None:
        await self.stream.reset()


async def discard(stream: Stream | FramedStream, *, graceful: bool = False) -> None:
    """Close (graceful) or reset a stream we stop using, even while being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            if graceful:
                await stream.close()
            else:
                await stream.reset()
        except PeerError:
            pass  # already gone


class KadClient:
    """Requests to other DHT nodes: at most ``max_inflight`` at once, each answered
    within ``request_timeout`` (the bound is taken before the clock starts: waiting for
    our own limiter is not the peer's fault), on a pooled stream when one is idle
    (at most 2 per peer, reused for ``pool_idle_timeout``, ``max_pooled`` in all)."""

    def __init__(self, network: PeerNetwork, *, max_inflight: int, request_timeout: float,
                 max_message_bytes: int, pool_idle_timeout: float, max_pooled: int) -> None:
        self.network = network
        self.request_timeout = request_timeout
        self.max_message_bytes = max_message_bytes
        self.pool_idle_timeout = pool_idle_timeout
        self.max_pooled = max_pooled
        self._inflight = trio.CapacityLimiter(max_inflight)
        self._idle: OrderedDict[str, list[tuple[FramedStream, float]]] = OrderedDict()
        self.requests_out: Counter[str] = Counter()
        self.streams_opened = 0
        self.open_retries = 0  # streams that opened on the second try (see _open)

    async def request(self, peer_id: str, request: dict[str, Any]) -> Message:
        """Send ``request`` (a wire message) to ``peer_id`` and return its answer,
        checked: the same type and id, a response, from that peer."""
        async with self._inflight:
            self.requests_out[request["type"]] += 1
            try:
                with trio.fail_after(self.request_timeout):
                    return await self._exchange(peer_id, request)
            except trio.TooSlowError:
                raise RequestTimedOut(
                    f"{request['type']} id={request['id']} to {peer_id} timed out") from None

    def forget(self, peer_id: str) -> list[FramedStream]:
        """Stop reusing streams to ``peer_id``; returns them, for the caller to discard."""
        return [s for s, _ in self._idle.pop(peer_id, [])]

    def statistics(self) -> dict[str, Any]:
        return {"requests_out": dict(self.requests_out),
                "inflight_out": self._inflight.borrowed_tokens,
                "max_inflight_out": self._inflight.total_tokens,
                "pooled_streams": sum(len(v) for v in self._idle.values()),
                "streams_opened": self.streams_opened, "open_retries": self.open_retries}

    async def _exchange(self, peer_id: str, request: dict[str, Any]) -> Message:
        stream, reused = await self._checkout(peer_id)
        try:
            raw = await self._roundtrip(stream, request)
        except StreamClosedError:
            await discard(stream)
            if not reused:
                raise
            # the remote closed the idle stream under us: once more on a fresh one
            stream = await self._open(peer_id)
            try:
                raw = await self._roundtrip(stream, request)
            except BaseException:
                await discard(stream)
                raise
        except BaseException:
            await discard(stream)
            raise
        try:
            answer = parse_peer_input(parse_message, raw)
            if (answer.type != request["type"] or not answer.response
                    or answer.id != request["id"] or answer.sender.peer_id != peer_id):
                raise RemoteProtocolError(
                    f"answer to {request['type']} id={request['id']} does not match it")
        except RemoteProtocolError:
            await discard(stream)
            raise
        await self._checkin(peer_id, stream)
        return answer

    async def _roundtrip(self, stream: FramedStream, request: dict[str, Any]) -> Any:
        await stream.send(request)
        raw = await stream.recv(self.max_message_bytes)
        if raw is None:
            raise StreamClosedError("stream closed before the answer")
        return raw

    async def _checkout(self, peer_id: str) -> tuple[FramedStream, bool]:
        now = trio.current_time()
        idle = self._idle.get(peer_id)
        while idle:
            stream, since = idle.pop()
            if not idle:
                del self._idle[peer_id]
            if now - since < self.pool_idle_timeout:
                return stream, True
            await discard(stream, graceful=True)
        return await self._open(peer_id), False

    async def _open(self, peer_id: str) -> FramedStream:
        """A fresh stream. Opening is tried twice: a failure that comes at once (a dial
        that broke off in its handshake, a connection reset while the stream was
        negotiated) passes under load, and one such failure would otherwise drop a live
        peer from the table and from a lookup. A timeout is not retried (the request's
        deadline covers both tries). Peers are dialed at their addresses only, never
        through a relay: a DHT server is publicly reachable, or it is stale."""
        self.streams_opened += 1
        try:
            return FramedStream(await self.network.open_stream(peer_id, PROTOCOL_ID, route=False))
        except RemoteProtocolError:
            raise
        except PeerError as e:
            self.open_retries += 1
            log.debug("peer=%s opening a stream failed (%s); once more", peer_id, e)
            return FramedStream(await self.network.open_stream(peer_id, PROTOCOL_ID, route=False))

    async def _checkin(self, peer_id: str, stream: FramedStream) -> None:
        idle = self._idle.setdefault(peer_id, [])
        self._idle.move_to_end(peer_id)
        if len(idle) >= _MAX_POOLED_PER_PEER or not stream.idle:
            await discard(stream, graceful=True)
            return
        idle.append((stream, trio.current_time()))
        while sum(len(v) for v in self._idle.values()) > self.max_pooled:
            _, streams = self._idle.popitem(last=False)
            for s, _ in streams:
                await discard(s, graceful=True)
