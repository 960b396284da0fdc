"""Communication schedules: after which local steps a participant averages.

Owns the schedule specs (`constant`, `late[:POWER]`, `tail[:FRACTION]`), their parsing
and the sync points they give. Pure: must not import trio, libp2p or sockets, and reads
no clock. The simulation and the daemon's runner ask the same question, "how many local
steps until the next average?" (`steps_until_sync`), so they follow the same schedule.

A job has T = `steps` local steps and a byte budget of R = ceil(T / `sync_every`)
averages, what constant gossip every `sync_every` steps sends. The schedule only decides
where those R averages fall; averages k = 1..R happen after local step t_k:

- `constant`: t_k = min(k * sync_every, T), every `sync_every` steps.
- `late:P` (0 < P <= 1, `late` is `late:0.5`): t_k = round(T * (k / R) ** P), rare early
  and dense near the end. Communication concentrated late in training is what lets one
  final merge recover server accuracy ("A Single Merging Suffices", Zhu et al. 2025).
- `tail:F` (0 < F <= 1): the R averages evenly spaced over the last fraction F of the
  steps, none before.

Points that round to the same step count once, so no schedule averages more often than
`constant` does, and the last point is always T: every schedule averages after its final
local step, then the job's final merge runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SCHEDULES", "Schedule", "ScheduleSpecError", "parse_schedule", "steps_until_sync", "sync_points"]

SCHEDULES = ("constant", "late", "tail")
DEFAULT_ARG = {"late": 0.5, "tail": 0.5}


class ScheduleSpecError(ValueError):
    """A schedule spec string that does not name a valid schedule."""


@dataclass(frozen=True)
class Schedule:
    kind: str  # "constant" | "late" | "tail"
    arg: float | None = None  # late: the power P; tail: the fraction F

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg:g}"

    def point(self, k: int, steps: int, sync_every: int) -> int:
        """t_k, the local step after which average k (1..R) happens."""
        if self.kind == "constant":
            return min(steps, k * sync_every)
        assert self.arg is not None
        rounds = _rounds(steps, sync_every)
        if self.kind == "late":
            t = steps * (k / rounds) ** self.arg
        else:
            start = steps * (1.0 - self.arg)
            t = start + (steps - start) * k / rounds
        rounded: int = round(t)
        return max(1, min(steps, rounded))


def parse_schedule(spec: str | Schedule) -> Schedule:
    """`constant`, `late[:P]` or `tail[:F]` (P, F finite numbers in (0, 1])."""
    if isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, str):
        raise ScheduleSpecError(f"schedule must be a string, got {type(spec).__name__}")
    kind, sep, arg = spec.strip().partition(":")
    if kind == "constant" and not sep:
        return Schedule("constant")
    if kind in DEFAULT_ARG:
        if not sep:
            return Schedule(kind, DEFAULT_ARG[kind])
        try:
            value = float(arg)
        except ValueError:
            raise ScheduleSpecError(f"{spec!r}: {arg!r} is not a number") from None
        if not (math.isfinite(value) and 0 < value <= 1):
            raise ScheduleSpecError(f"{spec!r}: the argument must be in (0, 1]")
        return Schedule(kind, value)
    raise ScheduleSpecError(f"unknown schedule {spec!r}: expected constant, late[:POWER] or tail[:FRACTION]")


def _rounds(steps: int, sync_every: int) -> int:
    if steps < 1 or sync_every < 1:
        raise ValueError(f"steps and sync_every must be >= 1, got {steps}, {sync_every}")
    return math.ceil(steps / sync_every)


def steps_until_sync(schedule: str | Schedule, steps: int, sync_every: int, done: int) -> int:
    """Local steps to run, from `done` steps, before the next average (0 once `done`
    reaches `steps`). O(log R): a binary search over the monotone points."""
    sched = parse_schedule(schedule)
    if done >= steps:
        return 0
    lo, hi = 1, _rounds(steps, sync_every)  # the smallest k with t_k > done: t_R == steps > done
    while lo < hi:
        mid = (lo + hi) // 2
        if sched.point(mid, steps, sync_every) > done:
            hi = mid
        else:
            lo = mid + 1
    return sched.point(lo, steps, sync_every) - done


def sync_points(schedule: str | Schedule, steps: int, sync_every: int) -> list[int]:
    """Every t_k, sorted and distinct (for reports and tests; runners step through
    `steps_until_sync`)."""
    points, done = [], 0
    while done < steps:
        done += steps_until_sync(schedule, steps, sync_every, done)
        points.append(done)
    return points
