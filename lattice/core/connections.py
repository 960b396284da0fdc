"""Which peer connections to close: the connection manager's policy, pure.

Owns the water-mark rule (as go-libp2p's connection manager): once a daemon holds more
than ``high_water`` connections it closes connections down to ``low_water``, never one
that is *protected* (a DHT neighbour, a sync mesh peer, a relay we hold a reservation
on, a partner in a running job) nor one younger than ``grace`` (a dial in progress of
being used). The rest are chosen at random, so no peer can make itself the one that is
kept. Must not import trio, libp2p or read the clock.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class WaterMarks:
    """The connection manager's bounds (daemon config section ``[connections]``)."""

    low: int = 32
    """Above the high water mark, connections are trimmed down to this many."""
    high: int = 64
    """More connections than this start a trim (kept: DHT neighbours, the sync mesh,
    relays, job partners)."""
    grace: float = 30.0
    """A connection younger than this, seconds, is not trimmed."""

    def __post_init__(self) -> None:
        if not (1 <= self.low <= self.high):
            raise ValueError("connection water marks need 1 <= low <= high")


def choose_trims(opened: Mapping[str, float], protected: set[str], marks: WaterMarks,
                 now: float, rng: random.Random) -> list[str]:
    """The peers to disconnect (``opened``: peer -> when its connection opened)."""
    if len(opened) <= marks.high:
        return []
    spare = sorted(p for p, at in opened.items()
                   if p not in protected and now - at >= marks.grace)
    rng.shuffle(spare)
    return spare[:len(opened) - marks.low]
