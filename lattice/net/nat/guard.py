"""The peer-input boundary of the NAT protocols (observe, holepunch): turning whatever a
parser raises on a peer's message into a typed error, and the penalty box for peers
that broke a protocol.

Owns `parse_peer_input` and `Penalties`. Both mirror what `hostile-net` is adding for
every protocol (`lattice.net.streams.parse_peer_input`, `lattice.core.penalties`); once
those land, this module goes and its callers use them (same signatures). Must not
import libp2p or latticed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from lattice.net.streams import PeerError, RemoteProtocolError

T = TypeVar("T")


class MalformedPeerInput(RemoteProtocolError):
    """A parser raised something other than a protocol error on a peer's input
    (``__cause__`` holds it: KeyError, TypeError, RecursionError...)."""


def parse_peer_input(parse: Callable[..., T], *args: Any,
                     keep: tuple[type[Exception], ...] = (), **kwargs: Any) -> T:
    """``parse(*args, **kwargs)`` over what a peer sent. ``parse`` is pure (it only
    looks at its arguments: a decoder, a sans-I/O machine's ``handle``), so whatever it
    raises was caused by the peer and becomes `MalformedPeerInput`; `PeerError`s and the
    types in ``keep`` (the protocol's own typed error, handled by the caller) pass
    through. Our code outside ``parse`` keeps its bugs: they propagate."""
    try:
        return parse(*args, **kwargs)
    except PeerError:
        raise
    except keep:
        raise
    except Exception as e:  # the peer-input boundary (above): blame the input, not us
        name = getattr(parse, "__qualname__", type(parse).__name__)
        raise MalformedPeerInput(f"{name}: {type(e).__name__}: {str(e)[:200]}") from e


class Penalties:
    """Per-peer exponential backoff after misbehaviour, with counts by reason: a peer
    penalized once is refused for ``base`` seconds, each further penalty doubles it up
    to ``cap``; at most ``max_peers`` remembered (the oldest first out)."""

    def __init__(self, *, base: float, cap: float = 3600.0, max_peers: int = 4096) -> None:
        if base <= 0 or cap < base or max_peers < 1:
            raise ValueError("need 0 < base <= cap and max_peers >= 1")
        self.base = base
        self.cap = cap
        self.max_peers = max_peers
        self._until: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.reasons: Counter[str] = Counter()
        self.penalized = 0

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
