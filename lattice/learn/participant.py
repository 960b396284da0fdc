"""One participant of a train job: its state, its rounds, its weights.

Owns `Participant` (trainer, channel, outer optimizer, the weights it averages and
merges by), `make_participant` (from the job's `TrainSpec` and a rank),
`participant_round` (the local steps up to the schedule's next average), the job's
partition, and `merge_weights` (what the final merge weighs each rank's model by).
The daemon's train kind (`lattice.jobs.train`) and the in-process simulator
(`lattice.learn.simulate`) both build on exactly these, so the runtime never imports
the simulator. Pure numpy: must not import trio, libp2p or sockets, and reads no clock.

The spec is `lattice.core.jobs.TrainSpec`, the one train spec; `check_spec` parses the
strings whose meaning this ring owns (partition, schedule, codec, weighting,
correction) and raises a ValueError subclass naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lattice.core.jobs.train import ALGORITHMS, TrainSpec
from lattice.learn.compression import get_codec
from lattice.learn.drift import check_correction, logit_offset
from lattice.learn.gossip import ParamChannel, pair_weights
from lattice.learn.optim import LocalTrainer, OuterNesterov, participant_rng
from lattice.learn.partition import parse_scheme, partition
from lattice.learn.schedule import parse_schedule, steps_until_sync
from lattice.learn.tasks import Task

__all__ = [
    "Participant",
    "check_spec",
    "job_partition",
    "make_participant",
    "merge_weights",
    "participant_round",
]


def check_spec(spec: TrainSpec) -> None:
    """Raise ValueError (or the ring's subclass: PartitionSchemeError,
    ScheduleSpecError, CompressionSpecError, CorrectionSpecError) unless every
    field this ring interprets means something."""
    if spec.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {spec.algorithm!r}")
    for name in ("participants", "steps", "batch", "sync_every"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{name} must be >= 1")
    parse_scheme(spec.partition)
    parse_schedule(spec.schedule)
    get_codec(spec.compression)
    pair_weights(1, 1, spec.weighting)
    check_correction(spec.correction)


@dataclass
class Participant:
    rank: int
    trainer: LocalTrainer
    channel: ParamChannel
    outer: OuterNesterov | None
    weighting: str = "uniform"
    part_sizes: tuple[int, ...] = ()  # every rank's local dataset size (all compute the same)
    bytes_sent: int = 0

    @property
    def averaging_samples(self) -> int:
        """The count this participant's pairwise weight is proportional to (what the
        gossip exchange states as its `samples`): its local dataset size under
        `weighting="data"`, else the samples it has trained on."""
        if self.weighting == "data":
            return self.part_sizes[self.rank]
        return self.trainer.samples_seen


def job_partition(spec: TrainSpec, task: Task) -> list[np.ndarray]:
    """Every rank's indices into the task's train split: a function of the spec, so
    every participant (and the merger) computes the same."""
    _, y = task.train_data()
    return partition(y, spec.participants, spec.partition, spec.seed)


def merge_weights(weighting: str, samples: Sequence[tuple[int, int]],
                  part_sizes: Sequence[int]) -> list[int]:
    """The final merge's weight of each (rank, samples its final model saw): the rank's
    dataset size under `weighting="data"`, else its samples. Computed from the spec's
    partition (`part_sizes`), never taken from the peer."""
    if weighting == "data":
        return [int(part_sizes[rank]) for rank, _ in samples]
    return [int(n) for _, n in samples]


def make_participant(spec: TrainSpec, task: Task, rank: int, parts: Sequence[np.ndarray] | None = None
                     ) -> Participant:
    """Participant `rank` (0-based, e.g. its position among sorted peer ids). Every
    participant starts from `task.init_params(spec.seed)`, which is also the shared
    reference of lossy channels. `parts`: the job's partition, if already computed.
    Raises ValueError (see `check_spec`), CorrectionSpecError when the task cannot
    apply `spec.correction`."""
    check_spec(spec)
    X, y = task.train_data()
    if parts is None:
        parts = job_partition(spec, task)
    part = parts[rank]
    init = task.init_params(spec.seed)
    trainer = LocalTrainer.create(
        task, init, X[part], y[part], lr=spec.lr, momentum=spec.momentum, rng=participant_rng(spec.seed, rank),
        logit_offset=logit_offset(spec.correction, y[part], task.n_classes),
    )
    channel = ParamChannel(spec.compression, reference=init)
    outer = OuterNesterov(init, spec.outer_lr, spec.outer_momentum) if spec.algorithm == "noloco" else None
    return Participant(rank, trainer, channel, outer, spec.weighting, tuple(len(p) for p in parts))


def participant_round(p: Participant, spec: TrainSpec, steps: int | None = None) -> list[float]:
    """The local steps up to the next average of the job's schedule (or `steps`, at
    most to the end of the job); the per-step losses."""
    if steps is None:
        k = steps_until_sync(spec.schedule, spec.steps, spec.sync_every, p.trainer.step)
    else:
        k = min(steps, spec.steps - p.trainer.step)
    return p.trainer.run_steps(k, spec.batch).losses if k > 0 else []
