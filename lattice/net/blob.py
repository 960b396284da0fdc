"""`/lattice/blob/1`: content-addressed, chunked, resumable transfer of blobs (models).

Owns the protocol driver (`serve_blobs` -> `BlobService`: answer ``have``/``get``, and
`BlobService.fetch` from any provider, resuming by offset, verified against the id),
its message parsers, and the `Providers` seam for discovery (default: ask the connected
peers; `DhtProviders` adapts the DHT). The local store (`BlobStore`: a directory of
files named by their SHA-256, written to a temp file then renamed, bounded in total
size) is `lattice.net.blob_store`'s, re-exported here. Spec:
proto/blob.md. Must not import libp2p: it speaks through `lattice.net.streams`.

Verification. A blob id is the plain SHA-256 of the bytes, so `sha256sum model.safetensors`
prints a model's id. A flat hash can only be checked once the last byte is in: a provider
that sends wrong bytes costs at most one blob's worth of transfer, then it is penalized
and the fetch starts over from the next provider (bytes from a provider that only
dropped out mid-way are kept, and the next provider continues from that offset).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from lattice.core.penalties import PenaltyBox
from lattice.net.blob_store import BlobError as BlobError
from lattice.net.blob_store import BlobNotFound as BlobNotFound
from lattice.net.blob_store import BlobStore as BlobStore
from lattice.net.blob_store import BlobStoreFull as BlobStoreFull
from lattice.net.blob_store import blob_id as blob_id
from lattice.net.blob_store import is_blob_id as is_blob_id
from lattice.net.streams import (
    PeerError,
    PeerNetwork,
    RemoteProtocolError,
    Stream,
    parse_peer_input,
    quietly,
    read_into,
    recv_frame,
    recv_frame_or_eof,
    send_frame,
)

log = logging.getLogger("lattice.net.blob")

PROTOCOL = "/lattice/blob/1"
VERSION = 1
MAX_CONTROL_BYTES = 16 * 1024
MAX_REQUESTS_PER_STREAM = 1 << 20
MAX_INT = 2**63 - 1  # rid, size, offset, length

Compute = Callable[[Callable[[], Any]], Awaitable[Any]]


class BlobCorrupt(RemoteProtocolError):
    """A provider's bytes do not hash to the blob id."""


@dataclass(frozen=True)
class BlobConfig:
    """Limits and timeouts (daemon config section ``[blobs]``)."""

    max_store_bytes: int = 4 << 30
    """Disk used for model blobs, at most."""
    keep_free_bytes: int = 0
    """The store refuses a write that would leave less free space on its disk
    (``[volunteer] keep_free_gb``)."""
    max_blob_bytes: int = 1 << 30
    chunk_bytes: int = 256 * 1024
    """Bytes per ``get`` (a provider serves at most max_chunk_bytes per request)."""
    max_chunk_bytes: int = 1 << 20
    request_timeout: float = 30.0
    """One request/response on a stream."""
    find_timeout: float = 5.0
    max_serving: int = 64
    """Concurrent inbound streams; beyond it requests get ``busy``."""
    max_providers_asked: int = 32
    penalty_backoff: float = 60.0
    """A peer that sent a malformed request or bytes that do not hash to the id is
    neither served nor asked for this long (doubling for each further offence)."""


# -- discovery ----------------------------------------------------------------------------


class Providers(Protocol):
    """Where to find a blob, and announcing that we hold one."""

    async def find_providers(self, bid: str) -> list[str]: ...

    async def provide(self, bid: str) -> None: ...


class AskConnectedPeers:
    """Default discovery: ask every connected peer (at most ``max_asked``, at once)
    whether it has the blob. Announcing is a no-op: we are asked directly."""

    def __init__(self, network: PeerNetwork, service: BlobService) -> None:
        self.network = network
        self.service = service

    async def find_providers(self, bid: str) -> list[str]:
        peers = [p for p in self.network.connected_peers() if p != self.network.peer_id]
        peers = peers[: self.service.config.max_providers_asked]
        found: list[str] = []

        async def ask(peer: str) -> None:
            if await self.service.ask_have(peer, bid) is not None:
                found.append(peer)

        with trio.move_on_after(self.service.config.find_timeout):
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(ask, peer)
        return sorted(found)

    async def provide(self, bid: str) -> None:
        return None


