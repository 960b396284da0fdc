"""What became of the hole punches with each peer, and when each is tried again.

Owns `PunchHistory`: the last session's `PunchRecord` per peer (for `lattice peers`,
`lattice status` and statistics: whose NAT, what was tried, the reason), the retry
schedule of peers still reached only through a relay, and `why_relayed`, the line a
user reads. Bounded (1024 peers, the oldest forgotten first). No I/O: times come in as
arguments (``now`` on trio's clock, ``wall`` on the wall clock). Must not import
libp2p or latticed; the driver is `lattice.net.nat.holepunch`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lattice.core.holepunch import Done, HolePunchSession, PeerView

MAX_PEERS = 1024


@dataclass
class PunchRecord:
    """The last session with a peer."""

    outcome: str  # "direct" | "relayed" | "failed"
    reason: str  # why, naming whose NAT
    role: str
    plan: str | None
    tried: str  # what was tried ("punch, 2 rounds", "nothing")
    ours: str  # how we looked to the peer ("private, cone NAT, router drops")
    theirs: str  # how the peer looked to us
    rtt_ms: float | None
    elapsed_ms: float
    at: float  # wall clock
    retry_at: float | None  # wall clock of our next try; None: direct, or theirs to try
    probes: dict[str, int] | None = None  # birthday: what we sent and opened


def describe_view(view: PeerView) -> str:
    """How a side looks in an exchange, in words: "private, cone NAT, router rejects"."""
    nat = {"none": "no NAT", "unknown": "NAT unknown"}.get(view.nat, f"{view.nat} NAT")
    words = [view.reach, nat]
    if view.filtering in ("drop", "reject"):
        words.append(f"router {view.filtering}s")
    return ", ".join(words)


class PunchHistory:
    """Records and the retry schedule. The side that opened a session tries again
    (the other's record says so): after a failure in ``retry_min`` seconds doubling to
    ``retry_max``; after a decision to stay relayed, in ``retry_max`` (NATs and
    addresses change)."""

    def __init__(self, *, retry_min: float, retry_max: float, rng: random.Random) -> None:
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.rng = rng
        self.records: dict[str, PunchRecord] = {}  # in order of recency
        self._retries: dict[str, tuple[float, float]] = {}  # peer -> (due, delay)

    def record(self, peer_id: str, session: HolePunchSession, result: Done, *,
               elapsed: float, now: float, wall: float,
               probes: dict[str, int] | None) -> float | None:
        """Keep the outcome of ``session``; returns when we try again (``now``'s clock)."""
        retry_at = self._schedule(peer_id, session, result, now)
        self.records.pop(peer_id, None)  # re-insert: the dict's order is recency
        self.records[peer_id] = PunchRecord(
            result.outcome, result.reason, session.role, session.plan, session.tried,
            describe_view(session.ours),
            "unknown" if session.theirs is None else describe_view(session.theirs),
            None if session.rtt is None else round(session.rtt * 1000, 2),
            round(elapsed * 1000, 1), wall,
            None if retry_at is None else round(wall + retry_at - now, 3), probes or None)
        _bound(self.records)
        return retry_at

    def _schedule(self, peer_id: str, session: HolePunchSession, result: Done,
                  now: float) -> float | None:
        if result.outcome == "direct" or session.role != "initiator":
            self._retries.pop(peer_id, None)
            return None
        _, last = self._retries.get(peer_id, (0.0, 0.0))
        if result.outcome == "failed":
            delay = min(self.retry_max, max(self.retry_min, last * 2))
        else:
            delay = self.retry_max
        at = now + delay * self.rng.uniform(0.9, 1.1)
        self._retries[peer_id] = (at, delay)
        _bound(self._retries)
        return at

    def due(self, now: float) -> list[str]:
        """Peers whose retry is due; each is taken off the schedule until recorded again."""
        out = [p for p, (at, _) in self._retries.items() if at <= now]
        for p in out:
            self._retries[p] = (float("inf"), self._retries[p][1])
        return out

    def forget_retry(self, peer_id: str) -> None:
        self._retries.pop(peer_id, None)

    def next_due(self) -> float | None:
        return min((at for at, _ in self._retries.values() if at != float("inf")), default=None)

    def peer_record(self, peer_id: str) -> dict[str, Any] | None:
        r = self.records.get(peer_id)
        return None if r is None else dict(r.__dict__)

    def recent(self, n: int) -> list[dict[str, Any]]:
        last = list(self.records.items())[-n:]
        return [{"peer": p, **r.__dict__} for p, r in reversed(last)]

    def why_relayed(self, peer_id: str, wall: float) -> str | None:
        """For a peer we reach only through a relay: why not directly, what was tried,
        when it is tried again ("their NAT is symmetric ...; tried punch, 2 rounds;
        again in 28 s"). None when we have no record of trying."""
        r = self.records.get(peer_id)
        if r is None or r.outcome == "direct":
            return None
        when = ("again when the peer retries" if r.retry_at is None
                else f"again in {max(0.0, r.retry_at - wall):.0f} s")
        return f"{r.reason}; tried {r.tried}; {when} (we: {r.ours}; they: {r.theirs})"


def _bound(d: dict[str, Any]) -> None:
    while len(d) > MAX_PEERS:
        d.pop(next(iter(d)))
