"""Checking a tensor received from a peer before it touches our model.

Owns `InvalidTensor` (the one error for "a peer sent a bad tensor": the network layer
maps it to RemoteProtocolError and penalizes the sender) and `validate_tensor`.
Pure numpy: must not import trio, libp2p or sockets, and reads no clock.

`InvalidTensor.reason` is one of the stable strings in `REASONS`; they appear in logs,
metrics and penalty records, so never rename one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["REASONS", "InvalidTensor", "NormBound", "tensor_norm", "validate_tensor"]

REASONS = frozenset({
    "type",        # not a numpy array
    "dtype",       # not our dtype
    "shape",       # not our shape
    "non_finite",  # contains NaN or +-inf
    "norm",        # norm above the bound relative to ours
    "payload",     # a compressed payload that does not decode (compression.py)
})


class InvalidTensor(ValueError):
    """A received tensor was rejected; `reason` is a stable string from REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise AssertionError(f"unregistered InvalidTensor reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NormBound:
    """Accept ||received|| <= factor * max(||ours||, floor).

    The floor lets a model that starts at zero (softmax regression's biases, a fresh
    delta) accept a first update; `factor` bounds how far one exchange can move us.
    Averaging two honest models never produces a norm above the larger of the two,
    so a factor of 10 only rejects blow-ups and scaling attacks."""

    factor: float = 10.0
    floor: float = 1.0


def tensor_norm(x: np.ndarray) -> float:
    """L2 norm. A float32 BLAS dot is fast (a 10M-parameter model in a few ms) and
    accurate enough for a bound check; only when its sum of squares overflows (values
    above ~1e19) is it redone in float64, in chunks that bound the extra memory."""
    flat = x.reshape(-1)
    if flat.dtype == np.float32:
        with np.errstate(over="ignore"):  # overflow is expected here and handled below
            fast = float(np.dot(flat, flat))
        if np.isfinite(fast):
            return float(np.sqrt(fast))
    total = 0.0
    for start in range(0, flat.size, _NORM_CHUNK):  # chunks bound the float64 copy
        part = flat[start : start + _NORM_CHUNK].astype(np.float64)
        total += float(np.dot(part, part))
    return float(np.sqrt(total))


_NORM_CHUNK = 1 << 20


def validate_tensor(received: object, ours: np.ndarray, bound: NormBound | None = NormBound()) -> np.ndarray:
    """Return `received` if it is an array with our dtype and shape, all finite and
    within `bound` of our norm (None disables the norm check); else InvalidTensor."""
    if not isinstance(received, np.ndarray):
        raise InvalidTensor("type", f"expected ndarray, got {type(received).__name__}")
    if received.dtype != ours.dtype:
        raise InvalidTensor("dtype", f"expected {ours.dtype}, got {received.dtype}")
    if received.shape != ours.shape:
        raise InvalidTensor("shape", f"expected {ours.shape}, got {received.shape}")
    if not np.isfinite(received).all():
        raise InvalidTensor("non_finite", f"{int((~np.isfinite(received)).sum())} non-finite values")
    if bound is not None:
        limit = bound.factor * max(tensor_norm(ours), bound.floor)
        norm = tensor_norm(received)
        if norm > limit:
            raise InvalidTensor("norm", f"norm {norm:.6g} exceeds bound {limit:.6g}")
    return received
