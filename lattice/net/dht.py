"""The Kademlia DHT driver: `/lattice/kad/1` over any `PeerNetwork` (proto/dht.md).

Owns `KademliaDHT`, one node: its routing table and stores, what it tells the table
about peers (seen, failed, penalized), the public operations, the periodic work
(random-walk refresh, republish, expiry GC) and `serve_dht`. Beside it: `dht_client`
(requests over pooled streams), `dht_server` (answering others), `dht_lookups`
(lookups, collecting and replicating records), `dht_publish` (our own records),
`dht_addresses` (where peers are), `dht_config` (bounds and results); pure cores in
`lattice.core.kademlia`, `lattice.core.records`, `lattice.core.dht_state` (what
survives a restart). Must not import libp2p: it runs
unchanged over the real host (`lattice.net.host`) and over `lattice.testing.memnet`.

Failure policy (`serve_dht`): a peer that vanishes, times out or breaks the protocol
ends only its own exchange. Timeouts and vanished peers count as failures and remove
the peer from the routing table (the replacement cache refills the bucket); protocol
violations (`RemoteProtocolError`: undecodable frames, schema violations, forged or
oversized records) are counted in ``statistics()["rejected"]``, remove the peer and
penalize it (`lattice.core.penalties.PenaltyBox`: its streams are reset and it stays
out of the table for a while). Anything else is our bug and propagates, cancelling the
service.

Time: lookups and timers use trio's clock; record expiry uses ``wall_clock`` (unix
seconds), injectable so tests can drive both with `autojump_clock`. Randomness (request
ids, refresh targets) comes only from ``rng``: pass a seeded one to replay a run.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NoReturn

import trio

from lattice.core.dht_state import DhtState, decode_state, encode_state
from lattice.core.dht_state import StateError as StateError
from lattice.core.identity import Identity
from lattice.core.kademlia import (
    PROTOCOL_ID,
    Lookup,
    Message,
    Mode,
    ObserveStatus,
    PeerInfo,
    RoutingTable,
    key_hash,
    make_message,
    peer_hash,
    target_bytes,
)
from lattice.core.netgroups import source_group
from lattice.core.penalties import PenaltyBox
from lattice.core.records import (
    Record,
    RecordStore,
    merge_records,
    peer_key,
    provider_key,
    record_addrs,
    split_key,
)
from lattice.net.dht_addresses import AddressBook, Addresses
from lattice.net.dht_addresses import MemoryAddressBook as MemoryAddressBook
from lattice.net.dht_client import KadClient, discard
from lattice.net.dht_client import RequestTimedOut as RequestTimedOut
from lattice.net.dht_config import DHTConfig, GetResult, LookupResult, Provider, PutResult
from lattice.net.dht_lookups import Lookups
from lattice.net.dht_publish import Publications
from lattice.net.dht_server import KadServer
from lattice.net.streams import PeerError, PeerNetwork, RemoteProtocolError

REJOIN_FIRST_RETRY_S = 2.0  # then doubling, up to `DHTConfig.refresh_interval`

log = logging.getLogger("lattice.net.dht")


class PeerNotFound(LookupError):
    """`find_peer` found neither a routing entry nor a peer record."""


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
        self.addrs = Addresses(self.peer_id, address_book, self_addrs)
        self.wall = wall_clock
        self._rng = rng or random.Random()
        self._source_ip = source_ip or (lambda peer_id: None)
        self.table = RoutingTable(self.peer_id, k=config.k)
        quotas = {"max_per_publisher": config.max_records_per_publisher,
                  "max_per_source": config.max_records_per_ip}
        self.records = RecordStore(max_per_key=config.max_records_per_key,
                                   max_total=config.max_records_total, **quotas)
        self.providers = RecordStore(max_per_key=config.max_providers_per_key,
                                     max_total=config.max_providers_total, **quotas)
        self.published = Publications(identity, config, self.records, self.providers,
                                      self.addrs.ours)
        self._bootstrap_peers: list[str] = []
        # False until the first bootstrap (self lookup and bucket refresh) is done:
        # until then our table is partial and our neighbours may not know us yet
        self.joined = False
        self._ids = itertools.count(self._rng.getrandbits(48))
        self.client = KadClient(network, max_inflight=config.max_inflight_requests,
                                request_timeout=config.request_timeout,
                                max_message_bytes=config.max_message_bytes,
                                pool_idle_timeout=config.pool_idle_timeout,
                                max_pooled=config.max_pooled_streams)
        self.server = KadServer(self)
        self.lookups = Lookups(self)
        self.penalties = PenaltyBox(base=config.penalty_backoff)
        self.rejected: Counter[str] = Counter()
        self.failures = 0
        self._pings_in_flight = 0
        self._nursery: trio.Nursery | None = None
        self._republish_now = trio.Event()
        self._alone = trio.Event()  # set when a refresh found no peer to join through

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
            self.addrs.learn(pid, list(addrs))
            ids.append(pid)
        self._bootstrap_peers = list(dict.fromkeys([*ids, *self._bootstrap_peers]))[:64]
        async with trio.open_nursery() as nursery:
            for pid in ids:
                nursery.start_soon(self._ping_quietly, pid)
        await self.refresh()
        if self.published.own or self.published.providing or self.mode is Mode.CLIENT:
            self._republish_now.set()
        return len(self.table)

    async def refresh(self) -> None:
        """A self lookup, then one random walk per bucket (Kademlia bucket refresh).
        We count as joined once the self lookup leaves us with a table (our closest
        peers now know us), or when nobody was given to join through (the first node
        of a network); the walks only fill the farther buckets."""
        if not len(self.table) and self._bootstrap_peers:
            for pid in self._bootstrap_peers:
                self.table.add_unverified(pid, trio.current_time())
        await self.find_closest_peers(peer_hash(self.peer_id))
        if len(self.table) or not self._bootstrap_peers:
            self.joined = True
        else:
            self._alone.set()  # nobody answered: `_refresh_loop` retries soon
            return
        targets = self.table.refresh_targets(
            [self._rng.getrandbits(256) for _ in range(16)])
        for target in targets:
            await self.find_closest_peers(target)

    async def find_closest_peers(self, target: int, count: int | None = None) -> LookupResult:
        """The ``count`` (default k) live server peers closest to ``target``."""
        return await self.lookups.find_closest_peers(target, count)

    async def put(self, key: str, value: Any, ttl: float) -> PutResult:
        """Sign ``value`` (any msgpack-able value) under ``key`` for ``ttl`` seconds,
        store it at the `replication` closest peers and republish it until it expires.
        Raises `RecordError` (a ValueError) if our own limits refuse it."""
        record = self.published.record(key, value, ttl, self.wall())
        return await self.lookups.replicate(record, "PUT_VALUE")

    async def get(self, key: str) -> list[Record]:
        """Every live record under ``key``, one per publisher."""
        return (await self.get_result(key)).records

    async def get_result(self, key: str, *, fresh: bool = False) -> GetResult:
        """Every live record under ``key``. When we are among the `replication` closest
        peers to the key, every put reached our own store too: what it holds is the
        answer at once (as hivemind and rust-libp2p do), and a network lookup completes
        our copy in the background. Otherwise, when we hold nothing, or when ``fresh``
        is asked for, it is a network lookup (`Lookups.collect`)."""
        split_key(key)  # Malformed for keys no node would store
        replica = self.lookups.among_replicas(key_hash(key))
        local = self.records.get(key, self.wall())
        if local and not fresh and replica:
            self.lookups.complete_in_background(key, self.records)
            return GetResult(merge_records(local), 0, 0)
        records, hops, requests = await self.lookups.collect(
            key, "GET_VALUE", self.records, "records", "PUT_VALUE", keep=replica)
        if records and replica:
            self.lookups.remember_completion(key)
        return GetResult(records, hops, requests)

    async def provide(self, name: str) -> PutResult:
        """Announce that we serve ``name`` (a blob id, a job id...) until `unprovide`;
        the announcement is re-signed and re-sent every republish interval."""
        record = self.published.announce(name, self.wall())
        return await self.lookups.replicate(record, "ADD_PROVIDER")

    def unprovide(self, name: str) -> None:
        """Stop re-announcing ``name``; remote copies expire with their TTL."""
        self.published.withdraw(name)

    async def find_providers(self, name: str) -> list[Provider]:
        """Live providers of ``name``; their addresses go to the address book."""
        records, _, _ = await self.lookups.collect(
            provider_key(name), "GET_PROVIDERS", self.providers, "providers", "ADD_PROVIDER")
        out = []
        for r in records:
            addrs = record_addrs(r)
            self.addrs.learn(r.publisher, addrs)
            out.append(Provider(r.publisher, addrs, r.expires_at))
        return out

    async def find_peer(self, peer_id: str) -> list[str]:
        """Addresses of ``peer_id``: from the routing table, else a lookup towards it
        (stopping when someone names it), else its signed peer record (client-mode
        peers publish one). Raises `PeerNotFound`."""
        if peer_id == self.peer_id:
            return list(self.addrs.ours())
        if peer_id in self.table:
            return self.addrs.known(peer_id)
        seen: list[PeerInfo] = []

        def on_answer(lookup: Lookup, peer: str, answer: Message) -> list[PeerInfo]:
            for info in answer.body["closer"]:
                if info.peer_id == peer_id:
                    seen.append(info)
                    lookup.finish()
            return answer.body["closer"]

        target = peer_hash(peer_id)
        await self.lookups.run(target, "FIND_NODE", {"target": target_bytes(target)},
                               num_results=self.config.k, on_answer=on_answer)
        if seen or peer_id in self.table:
            return self.addrs.known(peer_id)
        records = [r for r in await self.get(peer_key(peer_id)) if r.publisher == peer_id]
        if records:
            addrs = record_addrs(records[0])
            self.addrs.learn(peer_id, addrs)
            return addrs
        raise PeerNotFound(peer_id)

    async def republish(self) -> None:
        """Re-send our live records to the current closest peers, re-sign and re-send
        our provider announcements, and (in client mode) our peer record."""
        limiter = trio.CapacityLimiter(4)

        async def one(record: Record, mtype: str) -> None:
            async with limiter:
                await self.lookups.replicate(record, mtype)

        async with trio.open_nursery() as nursery:
            for record, mtype in self.published.refresh(self.wall(),
                                                        client=self.mode is Mode.CLIENT):
                nursery.start_soon(one, record, mtype)

    def gc(self) -> int:
        """Drop expired records and provider announcements; returns how many."""
        now = self.wall()
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
            "own_records": len(self.published.own),
            "providing": len(self.published.providing),
            "rejected": dict(self.rejected),
            **self.penalties.statistics(trio.current_time()),
            "request_failures": self.failures,
            **self.server.statistics(),
            **self.client.statistics(),
        }

    def export_state(self) -> bytes:
        """Routing table (with addresses) and our own records, for the state dir."""
        return encode_state(DhtState(
            [(p, tuple(self.addrs.known(p)[:16])) for p in self.table.peers()],
            list(self.published.own.values()), self.published.names()))

    def import_state(self, data: bytes) -> None:
        """Restore what `export_state` wrote: peers go into the table unverified (the
        first failed request drops them), live records and provider names are kept and
        republished after the next `bootstrap`. Raises `StateError`."""
        state = decode_state(data, now=self.wall(), publisher=self.peer_id,
                             limits=self.config.limits,
                             max_records=self.config.max_own_records)
        for peer_id, addrs in state.peers:
            self.addrs.learn(peer_id, list(addrs))
            self.table.add_unverified(peer_id, trio.current_time())
            self._bootstrap_peers.append(peer_id)
        self._bootstrap_peers = self._bootstrap_peers[:64]
        self.published.restore(state.records, state.providing, self.wall())

    # --- what the client, server and lookups ask of the node -------------------------

    async def request(self, peer_id: str, mtype: str, **body: Any) -> Message:
        """One request/response with ``peer_id``; raises PeerError (a timeout too).
        A failure removes the peer from the routing table; a protocol violation also
        penalizes it. A good answer tells the table the peer is alive."""
        rid = next(self._ids) & ((1 << 64) - 1)
        request = make_message(mtype, rid, False, self.self_info(), **body).to_wire()
        try:
            answer = await self.client.request(peer_id, request)
        except RemoteProtocolError as e:
            self.penalize(peer_id, "malformed_message")
            log.info("peer=%s id=%s broke the protocol: %s", peer_id, rid, e)
            raise
        except PeerError:
            self.failures += 1
            self._forget(peer_id)
            raise
        self.observe(answer.sender)
        return answer

    def penalize(self, peer_id: str, reason: str) -> None:
        """``peer_id`` broke the protocol: count it, drop it from the table, and refuse
        it (inbound streams, table entry) for a while."""
        self.rejected[reason] += 1
        self.penalties.penalize(peer_id, reason, trio.current_time())
        self._forget(peer_id)

    def observe(self, info: PeerInfo) -> None:
        """``info``'s peer answered us or asked us something."""
        if self.penalties.is_penalized(info.peer_id, trio.current_time()):
            return  # it may answer, but does not get into our table meanwhile
        if info.mode is Mode.SERVER:
            self.addrs.learn(info.peer_id, list(info.addrs))
        seen = self.table.observe(info.peer_id, info.mode, trio.current_time())
        if seen.status is ObserveStatus.ADDED:
            log.debug("peer=%s added to routing table", info.peer_id)
        if seen.ping is not None:
            if self._pings_in_flight < self.config.max_liveness_pings and self.spawn(
                    self._liveness_ping, seen.ping):
                self._pings_in_flight += 1
            else:
                self.table.ping_done(seen.ping)

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Run ``fn(*args)`` in the service's nursery; False before it runs."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    def self_info(self) -> PeerInfo:
        return PeerInfo(self.peer_id, tuple(self.addrs.ours()), self.mode)

    def source_of(self, peer_id: str) -> str:
        """The quota a record ``peer_id`` delivered is charged to (its network)."""
        return source_group(self._source_ip(peer_id), peer_id,
                            v4_prefix=self.config.source_prefix_v4,
                            v6_prefix=self.config.source_prefix_v6)

    # --- internals --------------------------------------------------------------------

    def _forget(self, peer_id: str) -> None:
        self.table.remove(peer_id)
        # pooled streams to it are closed lazily: an expired or broken one is
        # discarded on the next checkout; here we only stop reusing them
        for stream in self.client.forget(peer_id):
            self.spawn(discard, stream)

    async def _liveness_ping(self, peer_id: str) -> None:
        try:
            await self.request(peer_id, "PING")  # failure removes it, success refreshes
        except PeerError:
            pass
        finally:
            self._pings_in_flight -= 1
            self.table.ping_done(peer_id)

    async def _ping_quietly(self, peer_id: str) -> None:
        try:
            await self.request(peer_id, "PING")
        except PeerError as e:
            log.info("peer=%s bootstrap ping failed: %s", peer_id, e)

    async def _refresh_loop(self) -> NoReturn:
        # A node whose bootstrap peers did not answer (down, restarting, or too slow
        # under load) would otherwise sit outside the DHT until the next refresh, 10 min
        # later: while it is alone, it retries through them 2 s, 4 s, 8 s... apart.
        retry = REJOIN_FIRST_RETRY_S
        while True:
            with trio.move_on_after(self.config.refresh_interval):
                await self._alone.wait()
            if self._alone.is_set():
                self._alone = trio.Event()
                await trio.sleep(retry)
                retry = min(retry * 2, self.config.refresh_interval)
                log.info("dht: no peer answered, rejoining through %d bootstrap peers",
                         len(self._bootstrap_peers))
            await self.refresh()
            if len(self.table):
                retry = REJOIN_FIRST_RETRY_S

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
    `KademliaDHT.export_state` wrote before a restart (the caller then bootstraps);
    ``source_ip(peer_id)`` says where a peer's connection comes from, for the quotas
    per source network (default: unknown, each peer its own). Failure policy: see the
    module docstring."""
    dht = KademliaDHT(network, identity, config=config, address_book=address_book,
                      self_addrs=self_addrs, wall_clock=wall_clock, rng=rng,
                      source_ip=source_ip)
    if state is not None:
        dht.import_state(state)
    async with trio.open_nursery() as nursery:
        dht._nursery = nursery
        network.set_stream_handler(PROTOCOL_ID, dht.server.handle_stream)
        nursery.start_soon(dht._refresh_loop)
        nursery.start_soon(dht._republish_loop)
        nursery.start_soon(dht._gc_loop)
        task_status.started(dht)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover
