"""Local optimization: SGD, the NoLoCo/DiLoCo outer Nesterov step, and `LocalTrainer`.

Owns one participant's training state and its checkpoint form. Pure numpy: must not
import trio, libp2p or sockets, and reads no clock.

`LocalTrainer` is the state a daemon keeps per job: parameters, step, samples seen,
the minibatch sampler's RNG and epoch position, and the SGD momentum. It does no
communication; the job runner calls `run_steps(H, batch)` (off the event loop), then a
gossip exchange (gossip.py) replaces `params`, then optionally `OuterNesterov.step`.

The outer step follows NoLoCo (Kolehmainen et al. 2025) and DiLoCo (Douillard et al.
2023): the pseudo-gradient is the delta since the last sync, `anchor - target`, where
`anchor` is the model right after the previous outer step and `target` is what this
sync produced (here the pairwise average); Nesterov momentum is applied to it with
outer lr 0.7 and momentum 0.3 by default (NoLoCo's values).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lattice.learn.tasks import Task

__all__ = ["SGD", "LocalTrainer", "OuterNesterov", "StepReport", "participant_rng"]


def participant_rng(job_seed: int, rank: int) -> np.random.Generator:
    """The minibatch RNG of participant `rank` in a job: independent streams that any
    daemon can recreate from the job seed."""
    return np.random.default_rng([int(job_seed), int(rank)])


@dataclass
class SGD:
    """Plain or heavy-ball SGD, in place on a float32 vector."""

    lr: float
    momentum: float = 0.0
    velocity: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        if self.momentum:
            if self.velocity is None:
                self.velocity = np.zeros_like(params)
            self.velocity *= self.momentum
            self.velocity += grad
            grad = self.velocity
        params -= np.float32(self.lr) * grad


class OuterNesterov:
    """Outer Nesterov momentum on the delta since the last sync (NoLoCo/DiLoCo)."""

    def __init__(self, anchor: np.ndarray, lr: float = 0.7, momentum: float = 0.3):
        if not lr > 0 or not 0 <= momentum < 1:
            raise ValueError(f"outer lr must be > 0 and momentum in [0, 1), got {lr}, {momentum}")
        self.lr, self.momentum = lr, momentum
        self.anchor = np.array(anchor, dtype=np.float32)
        self.velocity = np.zeros_like(self.anchor)

    def step(self, target: np.ndarray) -> np.ndarray:
        """New parameters from the sync result `target`; they become the next anchor."""
        g = self.anchor - target  # pseudo-gradient: where the sync says we should go
        self.velocity *= np.float32(self.momentum)
        self.velocity += g
        self.anchor = self.anchor - np.float32(self.lr) * (g + np.float32(self.momentum) * self.velocity)
        return self.anchor.copy()

    def state(self) -> dict[str, np.ndarray]:
        return {"outer_anchor": self.anchor, "outer_velocity": self.velocity}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.anchor = np.array(arrays["outer_anchor"], dtype=np.float32)
        self.velocity = np.array(arrays["outer_velocity"], dtype=np.float32)


@dataclass(frozen=True)
class StepReport:
    """What `run_steps` did: one mean minibatch loss per step."""

    first_step: int
    losses: list[float]
    samples: int

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


@dataclass
class LocalTrainer:
    """One participant's training state over its local data partition.

    Minibatches walk through successive random permutations of the local data
    (epochs without replacement); a batch larger than what is left of an epoch
    continues into the next one, so tiny partitions still give full batches."""

    task: Task
    params: np.ndarray
    X: np.ndarray
    y: np.ndarray
    optimizer: SGD
    rng: np.random.Generator
    step: int = 0
    samples_seen: int = 0
    logit_offset: np.ndarray | None = None  # drift.logit_offset: derived from the data, not state
    _order: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    _pos: int = 0

    def __post_init__(self) -> None:
        self.params = np.array(self.params, dtype=np.float32)
        if self.params.shape != (self.task.num_params,):
            raise ValueError(f"params shape {self.params.shape}, task needs ({self.task.num_params},)")
        if len(self.X) == 0 or len(self.X) != len(self.y):
            raise ValueError(f"need a non-empty local dataset with matching labels, got {len(self.X)}/{len(self.y)}")

    @classmethod
    def create(
        cls,
        task: Task,
        params: np.ndarray,
        X: np.ndarray,
        y: np.ndarray,
        *,
        lr: float,
        momentum: float = 0.0,
        rng: np.random.Generator,
        logit_offset: np.ndarray | None = None,
    ) -> LocalTrainer:
        return cls(task, params, X, y, SGD(lr, momentum), rng, logit_offset=logit_offset)

    def next_batch(self, batch: int) -> np.ndarray:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        out, need = [], batch
        while need:
            if self._pos >= len(self._order):
                self._order = self.rng.permutation(len(self.X))
                self._pos = 0
            take = self._order[self._pos : self._pos + need]
            self._pos += len(take)
            need -= len(take)
            out.append(take)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def run_steps(self, k: int, batch: int) -> StepReport:
        """k SGD steps on minibatches of `batch` local samples."""
        first, losses = self.step, []
        for _ in range(k):
            idx = self.next_batch(batch)
            if self.logit_offset is None:
                loss, grad = self.task.loss_and_grad(self.params, self.X[idx], self.y[idx])
            else:
                loss, grad = self.task.loss_and_grad(self.params, self.X[idx], self.y[idx],
                                                     logit_offset=self.logit_offset)
            self.optimizer.step(self.params, grad)
            losses.append(loss)
            self.step += 1
            self.samples_seen += batch
        return StepReport(first, losses, k * batch)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """(arrays, meta) for a checkpoint (merge.save_npz); data is not included:
        the partition is recomputed from the job spec on resume."""
        arrays = {"params": self.params, "order": self._order.astype(np.int64)}
        if self.optimizer.velocity is not None:
            arrays["velocity"] = self.optimizer.velocity
        meta = {
            "step": str(self.step),
            "samples_seen": str(self.samples_seen),
            "pos": str(self._pos),
            # PCG64 state holds 128-bit ints: JSON keeps them exact, msgpack would not
            "rng": json.dumps(self.rng.bit_generator.state, sort_keys=True),
        }
        return arrays, meta

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        params = np.array(arrays["params"], dtype=np.float32)
        if params.shape != self.params.shape:
            raise ValueError(f"checkpoint params shape {params.shape}, expected {self.params.shape}")
        self.params = params
        self._order = np.array(arrays["order"], dtype=np.int64)
        if len(self._order) and (self._order.max() >= len(self.X) or self._order.min() < 0):
            raise ValueError("checkpoint sampler order does not fit the local data")
        self.optimizer.velocity = np.array(arrays["velocity"], np.float32) if "velocity" in arrays else None
        self.step = int(meta["step"])
        self.samples_seen = int(meta["samples_seen"])
        self._pos = int(meta["pos"])
        self.rng.bit_generator.state = json.loads(meta["rng"])
