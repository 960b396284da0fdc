"""The Kademlia DHT driver: `/lattice/kad/1` over any `PeerNetwork`.

Owns the I/O around the pure cores `lattice.core.kademlia` (routing table, lookups,
message schema) and `lattice.core.records` (signed records, validation, stores):
request/response exchanges with ids over pooled streams, the inbound handler, and the
periodic work (random-walk refresh, republish of our own records and provider
announcements, expiry GC). Must not import libp2p: it runs unchanged over the real
host (`lattice.net.host`) and over `lattice.testing.memnet`. Spec: proto/dht.md.

Failure policy (`serve_dht`): a peer that vanishes, times out or breaks the protocol
ends only its own exchange. Timeouts and vanished peers count as failures and remove
the peer from the routing table (the replacement cache refills the bucket); protocol
violations (`RemoteProtocolError`: undecodable frames, schema violations, forged or
oversized records in answers) are counted in ``statistics()["rejected"]`` and remove
the peer too. Anything else is our bug and propagates, cancelling the service.

Time: lookups and timers use trio's clock; record expiry uses ``wall_clock`` (unix
seconds), injectable so tests can drive both with `autojump_clock`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import trio

from lattice.core import codec
from lattice.core.identity import Identity
from lattice.core.kademlia import (
    FINISHED,
    MAX_RECORDS_PER_MESSAGE,
    PROTOCOL_ID,
    Lookup,
    MalformedMessage,
    Message,
    Mode,
    ObserveStatus,
    PeerInfo,
    RoutingTable,
    key_hash,
    make_message,
    parse_message,
    parse_peer_info,
    peer_hash,
    target_bytes,
    target_from_bytes,
)
from lattice.core.netgroups import source_group
from lattice.core.penalties import PenaltyBox
from lattice.core.records import (
    LOCAL,
    NS_PROVIDERS,
    BadSignature,
    Malformed,
    Record,
    RecordError,
    RecordLimits,
    RecordStore,
    StoreOutcome,
    TooLarge,
    address_value,
    merge_records,
    peer_key,
    provider_key,
    record_addrs,
    sign_record,
    split_key,
    validate_record,
)
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
# keys whose last background completion time we remember (bounds `_completed`)
_COMPLETIONS_REMEMBERED = 1024

STATE_VERSION = 1
# Answers carrying records stop growing past this, well under the 1 MiB frame limit.
_MAX_ANSWER_RECORD_BYTES = 640 * 1024


class AddressBook(Protocol):
    """Where the DHT leaves the addresses it learns, so the host can dial found peers
    (the real host's peerstore); memnet ignores addresses."""

    def add_addrs(self, peer_id: str, addrs: Sequence[str]) -> None: ...

    def get_addrs(self, peer_id: str) -> list[str]: ...


class MemoryAddressBook:
    """A bounded LRU address book (the default when the host gives none)."""

    def __init__(self, max_peers: int = 4096, max_addrs: int = 16) -> None:
        self.max_peers = max_peers
        self.max_addrs = max_addrs
        self._addrs: OrderedDict[str, list[str]] = OrderedDict()

    def add_addrs(self, peer_id: str, addrs: Sequence[str]) -> None:
        if not addrs:
            return
        merged = list(dict.fromkeys([*addrs, *self._addrs.get(peer_id, [])]))[:self.max_addrs]
        self._addrs[peer_id] = merged
        self._addrs.move_to_end(peer_id)
        while len(self._addrs) > self.max_peers:
            self._addrs.popitem(last=False)

    def get_addrs(self, peer_id: str) -> list[str]:
        return list(self._addrs.get(peer_id, []))


@dataclass(frozen=True)
class DHTConfig:
    """Every bound of the DHT; the daemon maps its `[dht]` config section onto this."""

    mode: Mode = Mode.SERVER
    k: int = 20  # bucket size and lookup result size
    alpha: int = 3  # requests in flight per lookup (until it stalls)
    replication: int = 20  # a put stores at this many closest peers
    # A get converges when this many closest live peers answered; each holds every
    # publisher's record since puts replicate to the `replication` closest.
    get_quorum: int = 3
    # a get answered from our own store asks the network at most this often per key
    get_refresh_interval: float = 30.0
    request_timeout: float = 5.0
    # A lookup that has not converged by then ends with the closest peers that
    # answered (a put stores there, a get returns what it found): an answer in
    # bounded time even when many peers are slow.
    lookup_timeout: float = 20.0
    max_inflight_requests: int = 64
    max_inbound_streams: int = 256
    max_message_bytes: int = 1 << 20
    server_idle_timeout: float = 60.0  # an inbound stream with no request is closed
    pool_idle_timeout: float = 20.0  # we reuse an idle outbound stream this long
    max_pooled_streams: int = 128
    refresh_interval: float = 600.0  # random walk
    republish_interval: float = 3600.0
    provider_ttl: float = 24 * 3600.0
    peer_record_ttl: float = 2 * 3600.0
    gc_interval: float = 60.0
    max_records_per_key: int = 64
    max_records_total: int = 20_000
    max_providers_per_key: int = 64
    max_providers_total: int = 20_000
    # Quotas on what others store at us (records and providers alike), so one peer, or
    # one network's Sybils, cannot fill the store and shut honest publishers out: a
    # publisher's slots, and the slots delivered from one source network (an IPv4 /24,
    # an IPv6 /48: whoever holds one address of a prefix can use them all). A full
    # store evicts from the biggest source first (records.RecordStore).
    max_records_per_publisher: int = 1024
    max_records_per_ip: int = 2000
    source_prefix_v4: int = 24
    source_prefix_v6: int = 48
    max_own_records: int = 1024
    max_liveness_pings: int = 8
    # a peer that broke the protocol is refused (its streams reset, kept out of our
    # table) for this long, doubling with each further offence
    penalty_backoff: float = 60.0
    limits: RecordLimits = field(default_factory=RecordLimits)


@dataclass(frozen=True)
class LookupResult:
    peers: list[str]  # closest first
    hops: int
    queried: int


@dataclass(frozen=True)
class GetResult:
    records: list[Record]  # newest per publisher, ordered by publisher
    hops: int  # longest responder chain behind a returned record (or the lookup)
    queried: int


@dataclass(frozen=True)
class PutResult:
    record: Record
    stored_at: list[str]
    hops: int


@dataclass(frozen=True)
class Provider:
    peer_id: str
    addrs: list[str]
    expires_at: float


class PeerNotFound(LookupError):
    """`find_peer` found neither a routing entry nor a peer record."""


class RequestTimedOut(StreamClosedError):
    """A request got no answer within `DHTConfig.request_timeout`."""


class StateError(ValueError):
    """Persisted DHT state that does not decode (the daemon should start empty)."""


_LEN = struct.Struct(">I")
_READ_CHUNK = 64 * 1024


class _Framed:
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


class KademliaDHT:
    """One node's DHT. Obtain it from `serve_dht`, which runs its background work."""

    def __init__(self, network: PeerNetwork, identity: Identity, *,
                 config: DHTConfig = DHTConfig(),
                 address_book: AddressBook | None = None,
                 self_addrs: Callable[[], Sequence[str]] | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None,
                 source_ip: Callable[[str], str | None] | None = None) -> None:
        if identity.peer_id != network.peer_id:
            raise ValueError("the DHT signs with the network's identity")
        self.network = network
        self.identity = identity
        self.peer_id = identity.peer_id
        self.config = config
        self.mode = Mode(config.mode)
        # Our own bounded copy of every address learnt; the host's book (which may be
        # costly: multiaddr parsing) only hears about changes.
        self._addrs = MemoryAddressBook()
        self.address_book = address_book
        self._self_addrs_fn = self_addrs or (lambda: [])
        self._self_cache: tuple[float, list[str]] = (-math.inf, [])
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self.table = RoutingTable(self.peer_id, k=config.k)
        self._source_ip = source_ip or (lambda peer_id: None)
        self.records = RecordStore(max_per_key=config.max_records_per_key,
                                   max_total=config.max_records_total,
                                   max_per_publisher=config.max_records_per_publisher,
                                   max_per_source=config.max_records_per_ip)
        self.providers = RecordStore(max_per_key=config.max_providers_per_key,
                                     max_total=config.max_providers_total,
                                     max_per_publisher=config.max_records_per_publisher,
                                     max_per_source=config.max_records_per_ip)
        self._own: dict[str, Record] = {}  # key -> our latest record under it
        self._providing: dict[str, Record] = {}  # provider key -> our announcement
        self._bootstrap_peers: list[str] = []
        # False until the first bootstrap (self lookup and bucket refresh) is done:
        # until then our table is partial and our neighbours may not know us yet
        self.joined = False
        self._ids = itertools.count(self._rng.getrandbits(48))
        self._outbound = trio.CapacityLimiter(config.max_inflight_requests)
        self._inbound_streams = 0
        self._idle: OrderedDict[str, list[tuple[_Framed, float]]] = OrderedDict()
        self._pings_in_flight = 0
        self._nursery: trio.Nursery | None = None
        self._completed: OrderedDict[str, float] = OrderedDict()  # key -> last completion
        self._republish_now = trio.Event()
        self.requests_in: Counter[str] = Counter()
        self.requests_out: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.penalties = PenaltyBox(base=config.penalty_backoff)
        self.failures = 0
        self.streams_opened = 0
        self.open_retries = 0  # streams that opened on the second try (see _open)

    # --- public operations ----------------------------------------------------------

    async def bootstrap(self, peers: Iterable[str | tuple[str, Sequence[str]]]) -> int:
        """Join through ``peers`` (peer ids, or (peer id, addrs)): ping them, look up
        ourselves, then refresh the buckets. Returns the routing table size. The peers
        are remembered: the refresh loop rejoins through them if the table empties."""
        ids = []
        for p in peers:
            pid, addrs = (p, ()) if isinstance(p, str) else (p[0], p[1])
            if pid == self.peer_id:
                continue
            self._learn_addrs(pid, list(addrs))
            ids.append(pid)
        self._bootstrap_peers = list(dict.fromkeys([*ids, *self._bootstrap_peers]))[:64]
        async with trio.open_nursery() as nursery:
            for pid in ids:
                nursery.start_soon(self._ping_quietly, pid)
        await self.refresh()
        self.joined = True
        if self._own or self._providing or self.mode is Mode.CLIENT:
            self._republish_now.set()
        return len(self.table)

    async def refresh(self) -> None:
        """A self lookup, then one random walk per bucket (Kademlia bucket refresh)."""
        if not len(self.table) and self._bootstrap_peers:
            for pid in self._bootstrap_peers:
                self.table.add_unverified(pid, trio.current_time())
        await self.find_closest_peers(peer_hash(self.peer_id))
        targets = self.table.refresh_targets(
            [self._rng.getrandbits(256) for _ in range(16)])
        for target in targets:
            await self.find_closest_peers(target)

    async def find_closest_peers(self, target: int, count: int | None = None) -> LookupResult:
        """The ``count`` (default k) live server peers closest to ``target``."""
        lookup = await self._run_lookup(
            target, "FIND_NODE", {"target": target_bytes(target)},
            num_results=count or self.config.k)
        return LookupResult(lookup.result(), lookup.hops, lookup.requests_sent)

    async def put(self, key: str, value: Any, ttl: float) -> PutResult:
        """Sign ``value`` (any msgpack-able value) under ``key`` for ``ttl`` seconds,
        store it at the `replication` closest peers and republish it until it expires.
        Raises `RecordError` (a ValueError) if our own limits refuse it."""
        record = sign_record(self.identity, key, codec.pack(value), self._wall() + ttl)
        record = validate_record(record, self._wall(), self.config.limits)
        if split_key(key)[0] == NS_PROVIDERS:
            raise Malformed("provider records are published with provide()")
        if key not in self._own and len(self._own) >= self.config.max_own_records:
            raise TooLarge(f"already publishing {len(self._own)} records")
        self._own[key] = record
        self.records.put(record, self._wall(), LOCAL)
        return await self._replicate(record, "PUT_VALUE")

    async def get(self, key: str) -> list[Record]:
        """Every live record under ``key``, one per publisher."""
        return (await self.get_result(key)).records

    async def get_result(self, key: str, *, fresh: bool = False) -> GetResult:
        """Every live record under ``key``. When we are among the `replication` closest
        peers to the key, every put reached our own store too: what it holds is the
        answer at once (as hivemind and rust-libp2p do), and a network lookup completes
        our copy in the background. Otherwise, when we hold nothing, or when ``fresh``
        is asked for, it is a network lookup (see `_collect`)."""
        split_key(key)  # Malformed for keys no node would store
        target = key_hash(key)
        local = self.records.get(key, self._wall())
        if local and not fresh and self._among_replicas(target):
            self._complete_in_background(key)
            return GetResult(merge_records(local), 0, 0)
        keep = self._among_replicas(target)
        records, hops, requests = await self._collect(
            key, "GET_VALUE", self.records, "records", "PUT_VALUE", keep=keep)
        if records and keep:
            self._remember_completion(key)
        return GetResult(records, hops, requests)

    async def provide(self, name: str) -> PutResult:
        """Announce that we serve ``name`` (a blob id, a job id...) until `unprovide`;
        the announcement is re-signed and re-sent every republish interval."""
        key = provider_key(name)
        if key not in self._providing and len(self._providing) >= self.config.max_own_records:
            raise TooLarge(f"already providing {len(self._providing)} keys")
        record = self._sign_provider(key)
        self._providing[key] = record
        self.providers.put(record, self._wall(), LOCAL)
        return await self._replicate(record, "ADD_PROVIDER")

    def unprovide(self, name: str) -> None:
        """Stop re-announcing ``name``; remote copies expire with their TTL."""
        self._providing.pop(provider_key(name), None)

    async def find_providers(self, name: str) -> list[Provider]:
        """Live providers of ``name``; their addresses go to the address book."""
        key = provider_key(name)
        records, _, _ = await self._collect(
            key, "GET_PROVIDERS", self.providers, "providers", "ADD_PROVIDER")
        out = []
        for r in records:
            addrs = record_addrs(r)
            self._learn_addrs(r.publisher, addrs)
            out.append(Provider(r.publisher, addrs, r.expires_at))
        return out

    async def find_peer(self, peer_id: str) -> list[str]:
        """Addresses of ``peer_id``: from the routing table, else a lookup towards it
        (stopping when someone names it), else its signed peer record (client-mode
        peers publish one). Raises `PeerNotFound`."""
        if peer_id == self.peer_id:
            return list(self._self_addrs())
        if peer_id in self.table:
            return self._known_addrs(peer_id)
        seen: list[PeerInfo] = []

        def on_answer(lookup: Lookup, peer: str, answer: Message) -> list[PeerInfo]:
            for info in answer.body["closer"]:
                if info.peer_id == peer_id:
                    seen.append(info)
                    lookup.finish()
            return answer.body["closer"]

        target = peer_hash(peer_id)
        await self._run_lookup(target, "FIND_NODE", {"target": target_bytes(target)},
                               num_results=self.config.k, on_answer=on_answer)
        if seen or peer_id in self.table:
            return self._known_addrs(peer_id)
        records = [r for r in await self.get(peer_key(peer_id)) if r.publisher == peer_id]
        if records:
            addrs = record_addrs(records[0])
            self._learn_addrs(peer_id, addrs)
            return addrs
        raise PeerNotFound(peer_id)

    async def republish(self) -> None:
        """Re-send our live records to the current closest peers, re-sign and re-send
        our provider announcements, and (in client mode) our peer record."""
        now = self._wall()
        for key in [k for k, r in self._own.items() if r.expires_at <= now]:
            del self._own[key]
        if self.mode is Mode.CLIENT:
            record = sign_record(self.identity, peer_key(self.peer_id),
                                 address_value(self._self_addrs()),
                                 now + self.config.peer_record_ttl)
            self._own[record.key] = record
            self.records.put(record, now, LOCAL)
        for key in list(self._providing):
            self._providing[key] = self._sign_provider(key)
            self.providers.put(self._providing[key], now, LOCAL)
        limiter = trio.CapacityLimiter(4)

        async def one(record: Record, mtype: str) -> None:
            async with limiter:
                await self._replicate(record, mtype)

        async with trio.open_nursery() as nursery:
            for record in list(self._own.values()):
                nursery.start_soon(one, record, "PUT_VALUE")
            for record in list(self._providing.values()):
                nursery.start_soon(one, record, "ADD_PROVIDER")

    def gc(self) -> int:
        """Drop expired records and provider announcements; returns how many."""
        now = self._wall()
        return self.records.gc(now) + self.providers.gc(now)

    def set_mode(self, mode: Mode | str) -> None:
        """Switch server/client (the host decides reachability); peers learn it from
        our next message, and a client also publishes a peer record."""
        self.mode = Mode(mode)
        if self.mode is Mode.CLIENT:
            self._republish_now.set()

    def statistics(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "mode": self.mode.value,
            "routing_table_size": len(self.table),
            "joined": self.joined,
            "buckets": len(self.table.bucket_sizes()),
            "records_stored": len(self.records),
            "providers_stored": len(self.providers),
            "record_store": self.records.statistics(),
            "provider_store": self.providers.statistics(),
            "own_records": len(self._own),
            "providing": len(self._providing),
            "requests_in": dict(self.requests_in),
            "requests_out": dict(self.requests_out),
            "rejected": dict(self.rejected),
            **self.penalties.statistics(trio.current_time()),
            "request_failures": self.failures,
            "inflight_out": self._outbound.borrowed_tokens,
            "max_inflight_out": self.config.max_inflight_requests,
            "inbound_streams": self._inbound_streams,
            "max_inbound_streams": self.config.max_inbound_streams,
            "pooled_streams": sum(len(v) for v in self._idle.values()),
            "streams_opened": self.streams_opened,
            "open_retries": self.open_retries,
        }

    # --- persistence ----------------------------------------------------------------

    def export_state(self) -> bytes:
        """Routing table (with addresses) and our own records, for the state dir."""
        return codec.pack({
            "version": STATE_VERSION,
            "peers": [{"peer_id": p, "addrs": self._known_addrs(p)[:16]}
                      for p in self.table.peers()],
            "records": [r.to_wire() for r in self._own.values()],
            "providing": [split_key(k)[1] for k in self._providing],
        })

    def import_state(self, data: bytes) -> None:
        """Restore what `export_state` wrote: peers go into the table unverified (the
        first failed request drops them), live records and provider names are kept and
        republished after the next `bootstrap`. Raises `StateError`."""
        try:
            state = codec.unpack(data, max_bytes=64 << 20)
        except codec.DecodeError as e:
            raise StateError(f"DHT state does not decode: {e}") from None
        if (not isinstance(state, dict) or state.get("version") != STATE_VERSION
                or not isinstance(state.get("peers"), list)
                or not isinstance(state.get("records"), list)
                or not isinstance(state.get("providing"), list)):
            raise StateError("DHT state has an unknown layout")
        now = self._wall()
        for raw in state["peers"][:4096]:
            try:
                info = PeerInfo(**{**_peer_fields(raw), "mode": Mode.SERVER})
            except (MalformedMessage, TypeError):
                raise StateError("bad peer entry in DHT state") from None
            self._learn_addrs(info.peer_id, list(info.addrs))
            self.table.add_unverified(info.peer_id, trio.current_time())
            self._bootstrap_peers.append(info.peer_id)
        self._bootstrap_peers = self._bootstrap_peers[:64]
        for raw in state["records"][:self.config.max_own_records]:
            try:
                record = validate_record(raw, now, self.config.limits)
            except RecordError:
                continue  # expired while we were down, or limits tightened
            if record.publisher == self.peer_id:
                self._own[record.key] = record
                self.records.put(record, now, LOCAL)
        for name in state["providing"][:self.config.max_own_records]:
            if isinstance(name, str) and name:
                self._providing[provider_key(name)] = self._sign_provider(provider_key(name))

    # --- lookups --------------------------------------------------------------------

    def _answers_needed(self, target: int) -> int:
        """Answers a get waits for: the quorum, minus one when we are ourselves among
        the quorum closest peers to the target (our own store is one of the answers)."""
        quorum = self.config.get_quorum
        closest = self.table.closest(target, quorum)
        ours = peer_hash(self.peer_id) ^ target
        if len(closest) < quorum or ours < peer_hash(closest[-1]) ^ target:
            return max(quorum - 1, 1)
        return quorum

    def _among_replicas(self, target: int) -> bool:
        """Whether puts for ``target`` store at us: we are among the `replication`
        closest peers our routing table knows."""
        closest = self.table.closest(target, self.config.replication)
        return (len(closest) < self.config.replication
                or peer_hash(self.peer_id) ^ target < peer_hash(closest[-1]) ^ target)

    async def _collect(self, key: str, mtype: str, store: RecordStore, field: str,
                       repair: str, *, keep: bool = False) -> tuple[list[Record], int, int]:
        """Records under ``key`` from our ``store`` and the network (``mtype`` requests
        answered in ``field``): (newest per publisher, hops, requests). Converges when
        the quorum closest live peers answered; when neither they nor we hold anything
        it widens to the k closest
        before calling it a miss, so one replica whose store failed (a timeout under
        load) cannot hide a record. Replicas among the quorum that answered without
        a record we found get it stored in the background (read repair: a ``repair``
        request)."""
        target = key_hash(key)
        found: list[Record] = list(store.get(key, self._wall()))
        verified: dict[bytes, Record] = {r.signature: r for r in found}
        held: dict[str, set[bytes]] = {}

        def on_answer(lookup: Lookup, peer: str, answer: Message) -> list[PeerInfo]:
            records = self._accept_records(peer, key, answer.body[field], verified)
            held[peer] = {r.signature for r in records}
            found.extend(records)
            if keep:  # a replica keeps what it lacked, charged to whoever delivered it
                for record in records:
                    store.put(record, self._wall(), self._source_of(peer))
            return answer.body["closer"]

        lookup = self._new_lookup(target, self._answers_needed(target))
        deadline = trio.current_time() + self.config.lookup_timeout
        await self._drive(lookup, mtype, {"key": key}, on_answer, deadline)
        if not found:
            lookup.widen(self.config.k)
            await self._drive(lookup, mtype, {"key": key}, on_answer, deadline)
        records = merge_records(found)
        holders = [p for p, sigs in held.items() if sigs]
        hops = max((lookup.hops_to(p) for p in holders), default=lookup.hops)
        self._repair_in_background(
            records, [p for p in lookup.result()[:self.config.get_quorum]
                      if p in held and not {r.signature for r in records} <= held[p]],
            repair)
        return records, hops, lookup.requests_sent

    def _complete_in_background(self, key: str) -> None:
        """After a get answered from our store: ask the network too (at most once per
        `get_refresh_interval` per key) and keep what we lacked, for the next get."""
        last = self._completed.get(key)
        if self._nursery is None or (
                last is not None
                and trio.current_time() - last < self.config.get_refresh_interval):
            return
        self._remember_completion(key)

        async def complete() -> None:
            await self._collect(key, "GET_VALUE", self.records, "records", "PUT_VALUE",
                                keep=True)

        self._nursery.start_soon(complete)

    def _remember_completion(self, key: str) -> None:
        """The network was just asked about ``key``: no background completion for a
        while."""
        self._completed[key] = trio.current_time()
        self._completed.move_to_end(key)
        while len(self._completed) > _COMPLETIONS_REMEMBERED:
            self._completed.popitem(last=False)

    def _repair_in_background(self, records: list[Record], peers: list[str],
                              mtype: str) -> None:
        if self._nursery is None or not records or not peers:
            return

        async def repair(peer: str) -> None:
            for record in records:
                with contextlib.suppress(PeerError):
                    await self._request(peer, mtype, record=record.to_wire())

        for peer in peers:
            self._nursery.start_soon(repair, peer)

    def _new_lookup(self, target: int, num_results: int) -> Lookup:
        return Lookup(target, self.table.closest(target, self.config.k),
                      local_peer_id=self.peer_id, num_results=num_results,
                      alpha=self.config.alpha, request_timeout=self.config.request_timeout)

    async def _run_lookup(
        self, target: int, mtype: str, body: dict[str, Any], *, num_results: int,
        on_answer: Callable[[Lookup, str, Message], list[PeerInfo]] | None = None,
    ) -> Lookup:
        lookup = self._new_lookup(target, num_results)
        await self._drive(lookup, mtype, body, on_answer)
        return lookup

    async def _drive(self, lookup: Lookup, mtype: str, body: dict[str, Any],
                     on_answer: Callable[[Lookup, str, Message], list[PeerInfo]] | None,
                     deadline: float | None = None) -> None:
        """Run ``lookup`` until it finishes or ``deadline`` (default: `lookup_timeout`
        from now) passes; our requests for it are cancelled then."""
        if deadline is None:
            deadline = trio.current_time() + self.config.lookup_timeout
        send, recv = trio.open_memory_channel[tuple[str, Message | None]](
            max(lookup.num_results, self.config.alpha))
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = deadline
            while True:
                step = lookup.next(trio.current_time())
                if step is FINISHED:
                    break
                if isinstance(step, list):
                    for peer in step:
                        nursery.start_soon(self._query, peer, mtype, body, send)
                    continue
                with trio.move_on_at(lookup.next_deadline()):
                    peer, answer = await recv.receive()
                    if answer is None:
                        lookup.on_failure(peer)
                        continue
                    closer = (on_answer(lookup, peer, answer) if on_answer
                              else answer.body["closer"])
                    for info in closer:
                        self._learn_addrs(info.peer_id, list(info.addrs))
                    lookup.on_success(peer, [i.peer_id for i in closer
                                             if i.mode is Mode.SERVER])
            nursery.cancel_scope.cancel()

    async def _query(self, peer: str, mtype: str, body: dict[str, Any],
                     results: trio.MemorySendChannel) -> None:
        try:
            answer = await self._request(peer, mtype, **body)
        except PeerError:
            answer = None
        await results.send((peer, answer))

    async def _replicate(self, record: Record, mtype: str) -> PutResult:
        lookup = await self.find_closest_peers(key_hash(record.key))
        targets = lookup.peers[:self.config.replication]
        stored: list[str] = []

        async def store(peer: str) -> None:
            try:
                answer = await self._request(peer, mtype, record=record.to_wire())
            except PeerError as e:
                log.info("peer=%s %s key=%s failed: %s", peer, mtype, record.key, e)
                return
            if answer.body["ok"]:
                stored.append(peer)
            else:
                log.info("peer=%s refused %s key=%s reason=%s", peer, mtype, record.key,
                         answer.body["reason"])

        async with trio.open_nursery() as nursery:
            for peer in targets:
                nursery.start_soon(store, peer)
        return PutResult(record, stored, lookup.hops)

    def _accept_records(self, peer: str, key: str, raw_records: list[Any],
                        verified: dict[bytes, Record]) -> list[Record]:
        """Validate records in an answer. Forged or oversized ones, or ones for another
        key, mean the responder skipped validation: a protocol violation. ``verified``
        holds the records this lookup already checked (replicas answer with the same
        signed bytes; verifying them once is enough)."""
        out = []
        now = self._wall()
        for raw in raw_records:
            sig = raw.get("signature") if isinstance(raw, dict) else None
            known = verified.get(sig) if isinstance(sig, bytes) else None
            if known is not None and known.to_wire() == raw:
                out.append(known)
                continue
            try:
                record = parse_peer_input(validate_record, raw, now, self.config.limits,
                                          keep=(RecordError,))
            except (BadSignature, Malformed, TooLarge) as e:
                self._penalize(peer, e.reason)
                return out
            except RecordError as e:
                self.rejected[e.reason] += 1  # expired in flight or clock skew: no blame
                continue
            except RemoteProtocolError:
                self._penalize(peer, "malformed_record")
                return out
            if record.key != key:
                self._penalize(peer, "wrong_key")
                return out
            verified[record.signature] = record
            out.append(record)
        return out

    def _sign_provider(self, key: str) -> Record:
        return sign_record(self.identity, key, address_value(self._self_addrs()),
                           self._wall() + self.config.provider_ttl)

    # --- outbound requests ----------------------------------------------------------

    def _self_addrs(self) -> list[str]:
        # asked for on every message; the host computes them from its listeners, so
        # re-read them at most once a second
        now = trio.current_time()
        if now - self._self_cache[0] >= 1.0:
            self._self_cache = (now, [str(a) for a in self._self_addrs_fn()][:16])
        return self._self_cache[1]

    def _self_info(self) -> PeerInfo:
        return PeerInfo(self.peer_id, tuple(self._self_addrs()), self.mode)

    def _learn_addrs(self, peer_id: str, addrs: Sequence[str]) -> None:
        if not addrs or peer_id == self.peer_id:
            return
        known = self._addrs.get_addrs(peer_id)
        if set(addrs) <= set(known):
            return
        self._addrs.add_addrs(peer_id, list(addrs))
        if self.address_book is not None:
            self.address_book.add_addrs(peer_id, list(addrs))

    def _known_addrs(self, peer_id: str) -> list[str]:
        addrs = self._addrs.get_addrs(peer_id)
        if not addrs and self.address_book is not None:
            addrs = self.address_book.get_addrs(peer_id)
        return addrs

    async def _request(self, peer_id: str, mtype: str, **body: Any) -> Message:
        """One request/response with ``peer_id``; raises PeerError (a timeout too).
        Failures remove the peer from the routing table."""
        rid = next(self._ids) & ((1 << 64) - 1)
        request = make_message(mtype, rid, False, self._self_info(), **body).to_wire()
        # The in-flight bound is taken before the clock starts: waiting for our own
        # limiter is not the peer's fault.
        async with self._outbound:
            self.requests_out[mtype] += 1
            try:
                with trio.fail_after(self.config.request_timeout):
                    answer = await self._exchange(peer_id, request)
            except trio.TooSlowError:
                self._failed(peer_id)
                raise RequestTimedOut(f"{mtype} id={rid} to {peer_id} timed out") from None
            except RemoteProtocolError as e:
                self._penalize(peer_id, "malformed_message")
                log.info("peer=%s id=%s broke the protocol: %s", peer_id, rid, e)
                raise
            except PeerError:
                self._failed(peer_id)
                raise
        self._observe(answer.sender)
        return answer

    async def _exchange(self, peer_id: str, request: dict[str, Any]) -> Message:
        stream, reused = await self._checkout(peer_id)
        try:
            raw = await self._roundtrip(stream, request)
        except StreamClosedError:
            await _discard(stream)
            if not reused:
                raise
            # the remote closed the idle stream under us: once more on a fresh one
            stream = await self._open(peer_id)
            try:
                raw = await self._roundtrip(stream, request)
            except BaseException:
                await _discard(stream)
                raise
        except BaseException:
            await _discard(stream)
            raise
        try:
            answer = parse_peer_input(parse_message, raw)
            if (answer.type != request["type"] or not answer.response
                    or answer.id != request["id"] or answer.sender.peer_id != peer_id):
                raise RemoteProtocolError(
                    f"answer to {request['type']} id={request['id']} does not match it")
        except RemoteProtocolError:
            await _discard(stream)
            raise
        await self._checkin(peer_id, stream)
        return answer

    async def _roundtrip(self, stream: _Framed, request: dict[str, Any]) -> Any:
        await stream.send(request)
        raw = await stream.recv(self.config.max_message_bytes)
        if raw is None:
            raise StreamClosedError("stream closed before the answer")
        return raw

    async def _checkout(self, peer_id: str) -> tuple[_Framed, bool]:
        now = trio.current_time()
        idle = self._idle.get(peer_id)
        while idle:
            stream, since = idle.pop()
            if not idle:
                del self._idle[peer_id]
            if now - since < self.config.pool_idle_timeout:
                return stream, True
            await _discard(stream, graceful=True)
        return await self._open(peer_id), False

    async def _open(self, peer_id: str) -> _Framed:
        """A fresh stream. Opening is tried twice: a failure that comes at once (a dial
        that broke off in its handshake, a connection reset while the stream was
        negotiated) passes under load, and one such failure would otherwise drop a live
        peer from the table and from a lookup. A timeout is not retried (the request's
        deadline covers both tries). Peers are dialed at their addresses only, never
        through a relay: a DHT server is publicly reachable, or it is stale."""
        self.streams_opened += 1
        try:
            return _Framed(await self.network.open_stream(peer_id, PROTOCOL_ID, route=False))
        except RemoteProtocolError:
            raise
        except PeerError as e:
            self.open_retries += 1
            log.debug("peer=%s opening a stream failed (%s); once more", peer_id, e)
            return _Framed(await self.network.open_stream(peer_id, PROTOCOL_ID, route=False))

    async def _checkin(self, peer_id: str, stream: _Framed) -> None:
        idle = self._idle.setdefault(peer_id, [])
        self._idle.move_to_end(peer_id)
        if len(idle) >= 2 or not stream.idle:
            await _discard(stream, graceful=True)
            return
        idle.append((stream, trio.current_time()))
        while sum(len(v) for v in self._idle.values()) > self.config.max_pooled_streams:
            _, streams = self._idle.popitem(last=False)
            for s, _ in streams:
                await _discard(s, graceful=True)

    def _drop_pooled(self, peer_id: str) -> list[_Framed]:
        return [s for s, _ in self._idle.pop(peer_id, [])]

    def _failed(self, peer_id: str) -> None:
        self.failures += 1
        self._forget(peer_id)

    def _penalize(self, peer_id: str, reason: str) -> None:
        """``peer_id`` broke the protocol: count it, drop it from the table, and refuse
        it (inbound streams, table entry) for a while."""
        self.rejected[reason] += 1
        self.penalties.penalize(peer_id, reason, trio.current_time())
        self._forget(peer_id)

    def _forget(self, peer_id: str) -> None:
        self.table.remove(peer_id)
        # pooled streams to it are closed lazily: an expired or broken one is
        # discarded on the next checkout; here we only stop reusing them
        for stream in self._drop_pooled(peer_id):
            if self._nursery is not None:
                self._nursery.start_soon(_discard, stream)

    def _observe(self, info: PeerInfo) -> None:
        if self.penalties.is_penalized(info.peer_id, trio.current_time()):
            return  # it may answer, but does not get into our table meanwhile
        if info.mode is Mode.SERVER:
            self._learn_addrs(info.peer_id, list(info.addrs))
        seen = self.table.observe(info.peer_id, info.mode, trio.current_time())
        if seen.status is ObserveStatus.ADDED:
            log.debug("peer=%s added to routing table", info.peer_id)
        if seen.ping is not None:
            if (self._nursery is not None
                    and self._pings_in_flight < self.config.max_liveness_pings):
                self._pings_in_flight += 1
                self._nursery.start_soon(self._liveness_ping, seen.ping)
            else:
                self.table.ping_done(seen.ping)

    async def _liveness_ping(self, peer_id: str) -> None:
        try:
            await self._request(peer_id, "PING")  # failure removes it, success refreshes
        except PeerError:
            pass
        finally:
            self._pings_in_flight -= 1
            self.table.ping_done(peer_id)

    async def _ping_quietly(self, peer_id: str) -> None:
        try:
            await self._request(peer_id, "PING")
        except PeerError as e:
            log.info("peer=%s bootstrap ping failed: %s", peer_id, e)

    # --- inbound requests -----------------------------------------------------------

    async def handle_stream(self, raw_stream: Stream) -> None:
        """Serve requests on one inbound stream, one at a time, until EOF or idle.
        Anything the peer sent that does not parse (`parse_peer_input`) resets the
        stream and penalizes it; a penalized peer's streams are reset at once."""
        stream = _Framed(raw_stream)
        remote = stream.remote_peer_id
        if self.penalties.is_penalized(remote, trio.current_time()):
            self.rejected["penalized_peer"] += 1
            await stream.reset()
            return
        if self._inbound_streams >= self.config.max_inbound_streams:
            self.rejected["inbound_streams_full"] += 1
            await stream.reset()
            return
        self._inbound_streams += 1
        try:
            while True:
                raw = None
                with trio.move_on_after(self.config.server_idle_timeout):
                    raw = await stream.recv(self.config.max_message_bytes)
                if raw is None:
                    break
                request = parse_peer_input(parse_message, raw)
                if request.response or request.sender.peer_id != remote:
                    raise RemoteProtocolError("not a request from the stream's peer")
                self.requests_in[request.type] += 1
                self._observe(request.sender)
                await stream.send(self._answer(request, remote))
        except RemoteProtocolError as e:
            self._penalize(remote, "malformed_message")
            log.info("peer=%s sent a malformed request: %s", remote, e)
            await stream.reset()
        except PeerError:
            pass  # the requester went away; nothing of ours is pending
        finally:
            self._inbound_streams -= 1
        await _discard(stream, graceful=True)

    def _answer(self, request: Message, remote: str) -> dict[str, Any]:
        body: dict[str, Any]
        t = request.type
        now = self._wall()
        if t == "PING":
            body = {}
        elif t == "FIND_NODE":
            body = {"closer": self._closer(target_from_bytes(request.body["target"]), remote)}
        elif t in ("GET_VALUE", "GET_PROVIDERS"):
            key = request.body["key"]
            want_provider = t == "GET_PROVIDERS"
            if _namespace_of(key) is None or (_namespace_of(key) == NS_PROVIDERS) != want_provider:
                raise RemoteProtocolError(f"{t} for key {key[:64]!r}")
            store = self.providers if want_provider else self.records
            records = _bounded_wire(store.get(key, now))
            body = {"providers" if want_provider else "records": records,
                    "closer": self._closer(key_hash(key), remote)}
        elif t in ("PUT_VALUE", "ADD_PROVIDER"):
            ok, reason = self._store_incoming(request.body["record"], t == "ADD_PROVIDER",
                                              remote, now)
            body = {"ok": ok, "reason": reason}
        else:  # parse_message admits only known types
            raise AssertionError(t)
        return make_message(t, request.id, True, self._self_info(), **body).to_wire()

    def _store_incoming(self, raw: Any, provider: bool, remote: str, now: float) -> tuple[bool, str]:
        try:
            record = parse_peer_input(validate_record, raw, now, self.config.limits,
                                      keep=(RecordError,))
        except RecordError as e:
            if isinstance(e, (BadSignature, Malformed)):
                self._penalize(remote, e.reason)  # honest peers validate before sending
            else:
                self.rejected[e.reason] += 1
            return False, e.reason
        if (record.namespace == NS_PROVIDERS) != provider:
            self.rejected["wrong_namespace"] += 1
            return False, "wrong_namespace"
        store = self.providers if provider else self.records
        outcome = store.put(record, now, self._source_of(remote))
        reason = _REFUSALS.get(outcome)
        if reason is not None:
            self.rejected[reason] += 1
            return False, reason
        return True, ""

    def _source_of(self, peer_id: str) -> str:
        """The quota a record ``peer_id`` delivered is charged to (its network)."""
        return source_group(self._source_ip(peer_id), peer_id,
                            v4_prefix=self.config.source_prefix_v4,
                            v6_prefix=self.config.source_prefix_v6)

    def _closer(self, target: int, remote: str) -> list[PeerInfo]:
        return [PeerInfo(p, tuple(self._known_addrs(p)[:16]), Mode.SERVER)
                for p in self.table.closest(target, self.config.k, exclude={remote})]

    # --- background work ------------------------------------------------------------

    async def _refresh_loop(self) -> NoReturn:
        while True:
            await trio.sleep(self.config.refresh_interval)
            await self.refresh()

    async def _republish_loop(self) -> NoReturn:
        while True:
            with trio.move_on_after(self.config.republish_interval):
                await self._republish_now.wait()
            self._republish_now = trio.Event()
            await self.republish()

    async def _gc_loop(self) -> NoReturn:
        while True:
            await trio.sleep(self.config.gc_interval)
            self.gc()


# store outcomes that refuse a record, as the `reason` a PUT_VALUE answer gives
_REFUSALS = {StoreOutcome.FULL: "store_full", StoreOutcome.PUBLISHER_QUOTA: "publisher_quota",
             StoreOutcome.SOURCE_QUOTA: "ip_quota"}


def _namespace_of(key: str) -> str | None:
    try:
        return split_key(key)[0]
    except Malformed:
        return None


def _bounded_wire(records: list[Record]) -> list[dict[str, Any]]:
    out, size = [], 0
    for r in records[:MAX_RECORDS_PER_MESSAGE]:
        size += len(r.value) + len(r.key) + 256
        if size > _MAX_ANSWER_RECORD_BYTES:
            break
        out.append(r.to_wire())
    return out


def _peer_fields(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) != {"peer_id", "addrs"}:
        raise MalformedMessage("peer entry")
    info = parse_peer_info({**raw, "mode": Mode.SERVER.value})
    return {"peer_id": info.peer_id, "addrs": info.addrs}


async def _discard(stream: Stream | _Framed, *, graceful: bool = False) -> None:
    """Close (graceful) or reset a stream we stop using, even while being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            if graceful:
                await stream.close()
            else:
                await stream.reset()
        except PeerError:
            pass  # already gone


async def serve_dht(network: PeerNetwork, identity: Identity, *,
                    config: DHTConfig = DHTConfig(),
                    address_book: AddressBook | None = None,
                    self_addrs: Callable[[], Sequence[str]] | None = None,
                    state: bytes | None = None,
                    wall_clock: Callable[[], float] = time.time,
                    rng: random.Random | None = None,
                    source_ip: Callable[[str], str | None] | None = None,
                    task_status: trio.TaskStatus[KademliaDHT] = trio.TASK_STATUS_IGNORED,
                    ) -> NoReturn:
    """Serve `/lattice/kad/1` on ``network`` and run refresh, republish and GC until
    cancelled; hands back the `KademliaDHT` via ``task_status``. ``state`` is what
    `KademliaDHT.export_state` wrote before a restart (the caller then bootstraps).
    Failure policy: see the module docstring."""
    dht = KademliaDHT(network, identity, config=config, address_book=address_book,
                      self_addrs=self_addrs, wall_clock=wall_clock, rng=rng,
                      source_ip=source_ip)
    if state is not None:
        dht.import_state(state)
    async with trio.open_nursery() as nursery:
        dht._nursery = nursery
        network.set_stream_handler(PROTOCOL_ID, dht.handle_stream)
        nursery.start_soon(dht._refresh_loop)
        nursery.start_soon(dht._republish_loop)
        nursery.start_soon(dht._gc_loop)
        task_status.started(dht)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover
