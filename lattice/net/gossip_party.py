"""One participant of one train job, as `/lattice/gossip-avg/2` sees it: its
parameters and when it can take part (`AveragingParty`), the settings
(`GossipConfig`), where its math runs (`Compute`), and who it will not deal with for a
while (`PeerHealth`). The driver is `lattice.net.gossip_avg`. Must not import libp2p.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import trio

from lattice.core.penalties import PenaltyBox
from lattice.learn.gossip import Outgoing, ParamChannel, pair_average, pair_weights
from lattice.learn.optim import OuterNesterov
from lattice.learn.validate import InvalidTensor, NormBound
from lattice.net.streams import parse_peer_input

log = logging.getLogger("lattice.net.gossip_avg")

T = TypeVar("T")
Compute = Callable[[Callable[[], Any]], Awaitable[Any]]


async def compute_inline(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the event loop (tests, tiny models). The daemon uses a thread."""
    await trio.lowlevel.checkpoint()
    return fn()


def thread_compute(limiter: trio.CapacityLimiter | None = None) -> Compute:
    """Run math in a worker thread, at most ``limiter`` at a time."""
    async def run(fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=limiter)
    return run


@dataclass(frozen=True)
class GossipConfig:
    """Timeouts and limits (daemon config section ``[jobs.gossip]``)."""

    accept_timeout: float = 15.0
    """Initiator: how long to wait for ``accept``/``busy`` (> hold_timeout)."""
    hold_timeout: float = 10.0
    """Responder: how long an offer is held while we finish a training round."""
    step_timeout: float = 30.0
    """Each later step: the tensors, the commit, the ack."""
    resolve_timeout: float = 10.0
    """Initiator: how long to keep asking for the outcome of an exchange whose ack was lost."""
    retry_pause: float = 0.05
    """Mean idle pause before retrying when every candidate offered to was busy."""
    offers_per_pass: int = 3
    """Candidates offered to before that pause. Nearly every participant of a busy job
    is itself offering (and so busy to others), so offering to all of them costs a
    stream per peer per round (O(N)) and keeps us busy to everyone else; a few offers
    and then listening lets others reach us, at a cost independent of the roster."""
    small_payload_bytes: int = 256 << 10
    """Models under this many float32 bytes average over the framed transport on the
    stream (about one Yamux window, one flight), never a bulk session."""
    max_payload_bytes: int = 1 << 31
    """Largest tensor payload accepted from a peer (the job's model bounds it too)."""
    outcome_memory: int = 1024
    """Responder outcomes remembered for ``status`` queries."""
    penalty_backoff: float = 60.0
    """A peer that sent garbage is not chosen, nor served, for this long (doubling)."""
    unreachable_backoff: float = 1.0
    """A peer we could not reach is skipped for this long (doubling, up to 30 s)."""


class Held:
    """An offer we hold while our training round finishes."""

    __slots__ = ("xid", "go", "state")

    def __init__(self, xid: str) -> None:
        self.xid = xid
        self.go = trio.Event()
        self.state = "waiting"  # -> "go" (we take part) | "expired" (answer busy)


