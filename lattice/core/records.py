"""Signed DHT records: format, signature, validation, and a bounded record store.

Owns what a DHT record is (proto/dht.md, "Records") and the rules every node applies
before storing or returning one. Pure: must not import trio, libp2p or sockets, and
never reads the clock (``now`` is unix seconds, passed in).

A record is ``{key, subkey, value, expires_at, publisher, signature}``:

- ``key`` is a namespaced string ``/<namespace>/<name>`` (`NAMESPACES`);
- ``subkey`` is the publisher's peer id, so several publishers may write under one
  key without overwriting each other (as hivemind's subkeys do);
- ``value`` is msgpack bytes (never pickle), decoded only on demand;
- ``expires_at`` is unix seconds (float) and doubles as the version: between two
  records of one publisher under one key, the one that expires later wins;
- ``signature`` is the publisher's Ed25519 signature over
  ``codec.canonical({"domain": DOMAIN, key, subkey, value, expires_at, publisher})``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lattice.core import codec
from lattice.core.identity import Identity, InvalidPeerId, public_key_from_peer_id, verify

DOMAIN = "lattice/dht-record/1"

NS_VALUES = "v"  # user values (`lattice dht put KEY VALUE`)
NS_PEERS = "peers"  # /peers/<peer id>: that peer's addresses, signed by itself
NS_JOBS = "jobs"  # /jobs/<job id>: job membership and announcements
NS_PROVIDERS = "providers"  # /providers/<content key>: who serves a blob or a job
NAMESPACES = (NS_VALUES, NS_PEERS, NS_JOBS, NS_PROVIDERS)

# Fields a peer may send, and nothing else (a record with extra fields is Malformed).
WIRE_FIELDS = ("key", "subkey", "value", "expires_at", "publisher", "signature")

MAX_ADDRS = 16  # addresses in a peer or provider record
MAX_ADDR_BYTES = 256


class RecordError(ValueError):
    """A record that no node may store or return. ``reason`` names it in statistics."""

    reason = "invalid"


class BadSignature(RecordError):
    reason = "bad_signature"


class Expired(RecordError):
    reason = "expired"


class TooLarge(RecordError):
    """Key or value over the limits, or an expiry beyond the maximum TTL."""

    reason = "too_large"


class Malformed(RecordError):
    reason = "malformed"


@dataclass(frozen=True)
class RecordLimits:
    max_key_bytes: int = 256
    max_value_bytes: int = 8192
    # Longest TTL a node accepts; republishing keeps longer-lived records alive.
    max_ttl: float = 48 * 3600.0
    # Slack for clocks that run ahead of ours when checking max_ttl.
    clock_skew: float = 60.0


DEFAULT_LIMITS = RecordLimits()


@dataclass(frozen=True)
class Record:
    key: str
    subkey: str
    value: bytes
    expires_at: float
    publisher: str
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "subkey": self.subkey,
            "value": self.value,
            "expires_at": self.expires_at,
            "publisher": self.publisher,
            "signature": self.signature,
        }

    def unpack_value(self) -> Any:
        return codec.unpack(self.value)

    @property
    def namespace(self) -> str:
        return split_key(self.key)[0]

    def newer_than(self, other: Record) -> bool:
        """Version order between two records of one publisher under one key: later
        expiry wins; ties break on the value bytes so all replicas pick the same one."""
        return (self.expires_at, self.value, self.signature) > (
            other.expires_at, other.value, other.signature)


def make_key(namespace: str, name: str) -> str:
    if namespace not in NAMESPACES:
        raise Malformed(f"unknown namespace {namespace!r}")
    if not name:
        raise Malformed("empty key name")
    return f"/{namespace}/{name}"


def user_key(name: str) -> str:
    """The key `lattice dht put NAME ...` writes under."""
    return make_key(NS_VALUES, name)


def peer_key(peer_id: str) -> str:
    return make_key(NS_PEERS, peer_id)


def provider_key(name: str) -> str:
    return make_key(NS_PROVIDERS, name)


def split_key(key: str) -> tuple[str, str]:
    """``/<namespace>/<name>`` -> (namespace, name), or Malformed."""
    if not key.startswith("/"):
        raise Malformed(f"key {key!r} has no namespace")
    namespace, sep, name = key[1:].partition("/")
    if not sep or not name or namespace not in NAMESPACES:
        raise Malformed(f"key {key!r} is not /<namespace>/<name> with a known namespace")
    return namespace, name


def signing_bytes(key: str, subkey: str, value: bytes, expires_at: float, publisher: str) -> bytes:
    return codec.canonical({
        "domain": DOMAIN,
        "key": key,
        "subkey": subkey,
        "value": value,
        "expires_at": expires_at,
        "publisher": publisher,
    })


def sign_record(identity: Identity, key: str, value: bytes, expires_at: float) -> Record:
    """A record for ``key`` signed by ``identity``. ``value`` must already be msgpack
    bytes (use `codec.pack`); validate the result before publishing it."""
    publisher = identity.peer_id
    expires_at = float(expires_at)
    sig = identity.sign(signing_bytes(key, publisher, value, expires_at, publisher))
    return Record(key, publisher, value, expires_at, publisher, sig)


def address_value(addrs: list[str]) -> bytes:
    """The value of a peer or provider record: the publisher's addresses."""
    return codec.pack({"addrs": list(addrs)})