class DhtProviders:
    """Discovery through `lattice.net.dht` (anything with ``provide(name)`` and
    ``find_providers(name) -> [obj with .peer_id]``)."""

    def __init__(self, dht: Any) -> None:
        self.dht = dht

    async def find_providers(self, bid: str) -> list[str]:
        return [p.peer_id for p in await self.dht.find_providers(f"blob:{bid}")]

    async def provide(self, bid: str) -> None:
        await self.dht.provide(f"blob:{bid}")


# -- the service --------------------------------------------------------------------------


class BlobFormatError(ValueError):
    """A request or answer that does not follow proto/blob.md."""


@dataclass(frozen=True)
class Request:
    """A checked ``have`` or ``get`` request (``offset``/``length`` -1 for ``have``)."""

    t: str
    rid: int
    bid: str
    offset: int = -1
    length: int = -1


def _int(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_INT


def parse_request(msg: Any) -> Request:
    """A client's request, checked; raises BlobFormatError. A ``get`` whose range
    misses the blob is well-formed: the provider answers ``error: range``."""
    if not isinstance(msg, dict) or msg.get("v") != VERSION or not _int(msg.get("rid")):
        raise BlobFormatError("a request is a map with v: 1 and an integer rid")
    t, bid = msg.get("t"), msg.get("id")
    if t not in ("have", "get"):
        raise BlobFormatError(f"unknown request {str(t)[:16]!r}")
    if not is_blob_id(bid):
        raise BlobFormatError("bad blob id")
    if t == "have":
        return Request("have", msg["rid"], bid)
    if not (_int(msg.get("offset")) and _int(msg.get("length"))):
        raise BlobFormatError("offset and length are non-negative integers")
    return Request("get", msg["rid"], bid, msg["offset"], msg["length"])


def parse_reply(msg: Any, kinds: tuple[str, ...], rid: int, max_size: int) -> dict[str, Any]:
    """A provider's answer to request ``rid``: one of ``kinds``, with ``size`` (have) in
    [0, max_size] and ``offset``/``length`` (data) integers; raises BlobFormatError."""
    if not isinstance(msg, dict) or msg.get("t") not in kinds or msg.get("rid") != rid:
        got = msg.get("t") if isinstance(msg, dict) else type(msg).__name__
        raise BlobFormatError(f"expected {kinds} for request {rid}, got {str(got)[:32]!r}")
    if msg["t"] == "have" and not (_int(msg.get("size")) and msg["size"] <= max_size):
        raise BlobFormatError(f"blob size {str(msg.get('size'))[:32]} outside [0, {max_size}]")
    if msg["t"] == "data" and not (_int(msg.get("offset")) and _int(msg.get("length"))):
        raise BlobFormatError("data header needs integer offset and length")
    return msg


async def _compute_inline(fn: Callable[[], Any]) -> Any:
    await trio.lowlevel.checkpoint()
    return fn()


async def _compute_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


class BlobService:
    """The running `/lattice/blob/1` service (what `serve_blobs` hands back)."""

    def __init__(self, network: PeerNetwork, store: BlobStore, config: BlobConfig,
                 providers: Providers | None, compute: Compute) -> None:
        self.network = network
        self.store = store
        self.config = config
        self.providers: Providers = providers or AskConnectedPeers(network, self)
        self.compute = compute
        self._serving = 0
        self._fetching: dict[str, trio.Lock] = {}
        self.counts: Counter[str] = Counter()
        self.penalties = PenaltyBox(base=config.penalty_backoff)
        self.bytes_served = 0
        self.bytes_fetched = 0

    # local ------------------------------------------------------------------------------------
    async def put(self, data: bytes, *, announce: bool = True) -> str:
        """Store ``data`` and (by default) announce that we provide it."""
        bid = await self.compute(lambda: self.store.put(data))
        if announce:
            await self.providers.provide(bid)
        return bid

    # client -------------------------------------------------------------------------------------
    async def ask_have(self, peer: str, bid: str) -> int | None:
        """The blob's size if ``peer`` has it; None if not or unreachable."""
        try:
            with trio.fail_after(self.config.request_timeout):
                stream = await self.network.open_stream(peer, PROTOCOL)
                try:
                    await send_frame(stream, {"t": "have", "v": VERSION, "rid": 0, "id": bid})
                    reply = parse_peer_input(
                        parse_reply, await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES),
                        ("have", "missing", "error"), 0, self.config.max_blob_bytes)
                finally:
                    await quietly(stream.close)
        except (PeerError, trio.TooSlowError) as e:
            if isinstance(e, RemoteProtocolError):
                self._penalize(peer, "malformed_reply")
            log.debug("peer=%s blob=%s have? failed: %r", peer, bid[:12], e)
            return None
        return reply["size"] if reply["t"] == "have" else None

    async def fetch(self, bid: str, *, hints: Iterable[str] = (), timeout: float | None = None,
                    max_bytes: int | None = None) -> bytes:
        """The blob's bytes, from the local store or any provider (``hints`` first, then
        `Providers.find_providers`); stored locally once verified. A provider announcing
        more than ``max_bytes`` (default: the config's max_blob_bytes) is refused.
        Raises BlobNotFound, or BlobStoreFull when the store has no room for it."""
        if not is_blob_id(bid):
            raise ValueError(f"not a blob id: {bid!r}")
        lock = self._fetching.setdefault(bid, trio.Lock())
        async with lock:  # one download per blob; later callers find it stored
            try:
                if not self.store.has(bid):
                    with trio.move_on_after(timeout if timeout is not None else float("inf")):
                        await self._download(bid, list(hints), max_bytes or self.config.max_blob_bytes)
            except BlobStoreFull:
                self.store.discard_partial(bid)  # no room: nothing half-kept either
                self.counts["fetch_store_full"] += 1
                raise
            finally:
                self._fetching.pop(bid, None)
        if not self.store.has(bid):
            self.counts["fetch_failed"] += 1
            raise BlobNotFound(f"no provider delivered blob {bid}")
        return await self.compute(lambda: self.store.get(bid))

    async def _download(self, bid: str, hints: list[str], max_bytes: int) -> None:
        me = self.network.peer_id
        tried: set[str] = set()
        pending = [p for p in dict.fromkeys(hints) if p != me]
        found_more = False
        contributors: set[str] = set()
        while True:
            if not pending:
                if found_more:
                    return
                found_more = True
                with trio.move_on_after(self.config.find_timeout):
                    found = await self.providers.find_providers(bid)
                    pending = [p for p in found if p != me and p not in tried]
                if not pending:
                    return
            provider = pending.pop(0)
            tried.add(provider)
            if self.penalties.is_penalized(provider, trio.current_time()):
                self.counts["skipped_penalized"] += 1
                continue
            try:
                done = await self._download_from(provider, bid, contributors, max_bytes)
            except BlobCorrupt as e:
                for peer in contributors:
                    self._penalize(peer, "corrupt")
                log.warning("blob=%s corrupt after download (providers %s): %s; starting over",
                            bid[:12], sorted(contributors), e)
                self.counts["corrupt"] += 1
                contributors.clear()
                continue
            except (PeerError, trio.TooSlowError) as e:
                if isinstance(e, RemoteProtocolError):
                    self._penalize(provider, "malformed_reply")
                self.counts["provider_failed"] += 1
                log.debug("peer=%s blob=%s fetch interrupted at %d: %r", provider, bid[:12],
                          self.store.partial_size(bid), e)
                continue
            if done:
                return

    async def _download_from(self, provider: str, bid: str, contributors: set[str], max_bytes: int) -> bool:
        """Continue the partial download from ``provider``; True when the blob is stored,
        False when the provider does not have it. Raises BlobCorrupt, PeerError."""
        cfg = self.config
        with trio.fail_after(cfg.request_timeout):
            raw = await self.network.open_stream(provider, PROTOCOL)
        try:
            with trio.fail_after(cfg.request_timeout):
                await send_frame(raw, {"t": "have", "v": VERSION, "rid": 0, "id": bid})
                reply = parse_peer_input(
                    parse_reply, await recv_frame(raw, max_bytes=MAX_CONTROL_BYTES),
                    ("have", "missing", "error"), 0, min(max_bytes, cfg.max_blob_bytes))
            if reply["t"] != "have":
                return False
            size = reply["size"]
            offset = self.store.partial_size(bid)
            if offset > size:
                self.store.discard_partial(bid)  # an earlier provider claimed a longer blob
                contributors.clear()
                offset = 0
            if offset:
                self.counts["resumed"] += 1
            rid = 1
            while offset < size:
                length = min(cfg.chunk_bytes, size - offset)
                with trio.fail_after(cfg.request_timeout):
                    await send_frame(raw, {"t": "get", "v": VERSION, "rid": rid, "id": bid,
                                           "offset": offset, "length": length})
                    head = parse_peer_input(
                        parse_reply, await recv_frame(raw, max_bytes=MAX_CONTROL_BYTES),
                        ("data", "missing", "error"), rid, size)
                    if head["t"] != "data":
                        raise RemoteProtocolError(f"provider answered {head['t']} after have")
                    n = head["length"]
                    if head["offset"] != offset or not 0 < n <= length:
                        raise RemoteProtocolError("data header does not match the request")
                    buf = bytearray(n)
                    await read_into(raw, memoryview(buf))
                contributors.add(provider)
                await self.compute(lambda: self.store.append_partial(bid, offset, bytes(buf)))
                offset += n
                self.bytes_fetched += n
                rid += 1
            await quietly(raw.close)
        except BaseException:
            await quietly(raw.reset)
            raise
        if not await self.compute(lambda: self.store.finish_partial(bid)):
            raise BlobCorrupt(f"bytes do not hash to {bid}")
        self.counts["fetched"] += 1
        return True

    # server ---------------------------------------------------------------------------------------
    async def handle(self, stream: Stream) -> None:
        """Serve ``have``/``get`` requests on one stream until the client closes it.

        Failure policy: a malformed request (`parse_request` refused or choked on it)
        resets the stream, is counted (``bad_requests``) and penalizes the peer, whose
        streams are then reset at once for ``penalty_backoff`` (doubling); a stream idle
        for ``request_timeout`` is reset. Store errors and bugs propagate."""
        peer = stream.remote_peer_id
        if self.penalties.is_penalized(peer, trio.current_time()):
            self.counts["refused_penalized"] += 1
            await quietly(stream.reset)
            return
        if self._serving >= self.config.max_serving:
            self.counts["refused_busy"] += 1
            try:
                with trio.fail_after(self.config.request_timeout):
                    msg = await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES)
                rid = msg.get("rid") if isinstance(msg, dict) and _int(msg.get("rid")) else None
                await send_frame(stream, {"t": "error", "rid": rid, "reason": "busy"})
            except trio.TooSlowError:
                pass
            finally:
                await quietly(stream.close)
            return
        self._serving += 1
        try:
            for _ in range(MAX_REQUESTS_PER_STREAM):
                with trio.fail_after(self.config.request_timeout):
                    msg = await recv_frame_or_eof(stream, max_bytes=MAX_CONTROL_BYTES)
                if msg is None:
                    break
                await self._answer(stream, msg)
        except RemoteProtocolError as e:
            log.info("peer=%s blob request refused: %s", peer, e)
            self.counts["bad_requests"] += 1
            self._penalize(peer, "malformed_request")
            await quietly(stream.reset)
        except trio.TooSlowError:
            await quietly(stream.reset)
        finally:
            self._serving -= 1

    async def _answer(self, stream: Stream, msg: Any) -> None:
        request = parse_peer_input(parse_request, msg)
        rid, bid = request.rid, request.bid
        size = self.store.size(bid)
        if request.t == "have":
            self.counts["have"] += 1
            reply = {"t": "have", "rid": rid, "size": size} if size is not None else {"t": "missing", "rid": rid}
            await send_frame(stream, reply)
            return
        offset, length = request.offset, request.length
        if size is None:
            await send_frame(stream, {"t": "missing", "rid": rid})
            return
        if not (offset < size and length > 0):
            await send_frame(stream, {"t": "error", "rid": rid, "reason": "range"})
            return
        n = min(length, self.config.max_chunk_bytes, size - offset)
        data = self.store.read(bid, offset, n)  # <= 1 MiB from the page cache
        await send_frame(stream, {"t": "data", "rid": rid, "offset": offset, "length": len(data)})
        await stream.write(data)
        self.counts["chunks_served"] += 1
        self.bytes_served += len(data)

    def _penalize(self, peer: str, reason: str) -> None:
        backoff = self.penalties.penalize(peer, reason, trio.current_time())
        log.info("peer=%s blob penalized (%s); refused for %.0f s", peer, reason, backoff)

    def statistics(self) -> dict[str, Any]:
        return {**self.counts, "serving": self._serving, "bytes_served": self.bytes_served,
                "bytes_fetched": self.bytes_fetched,
                **self.penalties.statistics(trio.current_time()),
                "store": self.store.statistics()}



async def serve_blobs(network: PeerNetwork, store: BlobStore, *, config: BlobConfig = BlobConfig(),
                      providers: Providers | None = None, compute: Compute | None = None,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `/lattice/blob/1` from ``store`` until cancelled; hands back the
    `BlobService`. ``compute`` runs file hashing and big writes (default: a thread)."""
    service = BlobService(network, store, config, providers, compute or _compute_thread)
    network.set_stream_handler(PROTOCOL, service.handle)
    task_status.started(service)
    await trio.sleep_forever()
