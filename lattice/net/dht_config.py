"""The DHT's configuration and what its operations return: `DHTConfig` (every bound of
`/lattice/kad/1`; the daemon maps its ``[dht]`` section onto it) and the result types of
`lattice.net.dht.KademliaDHT`. Pure data: must not import trio or libp2p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lattice.core.kademlia import Mode
from lattice.core.records import Record, RecordLimits


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
    request_timeout: float = 5.0  # one request's deadline
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
    refresh_interval: float = 600.0  # random-walk refresh of the routing table
    republish_interval: float = 3600.0  # our records and provider announcements are re-sent
    provider_ttl: float = 24 * 3600.0
    peer_record_ttl: float = 2 * 3600.0
    gc_interval: float = 60.0
    max_records_per_key: int = 64
    max_records_total: int = 20_000  # records stored for others, at most
    max_providers_per_key: int = 64
    max_providers_total: int = 20_000
    # Quotas on what others store at us (records and providers alike), so one peer, or
    # one network's Sybils, cannot fill the store and shut honest publishers out: a
    # publisher's slots, and the slots delivered from one source network (an IPv4 /24,
    # an IPv6 /48: whoever holds one address of a prefix can use them all). A full
    # store evicts from the biggest source first (records.RecordStore).
    max_records_per_publisher: int = 1024
    max_records_per_ip: int = 2000  # from one source network; the biggest is evicted first
    source_prefix_v4: int = 24  # the IPv4 prefix length of one source network
    source_prefix_v6: int = 48  # the IPv6 prefix length of one source network
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