def validate_record(record: Any, now: float, limits: RecordLimits = DEFAULT_LIMITS) -> Record:
    """Check an untrusted record (wire mapping or `Record`) and return it typed.

    Raises `Malformed`, `TooLarge`, `Expired` or `BadSignature`, cheapest checks first
    so a flood of junk costs no signature verifications.
    """
    if isinstance(record, Record):
        record = record.to_wire()
    if not isinstance(record, dict) or set(record) != set(WIRE_FIELDS):
        raise Malformed(f"a record is a map with exactly the fields {WIRE_FIELDS}")
    key, subkey, value = record["key"], record["subkey"], record["value"]
    expires_at, publisher, signature = record["expires_at"], record["publisher"], record["signature"]
    if not isinstance(key, str) or not isinstance(subkey, str) or not isinstance(publisher, str):
        raise Malformed("key, subkey and publisher are strings")
    if not isinstance(value, bytes) or not isinstance(signature, bytes):
        raise Malformed("value and signature are bytes")
    if not isinstance(expires_at, float) or not math.isfinite(expires_at):
        raise Malformed("expires_at is a finite float (unix seconds)")
    if len(key.encode()) > limits.max_key_bytes:
        raise TooLarge(f"key of {len(key.encode())} bytes exceeds {limits.max_key_bytes}")
    if len(value) > limits.max_value_bytes:
        raise TooLarge(f"value of {len(value)} bytes exceeds {limits.max_value_bytes}")
    namespace, name = split_key(key)
    if subkey != publisher:
        raise Malformed("subkey must be the publisher's peer id")
    try:
        public_key_from_peer_id(publisher)
    except InvalidPeerId:
        raise Malformed(f"publisher {publisher[:64]!r} is not an Ed25519 peer id") from None
    if expires_at <= now:
        raise Expired(f"record expired {now - expires_at:.1f} s ago")
    if expires_at > now + limits.max_ttl + limits.clock_skew:
        raise TooLarge(f"expiry {expires_at - now:.0f} s away exceeds max ttl {limits.max_ttl:.0f} s")
    try:
        decoded = codec.unpack(value, max_bytes=limits.max_value_bytes)
    except codec.DecodeError as e:
        raise Malformed(f"value is not msgpack: {e}") from None
    if namespace == NS_PEERS and name != publisher:
        raise Malformed("only a peer may publish its own peer record")
    if namespace in (NS_PEERS, NS_PROVIDERS):
        _check_address_value(decoded)
    if not verify(publisher, signing_bytes(key, subkey, value, expires_at, publisher), signature):
        raise BadSignature(f"signature does not match publisher {publisher}")
    return Record(key, subkey, value, expires_at, publisher, signature)


