"""Splitting a training set among the participants of a job.

Owns the partition schemes (`iid`, `dirichlet:ALPHA`) and the parsing of their spec
strings. Pure numpy: must not import trio, libp2p or sockets, and reads no clock.

Every participant computes the same partition from (labels, n_parts, scheme, seed) and
takes part `i`, its rank among the participants, so no data and no index lists cross
the network. The result is a pure function of its arguments.

`dirichlet:ALPHA` is the label-skew split of Hsu et al. 2019 ("Measuring the effects of
non-identical data distribution"): for each class, a share vector over the parts is
drawn from Dir(ALPHA) and that class's samples are cut in those proportions. Small
ALPHA (0.1) gives parts dominated by one or two classes; large ALPHA tends to IID.
Parts that come out empty are then given one sample each, taken from the largest part,
so every participant has data (deterministic, and it always terminates, unlike the
usual "redraw until no part is too small" loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["PartitionScheme", "PartitionSchemeError", "parse_scheme", "partition"]


class PartitionSchemeError(ValueError):
    """A partition spec string or argument that does not name a valid scheme."""


@dataclass(frozen=True)
class PartitionScheme:
    kind: str  # "iid" | "dirichlet"
    alpha: float | None = None

    def __str__(self) -> str:
        return self.kind if self.alpha is None else f"{self.kind}:{self.alpha:g}"


def parse_scheme(spec: str | PartitionScheme) -> PartitionScheme:
    """`iid` or `dirichlet:ALPHA` (ALPHA a finite float > 0) -> PartitionScheme."""
    if isinstance(spec, PartitionScheme):
        return spec
    if not isinstance(spec, str):
        raise PartitionSchemeError(f"partition scheme must be a string, got {type(spec).__name__}")
    kind, sep, arg = spec.strip().partition(":")
    if kind == "iid" and not sep:
        return PartitionScheme("iid")
    if kind == "dirichlet":
        if not arg:
            raise PartitionSchemeError(f"{spec!r}: dirichlet needs a concentration, e.g. 'dirichlet:0.1'")
        try:
            alpha = float(arg)
        except ValueError:
            raise PartitionSchemeError(f"{spec!r}: {arg!r} is not a number") from None
        if not math.isfinite(alpha) or alpha <= 0:
            raise PartitionSchemeError(f"{spec!r}: alpha must be a finite number > 0")
        return PartitionScheme("dirichlet", alpha)
    raise PartitionSchemeError(f"unknown partition scheme {spec!r}: expected 'iid' or 'dirichlet:ALPHA'")


def partition(
    n_samples_or_labels: int | np.ndarray,
    n_parts: int,
    scheme: str | PartitionScheme = "iid",
    seed: int = 0,
) -> list[np.ndarray]:
    """Disjoint, complete, non-empty parts: a list of `n_parts` sorted int64 index arrays.

    `iid` accepts a sample count or a label array; `dirichlet:ALPHA` needs labels."""
    parsed = parse_scheme(scheme)
    if isinstance(n_samples_or_labels, (int, np.integer)):
        labels, n = None, int(n_samples_or_labels)
    else:
        labels = np.asarray(n_samples_or_labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
        n = len(labels)
    if not isinstance(n_parts, (int, np.integer)) or n_parts < 1:
        raise ValueError(f"n_parts must be a positive int, got {n_parts!r}")
    if n < n_parts:
        raise ValueError(f"cannot split {n} samples into {n_parts} non-empty parts")
    rng = np.random.default_rng(seed)
    if parsed.kind == "iid":
        return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(n), n_parts)]
    if labels is None:
        raise PartitionSchemeError(f"{parsed}: a label-skewed split needs the labels, not a sample count")
    if parsed.alpha is None:
        raise PartitionSchemeError(f"{parsed}: a Dirichlet split needs alpha")
    return _dirichlet(labels, n_parts, parsed.alpha, rng)


def _dirichlet(labels: np.ndarray, n_parts: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    buckets: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(n_parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for part, chunk in enumerate(np.split(idx, cuts)):
            buckets[part].append(chunk)
    parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
    # Give each empty part one sample from the currently largest part (ties: lowest
    # index), taking that part's last index: deterministic and keeps the skew.
    for i in range(n_parts):
        if len(parts[i]) == 0:
            donor = max(range(n_parts), key=lambda j: (len(parts[j]), -j))
            parts[i] = parts[donor][-1:].copy()
            parts[donor] = parts[donor][:-1]
    return parts
