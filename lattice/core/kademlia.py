"""Kademlia routing, sans-I/O: key space, k-buckets, iterative lookups, wire messages.

Owns the routing decisions of `/lattice/kad/1` (proto/dht.md): which peers a node
keeps, whom a lookup asks next, when a lookup is done, and what a well-formed message
looks like. The trio driver (`lattice.net.dht`) does the I/O and feeds results back.
Must not import trio, libp2p or sockets, and never reads the clock: every method that
needs time takes ``now`` (any monotonic seconds; the driver passes trio's clock).

Theory of operation
-------------------
Keys and peers live in one 256-bit space: a record key hashes as ``sha256(key utf-8)``,
a peer as ``sha256(peer id bytes)``. Distance is XOR. The routing table keeps, for each
distance bucket ``i`` (distance in ``[2**i, 2**(i+1))``), up to ``k`` peers in LRU order
(head = least recently seen) plus a small replacement cache. A peer enters the table
only after it answered us or asked us something *and said it is a server*: client-mode
peers (behind NAT, not dialable) are never inserted, and a peer that switches to client
mode is removed. When a bucket is full the newcomer waits in the replacement cache and
the table asks the driver to ping the LRU head (unless it was seen recently); if the
ping fails the driver removes the head and the newest replacement takes its place.

A lookup (`Lookup`, after rust-libp2p ``query/peers/closest.rs``) keeps the candidates
ordered by distance to the target, asks up to ``alpha`` at a time, and finishes when the
``num_results`` closest candidates that did not fail have all answered. Unlike
rust-libp2p it never asks a candidate while the ``num_results`` closer ones are all
answered or in flight: that request could only matter if one of them failed. If ``alpha``
answers in a row bring nobody closer, it is *stalled* and widens to ``num_results``
requests in flight, so a lookup never ends before the closest known peers were asked;
it does the same while it knows no more candidates than ``num_results`` (it has to ask
them all anyway).
Each candidate remembers its depth: seeds have depth 0, a peer first learnt from a
depth-d responder has depth d+1. Asking a depth-d peer is hop d+1, so `Lookup.hops`
is the length of the longest responder chain needed to reach the result.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lattice.core.identity import InvalidPeerId, b58decode, public_key_from_peer_id

KEY_BITS = 256
K = 20
ALPHA = 3


def key_hash(key: str | bytes) -> int:
    """Position of a record key in the key space."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


@functools.lru_cache(maxsize=1 << 14)
def peer_hash(peer_id: str) -> int:
    """Position of a peer in the key space: sha256 of its binary peer id (memoized:
    lookups and tables hash the same few thousand ids over and over)."""
    return int.from_bytes(hashlib.sha256(b58decode(peer_id)).digest(), "big")