def _check_address_value(decoded: Any) -> None:
    if not isinstance(decoded, dict) or set(decoded) != {"addrs"}:
        raise Malformed("peer and provider records carry {'addrs': [str]}")
    addrs = decoded["addrs"]
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
        raise Malformed(f"addrs is a list of at most {MAX_ADDRS} strings")
    for a in addrs:
        if not isinstance(a, str) or len(a.encode()) > MAX_ADDR_BYTES:
            raise Malformed(f"an address is a string of at most {MAX_ADDR_BYTES} bytes")


def record_addrs(record: Record) -> list[str]:
    """Addresses carried by a validated peer or provider record."""
    return list(record.unpack_value()["addrs"])


class StoreOutcome(Enum):
    STORED = "stored"  # a new (key, publisher) slot
    REPLACED = "replaced"  # newer version from the same publisher
    KEPT_EXISTING = "kept_existing"  # we already hold this or a newer version
    FULL = "full"  # over the per-key or total bound, and not worth an eviction
    PUBLISHER_QUOTA = "publisher_quota"  # the publisher holds max_per_publisher already
    SOURCE_QUOTA = "source_quota"  # records delivered from that network: max_per_source


LOCAL = None
"""The source of our own records: exempt from quotas, never evicted for others."""
UNATTRIBUTED = "unattributed"
"""The source of records put without saying where they came from: one shared quota."""


