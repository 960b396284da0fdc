"""Who not to serve or choose for a while: the penalty box every protocol driver keeps
for peers that broke its protocol.

Owns `PenaltyBox`: a peer penalized once is refused for ``base`` seconds, each further
penalty doubles it (up to ``cap``), and the peers remembered are bounded (the oldest
entry goes first, so Sybils that fill the box only push out each other and long-expired
offenders). Pure: must not import trio, libp2p or sockets, and never reads the clock
(``now`` is the driver's monotonic seconds).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any


class PenaltyBox:
    """Per-peer exponential backoff after misbehaviour, with counts by reason."""

    def __init__(self, *, base: float, cap: float = 3600.0, max_peers: int = 4096) -> None:
        if base <= 0 or cap < base or max_peers < 1:
            raise ValueError("need 0 < base <= cap and max_peers >= 1")
        self.base = base
        self.cap = cap
        self.max_peers = max_peers
        self._until: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (until, backoff)
        self.reasons: Counter[str] = Counter()
        self.penalized = 0  # penalties given, ever

    def penalize(self, peer: str, reason: str, now: float) -> float:
        """Refuse ``peer`` from ``now`` on; returns for how long (seconds)."""
        _, last = self._until.pop(peer, (0.0, self.base / 2))
        backoff = min(last * 2, self.cap)
        self._until[peer] = (now + backoff, backoff)
        while len(self._until) > self.max_peers:
            self._until.popitem(last=False)
        self.reasons[reason] += 1
        self.penalized += 1
        return backoff

    def is_penalized(self, peer: str, now: float) -> bool:
        entry = self._until.get(peer)
        return entry is not None and now < entry[0]

    def statistics(self, now: float) -> dict[str, Any]:
        return {"penalties": dict(self.reasons), "penalized_total": self.penalized,
                "penalized_now": sum(1 for until, _ in self._until.values() if now < until),
                "penalty_base_s": self.base, "max_penalized_peers": self.max_peers}
