"""An in-process simulation of a whole train job, and the centralized baseline.

Owns `simulate` (N participants, no networking), `sync_pair` (one exchange, both sides
in process), `final_merge` and `centralized_baseline` (one learner, same total samples).
Pure numpy: must not import trio, libp2p or sockets, and reads no clock. The job is
the daemon's own spec, `lattice.core.jobs.TrainSpec` (its `participants` is the
roster size), and a participant is exactly what the daemon runs
(`lattice.learn.participant`: `make_participant`, `participant_round`); the runtime
never imports this module.

Rounds: a round is the local steps up to the next sync point of `spec.schedule`
(schedule.py: R = ceil(steps / sync_every) averages, placed evenly, late or in the
tail); after each round the participants are paired by a random perfect matching (one
sits out if N is odd) and each pair averages (pairwise, both end equal).
`algorithm="none"` skips all exchanges: local training, then the one global merge
("A Single Merging Suffices" shows when that is enough; on label-skewed data it is
not, which the benchmark shows). `correction` changes the local loss (drift.py);
`weighting="data"` weights averages and the merge by local dataset size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lattice.core.jobs.train import TrainSpec
from lattice.learn.gossip import exchange_in_process, pair_weights
from lattice.learn.merge import model_id, weighted_average
from lattice.learn.optim import LocalTrainer, participant_rng
from lattice.learn.participant import (
    Participant,
    check_spec,
    job_partition,
    make_participant,
    merge_weights,
    participant_round,
)
from lattice.learn.tasks import Task, get_task
from lattice.learn.validate import NormBound

__all__ = [
    "BaselineResult",
    "SimulationResult",
    "centralized_baseline",
    "final_merge",
    "simulate",
    "sync_pair",
]

BASELINE_RANK = 0xFFFFFFFF  # its own sampler stream, distinct from every participant rank


def sync_pair(p: Participant, q: Participant, spec: TrainSpec) -> int:
    """One exchange between p and q (both end with the same average), then each
    applies its outer step if the algorithm has one. Returns the bytes sent."""
    w_p, w_q = pair_weights(p.averaging_samples, q.averaging_samples, spec.weighting)
    bound = NormBound(factor=spec.norm_factor)
    new_p, new_q, stats = exchange_in_process(p.trainer.params, q.trainer.params, p.channel, q.channel, w_p, w_q, bound)
    for part, new in ((p, new_p), (q, new_q)):
        part.trainer.params = part.outer.step(new) if part.outer is not None else new
    p.bytes_sent += stats.bytes_a_to_b
    q.bytes_sent += stats.bytes_b_to_a
    return stats.total_bytes


def final_merge(participants: Sequence[Participant], task: Task, meta: dict[str, str] | None = None) -> tuple[np.ndarray, str]:
    """(merged params, model id): the weighted average (`participant.merge_weights`),
    inputs in rank order; the id is over the task's named blocks plus `meta`."""
    ordered = sorted(participants, key=lambda p: p.rank)
    weights = merge_weights(ordered[0].weighting, [(p.rank, p.trainer.samples_seen) for p in ordered],
                            ordered[0].part_sizes)
    merged = weighted_average([p.trainer.params for p in ordered], weights)
    return merged, model_id(task.unflatten(merged), {"task": task.name, **(meta or {})})


@dataclass
class SimulationResult:
    spec: TrainSpec
    accuracy: float  # merged model, held-out test set
    loss: float
    model_id: str
    participant_accuracy: list[float]  # each final local model, before the merge
    bytes_gossip: int  # all exchanges, both directions
    bytes_merge: int  # every participant uploading its final model once, uncompressed
    exchanges: int
    steps: list[dict[str, float]]  # per local step: mean loss over participants, bytes so far
    partition_sizes: list[int]

    @property
    def bytes_total(self) -> int:
        return self.bytes_gossip + self.bytes_merge


def simulate(spec: TrainSpec, task: Task | None = None) -> SimulationResult:
    """Run the whole job in process (`spec.participants` of them); deterministic in
    `spec`."""
    check_spec(spec)
    task = task or get_task(spec.task, **dict(spec.task_options))
    parts = job_partition(spec, task)
    people = [make_participant(spec, task, r, parts) for r in range(spec.participants)]
    pairing_rng = np.random.default_rng([spec.seed, 0x9055])  # matchings, independent of ranks' streams
    steps: list[dict[str, float]] = []
    bytes_gossip = exchanges = 0
    while people[0].trainer.step < spec.steps:  # rounds are in lockstep: all at the same step
        losses = [participant_round(p, spec) for p in people]
        for i in range(len(losses[0])):
            steps.append({"step": float(len(steps) + 1), "loss": float(np.mean([l[i] for l in losses])),
                          "bytes_sent": float(bytes_gossip)})
        if spec.algorithm == "none" or spec.participants < 2:
            continue
        order = pairing_rng.permutation(spec.participants)
        for a, b in zip(order[0::2], order[1::2]):
            bytes_gossip += sync_pair(people[a], people[b], spec)
            exchanges += 1
        steps[-1]["bytes_sent"] = float(bytes_gossip)
    merged, mid = final_merge(people, task)
    X_test, y_test = task.test_data()
    metrics = task.evaluate(merged, X_test, y_test)
    return SimulationResult(
        spec=spec,
        accuracy=metrics["accuracy"],
        loss=metrics["loss"],
        model_id=mid,
        participant_accuracy=[task.evaluate(p.trainer.params, X_test, y_test)["accuracy"] for p in people],
        bytes_gossip=bytes_gossip,
        bytes_merge=spec.participants * task.num_params * 4,
        exchanges=exchanges,
        steps=steps,
        partition_sizes=[len(p) for p in parts],
    )


@dataclass
class BaselineResult:
    accuracy: float
    loss: float
    steps: int
    total_samples: int


def centralized_baseline(
    task: Task | str,
    total_samples: int,
    *,
    batch: int = 32,
    lr: float = 0.02,
    momentum: float = 0.9,
    seed: int = 0,
) -> BaselineResult:
    """Plain minibatch SGD on the whole train split for `total_samples` samples
    (rounded down to whole batches), from the same initial parameters as a job."""
    task = get_task(task) if isinstance(task, str) else task
    X, y = task.train_data()
    trainer = LocalTrainer.create(task, task.init_params(seed), X, y, lr=lr, momentum=momentum,
                                  rng=participant_rng(seed, BASELINE_RANK))
    n_steps = total_samples // batch
    trainer.run_steps(n_steps, batch)
    metrics = task.evaluate(trainer.params, *task.test_data())
    return BaselineResult(metrics["accuracy"], metrics["loss"], n_steps, n_steps * batch)
