"""What a job kind is: the one interface the supervisor runs every kind through.

A kind declares its spec type and parser, how a daemon decides to take part, what a
participant does, and how the merger produces the job's result. Everything else — the
job record and id, the roster, participation entries and their state machine, progress
writes, checkpoints on disk, the merge decision, takeovers, cancellation — is the
supervisor's (`lattice.jobs.supervisor`), the same for every kind.

Adding a kind touches the kind's own module (`lattice.jobs.<kind>`), its spec in
proto/jobs.md, and one registration line (`lattice.jobs.KINDS`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np

from lattice.core.jobs import JobSpecLike
from lattice.net.blob import BlobService
from lattice.net.gossip_avg import Compute, GossipAverager, compute_inline
from lattice.net.modelstore import ModelService
from lattice.net.streams import PeerNetwork

if TYPE_CHECKING:
    from lattice.jobs.supervisor import JobsConfig, Run

SpecT = TypeVar("SpecT", bound=JobSpecLike)

INLINE_MATH_PARAMS = 1 << 20
"""Bookkeeping math on models up to this many parameters (an averaging round's encode,
mix and apply; an attached loop's sync) runs on the event loop: about a millisecond of
numpy at most. The governed compute threads run at the volunteer's idle priority, so a
hop there waits for every core to be idle: behind the user's own loop (attach: a 9k-
parameter CNN spent 6.5 ms a sync), or behind other daemons' event loops (a 12-daemon
digits job on 2 cores: ~100 ms of wall for each 2 ms evaluation). Training stays there."""
INLINE_EVAL_WORK = 1 << 25
"""Evaluations of at most this many parameter x test-sample products run inline too."""


def math_compute(compute: Compute, num_params: int) -> Compute:
    """``compute`` for a large model's bookkeeping math; inline for a small one."""
    return compute_inline if num_params <= INLINE_MATH_PARAMS else compute


@dataclass(frozen=True)
class Contribution:
    """A participant's final part, published as a blob: ``weight`` is what the merge
    weighs it by (samples trained on, tensors merged...)."""

    blob: str
    weight: int


@dataclass(frozen=True)
class Input:
    """One participant's contribution as the merger sees it."""

    peer: str
    rank: int
    blob: str
    weight: int


@dataclass
class Result:
    """What a merger produced: the model (already stored as a blob, id = SHA-256 of its
    bytes), the inputs it used, and the kind's own record fields (metrics, method...)."""

    model_id: str
    size: int
    used: list[Input]
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Services:
    """What a kind may use: the network and the services the supervisor runs."""

    network: PeerNetwork
    gossip: GossipAverager
    blobs: BlobService
    models: ModelService
    """Models as pieces over ``blobs`` (the daemon's model store: `models.*` RPCs)."""
    compute: Compute
    config: JobsConfig
    rng: random.Random
    clock: Callable[[], float]
    asked_to_join: Callable[[str], bool] = lambda _job_id: False
    """Whether a local user asked to take part in this job (`JobSupervisor.join`)."""


class RunContext(Protocol):
    """The supervisor's side of one participation, handed to the kind."""

    services: Services
    checkpoint: tuple[dict[str, np.ndarray], dict[str, Any]] | None
    """The kind's arrays and metadata from the last checkpoint (None: a fresh start)."""

    async def report(self, *, force: bool = False, **progress: Any) -> None:
        """Record progress fields (written to our participation entry at most every
        `JobsConfig.progress_interval`, or now with ``force``)."""

    def due(self) -> bool:
        """A progress write would happen now: compute costly fields (an evaluation)
        only then."""

    async def save_checkpoint(self, arrays: Mapping[str, np.ndarray],
                              meta: Mapping[str, Any], *,
                              final: Contribution | None = None) -> None:
        """Persist the kind's state with the supervisor's (a restart resumes from it);
        with ``final``, the contribution about to be returned (a restart then goes
        straight to the merge phase while its blob is still here)."""

    def on_close(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` when the participation ends (after the merge phase)."""

    def candidates(self) -> list[str]:
        """Roster members that may still exchange with us: not finished, not paused,
        not known dead."""

    def reserve_memory(self, nbytes: int) -> None:
        """Reserve ``nbytes`` of the volunteer's compute memory (``max_memory_mb``) for
        this participation, released when it ends; raises `OverLimit` when it would
        exceed the cap."""

    def entries(self) -> dict[str, Mapping[str, Any]]:
        """The roster members' participation entries as this daemon sees them now."""

    async def wait_changed(self) -> None:
        """Wait until the job's records (or members' liveness) may have changed."""


class JobKind(Protocol, Generic[SpecT]):
    """A kind of job. Implementations are registered in `lattice.jobs.KINDS`."""

    name: str
    counts: Counter[str]
    """The kind's own counters (shown in `jobs.stats` beside the supervisor's)."""

    def parse_spec(self, raw: Any) -> SpecT:
        """The kind's spec from a plain mapping; raises `JobSpecError`."""

    def volunteers(self, job_id: str, spec: SpecT) -> bool:
        """Whether this daemon takes part in the job when it has room."""

    async def participate(self, run: Run, ctx: RunContext) -> Contribution | None:
        """Do this participant's part and publish its contribution (None: nothing to
        contribute, e.g. the task cannot be built here: `KindRefused`). Cancelled when
        the job is cancelled or fails."""

    async def produce(self, run: Run, ctx: RunContext, inputs: list[Input]) -> Result | None:
        """As the merger: the job's result from the contributions (None: none could be
        used; the job fails; `KindRefused`: the job cannot be done, its message is the
        reason)."""

    def statistics(self) -> dict[str, Any]:
        """The kind's own counters and limits (shown under ``kinds`` in `jobs.stats`)."""


class KindRefused(Exception):
    """This daemon cannot take part after all (the task is unknown here, the model is
    over our limits...); the message is recorded as our participation's reason."""


class KindLeft(Exception):
    """This participant leaves the job (e.g. the user's attached loop went away); our
    entry says ``left`` with the message as its reason, and the others go on."""


class OverLimit(KindLeft):
    """The volunteer's limits (memory, disk) do not allow taking part: the participation
    is *left* with this reason, and the job goes on without us."""