class RecordStore:
    """Validated records by key and publisher, bounded per key, per publisher, per
    source and in total.

    Callers validate before `put` and say where a record came from (``source``: a
    `lattice.core.netgroups.source_group`, or `LOCAL` for our own); the store orders versions and enforces
    the bounds. Theory of operation:

    1. One slot per (key, publisher); a newer version replaces the old in place (and
       keeps the slot's source: only its first delivery is charged).
    2. A new slot is refused when its publisher holds ``max_per_publisher`` slots, or
       its source ``max_per_source``: one peer, or one network's Sybils, can fill only
       that share of the store, so it can never shut out everyone else.
    3. When the key (``max_per_key``) or the whole store (``max_total``) is full, the
       newcomer evicts the soonest-expiring record of the source holding the most slots
       there - if that source holds at least two more than the newcomer's (max-min
       fairness: an eviction never makes the shares less even). Failing that, a full
       key still makes room for a newcomer that outlives its soonest-expiring record
       (long-lived records are the ones worth keeping); a full store says FULL.
    Our own records (`LOCAL`) count towards the total but never against a quota, and
    are never evicted.
    """

    def __init__(self, *, max_per_key: int = 64, max_total: int = 10_000,
                 max_per_publisher: int | None = None, max_per_source: int | None = None) -> None:
        self.max_per_key = max_per_key
        self.max_total = max_total
        self.max_per_publisher = max_per_publisher  # None: no quota
        self.max_per_source = max_per_source
        self._by_key: dict[str, dict[str, Record]] = {}
        self._source: dict[tuple[str, str], str | None] = {}  # (key, publisher) -> source
        self._by_source: dict[str, set[tuple[str, str]]] = {}
        self._per_publisher: Counter[str] = Counter()
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def keys(self) -> list[str]:
        return list(self._by_key)

    def put(self, record: Record, now: float, source: str | None = UNATTRIBUTED) -> StoreOutcome:
        slots = self._by_key.get(record.key)
        if slots is not None:
            old = slots.get(record.publisher)
            if old is not None:
                if not record.newer_than(old):
                    return StoreOutcome.KEPT_EXISTING
                slots[record.publisher] = record
                return StoreOutcome.REPLACED
            self._drop_expired(record.key, now)
            slots = self._by_key.get(record.key)
        if source is not LOCAL:
            if (self.max_per_publisher is not None
                    and self._per_publisher[record.publisher] >= self.max_per_publisher):
                return StoreOutcome.PUBLISHER_QUOTA
            if (self.max_per_source is not None
                    and len(self._by_source.get(source, ())) >= self.max_per_source):
                return StoreOutcome.SOURCE_QUOTA
        if slots is not None and len(slots) >= self.max_per_key:
            victim = self._fair_victim(
                [(record.key, p) for p in slots], source) if source is not LOCAL else None
            if victim is None:
                victim = min(slots.values(), key=lambda r: r.expires_at)
                if victim.expires_at >= record.expires_at or self._is_local(victim):
                    return StoreOutcome.FULL
            self._remove(victim)
        elif self._total >= self.max_total:
            victim = self._fair_victim(None, source) if source is not LOCAL else None
            if victim is None:
                return StoreOutcome.FULL
            self._remove(victim)
        self._by_key.setdefault(record.key, {})[record.publisher] = record
        slot = (record.key, record.publisher)
        self._source[slot] = source
        if source is not LOCAL:
            self._by_source.setdefault(source, set()).add(slot)
        self._per_publisher[record.publisher] += 1
        self._total += 1
        return StoreOutcome.STORED

    def _fair_victim(self, among: list[tuple[str, str]] | None, newcomer: str) -> Record | None:
        """The soonest-expiring record of the source with the most slots (``among`` a
        key's slots, or the whole store), if it holds at least two more than
        ``newcomer``'s source; else None."""
        if among is None:
            counts = {src: len(slots) for src, slots in self._by_source.items()}
        else:
            counts = Counter(src for slot in among if (src := self._source[slot]) is not LOCAL)
        if not counts:
            return None
        biggest = max(counts, key=lambda src: counts[src])
        if counts[biggest] < counts.get(newcomer, 0) + 2:
            return None
        slots = self._by_source[biggest] if among is None else [
            slot for slot in among if self._source[slot] == biggest]
        key, publisher = min(slots, key=lambda s: self._by_key[s[0]][s[1]].expires_at)
        return self._by_key[key][publisher]

    def _is_local(self, record: Record) -> bool:
        return self._source[(record.key, record.publisher)] is LOCAL

    def get(self, key: str, now: float) -> list[Record]:
        """Live records under ``key``, one per publisher, ordered by publisher."""
        slots = self._by_key.get(key, {})
        return [slots[p] for p in sorted(slots) if slots[p].expires_at > now]

    def get_one(self, key: str, publisher: str) -> Record | None:
        return self._by_key.get(key, {}).get(publisher)

    def all_records(self) -> list[Record]:
        return [r for slots in self._by_key.values() for r in slots.values()]

    def drop(self, key: str) -> int:
        """Forget every record under ``key`` (e.g. an operator clears a key); returns
        how many."""
        records = list(self._by_key.get(key, {}).values())
        for record in records:
            self._remove(record)
        return len(records)

    def clear(self) -> None:
        for key in list(self._by_key):
            self.drop(key)

    def gc(self, now: float) -> int:
        """Drop expired records; returns how many."""
        before = self._total
        for key in list(self._by_key):
            self._drop_expired(key, now)
        return before - self._total

    def statistics(self) -> dict[str, Any]:
        return {"stored": self._total, "max_total": self.max_total,
                "max_per_key": self.max_per_key,
                "max_per_publisher": self.max_per_publisher,
                "max_per_source": self.max_per_source,
                "sources": len(self._by_source),
                "largest_source": max(map(len, self._by_source.values()), default=0),
                "publishers": len(self._per_publisher)}

    def _drop_expired(self, key: str, now: float) -> None:
        for r in [r for r in self._by_key.get(key, {}).values() if r.expires_at <= now]:
            self._remove(r)

    def _remove(self, record: Record) -> None:
        slots = self._by_key[record.key]
        del slots[record.publisher]
        slot = (record.key, record.publisher)
        source = self._source.pop(slot)
        if source is not LOCAL:
            members = self._by_source[source]
            members.discard(slot)
            if not members:
                del self._by_source[source]
        self._per_publisher[record.publisher] -= 1
        if not self._per_publisher[record.publisher]:
            del self._per_publisher[record.publisher]
        self._total -= 1
        if not slots:
            del self._by_key[record.key]


def merge_records(records: list[Record]) -> list[Record]:
    """The newest record per (key, publisher), ordered by key then publisher."""
    best: dict[tuple[str, str], Record] = {}
    for r in records:
        slot = (r.key, r.publisher)
        if slot not in best or r.newer_than(best[slot]):
            best[slot] = r
    return [best[s] for s in sorted(best)]
