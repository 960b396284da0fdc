"""What a `/lattice/bulk/2` transfer is configured with, and the errors it raises
(proto/bulk.md, "Errors"): `BulkConfig`, the default `ArrayLimits`, the `Progress`
callback type, and a typed `PeerError` per way a transfer can fail. Must not import
libp2p.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lattice.core.arrays import ArrayLimits
from lattice.net.streams import PeerError, RemoteProtocolError, StreamClosedError

Progress = Callable[[int, int], Awaitable[None]]
"""``await on_progress(done_bytes, total_bytes)`` after each chunk; a slow callback
simply pauses the transfer (flow control holds the peer back, nothing times out)."""


# -- errors ---------------------------------------------------------------------------


class BulkHeaderError(RemoteProtocolError):
    """The peer offered an array outside our limits (dtype, shape, size) or not the one we
    expected; we refused it."""


class BulkRejectedError(PeerError):
    """The peer refused the array we offered; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"peer refused the array: {reason}")
        self.reason = reason


class BulkIntegrityError(RemoteProtocolError):
    """A chunk failed authentication: tampered, corrupted or misordered on the way."""


class BulkTruncatedError(StreamClosedError):
    """The data ended before the announced size (the peer vanished mid-transfer)."""


class BulkStalledError(PeerError):
    """No progress for `BulkConfig.idle_timeout` seconds."""


class BulkAbortedError(PeerError):
    """The peer aborted the transfer; ``reason`` is what it told us."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"peer aborted the transfer: {reason}")
        self.reason = reason


# -- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class BulkConfig:
    """How we transfer (daemon config section `[bulk]`; what we accept is
    `lattice.core.arrays.ArrayLimits`)."""

    chunk_bytes: int = 1 << 20
    """Plaintext bytes per sealed chunk on the side channel (bf.DIRECT_CHUNK_MIN..MAX)."""
    stream_chunk_bytes: int = 1 << 20
    """Plaintext bytes per sealed chunk on the fallback path (bf.STREAM_CHUNK_MIN..MAX)."""
    stream_window_bytes: int = 8 << 20
    """Fallback credit we grant as receiver: sealed bytes the sender may run ahead of our
    consumer, i.e. what we buffer per inbound transfer while the consumer pauses."""
    direct: bool = True
    """As sender: use the side channel the receiver offers. False forces the fallback."""
    connect_timeout: float = 3.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    """Seconds without any progress (a chunk, a credit, a frame) before BulkStalledError.
    A reader may pause this long; Yamux alone would have reset the stream after 5 s."""


DEFAULT_LIMITS = ArrayLimits()
DEFAULT_CONFIG = BulkConfig()
