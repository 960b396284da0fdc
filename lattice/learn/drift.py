"""Drift correction for label-skewed partitions: what a participant changes in its
local loss so that models trained on different label mixes still merge well.

Owns the correction specs (`none`, `logit-adjust`) and the per-participant logit
offset. Pure numpy: must not import trio, libp2p or sockets, and reads no clock.

`logit-adjust` (logit adjustment, Menon et al. 2021; for label skew in federated
learning, FedLC, Zhang et al. 2022): participant i trains on the cross-entropy of
`logits + log(prior_i)`, prior_i being the label frequencies of its own partition; the
model itself (evaluated, averaged, merged) keeps plain logits. Each local model then
estimates the class posterior under a uniform prior instead of under its own skewed
one, so local steps stop pulling the shared weights toward the local label mix, and a
class absent from a partition (prior 0) gets no gradient there instead of being pushed
down. It needs no communication: the prior is computed from local labels. On IID
partitions the local prior is nearly uniform and the offset nearly a constant, which
softmax ignores. bench/learning_quality.py measures where it helps and where it does
not (tiny partitions, where balancing inflates a handful of samples).
"""

from __future__ import annotations

import numpy as np

__all__ = ["CORRECTIONS", "CorrectionSpecError", "check_correction", "logit_offset"]

CORRECTIONS = ("none", "logit-adjust")


class CorrectionSpecError(ValueError):
    """An unknown drift-correction name, or one the task cannot apply."""


def check_correction(name: str) -> str:
    if name not in CORRECTIONS:
        raise CorrectionSpecError(f"unknown correction {name!r}: expected one of {', '.join(CORRECTIONS)}")
    return name


def logit_offset(correction: str, labels: np.ndarray, n_classes: int | None) -> np.ndarray | None:
    """What participant training on `labels` adds to its logits during training (float32,
    (n_classes,)), or None when the correction changes nothing. Raises
    CorrectionSpecError when the task has no softmax logits (`n_classes` None)."""
    if check_correction(correction) == "none":
        return None
    if n_classes is None:
        raise CorrectionSpecError(f"{correction} needs a task with softmax logits (a classifier)")
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be non-empty and in [0, {n_classes})")
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    with np.errstate(divide="ignore"):
        # log 0 = -inf: softmax gives an absent class probability 0 and gradient 0
        prior: np.ndarray = np.log(counts / counts.sum()).astype(np.float32)
    return prior
