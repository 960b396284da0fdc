"""The train job's spec (`TrainSpec`), defined once: the daemon's train kind, the
in-process simulator (`lattice.learn.simulate`) and the benchmarks all use it. Pure.

Only syntax is checked here where the learning ring owns the meaning: the task must
also exist and be allowed on each daemon; the partition, schedule, codec and correction
strings are parsed again by `lattice.learn` when a participant starts (a task without
softmax logits refuses `logit-adjust` there).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lattice.core.jobs.spec import (
    NAME_RE,
    Fields,
    FloatBound,
    JobSpecError,
    check_compression,
    parse_fields,
    parse_options,
    positive,
)

KIND_TRAIN = "train"
ALGORITHMS = ("gossip", "noloco", "none")
WEIGHTINGS = ("uniform", "samples", "data")
CORRECTIONS = ("none", "logit-adjust")
BUILTIN_TASKS = ("breast-cancer-logreg", "digits-mlp", "digits-softmax")
MAX_PEERS = 256

_PARTITION_RE = re.compile(r"iid|dirichlet:([0-9.eE+\-]+)")
_SCHEDULE_RE = re.compile(r"constant|(late|tail)(?::([0-9.eE+\-]+))?")


@dataclass(frozen=True)
class TrainSpec:
    """What every participant of a train job must agree on. ``min_peers`` is the
    number of participants; ``merge_timeout`` bounds how long the merger waits for the
    others' final models after finishing its own steps. Defaults are what
    `bench/learning_quality.py` shows best (digits-mlp and fashion-mlp, 8 participants,
    5 seeds): weighting ``data`` beats ``uniform`` under label skew and ties on IID;
    schedule ``late`` is the best or tied schedule at every byte budget and ties at
    H=2; correction ``logit-adjust`` stays off: it helps fashion-mlp under skew but
    costs digits-mlp (tiny partitions) points."""

    task: str = "digits-mlp"
    min_peers: int = 4
    steps: int = 600
    batch: int = 32
    lr: float = 0.02
    momentum: float = 0.9
    sync_every: int = 2
    schedule: str = "late"
    algorithm: str = "gossip"
    partition: str = "iid"
    compression: str = "none"
    weighting: str = "data"
    correction: str = "none"
    outer_lr: float = 0.7
    outer_momentum: float = 0.3
    seed: int = 0
    norm_factor: float = 10.0
    merge_timeout: float = 60.0
    task_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def max_peers(self) -> int:
        return self.min_peers  # a train job runs with exactly min_peers participants

    @property
    def participants(self) -> int:
        return self.min_peers  # the roster's size: what the partition splits the data into

    @property
    def total_samples(self) -> int:
        return self.min_peers * self.steps * self.batch

    def to_dict(self) -> dict[str, Any]:
        """Every field, explicitly: the form stored in the job record and hashed."""
        out = asdict(self)
        out["task_options"] = dict(self.task_options)
        return out


FIELDS = Fields(
    ints={"min_peers": (1, MAX_PEERS), "steps": (1, 10_000_000), "batch": (1, 1 << 16),
          "sync_every": (1, 10_000_000), "seed": (0, (1 << 32) - 1)},
    floats={"lr": FloatBound(0.0, 100.0, low_open=True),
            "momentum": FloatBound(0.0, 0.999999),
            "outer_lr": FloatBound(0.0, 100.0, low_open=True),
            "outer_momentum": FloatBound(0.0, 0.999999),
            "norm_factor": FloatBound(1.0, 1e6),
            "merge_timeout": FloatBound(1.0, 7 * 86400.0)},
    strs=("task", "schedule", "algorithm", "partition", "compression", "weighting", "correction"),
    other=("task_options",),
    required=("task",),
)


def parse_train_spec(raw: Any) -> TrainSpec:
    """A `TrainSpec` from a plain mapping (user input or a received record).
    Raises JobSpecError."""
    values = parse_fields(raw, KIND_TRAIN, FIELDS)
    spec = TrainSpec(**values, task_options=parse_options(raw.get("task_options", {})))
    _check_strings(spec)
    if spec.sync_every > spec.steps:
        raise JobSpecError("sync_every", "must not exceed steps")
    return spec


def _check_strings(spec: TrainSpec) -> None:
    if not NAME_RE.fullmatch(spec.task):
        raise JobSpecError("task", "must be a task name like 'digits-mlp'")
    if spec.algorithm not in ALGORITHMS:
        raise JobSpecError("algorithm", f"must be one of {', '.join(ALGORITHMS)}")
    if spec.weighting not in WEIGHTINGS:
        raise JobSpecError("weighting", f"must be one of {', '.join(WEIGHTINGS)}")
    if spec.correction not in CORRECTIONS:
        raise JobSpecError("correction", f"must be one of {', '.join(CORRECTIONS)}")
    m = _SCHEDULE_RE.fullmatch(spec.schedule)
    if m is None or (m.group(2) is not None and not (positive(m.group(2)) and float(m.group(2)) <= 1)):
        raise JobSpecError("schedule", "must be constant, late[:POWER] or tail[:FRACTION] (0 < POWER, FRACTION <= 1)")
    m = _PARTITION_RE.fullmatch(spec.partition)
    if m is None or (m.group(1) is not None and not positive(m.group(1))):
        raise JobSpecError("partition", "must be 'iid' or 'dirichlet:ALPHA' with ALPHA > 0")
    check_compression(spec.compression)
