"""The DHT's lookups over the network (proto/dht.md, "Lookups"): driving the pure
`lattice.core.kademlia.Lookup` with requests, collecting the records under a key
(quorum, widening, read repair), and replicating a record to the closest peers.

Owns `Lookups`. It speaks through the `Node` it serves (`lattice.net.dht.KademliaDHT`),
whose ``request`` already turns each failure into what it means for the routing table;
here a failed request only fails its candidate. Must not import libp2p.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from lattice.core.kademlia import (
    FINISHED,
    Lookup,
    Message,
    Mode,
    PeerInfo,
    RoutingTable,
    key_hash,
    peer_hash,
    target_bytes,
)
from lattice.core.records import (
    BadSignature,
    Malformed,
    Record,
    RecordError,
    RecordStore,
    TooLarge,
    merge_records,
    validate_record,
)
from lattice.net.dht_addresses import Addresses
from lattice.net.dht_config import DHTConfig, LookupResult, PutResult
from lattice.net.streams import PeerError, RemoteProtocolError, parse_peer_input

log = logging.getLogger("lattice.net.dht")

# keys whose last background completion time we remember (bounds `_completed`)
_COMPLETIONS_REMEMBERED = 1024

OnAnswer = Callable[[Lookup, str, Message], list[PeerInfo]]
"""Called with each answer of a lookup; returns the peers it names (its ``closer``)."""


class Node(Protocol):
    """What lookups need from the DHT node they run for."""

    peer_id: str
    config: DHTConfig
    table: RoutingTable
    rejected: Counter[str]
    addrs: Addresses

    async def request(self, peer_id: str, mtype: str, **body: Any) -> Message: ...

    def penalize(self, peer_id: str, reason: str) -> None: ...

    def source_of(self, peer_id: str) -> str: ...

    def wall(self) -> float: ...

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool: ...


class Lookups:
    """Iterative lookups for one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config
        self._completed: OrderedDict[str, float] = OrderedDict()  # key -> last completion

    async def find_closest_peers(self, target: int, count: int | None = None) -> LookupResult:
        """The ``count`` (default k) live server peers closest to ``target``."""
        lookup = await self.run(target, "FIND_NODE", {"target": target_bytes(target)},
                                num_results=count or self.config.k)
        return LookupResult(lookup.result(), lookup.hops, lookup.requests_sent)

    async def run(self, target: int, mtype: str, body: dict[str, Any], *, num_results: int,
                  on_answer: OnAnswer | None = None) -> Lookup:
        lookup = self._new_lookup(target, num_results)
        await self._drive(lookup, mtype, body, on_answer)
        return lookup

    def answers_needed(self, target: int) -> int:
        """Answers a get waits for: the quorum, minus one when we are ourselves among
        the quorum closest peers to the target (our own store is one of the answers)."""
        quorum = self.config.get_quorum
        closest = self.node.table.closest(target, quorum)
        ours = peer_hash(self.node.peer_id) ^ target
        if len(closest) < quorum or ours < peer_hash(closest[-1]) ^ target:
            return max(quorum - 1, 1)
        return quorum

    def among_replicas(self, target: int) -> bool:
        """Whether puts for ``target`` store at us: we are among the `replication`
        closest peers our routing table knows."""
        closest = self.node.table.closest(target, self.config.replication)
        return (len(closest) < self.config.replication
                or peer_hash(self.node.peer_id) ^ target < peer_hash(closest[-1]) ^ target)

    async def collect(self, key: str, mtype: str, store: RecordStore, field: str,
                      repair: str, *, keep: bool = False) -> tuple[list[Record], int, int]:
        """Records under ``key`` from our ``store`` and the network (``mtype`` requests
        answered in ``field``): (newest per publisher, hops, requests). Converges when
        the quorum closest live peers answered; when neither they nor we hold anything
        it widens to the k closest before calling it a miss, so one replica whose store
        failed (a timeout under load) cannot hide a record. Replicas among the quorum
        that answered without a record we found get it stored in the background (read
        repair: a ``repair`` request). With ``keep`` (we are a replica), what others
        hold goes into ``store`` too, charged to whoever delivered it."""
        target = key_hash(key)
        found: list[Record] = list(store.get(key, self.node.wall()))
        verified: dict[bytes, Record] = {r.signature: r for r in found}
        held: dict[str, set[bytes]] = {}

        def on_answer(lookup: Lookup, peer: str, answer: Message) -> list[PeerInfo]:
            records = self.accept_records(peer, key, answer.body[field], verified)
            held[peer] = {r.signature for r in records}
            found.extend(records)
            if keep:
                for record in records:
                    store.put(record, self.node.wall(), self.node.source_of(peer))
            return answer.body["closer"]

        lookup = self._new_lookup(target, self.answers_needed(target))
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

    def complete_in_background(self, key: str, store: RecordStore) -> None:
        """After a get answered from our store: ask the network too (at most once per
        `get_refresh_interval` per key) and keep what we lacked, for the next get."""
        last = self._completed.get(key)
        if last is not None and trio.current_time() - last < self.config.get_refresh_interval:
            return
        if self.node.spawn(functools.partial(self.collect, key, "GET_VALUE", store, "records",
                                             "PUT_VALUE", keep=True)):
            self.remember_completion(key)

    def remember_completion(self, key: str) -> None:
        """The network was just asked about ``key``: no background completion for a
        while."""
        self._completed[key] = trio.current_time()
        self._completed.move_to_end(key)
        while len(self._completed) > _COMPLETIONS_REMEMBERED:
            self._completed.popitem(last=False)

    async def replicate(self, record: Record, mtype: str) -> PutResult:
        """Store ``record`` (``mtype``: PUT_VALUE or ADD_PROVIDER) at the `replication`
        closest peers."""
        lookup = await self.find_closest_peers(key_hash(record.key))
        targets = lookup.peers[:self.config.replication]
        stored: list[str] = []

        async def store(peer: str) -> None:
            try:
                answer = await self.node.request(peer, mtype, record=record.to_wire())
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

    def accept_records(self, peer: str, key: str, raw_records: list[Any],
                       verified: dict[bytes, Record]) -> list[Record]:
        """Validate records in an answer. Forged or oversized ones, or ones for another
        key, mean the responder skipped validation: a protocol violation. ``verified``
        holds the records this lookup already checked (replicas answer with the same
        signed bytes; verifying them once is enough)."""
        out = []
        now = self.node.wall()
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
                self.node.penalize(peer, e.reason)
                return out
            except RecordError as e:
                self.node.rejected[e.reason] += 1  # expired in flight or clock skew: no blame
                continue
            except RemoteProtocolError:
                self.node.penalize(peer, "malformed_record")
                return out
            if record.key != key:
                self.node.penalize(peer, "wrong_key")
                return out
            verified[record.signature] = record
            out.append(record)
        return out

    def _repair_in_background(self, records: list[Record], peers: list[str],
                              mtype: str) -> None:
        if not records or not peers:
            return

        async def repair(peer: str) -> None:
            for record in records:
                with contextlib.suppress(PeerError):
                    await self.node.request(peer, mtype, record=record.to_wire())

        for peer in peers:
            self.node.spawn(repair, peer)

    def _new_lookup(self, target: int, num_results: int) -> Lookup:
        return Lookup(target, self.node.table.closest(target, self.config.k),
                      local_peer_id=self.node.peer_id, num_results=num_results,
                      alpha=self.config.alpha, request_timeout=self.config.request_timeout)

    async def _drive(self, lookup: Lookup, mtype: str, body: dict[str, Any],
                     on_answer: OnAnswer | None, deadline: float | None = None) -> None:
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
                        self.node.addrs.learn(info.peer_id, list(info.addrs))
                    lookup.on_success(peer, [i.peer_id for i in closer
                                             if i.mode is Mode.SERVER])
            nursery.cancel_scope.cancel()

    async def _query(self, peer: str, mtype: str, body: dict[str, Any],
                     results: trio.MemorySendChannel) -> None:
        try:
            answer = await self.node.request(peer, mtype, **body)
        except PeerError:
            answer = None
        await results.send((peer, answer))
