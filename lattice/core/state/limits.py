"""Limits of the shared state: protocol constants and local policy.

Owns every bound the state store and the sync protocol enforce. Must not import trio,
libp2p or read the clock.

Two kinds of limit, kept apart on purpose:

- *Protocol limits* (module constants, in proto/crdt-sync.md). Every honest peer uses
  the same numbers, so an envelope one honest peer accepts is accepted by all. Breaking
  one is proof of misbehaviour and the sender is penalized.
- *Local policy* (`StateLimits`, from the daemon config). They protect this process's
  memory and may differ between peers; hitting one is never blamed on the sender.
"""

from __future__ import annotations

from dataclasses import dataclass

from lattice.core.config_errors import InvalidSetting

# -- protocol limits (same on every peer; changing one needs a new protocol version) --
MAX_ENVELOPE_BYTES = 256 * 1024
"""Largest encoded envelope (a delta or a snapshot)."""
MAX_AUTHOR_BYTES = 1024 * 1024
"""Largest sum of an author's retained envelopes (from its last snapshot on)."""
MAX_VALUE_BYTES = 64 * 1024
"""Largest encoded value of one record (a member field, a job spec, ...)."""
MAX_VALUE_DEPTH = 8
"""Deepest nesting of maps and lists in one record value (ours go 3 deep). msgpack
decodes up to ~1000 levels without complaint, but Python code that walks a value
(canonical encoding, equality) recurses and raises RecursionError long before that."""
MAX_KEY_CHARS = 128
"""Longest record key (job id, model id, counter name)."""
MAX_SEQ = 2**53
"""Sequence numbers stay exact in every language's number type."""
MAX_FRAME_BYTES = 1024 * 1024 + 64 * 1024
"""Largest sync frame: one batch of envelopes plus framing."""
MAX_BATCH_BYTES = 512 * 1024
"""A sender packs envelopes into one message up to this many bytes (one envelope
always fits, whatever its size)."""
MAX_ITEMS_PER_MESSAGE = 1024
MAX_SUMMARY_ENTRIES = 8192
"""A summary names at most this many authors (about 500 KiB), so it fits a frame."""
MAX_RANGES_PER_MESSAGE = 1024
"""Reconciliation ranges in one ``recon`` message (each level of a split is 16)."""


@dataclass(frozen=True)
class StateLimits:
    """Local policy: how much this process keeps for others (see module docstring)."""

    max_authors: int = 4096
    """Authors we replicate; beyond it unreferenced authors are evicted to make room,
    else new authors are refused (Sybil bound). At most MAX_SUMMARY_ENTRIES, so our
    summary always fits one message."""
    max_state_bytes: int = 32 * 1024 * 1024
    """The global budget: envelope bytes kept for every author but us. An envelope
    that would exceed it evicts unreferenced authors (largest first) or is refused.
    Memory is a small multiple of it (the documents and decoded records too)."""
    peer_authors_per_s: float = 4.0
    """New authors one peer may have us admit, per second after its burst."""
    peer_authors_burst: int = 256
    """New authors one peer may have us admit (other than its own): a token bucket of
    this burst, refilled at this rate. A new daemon learns a network of a few hundred
    members from its first peer at once, and the rest from every peer in parallel."""
    peer_bytes_per_s: float = 64 * 1024
    """Envelope bytes one peer may have us accept, per second after its burst."""
    peer_bytes_burst: int = 4 * 1024 * 1024
    """Envelope bytes one peer may have us accept at once: the same kind of bucket."""
    max_gap_per_author: int = 64
    """Out-of-order envelopes buffered per author while waiting for the missing seq."""
    max_gap_bytes: int = 4 * 1024 * 1024
    """Out-of-order envelopes buffered in total."""
    snapshot_min_bytes: int = 16 * 1024
    """Our own log is compacted into a snapshot once it holds this many bytes and twice
    the size of a fresh snapshot."""
    heartbeat_timeout: float = 60.0
    """A member whose heartbeat is older than this is shown as not alive."""
    max_jobs_per_author: int = 16
    """Jobs of one author shown (its newest): what a Sybil's job flood can make every
    daemon plan and list is this times the authors admitted."""
    max_subscribers: int = 64

    def __post_init__(self) -> None:
        if not (1 <= self.max_authors <= MAX_SUMMARY_ENTRIES):
            raise InvalidSetting("max_authors", f"must be in [1, {MAX_SUMMARY_ENTRIES}]")
        if self.max_state_bytes < MAX_AUTHOR_BYTES:
            raise InvalidSetting("max_state_bytes", f"must hold one author ({MAX_AUTHOR_BYTES})")
        for rate in ("peer_authors_per_s", "peer_bytes_per_s"):
            if getattr(self, rate) < 0:
                raise InvalidSetting(rate, "must not be negative")
        for burst in ("peer_authors_burst", "peer_bytes_burst"):
            if getattr(self, burst) < 1:
                raise InvalidSetting(burst, "must be at least 1")
