"""The stream interface every protocol driver uses, and length-prefixed msgpack framing.

Owns: `Stream` / `PeerNetwork` (what a driver may ask of the network), peer connect and
disconnect events (`PeerEvent`, fanned out to bounded subscriptions by `PeerEventHub`:
the one way a service learns that a peer came or went), `send_frame` / `recv_frame`,
the error a vanished or misbehaving peer raises (`PeerError`), and `parse_peer_input`,
the one way a driver runs a parser over what a peer sent.
Must not import libp2p: `lattice.net.host` adapts py-libp2p to this interface and
`lattice.testing.memnet` provides an in-memory one.

Frame: 4-byte big-endian length, then that many bytes of msgpack (proto/README.md).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import trio

from lattice.core.codec import DEFAULT_MAX_BYTES, DecodeError, pack, unpack

_LEN = struct.Struct(">I")
T = TypeVar("T")


class PeerError(Exception):
    """The remote peer vanished, reset the stream, or broke the protocol.

    The one error a per-peer exchange catches; everything else is a bug and propagates.
    """


class StreamClosedError(PeerError):
    """The remote closed its side before we got what we needed (EOF or reset)."""


class RemoteProtocolError(PeerError):
    """The remote sent bytes that violate the protocol (bad frame, bad message)."""


class MalformedInputError(RemoteProtocolError):
    """A parser raised something other than a protocol error on the peer's input
    (``__cause__`` holds what it raised: ValueError, KeyError, RecursionError...)."""


def parse_peer_input(parse: Callable[..., T], *args: Any,
                     keep: tuple[type[Exception], ...] = (), **kwargs: Any) -> T:
    """``parse(*args, **kwargs)`` over what a peer sent: the one way a handler reads
    peer input. ``parse`` is pure (it only looks at its arguments), so whatever it
    raises was caused by the peer and becomes a `RemoteProtocolError` - `PeerError`s
    pass through, exception types in ``keep`` (typed errors the caller handles itself,
    such as `InvalidTensor`) too. The handler's existing `RemoteProtocolError` path
    then counts it, penalizes the peer and serves on. Our own code outside ``parse``
    keeps its bugs: they propagate as always."""
    try:
        return parse(*args, **kwargs)
    except PeerError:
        raise
    except keep:
        raise
    except Exception as e:  # the peer-input boundary (above): blame the input, not us
        name = getattr(parse, "__qualname__", type(parse).__name__)
        raise MalformedInputError(f"{name}: {type(e).__name__}: {str(e)[:200]}") from e


async def quietly(action: Callable[[], Awaitable[Any]]) -> None:
    """Close or reset a stream whose peer may already be gone, even while cancelled
    (shielded, at most 1 s): a `PeerError` then only means it was closed already."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await action()
        except PeerError:
            pass  # already closed by the other side: nothing left to release


class Stream(Protocol):
    """A bidirectional byte stream to one peer, for one protocol."""

    remote_peer_id: str
    protocol: str

    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at EOF; raises StreamClosedError on reset."""
        ...

    async def write(self, data: bytes | memoryview) -> None: ...

    async def close_write(self) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


StreamHandler = Callable[[Stream], Awaitable[None]]


class StreamWrapper:
    """A `Stream` around ``stream``: its identity and its ends pass through; a subclass
    says what happens to the bytes (``read``/``write``)."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self.remote_peer_id = stream.remote_peer_id
        self.protocol = stream.protocol

    async def close_write(self) -> None:
        await self._stream.close_write()

    async def close(self) -> None:
        await self._stream.close()

    async def reset(self) -> None:
        await self._stream.reset()


class CountingStream(StreamWrapper):
    """``stream``, counting its bytes both ways into ``counts``: any object with
    ``bytes_sent`` and ``bytes_received`` (a sync session that reports them while it
    runs), by default this wrapper itself."""

    def __init__(self, stream: Stream, counts: Any = None) -> None:
        super().__init__(stream)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._counts = self if counts is None else counts

    async def read(self, max_bytes: int) -> bytes:
        data = await self._stream.read(max_bytes)
        self._counts.bytes_received += len(data)
        return data

    async def write(self, data: bytes | memoryview) -> None:
        await self._stream.write(data)
        self._counts.bytes_sent += len(data)


CONNECTED = "connected"
DISCONNECTED = "disconnected"
ADDED = "added"
LAGGED = "lagged"


@dataclass(frozen=True)
class PeerEvent:
    """A peer's first connection came up (``connected``) or its last one went down
    (``disconnected``). ``added``: another connection to a connected peer came up
    (``relayed`` says which kind: a punched direct one beside a relayed one, for
    lattice.net.nat); subscribers that count peers ignore it. ``lagged`` (no peer)
    tells a subscriber that fell behind that events were dropped: re-read
    `PeerNetwork.connected_peers` once."""

    kind: str
    peer_id: str = ""
    direction: str = "unknown"  # "inbound" | "outbound" | "unknown"
    addr: str = ""
    relayed: bool = False


