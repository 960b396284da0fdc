"""What a DHT node publishes itself (proto/dht.md, "Maintenance"): its own records,
its provider announcements and, in client mode, its peer record - kept in its own
stores (exempt from quotas), bounded (``max_own_records`` each), re-signed and re-sent
until they expire or are withdrawn.

Owns `Publications`. Pure bookkeeping: the node (`lattice.net.dht.KademliaDHT`) does
the replicating. Must not import libp2p or trio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lattice.core import codec
from lattice.core.identity import Identity
from lattice.core.records import (
    LOCAL,
    NS_PROVIDERS,
    Malformed,
    Record,
    RecordStore,
    TooLarge,
    address_value,
    peer_key,
    provider_key,
    sign_record,
    split_key,
    validate_record,
)
from lattice.net.dht_config import DHTConfig


class Publications:
    """Our records (key -> latest) and announcements (provider key -> latest)."""

    def __init__(self, identity: Identity, config: DHTConfig, records: RecordStore,
                 providers: RecordStore, own_addrs: Callable[[], list[str]]) -> None:
        self.identity = identity
        self.config = config
        self._records = records
        self._providers = providers
        self._own_addrs = own_addrs
        self.own: dict[str, Record] = {}
        self.providing: dict[str, Record] = {}

    def record(self, key: str, value: Any, ttl: float, now: float) -> Record:
        """Sign ``value`` under ``key`` for ``ttl`` seconds and keep it. Raises
        `RecordError` (a ValueError) if our own limits refuse it."""
        record = sign_record(self.identity, key, codec.pack(value), now + ttl)
        record = validate_record(record, now, self.config.limits)
        if split_key(key)[0] == NS_PROVIDERS:
            raise Malformed("provider records are published with provide()")
        if key not in self.own and len(self.own) >= self.config.max_own_records:
            raise TooLarge(f"already publishing {len(self.own)} records")
        self.own[key] = record
        self._records.put(record, now, LOCAL)
        return record

    def announce(self, name: str, now: float) -> Record:
        """Sign (or re-sign) our announcement that we provide ``name``, and keep it."""
        key = provider_key(name)
        if key not in self.providing and len(self.providing) >= self.config.max_own_records:
            raise TooLarge(f"already providing {len(self.providing)} keys")
        return self._announce(key, now)

    def withdraw(self, name: str) -> None:
        self.providing.pop(provider_key(name), None)

    def refresh(self, now: float, *, client: bool) -> list[tuple[Record, str]]:
        """Before a republish: drop expired records, re-sign the announcements (and, in
        client mode, our peer record); returns every (record, request type) to send."""
        for key in [k for k, r in self.own.items() if r.expires_at <= now]:
            del self.own[key]
        if client:
            record = sign_record(self.identity, peer_key(self.identity.peer_id),
                                 address_value(self._own_addrs()),
                                 now + self.config.peer_record_ttl)
            self.own[record.key] = record
            self._records.put(record, now, LOCAL)
        for key in list(self.providing):
            self._announce(key, now)
        return ([(r, "PUT_VALUE") for r in self.own.values()]
                + [(r, "ADD_PROVIDER") for r in self.providing.values()])

    def restore(self, records: list[Record], names: list[str], now: float) -> None:
        """Take back what a restart kept (`lattice.core.dht_state`)."""
        for record in records:
            self.own[record.key] = record
            self._records.put(record, now, LOCAL)
        for name in names:
            self._announce(provider_key(name), now)

    def names(self) -> list[str]:
        return [split_key(k)[1] for k in self.providing]

    def _announce(self, key: str, now: float) -> Record:
        record = sign_record(self.identity, key, address_value(self._own_addrs()),
                             now + self.config.provider_ttl)
        self.providing[key] = record
        self._providers.put(record, now, LOCAL)
        return record
