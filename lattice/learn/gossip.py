"""One pairwise gossip-averaging exchange, as pure functions over arrays.

Owns the math of an exchange between two participants (D-PSGD / AD-PSGD pairwise
averaging, Lian et al. 2017/2018): what each side sends (`ParamChannel.prepare`), how
it checks and rebuilds what it received (`ParamChannel.receive`), and the average both
sides commit (`pair_average`). Pure numpy: must not import trio, libp2p or sockets,
and reads no clock. The network driver for /lattice/gossip-avg/2 calls exactly these;
`exchange_in_process` runs both sides in one process for the simulation and tests.

Atomicity: both sides compute `pair_average(own_estimate, peer_estimate, w_own,
w_peer)` from the *same two arrays* (each side's estimate of itself is bit-identical
to what the peer rebuilds, see below), and the expression is symmetric in IEEE
arithmetic (a*wa + b*wb == b*wb + a*wa bit for bit), so after a commit both hold the
same bytes. Before the commit nothing is mutated: `prepare` and `receive` are pure
and the error-feedback memory changes only in `commit`. An abort keeps both models.

Compression: with a lossy codec a participant sends `codec(params - reference +
residual)`, where `reference` is a vector both sides hold bit for bit (the job's
initial parameters: every participant derives them from the job seed), so the
quantization error scales with how far training moved rather than with the weights;
the receiver rebuilds `reference + decode(payload)`. The sender uses that very
rebuilt estimate of itself in the average, and error feedback keeps the difference
for its next send (compression.py). Without compression (`none`) the parameters go
as they are and the average is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lattice.learn.compression import Codec, ErrorFeedback, NoCompression, Payload, Prepared, get_codec
from lattice.learn.validate import NormBound, validate_tensor

__all__ = [
    "ExchangeStats",
    "Outgoing",
    "ParamChannel",
    "exchange_in_process",
    "pair_average",
    "pair_weights",
]

WEIGHTINGS = ("uniform", "samples", "data")


def pair_weights(samples_own: int, samples_peer: int, weighting: str = "uniform") -> tuple[float, float]:
    """(w_own, w_peer): 0.5/0.5, or proportional to the two counts: samples seen
    (`samples`) or local dataset sizes (`data`; the caller passes those, see
    `participant.Participant.averaging_samples`). Swapping the arguments swaps the result
    exactly, which `pair_average`'s symmetry relies on.

    Why `data`: a weighted pair average keeps sum(n_i * x_i) unchanged, so with weights
    n_i = local dataset size the tracked mean moves along the gradient of the *global*
    objective sum(n_i f_i) / n (FedAvg's weighting, McMahan et al. 2017), while uniform
    weights give a participant with 3 samples the same pull as one with 17,000."""
    if weighting == "uniform":
        return 0.5, 0.5
    if weighting in ("samples", "data"):
        total = samples_own + samples_peer
        if samples_own < 0 or samples_peer < 0 or total == 0:
            return 0.5, 0.5
        return samples_own / total, samples_peer / total
    raise ValueError(f"unknown weighting {weighting!r}: expected one of {WEIGHTINGS}")


def pair_average(
    x_a: np.ndarray, x_b: np.ndarray, w_a: float = 0.5, w_b: float = 0.5, *, out: np.ndarray | None = None
) -> np.ndarray:
    """w_a * x_a + w_b * x_b in float32; pair_average(a, b, wa, wb) and
    pair_average(b, a, wb, wa) are bit-identical (each product rounds once, and IEEE
    addition is commutative).

    Works in chunks that stay in cache instead of allocating two model-sized
    temporaries. `out` (float32, same shape) may be one of the inputs: each chunk's
    inputs are read before its output is written."""
    if x_a.shape != x_b.shape:
        raise ValueError(f"shapes differ: {x_a.shape} vs {x_b.shape}")
    if out is None:
        out = np.empty(x_a.shape, dtype=np.float32)
    elif out.shape != x_a.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {x_a.shape}, got {out.dtype} {out.shape}")
    fa, fb, fo = x_a.reshape(-1), x_b.reshape(-1), out.reshape(-1)
    if not np.shares_memory(fo, out):
        raise ValueError("out must be contiguous")
    wa, wb = np.float32(w_a), np.float32(w_b)
    step = min(_AVG_CHUNK, fa.size) or 1
    ta, tb = np.empty(step, np.float32), np.empty(step, np.float32)
    for start in range(0, fa.size, step):
        end = min(start + step, fa.size)
        n = end - start
        np.multiply(fa[start:end], wa, out=ta[:n])
        np.multiply(fb[start:end], wb, out=tb[:n])
        np.add(ta[:n], tb[:n], out=fo[start:end])
    return out


_AVG_CHUNK = 1 << 16  # 256 KiB of float32 per temporary: stays in L2


@dataclass(frozen=True)
class Outgoing:
    """One prepared send: the payload for the wire and our own estimate of it."""

    payload: Payload
    nbytes: int
    estimate: np.ndarray  # bit-identical to what the peer's `receive` returns
    _prepared: Prepared | None


class ParamChannel:
    """How one participant's parameters travel in a job's exchanges.

    One per participant per job; it holds the error-feedback memory, so it is part of
    the participant's checkpoint (`residual`)."""

    def __init__(
        self,
        codec: Codec | str = "none",
        *,
        reference: np.ndarray | None = None,
        error_feedback: bool = True,
    ):
        self.codec = get_codec(codec)
        self.lossless = isinstance(self.codec, NoCompression)
        if self.lossless:
            self.reference, self.ef = None, None
            return
        if reference is None:
            raise ValueError("a lossy codec needs the shared reference vector (the job's initial params)")
        self.reference = np.array(reference, dtype=np.float32)
        self.reference.setflags(write=False)
        self.ef = ErrorFeedback(self.codec, self.reference.shape) if error_feedback else None

    def prepare(self, params: np.ndarray) -> Outgoing:
        """What to send for `params`. Mutates nothing."""
        if self.lossless:
            # one snapshot serves as both the payload and our estimate of ourselves
            payload, nbytes = self.codec.encode(params)
            return Outgoing(payload, nbytes, payload["data"].reshape(np.shape(params)), None)
        delta = params - self.reference
        if self.ef is not None:
            prepared = self.ef.prepare(delta)
        else:
            payload, nbytes = self.codec.encode(delta)
            sent = self.codec.decode(payload, delta.shape)
            prepared = Prepared(payload, nbytes, sent, np.zeros(0, np.float32), -1)
        return Outgoing(prepared.payload, prepared.nbytes, self.reference + prepared.sent, prepared)

    def commit(self, outgoing: Outgoing) -> None:
        """The exchange committed: keep what this send dropped for the next one."""
        if self.ef is not None and outgoing._prepared is not None:
            self.ef.commit(outgoing._prepared)

    def receive(self, payload: Payload, ours: np.ndarray, bound: NormBound | None = NormBound()) -> np.ndarray:
        """The peer's parameters from its payload, validated against `ours` (shape,
        dtype, finite, norm bound). Raises InvalidTensor; mutates nothing."""
        decoded = self.codec.decode(payload, ours.shape)
        estimate = decoded if self.reference is None else self.reference + decoded
        return validate_tensor(estimate, ours, bound)

    @property
    def residual(self) -> np.ndarray | None:
        return None if self.ef is None else self.ef.residual

    def state(self) -> dict[str, np.ndarray]:
        """Arrays for the participant's checkpoint (the reference is not included:
        it is recomputed from the job seed)."""
        return {} if self.ef is None else {"ef_residual": self.ef.residual}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if self.ef is None:
            return
        residual = np.array(arrays["ef_residual"], dtype=np.float32)
        if residual.shape != self.ef.residual.shape:
            raise ValueError(f"checkpoint residual shape {residual.shape}, expected {self.ef.residual.shape}")
        self.ef.residual = residual
        self.ef.generation += 1  # any send prepared before the restore is now stale


@dataclass(frozen=True)
class ExchangeStats:
    bytes_a_to_b: int
    bytes_b_to_a: int

    @property
    def total_bytes(self) -> int:
        return self.bytes_a_to_b + self.bytes_b_to_a


def exchange_in_process(
    params_a: np.ndarray,
    params_b: np.ndarray,
    chan_a: ParamChannel,
    chan_b: ParamChannel,
    w_a: float = 0.5,
    w_b: float = 0.5,
    bound: NormBound | None = NormBound(),
) -> tuple[np.ndarray, np.ndarray, ExchangeStats]:
    """Both sides of one exchange, as the wire protocol would run them:
    (new params of a, new params of b, bytes each way). Both results are equal
    arrays (distinct objects). Raises InvalidTensor before committing anything."""
    out_a, out_b = chan_a.prepare(params_a), chan_b.prepare(params_b)
    a_seen_by_b = chan_b.receive(out_a.payload, params_b, bound)
    b_seen_by_a = chan_a.receive(out_b.payload, params_a, bound)
    new_a = pair_average(out_a.estimate, b_seen_by_a, w_a, w_b)
    new_b = pair_average(out_b.estimate, a_seen_by_b, w_b, w_a)
    chan_a.commit(out_a)
    chan_b.commit(out_b)
    return new_a, new_b, ExchangeStats(out_a.nbytes, out_b.nbytes)