class PeerEvents:
    """One subscription to peer events: ``async for event in events`` until closed.
    Bounded: when the queue is full further events are dropped (counted), and the next
    one delivered is a ``lagged`` event. Use as a context manager (closing it stops
    delivery)."""

    def __init__(self, hub: PeerEventHub, buffer: int) -> None:
        self._hub = hub
        self._send, self._receive = trio.open_memory_channel[PeerEvent](buffer)
        self.dropped = 0
        self._lagging = False

    def _offer(self, event: PeerEvent) -> None:
        try:
            if self._lagging:
                self._send.send_nowait(PeerEvent(LAGGED))
                self._lagging = False
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
            self._hub.dropped += 1
            self._lagging = True
        except trio.ClosedResourceError:
            pass

    def close(self) -> None:
        self._hub._subscribers.discard(self)
        self._send.close()

    def __enter__(self) -> PeerEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[PeerEvent]:
        return self._receive.__aiter__()


class PeerEventHub:
    """Fans peer events out to subscriptions; a `PeerNetwork` implementation owns one
    and calls `publish` from wherever its transport learns of a connection."""

    def __init__(self) -> None:
        self._subscribers: set[PeerEvents] = set()
        self.published = 0
        self.dropped = 0

    def subscribe(self, buffer: int = 64) -> PeerEvents:
        events = PeerEvents(self, buffer)
        self._subscribers.add(events)
        return events

    def publish(self, event: PeerEvent) -> None:
        self.published += 1
        for events in list(self._subscribers):
            events._offer(event)

    def statistics(self) -> dict[str, int]:
        return {"subscribers": len(self._subscribers), "published": self.published,
                "dropped": self.dropped}


class PeerNetwork(Protocol):
    """What a protocol driver may ask of the network."""

    @property
    def peer_id(self) -> str: ...

    async def open_stream(self, peer_id: str, protocol: str, *, route: bool = True) -> Stream:
        """Open a stream on an existing or new connection; raises PeerError. With
        ``route`` a peer we are not connected to is reached by its id however the
        network can (behind a NAT: through a relay); without, only at its addresses."""
        ...

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None: ...

    def connected_peers(self) -> list[str]: ...

    async def disconnect(self, peer_id: str) -> None:
        """Close our connections to ``peer_id`` (the connection manager trims)."""
        ...

    def peer_events(self, *, buffer: int = 64) -> PeerEvents:
        """Subscribe to peer connect/disconnect events from now on (`PeerEvents`);
        peers already connected are in `connected_peers`."""
        ...


async def read_exactly(stream: Stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise StreamClosedError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_into(stream: Stream, view: memoryview) -> None:
    """Fill ``view`` (a writable byte view) from the stream or raise StreamClosedError."""
    filled = 0
    total = len(view)
    while filled < total:
        chunk = await stream.read(min(total - filled, 1 << 20))
        if not chunk:
            raise StreamClosedError(f"stream ended after {filled} of {total} bytes")
        view[filled:filled + len(chunk)] = chunk
        filled += len(chunk)


async def send_frame(stream: Stream, message: Any) -> None:
    body = pack(message)
    await stream.write(_LEN.pack(len(body)) + body)


async def recv_frame(stream: Stream, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """The next framed message; raises StreamClosedError at EOF, RemoteProtocolError
    for an oversized or undecodable frame."""
    return await _read_body(stream, await read_exactly(stream, _LEN.size), max_bytes)


async def recv_frame_or_eof(stream: Stream, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any | None:
    """Like recv_frame, but a clean EOF before a new frame returns None."""
    first = await stream.read(1)
    if not first:
        return None
    return await _read_body(stream, first + await read_exactly(stream, _LEN.size - 1), max_bytes)


async def _read_body(stream: Stream, header: bytes, max_bytes: int) -> Any:
    (length,) = _LEN.unpack(header)
    if length > max_bytes:
        raise RemoteProtocolError(f"frame of {length} bytes exceeds limit {max_bytes}")
    body = await read_exactly(stream, length)
    try:
        return unpack(body, max_bytes=max_bytes)
    except DecodeError as e:
        raise RemoteProtocolError(str(e)) from None


def raise_peer_fault(group: BaseExceptionGroup) -> NoReturn:
    """Concurrent halves of one exchange fail together: when every failure is the
    peer's (`PeerError`), raise one of them — a typed fault before a bare closed stream,
    which is usually its echo on the other half. Anything else (a bug) propagates whole."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    if leaves and all(isinstance(e, PeerError) for e in leaves):
        leaves.sort(key=lambda e: type(e) is StreamClosedError)
        raise leaves[0] from None
    raise group


async def run_both(a: Callable[[], Awaitable[None]], b: Callable[[], Awaitable[None]]) -> None:
    """Run two halves of an exchange at once; if one fails the other is cancelled and
    the peer's fault surfaces as one `PeerError` (`raise_peer_fault`)."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a)
            nursery.start_soon(b)
    except BaseExceptionGroup as group:
        raise_peer_fault(group)