def target_bytes(target: int) -> bytes:
    return target.to_bytes(KEY_BITS // 8, "big")


def target_from_bytes(data: bytes) -> int:
    return int.from_bytes(data, "big")


def distance(a: int, b: int) -> int:
    return a ^ b


def bucket_index(local: int, other: int) -> int:
    """Bucket of ``other`` in ``local``'s table; -1 for ``local`` itself."""
    return (local ^ other).bit_length() - 1


def random_target_in_bucket(local: int, index: int, random_bits: int) -> int:
    """A key whose distance from ``local`` falls in bucket ``index``; ``random_bits``
    is any random integer (the caller owns the randomness, so this stays pure)."""
    low = random_bits & ((1 << index) - 1)
    return local ^ ((1 << index) | low)


class Mode(str, Enum):
    SERVER = "server"  # dialable: answers queries, belongs in routing tables
    CLIENT = "client"  # behind NAT: asks queries, never enters anyone's table


@dataclass
class Contact:
    peer_id: str
    key: int
    last_seen: float


@dataclass
class _Bucket:
    entries: list[Contact] = field(default_factory=list)  # head = least recently seen
    replacements: list[Contact] = field(default_factory=list)  # tail = most recent
    pinging: str | None = None  # the head being checked for liveness


class ObserveStatus(Enum):
    ADDED = "added"
    UPDATED = "updated"  # already present; moved to the tail
    CACHED = "cached"  # bucket full; kept in the replacement cache
    IGNORED = "ignored"  # ourselves, or a client-mode peer
    REMOVED = "removed"  # was present, now says it is a client


@dataclass(frozen=True)
class Observation:
    status: ObserveStatus
    # When set, the driver should ping this peer (the full bucket's LRU head) and call
    # `remove` if it does not answer.
    ping: str | None = None


class RoutingTable:
    """k-buckets around ``local_peer_id``. Pure bookkeeping: the driver reports what it
    saw (`observe`, `remove`) and asks `closest`."""

    def __init__(self, local_peer_id: str, *, k: int = K, replacement_cache: int = 8,
                 liveness_interval: float = 60.0) -> None:
        self.local_peer_id = local_peer_id
        self.local_key = peer_hash(local_peer_id)
        self.k = k
        self.replacement_cache = replacement_cache
        # A full bucket's head seen within this many seconds is not pinged again.
        self.liveness_interval = liveness_interval
        self._buckets: list[_Bucket] = [_Bucket() for _ in range(KEY_BITS)]
        self._where: dict[str, int] = {}  # peer id -> bucket index, for table members

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._where

    def peers(self) -> list[str]:
        return [c.peer_id for b in self._buckets for c in b.entries]

    def bucket_sizes(self) -> dict[int, int]:
        return {i: len(b.entries) for i, b in enumerate(self._buckets) if b.entries}

    def observe(self, peer_id: str, mode: Mode | str, now: float) -> Observation:
        """``peer_id`` answered us or asked us something, saying it runs in ``mode``."""
        if peer_id == self.local_peer_id:
            return Observation(ObserveStatus.IGNORED)
        if Mode(mode) is Mode.CLIENT:
            if self.remove(peer_id):
                return Observation(ObserveStatus.REMOVED)
            self._drop_replacement(peer_id)
            return Observation(ObserveStatus.IGNORED)
        key = peer_hash(peer_id)
        index = bucket_index(self.local_key, key)
        bucket = self._buckets[index]
        if peer_id in self._where:
            entry = next(c for c in bucket.entries if c.peer_id == peer_id)
            bucket.entries.remove(entry)
            entry.last_seen = now
            bucket.entries.append(entry)
            if bucket.pinging == peer_id:
                bucket.pinging = None
            return Observation(ObserveStatus.UPDATED)
        if len(bucket.entries) < self.k:
            bucket.entries.append(Contact(peer_id, key, now))
            self._where[peer_id] = index
            self._drop_replacement(peer_id)
            return Observation(ObserveStatus.ADDED)
        self._drop_replacement(peer_id)
        bucket.replacements.append(Contact(peer_id, key, now))
        del bucket.replacements[:-self.replacement_cache]
        head = bucket.entries[0]
        if bucket.pinging is None and now - head.last_seen >= self.liveness_interval:
            bucket.pinging = head.peer_id
            return Observation(ObserveStatus.CACHED, ping=head.peer_id)
        return Observation(ObserveStatus.CACHED)

    def add_unverified(self, peer_id: str, now: float) -> bool:
        """Insert a peer we have not heard from (restored from disk, or a bootstrap
        peer) if its bucket has room; the first failed request removes it."""
        if peer_id == self.local_peer_id or peer_id in self._where:
            return False
        key = peer_hash(peer_id)
        index = bucket_index(self.local_key, key)
        bucket = self._buckets[index]
        if len(bucket.entries) >= self.k:
            return False
        # last_seen far in the past: it is the first to be pinged when the bucket fills
        bucket.entries.insert(0, Contact(peer_id, key, -math.inf))
        self._where[peer_id] = index
        return True

    def remove(self, peer_id: str) -> bool:
        """Drop a peer (failed a request or misbehaved). The newest replacement, if
        any, takes its slot. Returns whether the peer was in the table."""
        self._drop_replacement(peer_id)
        index = self._where.pop(peer_id, None)
        if index is None:
            return False
        bucket = self._buckets[index]
        bucket.entries = [c for c in bucket.entries if c.peer_id != peer_id]
        if bucket.pinging == peer_id:
            bucket.pinging = None
        if bucket.replacements:
            promoted = bucket.replacements.pop()
            bucket.entries.append(promoted)
            self._where[promoted.peer_id] = index
        return True

    def ping_done(self, peer_id: str) -> None:
        """The liveness ping of ``peer_id`` ended (either way); allow the next one."""
        index = self._where.get(peer_id)
        if index is not None and self._buckets[index].pinging == peer_id:
            self._buckets[index].pinging = None

    def closest(self, target: int, count: int | None = None,
                exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Up to ``count`` (default k) table members closest to ``target``."""
        count = self.k if count is None else count
        members = [c for b in self._buckets for c in b.entries if c.peer_id not in exclude]
        members.sort(key=lambda c: c.key ^ target)
        return [c.peer_id for c in members[:count]]

    def refresh_targets(self, random_bits: list[int], limit: int = 16) -> list[int]:
        """Random lookup targets, one per bucket from the closest non-empty bucket
        outwards (Kademlia bucket refresh), at most ``limit``; ``random_bits`` supplies
        one random integer per target."""
        nonempty = [i for i, b in enumerate(self._buckets) if b.entries]
        if not nonempty:
            return []
        first = nonempty[0]
        # Buckets farther out than the closest peer hold most of the network; refresh
        # the farthest ones first since they cover the most peers.
        indices = list(range(KEY_BITS - 1, first - 1, -1))[:limit]
        return [random_target_in_bucket(self.local_key, i, r)
                for i, r in zip(indices, random_bits)]

    def _drop_replacement(self, peer_id: str) -> None:
        index = bucket_index(self.local_key, peer_hash(peer_id))
        if index < 0:
            return
        bucket = self._buckets[index]
        bucket.replacements = [c for c in bucket.replacements if c.peer_id != peer_id]


# --- lookups -----------------------------------------------------------------------


class Waiting:
    """`Lookup.next`: nothing to send now; wait for an answer or `next_deadline`."""

    def __repr__(self) -> str:
        return "WAITING"


class Finished:
    """`Lookup.next`: the lookup converged (or ran out of candidates)."""

    def __repr__(self) -> str:
        return "FINISHED"


WAITING = Waiting()
FINISHED = Finished()


class _PeerState(Enum):
    NOT_CONTACTED = 0
    WAITING = 1
    UNRESPONSIVE = 2  # timed out; a late answer still counts
    FAILED = 3
    SUCCEEDED = 4


@dataclass
class _Candidate:
    peer_id: str
    distance: int
    depth: int
    state: _PeerState = _PeerState.NOT_CONTACTED
    deadline: float = math.inf


class Lookup:
    """An iterative lookup of the peers closest to ``target``, as a sans-I/O iterator.

    Drive it with ``next(now)`` -> list of peers to ask | `WAITING` | `FINISHED`, and
    report each request's outcome with `on_success(peer, closer_peers)` or
    `on_failure(peer)`. The driver enforces no timeouts itself: a request older than
    ``request_timeout`` stops counting against ``alpha`` when `next` next runs.
    """

    def __init__(self, target: int, seeds: list[str], *, local_peer_id: str,
                 num_results: int = K, alpha: int = ALPHA, request_timeout: float = 10.0,
                 max_candidates: int | None = None) -> None:
        self.target = target
        self.local_peer_id = local_peer_id
        self.num_results = num_results
        self.alpha = alpha
        self.request_timeout = request_timeout
        # Bound memory: peers farther than this many candidates are forgotten.
        self.max_candidates = max_candidates or max(4 * num_results, 64)
        self._candidates: dict[str, _Candidate] = {}
        self._num_waiting = 0
        self._no_progress = 0
        self._stalled = False
        self._finished = False
        self.requests_sent = 0
        for peer in seeds:
            self._add(peer, 0)

    # -- driving --

    def next(self, now: float) -> list[str] | Waiting | Finished:
        if self._finished:
            return FINISHED
        to_query: list[str] = []
        succeeded = 0
        active = 0  # answered or in flight, among the closest candidates so far
        for c in self._ordered():
            if c.state is _PeerState.WAITING and now >= c.deadline:
                c.state = _PeerState.UNRESPONSIVE
                self._num_waiting -= 1
                self._no_progress += 1
            if c.state is _PeerState.SUCCEEDED:
                succeeded += 1
                active += 1
                if succeeded >= self.num_results:
                    break
            elif c.state is _PeerState.WAITING:
                active += 1
            elif c.state is _PeerState.NOT_CONTACTED:
                # Peers beyond the num_results closest live ones cannot change the
                # result unless one of those fails: ask them only then (this keeps a
                # get with a small quorum at exactly `quorum` requests).
                if active >= self.num_results or self._num_waiting >= self._parallelism():
                    break
                c.state = _PeerState.WAITING
                c.deadline = now + self.request_timeout
                self._num_waiting += 1
                self.requests_sent += 1
                active += 1
                to_query.append(c.peer_id)
        self._update_stall()
        if to_query:
            return to_query
        if succeeded >= self.num_results or self._num_waiting == 0:
            self._finished = True
            return FINISHED
        return WAITING

    def next_deadline(self) -> float:
        """When the oldest in-flight request times out (inf when none is in flight)."""
        return min((c.deadline for c in self._candidates.values()
                    if c.state is _PeerState.WAITING), default=math.inf)

    def on_success(self, peer_id: str, closer_peers: list[str]) -> None:
        c = self._candidates.get(peer_id)
        if c is None or c.state in (_PeerState.SUCCEEDED, _PeerState.FAILED):
            return
        if c.state is _PeerState.WAITING:
            self._num_waiting -= 1
        c.state = _PeerState.SUCCEEDED
        best_before = self._best_distance()
        for peer in closer_peers:
            self._add(peer, c.depth + 1)
        if self._best_distance() < best_before:
            self._no_progress = 0
            self._stalled = False
        else:
            self._no_progress += 1
        self._update_stall()

    def on_failure(self, peer_id: str) -> None:
        c = self._candidates.get(peer_id)
        if c is None or c.state in (_PeerState.SUCCEEDED, _PeerState.FAILED):
            return
        if c.state is _PeerState.WAITING:
            self._num_waiting -= 1
        c.state = _PeerState.FAILED

    def finish(self) -> None:
        """Stop early (the caller found what it was looking for)."""
        self._finished = True

    def widen(self, num_results: int) -> None:
        """Go on until ``num_results`` closest live peers answered (a get that found
        nothing among the quorum closest asks on before calling it a miss)."""
        if num_results > self.num_results:
            self.num_results = num_results
            self.max_candidates = max(self.max_candidates, 4 * num_results)
            self._finished = False

    # -- results --

    @property
    def finished(self) -> bool:
        return self._finished

    def result(self) -> list[str]:
        """The closest peers that answered, closest first, at most ``num_results``."""
        return [c.peer_id for c in self._ordered()
                if c.state is _PeerState.SUCCEEDED][:self.num_results]

    def depth(self, peer_id: str) -> int:
        return self._candidates[peer_id].depth

    def hops_to(self, peer_id: str) -> int:
        """Hops needed to reach ``peer_id``'s answer: its depth + 1."""
        return self._candidates[peer_id].depth + 1

    @property
    def hops(self) -> int:
        """Longest responder chain behind `result` (0 when nobody answered)."""
        return max((self.hops_to(p) for p in self.result()), default=0)

    def knows(self, peer_id: str) -> bool:
        return peer_id in self._candidates

    # -- internals --

    def _parallelism(self) -> int:
        # While no more candidates are known than results wanted, every one of them
        # must be asked anyway: asking them all at once saves rounds in small networks.
        if self._stalled or len(self._candidates) <= self.num_results:
            return max(self.num_results, self.alpha)
        return self.alpha

    def _update_stall(self) -> None:
        if self._no_progress >= self.alpha:
            self._stalled = True

    def _ordered(self) -> list[_Candidate]:
        return sorted(self._candidates.values(), key=lambda c: c.distance)

    def _best_distance(self) -> int:
        return min((c.distance for c in self._candidates.values()
                    if c.state is not _PeerState.FAILED), default=1 << KEY_BITS)

    def _add(self, peer_id: str, depth: int) -> None:
        if peer_id == self.local_peer_id:
            return
        c = self._candidates.get(peer_id)
        if c is not None:
            if c.state is _PeerState.NOT_CONTACTED and depth < c.depth:
                c.depth = depth
            return
        self._candidates[peer_id] = _Candidate(peer_id, peer_hash(peer_id) ^ self.target, depth)
        if len(self._candidates) > self.max_candidates:
            # forget the farthest peer we have not asked yet
            for far in reversed(self._ordered()):
                if far.state is _PeerState.NOT_CONTACTED:
                    del self._candidates[far.peer_id]
                    break


# --- wire messages ----------------------------------------------------------------

PROTOCOL_ID = "/lattice/kad/1"

MESSAGE_TYPES = ("PING", "FIND_NODE", "GET_VALUE", "PUT_VALUE", "ADD_PROVIDER", "GET_PROVIDERS")

# Body fields per message type beyond the envelope {"type", "id", "response", "sender"}.
# proto/dht.md mirrors this table (a test keeps them in step).
REQUEST_FIELDS: dict[str, dict[str, str]] = {
    "PING": {},
    "FIND_NODE": {"target": "bin(32)"},
    "GET_VALUE": {"key": "str"},
    "PUT_VALUE": {"record": "record"},
    "ADD_PROVIDER": {"record": "record"},
    "GET_PROVIDERS": {"key": "str"},
}
RESPONSE_FIELDS: dict[str, dict[str, str]] = {
    "PING": {},
    "FIND_NODE": {"closer": "[peer]"},
    "GET_VALUE": {"records": "[record]", "closer": "[peer]"},
    "PUT_VALUE": {"ok": "bool", "reason": "str"},
    "ADD_PROVIDER": {"ok": "bool", "reason": "str"},
    "GET_PROVIDERS": {"providers": "[record]", "closer": "[peer]"},
}
ENVELOPE_FIELDS = ("type", "id", "response", "sender")

MAX_REQUEST_ID = (1 << 64) - 1
MAX_PEERS_PER_MESSAGE = 64
MAX_RECORDS_PER_MESSAGE = 128
MAX_ADDRS_PER_PEER = 16
MAX_ADDR_BYTES = 256
MAX_KEY_BYTES = 512  # structural bound; records.RecordLimits enforces the policy bound
MAX_REASON_BYTES = 128


class MalformedMessage(ValueError):
    """A message that does not match the schema; the sender broke the protocol."""


@dataclass(frozen=True)
class PeerInfo:
    peer_id: str
    addrs: tuple[str, ...] = ()
    mode: Mode = Mode.SERVER

    def to_wire(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "addrs": list(self.addrs), "mode": self.mode.value}


@dataclass(frozen=True)
class Message:
    type: str
    id: int
    response: bool
    sender: PeerInfo
    body: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "id": self.id, "response": self.response,
                               "sender": self.sender.to_wire()}
        for name, kind in self._fields().items():
            value = self.body[name]
            if kind == "[peer]":
                value = [p.to_wire() for p in value]
            out[name] = value
        return out

    def _fields(self) -> dict[str, str]:
        return (RESPONSE_FIELDS if self.response else REQUEST_FIELDS)[self.type]


def make_message(type: str, id: int, response: bool, sender: PeerInfo, **body: Any) -> Message:
    fields = (RESPONSE_FIELDS if response else REQUEST_FIELDS)[type]
    if set(body) != set(fields):
        raise TypeError(f"{type} {'response' if response else 'request'} takes {sorted(fields)}")
    return Message(type, id, response, sender, body)


def parse_message(raw: Any) -> Message:
    """Validate a decoded frame against the schema; raises `MalformedMessage`.

    Records inside are only checked for shape here (a map); their signatures and
    limits are checked by `records.validate_record`, so rejections can be counted
    by reason.
    """
    if not isinstance(raw, dict):
        raise MalformedMessage("a message is a map")
    mtype = raw.get("type")
    if mtype not in MESSAGE_TYPES:
        raise MalformedMessage(f"unknown message type {str(mtype)[:32]!r}")
    response = raw.get("response")
    if not isinstance(response, bool):
        raise MalformedMessage("response is a bool")
    fields = (RESPONSE_FIELDS if response else REQUEST_FIELDS)[mtype]
    if set(raw) != set(ENVELOPE_FIELDS) | set(fields):
        raise MalformedMessage(f"{mtype} carries exactly {sorted(set(ENVELOPE_FIELDS) | set(fields))}")
    mid = raw["id"]
    if not isinstance(mid, int) or isinstance(mid, bool) or not 0 <= mid <= MAX_REQUEST_ID:
        raise MalformedMessage("id is an unsigned 64-bit integer")
    sender = parse_peer_info(raw["sender"])
    body = {name: _parse_field(kind, raw[name], name) for name, kind in fields.items()}
    return Message(mtype, mid, response, sender, body)


def parse_peer_info(raw: Any) -> PeerInfo:
    if not isinstance(raw, dict) or set(raw) != {"peer_id", "addrs", "mode"}:
        raise MalformedMessage("a peer is {peer_id, addrs, mode}")
    peer_id, addrs, mode = raw["peer_id"], raw["addrs"], raw["mode"]
    if not isinstance(peer_id, str) or len(peer_id) > 128:
        raise MalformedMessage("peer_id is a string")
    if not _is_ed25519_peer_id(peer_id):
        raise MalformedMessage(f"not an Ed25519 peer id: {peer_id[:64]!r}")
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS_PER_PEER:
        raise MalformedMessage(f"addrs is a list of at most {MAX_ADDRS_PER_PEER}")
    for a in addrs:
        if not isinstance(a, str) or len(a.encode()) > MAX_ADDR_BYTES:
            raise MalformedMessage(f"an address is a string of at most {MAX_ADDR_BYTES} bytes")
    if mode not in (Mode.SERVER.value, Mode.CLIENT.value):
        raise MalformedMessage("mode is 'server' or 'client'")
    return PeerInfo(peer_id, tuple(addrs), Mode(mode))


@functools.lru_cache(maxsize=1 << 14)
def _is_ed25519_peer_id(peer_id: str) -> bool:
    # memoized: every answer repeats the same peer ids, and base58 decoding is slow
    try:
        public_key_from_peer_id(peer_id)
    except InvalidPeerId:
        return False
    return True


def _parse_field(kind: str, value: Any, name: str) -> Any:
    if kind == "bin(32)":
        if not isinstance(value, bytes) or len(value) != KEY_BITS // 8:
            raise MalformedMessage(f"{name} is 32 bytes")
        return value
    if kind == "str":
        if not isinstance(value, str) or len(value.encode()) > MAX_KEY_BYTES:
            raise MalformedMessage(f"{name} is a string of at most {MAX_KEY_BYTES} bytes")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise MalformedMessage(f"{name} is a bool")
        return value
    if kind == "record":
        if not isinstance(value, dict):
            raise MalformedMessage(f"{name} is a record map")
        return value
    if kind == "[record]":
        if not isinstance(value, list) or len(value) > MAX_RECORDS_PER_MESSAGE:
            raise MalformedMessage(f"{name} is a list of at most {MAX_RECORDS_PER_MESSAGE} records")
        if not all(isinstance(r, dict) for r in value):
            raise MalformedMessage(f"{name} holds record maps")
        return value
    if kind == "[peer]":
        if not isinstance(value, list) or len(value) > MAX_PEERS_PER_MESSAGE:
            raise MalformedMessage(f"{name} is a list of at most {MAX_PEERS_PER_MESSAGE} peers")
        return [parse_peer_info(p) for p in value]
    raise AssertionError(f"unknown field kind {kind}")