class AveragingParty:
    """One participant of one job, as the averaging protocol sees it.

    Holds the parameters (through ``participant``: a `lattice.learn.participant.Participant`,
    i.e. trainer, channel, outer optimizer), the roster, and when the participant can
    take part: never while it trains (an offer is then *held* until the round ends, at
    most ``hold_timeout``), one exchange at a time, never after it finished. The runner
    trains only through `train`, so parameters change only there and in a committed
    exchange.

    ``average_into``, when given, returns where an exchange writes its average (or None:
    a new array): a buffer that is neither the current parameters nor anything a
    trainer touches until the commit adopts it (an attached loop's spare slot in shared
    memory, so adopting the average copies nothing)."""

    def __init__(self, job_id: str, me: str, roster: list[str], participant: Any, *,
                 weighting: str = "uniform", bound: NormBound | None = NormBound(),
                 compute: Compute = compute_inline, math: Compute | None = None,
                 average_into: Callable[[], np.ndarray | None] | None = None) -> None:
        self.job_id = job_id
        self.me = me
        self.roster = frozenset(roster) - {me}
        self.participant = participant
        self.weighting = weighting
        self.bound = bound
        self.compute = compute  # training rounds
        self.math = math or compute  # an exchange's encode, mix and apply
        self.average_into = average_into
        self.training = False
        self.closed = False
        self.exchange: str | None = None
        self.held: Held | None = None
        self.mixed = False  # averaged since the current round started
        self._idle = trio.Event()
        self._idle.set()
        self._mixed_event = trio.Event()
        self.stats: Counter[str] = Counter()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.partners: set[str] = set()

    # parameters ---------------------------------------------------------------------------
    @property
    def params(self) -> np.ndarray:
        return self.participant.trainer.params

    @property
    def samples(self) -> int:
        return int(self.participant.averaging_samples)

    @property
    def channel(self) -> ParamChannel:
        return self.participant.channel

    def expected_payload(self) -> dict[str, np.dtype]:
        return {**self.channel.codec.payload_dtypes, "shape": np.dtype(np.int64)}

    def max_payload_bytes(self, config: GossipConfig) -> int:
        # any codec's payload for this model is at most ~2x the float32 parameters
        return min(config.max_payload_bytes, 2 * self.params.nbytes + 4096)

    # coordination -------------------------------------------------------------------------
    def busy_reason(self) -> str | None:
        if self.closed:
            return "finished"
        if self.exchange is not None or self.held is not None:
            return "exchange"
        return None

    def begin(self, xid: str) -> None:
        if self.exchange is not None:
            raise AssertionError(f"exchange {self.exchange} still running")  # our bug
        self.exchange = xid
        self._idle = trio.Event()

    def end(self) -> None:
        self.exchange = None
        self._idle.set()

    async def wait_idle(self) -> None:
        while self.exchange is not None:
            await self._idle.wait()

    @asynccontextmanager
    async def exclusive(self, why: str) -> AsyncIterator[None]:
        """Hold the exchange slot: no average swaps the parameters until the block ends
        (a checkpoint reads them consistently under it)."""
        await self.wait_idle()
        self.begin(why)
        try:
            yield
        finally:
            self.end()

    async def train(self, fn: Callable[[], T]) -> T:
        """Run one training round (``fn``, through ``compute``); offers arriving
        meanwhile are held and served as soon as it returns."""
        async with self.training_round():
            return await self.compute(fn)

    @asynccontextmanager
    async def training_round(self) -> AsyncIterator[None]:
        """A training round that runs elsewhere for the duration of the block (an
        attached loop in the user's process): offers are held meanwhile and served as
        soon as it ends, exactly as during `train`."""
        await self.wait_idle()
        self.new_round()
        self.training = True
        try:
            yield
        finally:
            self.training = False
            self._release_held()

    def new_round(self) -> None:
        """A round starts: whether a peer averaged with us (`mixed`) counts afresh."""
        self.mixed = False
        self._mixed_event = trio.Event()

    def _release_held(self) -> None:
        held, self.held = self.held, None
        if held is not None and held.state == "waiting" and not self.closed:
            held.state = "go"
            self.begin(held.xid)  # reserved for the held offer: no one slips in first
            held.go.set()

    def note_mixed(self) -> None:
        self.mixed = True
        self._mixed_event.set()

    async def wait_mixed(self) -> None:
        await self._mixed_event.wait()

    def close(self) -> None:
        """Take part in no more exchanges (finished training, cancelled, stopped)."""
        self.closed = True
        held, self.held = self.held, None
        if held is not None and held.state == "waiting":
            held.state = "expired"
            held.go.set()

    # the math (pure, run through math) ---------------------------------------------------
    def _mix(self, out: Outgoing, payload: dict[str, np.ndarray], peer_samples: int
             ) -> np.ndarray:
        """Validate the peer's payload and compute the average; mutates nothing.
        Raises InvalidTensor, or RemoteProtocolError if decoding the payload choked."""
        theirs = parse_peer_input(self.channel.receive, payload, self.params, self.bound,
                                  keep=(InvalidTensor,))
        w_own, w_peer = pair_weights(self.samples, peer_samples, self.weighting)
        into = self.average_into() if self.average_into is not None else None
        return pair_average(out.estimate, theirs, w_own, w_peer, out=into)

    def _apply(self, out: Outgoing, average: np.ndarray) -> None:
        """The commit: adopt the average (through the outer step, if any)."""
        outer: OuterNesterov | None = self.participant.outer
        self.participant.trainer.params = outer.step(average) if outer is not None else average
        self.channel.commit(out)

    def statistics(self) -> dict[str, Any]:
        return {"job": self.job_id, **self.stats, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "partners": len(self.partners)}


# -- peer health --------------------------------------------------------------------------


class PeerHealth:
    """Who not to choose (or serve) for a while: penalized senders of garbage (a
    `PenaltyBox`), and peers we could not reach (exponential backoff, reset on
    success; only roster peers are ever tried, so this stays small)."""

    def __init__(self, config: GossipConfig) -> None:
        self.config = config
        self._penalized = PenaltyBox(base=config.penalty_backoff)
        self._unreachable: dict[str, tuple[float, float]] = {}

    def penalize(self, peer: str, reason: str, now: float) -> None:
        backoff = self._penalized.penalize(peer, reason, now)
        log.warning("peer=%s gossip-avg penalized (%s); ignored for %.0f s", peer, reason, backoff)

    def unreachable(self, peer: str, now: float) -> None:
        _, last = self._unreachable.get(peer, (0.0, self.config.unreachable_backoff / 2))
        backoff = min(last * 2, 30.0)
        self._unreachable[peer] = (now + backoff, backoff)

    def reachable(self, peer: str) -> None:
        self._unreachable.pop(peer, None)

    def is_penalized(self, peer: str, now: float) -> bool:
        return self._penalized.is_penalized(peer, now)

    def blocked(self, peer: str, now: float) -> bool:
        if self.is_penalized(peer, now):
            return True
        until = self._unreachable.get(peer)
        return until is not None and now < until[0]

    def statistics(self, now: float) -> dict[str, Any]:
        return {**self._penalized.statistics(now), "unreachable": len(self._unreachable)}
