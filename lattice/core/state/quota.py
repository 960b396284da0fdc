"""What one peer may add to our replicated state, per unit of time (local policy).

Owns `Allowance`: two token buckets, new authors and bytes, kept per remote peer by
the sync hub (so a peer that reconnects finds its allowance as it left it) and
charged by the store for what it *accepts* from that peer: refusals cost nothing and
blame nobody. Must not import trio, libp2p or read the clock (``now`` is passed in).

Why: keys are free, so a single peer can sign for any number of fresh authors
(Sybils), each holding up to `MAX_AUTHOR_BYTES`. The global state budget bounds the
total (`StateLimits.max_state_bytes`); allowances bound how fast any one connection
can spend it, so honest peers keep up and unreferenced authors can be evicted as
fast as they arrive. A peer's own author is admitted without an author token: the
connection (Noise) proves that key is the peer's, and connections are bounded.
"""

from __future__ import annotations


class _Bucket:
    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def level(self, now: float) -> float:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        return self.tokens


class Allowance:
    """Token buckets of new authors and bytes one peer may still have us accept."""

    def __init__(self, *, authors_per_s: float, authors_burst: int, bytes_per_s: float,
                 bytes_burst: int, now: float) -> None:
        self._authors = _Bucket(authors_per_s, authors_burst, now)
        self._bytes = _Bucket(bytes_per_s, bytes_burst, now)
        self.refused = 0

    def refusal(self, now: float, *, new_author: bool, nbytes: int) -> str | None:
        """The reason to refuse an envelope of ``nbytes`` (for a ``new_author``), or
        None when the allowance covers it. An envelope larger than the burst is
        covered by a full bucket (which it empties), else it could never arrive."""
        if new_author and self._authors.level(now) < 1:
            self.refused += 1
            return "peer_author_rate"
        if self._bytes.level(now) < min(nbytes, self._bytes.burst):
            self.refused += 1
            return "peer_byte_rate"
        return None

    def charge(self, *, new_author: bool, nbytes: int) -> None:
        """Spend what an accepted envelope cost (after `refusal` said None)."""
        if new_author:
            self._authors.tokens -= 1
        self._bytes.tokens = max(0.0, self._bytes.tokens - nbytes)

    def refilled(self, now: float) -> bool:
        """Whether both buckets are at least half full again."""
        return (self._authors.level(now) >= self._authors.burst / 2
                and self._bytes.level(now) >= self._bytes.burst / 2)

    def statistics(self, now: float) -> dict[str, float]:
        return {"authors": round(self._authors.level(now), 2),
                "bytes": round(self._bytes.level(now)), "refused": self.refused}
