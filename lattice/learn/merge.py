"""Merge methods: the math of every merge, one tensor at a time, in bounded memory.

Owns the ten methods (linear, slerp, task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs, della, model_stock, nuslerp) as kernels over a tensor's inputs read in
element blocks, the in-memory conveniences over them (`merge_models`, `linear`, ...),
and `weighted_average` (a train job's final merge). Definitions, parameters and every
difference from mergekit: proto/merge.md. Pure numpy: must not import trio, libp2p or
sockets, and reads no clock. The model file formats live in `modelfile` (re-exported
here for older callers); the engine that streams whole models is `mergeengine`.

Streaming. A kernel never holds a whole tensor: it walks the inputs in blocks of at
most `block` elements (whole rows where a method works per row), once per statistic it
needs (norms and dots; magnitude thresholds by radix selection over the float bit
patterns, 16 bits per pass), then once more to write the result, block by block.

Recomputability: a result is bit-for-bit the same on any machine and for any block
size, so `lattice models verify` can recompute it:
- element-wise math is IEEE float32 (float64 for F64 inputs) in a fixed operation order;
- a whole-tensor sum is float64 partial sums over fixed runs of `REDUCE_BLOCK` elements
  (numpy's pairwise sum, the same code on every CPU), added with math.fsum (correctly
  rounded); per-row sums are float64 sums of each row; column sums add rows in order;
- magnitude thresholds are exact order statistics, and every entry tied with the
  threshold is kept, so no sort order decides;
- DARE-family masks come from one numpy PCG64 stream per (seed, tensor name, input),
  drawn in element order, so the block size does not change them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lattice.learn.modelfile import (
    FLOAT_TAGS,
    TAGS,
    ModelFormatError,
    TensorInfo,
    canonical_model_bytes,
    from_float,
    info_of,
    load_npz,
    load_safetensors,
    loads_safetensors,
    math_dtype,
    model_id,
    save_npz,
    save_safetensors,
    to_float,
)

__all__ = [
    "BLOCK_ELEMENTS", "MERGE_METHODS", "REDUCE_BLOCK", "ArraySource", "MergeInputError",
    "ModelFormatError", "Source", "canonical_model_bytes", "dare", "dumps_safetensors",
    "linear", "load_npz", "load_safetensors", "loads_safetensors", "merge_models",
    "merge_tensor", "model_id", "save_npz", "save_safetensors", "slerp", "task_arithmetic",
    "ties", "weighted_average",
]

MERGE_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                 "breadcrumbs", "della", "model_stock", "nuslerp")
REDUCE_BLOCK = 1 << 16
"""Whole-tensor sums add float64 partial sums of runs of this many elements."""
BLOCK_ELEMENTS = 1 << 20
"""Default elements per block (a multiple of REDUCE_BLOCK): 4 MiB per float32 array. A
TIES merge of a 125 MiB BF16 tensor peaks at ~150 MiB RSS with it (~290 MiB at 4 Mi
elements) and runs no slower."""
SLERP_LINEAR_ABOVE = 1 - 1e-7
"""SLERP interpolates linearly when |cos| exceeds this (mergekit: 0.9995)."""

dumps_safetensors = canonical_model_bytes


class MergeInputError(ValueError):
    """An input tensor cannot be merged: missing, wrong shape or dtype, non-finite.
    ``tensor`` names it."""

    def __init__(self, tensor: str, reason: str) -> None:
        super().__init__(f"tensor {tensor!r}: {reason}")
        self.tensor = tensor
        self.reason = reason


# -- inputs ---------------------------------------------------------------------------------


class Source(Protocol):
    """One input tensor: its info and raw (little-endian, C-order, flat) element ranges."""

    info: TensorInfo

    def read(self, start: int, stop: int) -> np.ndarray: ...


class ArraySource:
    """A `Source` over an array in memory."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        self.info = info_of(name, array)
        self._flat = np.ascontiguousarray(array, dtype=TAGS[self.info.dtype]).reshape(-1)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._flat[start:stop]


@dataclass
class _Block:
    start: int
    stop: int
    base: np.ndarray | None
    models: list[np.ndarray]

    @property
    def given_base(self) -> np.ndarray:
        """The base, for a method that requires one (its spec was refused without)."""
        if self.base is None:
            raise AssertionError("a method that needs a base ran without one")
        return self.base


class _Inputs:
    """A tensor's inputs (optional base, then models), read as float blocks."""

    def __init__(self, name: str, base: Source | None, models: Sequence[Source], labels: Sequence[str],
                 block: int) -> None:
        self.name = name
        self.base = base
        self.models = list(models)
        self.labels = list(labels)
        first = base if base is not None else self.models[0]
        self.info = first.info
        self.count = first.info.count
        self.shape = first.info.shape
        self.block = max(REDUCE_BLOCK, block // REDUCE_BLOCK * REDUCE_BLOCK)

    def _step(self, row_len: int | None) -> int:
        if row_len is None:
            return self.block
        return max(1, self.block // max(1, row_len)) * max(1, row_len)

    def _float(self, src: Source, label: str, start: int, stop: int, check: bool) -> np.ndarray:
        x = to_float(src.read(start, stop), src.info.dtype)
        if check and not np.isfinite(x).all():
            raise MergeInputError(self.name, f"input {label} has non-finite values")
        return x

    def blocks(self, *, row_len: int | None = None, check: bool = False) -> Iterator[_Block]:
        step = self._step(row_len)
        for start in range(0, self.count, step):
            stop = min(self.count, start + step)
            base = None
            offset = 0
            if self.base is not None:
                base = self._float(self.base, self.labels[0], start, stop, check)
                offset = 1
            models = [self._float(m, self.labels[offset + i], start, stop, check) for i, m in enumerate(self.models)]
            yield _Block(start, stop, base, models)


class _Writer:
    """Converts float result blocks to the output dtype and hands them on."""

    def __init__(self, name: str, tag: str, emit: Callable[[np.ndarray], None]) -> None:
        self.name, self.tag, self.emit = name, tag, emit

    def write(self, values: np.ndarray) -> None:
        if not np.isfinite(values).all():
            raise MergeInputError(self.name, "the merged values are not finite (overflow)")
        raw = from_float(values, self.tag)
        if self.tag in ("F16", "BF16") and not np.isfinite(to_float(raw, self.tag)).all():
            raise MergeInputError(self.name, f"the merged values overflow {self.tag}")
        self.emit(raw)


# -- reductions ------------------------------------------------------------------------------


class _Sum:
    """A float64 sum over a tensor fed in REDUCE_BLOCK-aligned blocks; the same value
    whatever the block size (module docstring)."""

    def __init__(self) -> None:
        self.parts: list[float] = []

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1)
        full = x.size // REDUCE_BLOCK * REDUCE_BLOCK
        if full:
            self.parts.extend(x[:full].reshape(-1, REDUCE_BLOCK).sum(axis=1).tolist())
        if x.size > full:
            self.parts.append(float(x[full:].sum()))

    @property
    def value(self) -> float:
        return math.fsum(self.parts)


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64)


def _rows(x: np.ndarray, row_len: int) -> np.ndarray:
    return x.reshape(-1, row_len)


def _row_len(shape: tuple[int, ...]) -> int:
    """Length of the vectors a per-row method works on: the last axis (1-D: all)."""
    return shape[-1] if len(shape) >= 1 and shape[-1] > 0 else 1


# -- order statistics by radix selection ------------------------------------------------------


def _magnitude_bits(x: np.ndarray) -> np.ndarray:
    """Bit patterns of |x|; for non-negative floats they sort as the values do."""
    a = np.abs(x)
    bits: np.ndarray = a.view(np.uint64 if a.dtype == np.float64 else np.uint32)
    return bits


def _select(inputs: _Inputs, wants: list[tuple[int, list[int]]],
            delta: Callable[[_Block, int], np.ndarray]) -> dict[tuple[int, int], int]:
    """Exact order statistics of |delta(block, i)| over the whole tensor: for each
    (model i, ascending rank r) in ``wants``, the bit pattern of the r-th smallest
    magnitude. 16 bits per pass, all models in the same pass."""
    width = 64 if math_dtype(inputs.info.dtype) == np.float64 else 32
    state = {(i, r): (0, r) for i, ranks in wants for r in ranks}  # -> (prefix, rank left)
    for shift in range(width - 16, -1, -16):
        hists: dict[tuple[int, int], np.ndarray] = {}
        known = width - 16 - shift  # bits already fixed in each prefix
        for blk in inputs.blocks():
            for i, ranks in wants:
                bits = _magnitude_bits(delta(blk, i))
                for r in ranks:
                    prefix = state[(i, r)][0]
                    sel = bits if not known else bits[(bits >> (shift + 16)) == (prefix >> (shift + 16))]
                    h = np.bincount(((sel >> shift) & 0xFFFF).astype(np.int64), minlength=1 << 16)
                    hists[(i, r)] = h if (i, r) not in hists else hists[(i, r)] + h
        for key, (prefix, left) in list(state.items()):
            cum = np.cumsum(hists[key])
            digit = int(np.searchsorted(cum, left, side="right"))
            below = int(cum[digit - 1]) if digit else 0
            state[key] = (prefix | (digit << shift), left - below)
    return {key: prefix for key, (prefix, _) in state.items()}


def _as_float_bits(bits: int, dtype: np.dtype) -> float:
    if dtype == np.float64:
        return float(np.array([bits], np.uint64).view(np.float64)[0])
    return float(np.array([bits], np.uint32).view(np.float32)[0])


# -- sparsification ---------------------------------------------------------------------------


def _rng(seed: int, tensor: str, index: int) -> np.random.Generator:
    """The mask stream of input ``index`` (0 = first non-base model) of ``tensor``."""
    words = np.frombuffer(hashlib.sha256(tensor.encode()).digest(), np.uint32).tolist()
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, *words, index]))


class _Sparsifier:
    """Per-model masks of a task-vector method: prepared over the whole tensor, then
    applied block by block (in the final pass, in element order)."""

    row_len: int | None = None

    def prepare(self, inputs: _Inputs, p: _Params) -> None:
        return None

    def apply(self, i: int, d: np.ndarray, blk: _Block) -> np.ndarray:
        return d


class _Magnitude(_Sparsifier):
    """TIES: keep each task vector's top max(1, floor(density·n)) entries by magnitude,
    and every entry tied with the smallest of them."""

    outliers = False

    def prepare(self, inputs: _Inputs, p: _Params) -> None:
        n = inputs.count
        self.keep: list[tuple[float, float] | None] = []  # (lo, hi) magnitudes kept, None: all
        wants: list[tuple[int, list[int]]] = []
        plans: list[tuple[int, int] | None] = []
        for i in range(len(inputs.models)):
            density = p.model[i]["density"]
            if density >= 1 or n == 0:
                plans.append(None)
                continue
            if self.outliers:
                target = int(density * n)
                top = int(p.model[i]["gamma"] * n)
                bottom = max(0, n - target - top)
                plans.append((bottom, bottom + target - 1) if target else (-1, -1))
            else:
                k = max(1, int(density * n))
                plans.append((n - k, n - 1))
            if plans[-1] is not None and plans[-1][0] >= 0:
                wants.append((i, sorted({plans[-1][0], plans[-1][1]})))
        found = _select(inputs, wants, lambda blk, i: blk.models[i] - blk.base) if wants else {}
        dt = math_dtype(inputs.info.dtype)
        for i, plan in enumerate(plans):
            if plan is None:
                self.keep.append(None)
            elif plan[0] < 0:
                self.keep.append((math.inf, -math.inf))  # keep nothing
            elif not self.outliers:
                self.keep.append((_as_float_bits(found[(i, plan[0])], dt), math.inf))
            else:
                self.keep.append((_as_float_bits(found[(i, plan[0])], dt), _as_float_bits(found[(i, plan[1])], dt)))
        self.scales = [1.0] * len(inputs.models)
        if p.shared.get("rescale"):
            self.scales = _l1_rescale(inputs, self)

    def mask(self, i: int, d: np.ndarray) -> np.ndarray | None:
        keep = self.keep[i]
        if keep is None:
            return None
        a = np.abs(d)
        inside: np.ndarray = (a >= keep[0]) & (a <= keep[1])
        return inside

    def apply(self, i: int, d: np.ndarray, blk: _Block) -> np.ndarray:
        m = self.mask(i, d)
        out = d if m is None else np.where(m, d, d.dtype.type(0))
        return out if self.scales[i] == 1.0 else out * self.scales[i]


class _Outliers(_Magnitude):
    """Model breadcrumbs: drop the largest floor(gamma·n) and then the smallest entries,
    keeping floor(density·n); ties with either kept boundary are kept."""

    outliers = True


def _l1_rescale(inputs: _Inputs, sp: _Magnitude) -> list[float]:
    """mergekit's rescale of a magnitude mask: match the L1 norm of the task vector."""
    before = [_Sum() for _ in inputs.models]
    after = [_Sum() for _ in inputs.models]
    for blk in inputs.blocks():
        for i, m in enumerate(blk.models):
            d = m - blk.base
            a = np.abs(_f64(d))
            before[i].add(a)
            mask = sp.mask(i, d)
            after[i].add(a if mask is None else np.where(mask, a, 0.0))
    out = []
    for b, a in zip(before, after):
        bv, av = b.value, a.value
        out.append(1.0 if bv < 1e-7 or av < 1e-7 else bv / av)
    return out


class _Random(_Sparsifier):
    """DARE: keep each entry with probability density; survivors times 1/density."""

    def prepare(self, inputs: _Inputs, p: _Params) -> None:
        self.density = [p.model[i]["density"] for i in range(len(inputs.models))]
        self.rescale = bool(p.shared.get("rescale"))
        self.rngs = [_rng(p.shared["seed"], inputs.name, i) for i in range(len(inputs.models))]

    def apply(self, i: int, d: np.ndarray, blk: _Block) -> np.ndarray:
        density = self.density[i]
        if density >= 1:
            return d
        keep = self.rngs[i].random(d.size) < density
        out = np.where(keep, d, d.dtype.type(0))
        return out * (1.0 / density) if self.rescale else out


class _Della(_Sparsifier):
    """DELLA's MagPrune: within each row, the entry of magnitude rank r (1 = smallest of
    n) is kept with probability p = density - epsilon + 2·epsilon·(r-1)/(n-1) (n = 1:
    p = density); survivors times 1/p."""

    row_len: int  # ranks are taken within rows: prepare always sets it

    def prepare(self, inputs: _Inputs, p: _Params) -> None:
        if len(inputs.shape) > 2:
            raise MergeInputError(inputs.name, "della ranks entries within rows: tensors of more than "
                                               "2 dimensions are not supported")
        self.row_len = _row_len(inputs.shape) if len(inputs.shape) == 2 else max(1, inputs.count)
        self.density = [p.model[i]["density"] for i in range(len(inputs.models))]
        self.epsilon = [p.model[i]["epsilon"] for i in range(len(inputs.models))]
        self.rescale = bool(p.shared.get("rescale"))
        self.rngs = [_rng(p.shared["seed"], inputs.name, i) for i in range(len(inputs.models))]

    def apply(self, i: int, d: np.ndarray, blk: _Block) -> np.ndarray:
        density, eps = self.density[i], self.epsilon[i]
        if density >= 1:
            return d
        rows = _rows(d, self.row_len)
        n = rows.shape[1]
        if n > 1:
            order = np.argsort(np.abs(rows), axis=1, kind="stable")
            ranks = np.empty_like(order)
            np.put_along_axis(ranks, order, np.arange(n)[None, :], axis=1)
            prob = (density - eps) + ranks.astype(d.dtype) * d.dtype.type(2 * eps / (n - 1))
        else:
            prob = np.full(rows.shape, density, d.dtype)
        prob = prob.reshape(-1)
        keep = self.rngs[i].random(d.size) < prob
        out = np.where(keep, d, d.dtype.type(0))
        return np.where(keep, out / prob, out) if self.rescale else out


# -- the kernels --------------------------------------------------------------------------------


@dataclass
class _Params:
    """Resolved parameters of one tensor: shared ones and one map per non-base model."""

    shared: dict[str, Any]
    model: list[dict[str, Any]]


def _linear(inputs: _Inputs, p: _Params, out: _Writer) -> None:
    weights = [m["weight"] for m in p.model]
    total = math.fsum(weights)
    if p.shared["normalize"] and total == 0:
        raise MergeInputError(inputs.name, "linear: the weights sum to zero")
    for blk in inputs.blocks(check=True):
        acc = np.zeros(blk.stop - blk.start, blk.models[0].dtype)
        for m, w in zip(blk.models, weights):
            acc += m * w
        if p.shared["normalize"]:
            acc /= acc.dtype.type(total)
        out.write(acc)


def _task_vector_method(sparsifier: type[_Sparsifier] | None, consensus: bool
                        ) -> Callable[[_Inputs, _Params, _Writer], None]:
    """The generalized task arithmetic of mergekit (TIES, DARE, breadcrumbs, DELLA):
    sparsify each task vector, weight it, optionally keep only entries agreeing with the
    elected sign, sum, optionally normalize by the weights, scale by lambda, add to base."""

    def kernel(inputs: _Inputs, p: _Params, out: _Writer) -> None:
        weights = [m["weight"] for m in p.model]
        sp = sparsifier() if sparsifier is not None else _Sparsifier()
        sp.prepare(inputs, p)
        lam, normalize = p.shared["lambda"], p.shared["normalize"]
        for blk in inputs.blocks(check=True, row_len=sp.row_len):
            base = blk.given_base
            deltas = [sp.apply(i, m - base, blk) * w for i, (m, w) in enumerate(zip(blk.models, weights))]
            if consensus:
                total = deltas[0].copy()
                for d in deltas[1:]:
                    total += d
                elected = np.sign(total)  # a zero sum elects no sign (mergekit: +1)
                mixed = np.zeros_like(base)
                divisor = np.zeros_like(base)
                for d, w in zip(deltas, weights):
                    agree = (np.sign(d) == elected) & (d != 0)
                    mixed += np.where(agree, d, base.dtype.type(0))
                    divisor += np.where(agree, base.dtype.type(w), base.dtype.type(0))
                divisor[divisor == 0] = 1
            else:
                mixed = deltas[0].copy()
                for d in deltas[1:]:
                    mixed += d
                div = math.fsum(weights)
                divisor = base.dtype.type(1 if abs(div) < 1e-8 else div)
            if normalize:
                mixed /= divisor
            if lam != 1:
                mixed *= base.dtype.type(lam)
            out.write(base + mixed)

    return kernel


def _slerp(inputs: _Inputs, p: _Params, out: _Writer) -> None:
    t = p.shared["t"]
    saa, sbb, sab = _Sum(), _Sum(), _Sum()
    for blk in inputs.blocks():
        a, b = _f64(_ends(blk)[0]), _f64(_ends(blk)[1])
        saa.add(a * a)
        sbb.add(b * b)
        sab.add(a * b)
    na, nb = math.sqrt(saa.value), math.sqrt(sbb.value)
    ca, cb = 1 - t, t
    if na > 1e-8 and nb > 1e-8:
        cos = max(-1.0, min(1.0, sab.value / (na * nb)))
        if abs(cos) <= SLERP_LINEAR_ABOVE:
            theta = math.acos(cos)
            s = math.sin(theta)
            ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    for blk in inputs.blocks(check=True):
        a, b = _ends(blk)
        out.write(a * a.dtype.type(ca) + b * b.dtype.type(cb))


def _ends(blk: _Block) -> tuple[np.ndarray, np.ndarray]:
    """SLERP's two ends: (base, model) or (first, second model)."""
    if blk.base is not None:
        return blk.base, blk.models[0]
    return blk.models[0], blk.models[1]


def _nuslerp_coefficients(t: float, s00: np.ndarray, s11: np.ndarray, s01: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c0, c1, divisor) per vector: result = (c0·v0 + c1·v1) / divisor (mergekit's nuslerp)."""
    n0 = np.maximum(np.sqrt(s00), 1e-7)
    n1 = np.maximum(np.sqrt(s11), 1e-7)
    cos = np.clip(s01 / (n0 * n1), -1.0, 1.0)
    colinear = (1 - cos * cos) <= 1e-16
    theta = np.arccos(np.where(colinear, 0.0, cos))
    s = np.sin(theta)
    c0 = np.where(colinear, 1 - t, np.sin((1 - t) * theta))
    c1 = np.where(colinear, t, np.sin(t * theta))
    return c0, c1, np.where(colinear, 1.0, s)


def _nuslerp(inputs: _Inputs, p: _Params, out: _Writer) -> None:
    w0, w1 = p.model[0]["weight"], p.model[1]["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    flatten = p.shared["nuslerp_flatten"] or len(inputs.shape) < 2
    row_wise = p.shared["nuslerp_row_wise"]

    def ends(blk: _Block) -> tuple[np.ndarray, np.ndarray]:
        v0, v1 = blk.models
        return (v0, v1) if blk.base is None else (v0 - blk.base, v1 - blk.base)

    def finish(blk: _Block, v0: np.ndarray, v1: np.ndarray, c0: Any, c1: Any, div: Any) -> None:
        res = (v0 * c0 + v1 * c1) / div
        res = res.astype(v0.dtype, copy=False)
        out.write(res.reshape(-1) if blk.base is None else blk.base + res.reshape(-1))

    if flatten:
        s = [_Sum(), _Sum(), _Sum()]
        for blk in inputs.blocks():
            v0, v1 = (_f64(v) for v in ends(blk))
            s[0].add(v0 * v0)
            s[1].add(v1 * v1)
            s[2].add(v0 * v1)
        c0, c1, div = (float(x) for x in _nuslerp_coefficients(t, *(np.array(x.value) for x in s)))
        for blk in inputs.blocks(check=True):
            v0, v1 = ends(blk)
            finish(blk, v0, v1, v0.dtype.type(c0), v0.dtype.type(c1), v0.dtype.type(div))
        return
    if not row_wise:  # vectors along the last axis: each block holds whole rows
        n = _row_len(inputs.shape)
        for blk in inputs.blocks(check=True, row_len=n):
            v0, v1 = (_rows(v, n) for v in ends(blk))
            a, b = _f64(v0), _f64(v1)
            c0s, c1s, divs = _nuslerp_coefficients(t, (a * a).sum(1), (b * b).sum(1), (a * b).sum(1))
            dt = v0.dtype
            finish(blk, v0, v1, c0s.astype(dt)[:, None], c1s.astype(dt)[:, None], divs.astype(dt)[:, None])
        return
    cols = inputs.count // inputs.shape[0] if inputs.shape[0] else 0  # vectors along axis 0
    s00, s11, s01 = (np.zeros(cols) for _ in range(3))
    for blk in inputs.blocks(row_len=cols):
        v0, v1 = (_f64(_rows(v, cols)) for v in ends(blk))
        for r0, r1 in zip(v0, v1):  # rows added in order: independent of the block size
            s00 += r0 * r0
            s11 += r1 * r1
            s01 += r0 * r1
    c0s, c1s, divs = _nuslerp_coefficients(t, s00, s11, s01)
    for blk in inputs.blocks(check=True, row_len=cols):
        v0, v1 = (_rows(v, cols) for v in ends(blk))
        dt = v0.dtype
        finish(blk, v0, v1, c0s.astype(dt)[None, :], c1s.astype(dt)[None, :], divs.astype(dt)[None, :])


def _model_stock_t(count: int, cos: np.ndarray) -> np.ndarray:
    denominator = 1 + (count - 1) * cos
    singular = np.abs(denominator) < 1e-6
    return np.where(singular, 0.0, count * cos / np.where(singular, 1.0, denominator))


def _model_stock(inputs: _Inputs, p: _Params, out: _Writer) -> None:
    count = len(inputs.models)
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    if p.shared["filter_wise"] and len(inputs.shape) >= 1:
        n = _row_len(inputs.shape)
        for blk in inputs.blocks(check=True, row_len=n):
            offs = [_f64(_rows(m - blk.base, n)) for m in blk.models]
            norms = [np.sqrt((o * o).sum(1)) for o in offs]
            cos = np.mean([np.clip((offs[i] * offs[j]).sum(1) / np.maximum(norms[i] * norms[j], 1e-6), -1, 1)
                           for i, j in pairs], axis=0)
            t = _model_stock_t(count, cos).astype(blk.given_base.dtype)[:, None]
            _model_stock_write(blk, t, count, n, out)
        return
    dots = {pair: _Sum() for pair in pairs}
    sq = [_Sum() for _ in range(count)]
    for blk in inputs.blocks():
        offs = [_f64(m - blk.base) for m in blk.models]
        for i, o in enumerate(offs):
            sq[i].add(o * o)
        for (i, j), s in dots.items():
            s.add(offs[i] * offs[j])
    norms = [math.sqrt(s.value) for s in sq]
    cos = math.fsum(max(-1.0, min(1.0, dots[(i, j)].value / max(norms[i] * norms[j], 1e-6)))
                    for i, j in pairs) / len(pairs)
    t_all = float(_model_stock_t(count, np.array(cos)))
    for blk in inputs.blocks(check=True):
        _model_stock_write(blk, blk.given_base.dtype.type(t_all), count, None, out)


def _model_stock_write(blk: _Block, t: Any, count: int, n: int | None, out: _Writer) -> None:
    avg = blk.models[0].copy()
    for m in blk.models[1:]:
        avg += m
    avg /= avg.dtype.type(count)
    base = blk.given_base
    if n is not None:
        avg, base = _rows(avg, n), _rows(base, n)
    out.write((t * avg + (1 - t) * base).reshape(-1))


KERNELS: dict[str, Callable[[_Inputs, _Params, _Writer], None]] = {
    "linear": _linear,
    "slerp": _slerp,
    "task_arithmetic": _task_vector_method(None, consensus=False),
    "ties": _task_vector_method(_Magnitude, consensus=True),
    "dare_linear": _task_vector_method(_Random, consensus=False),
    "dare_ties": _task_vector_method(_Random, consensus=True),
    "breadcrumbs": _task_vector_method(_Outliers, consensus=False),
    "della": _task_vector_method(_Della, consensus=True),
    "model_stock": _model_stock,
    "nuslerp": _nuslerp,
}
assert set(KERNELS) == set(MERGE_METHODS)


def merge_tensor(method: str, name: str, base: Source | None, models: Sequence[Source],
                 shared: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]],
                 emit: Callable[[np.ndarray], None], *, out_dtype: str | None = None,
                 labels: Sequence[str] | None = None, block: int = BLOCK_ELEMENTS) -> TensorInfo:
    """Merge one tensor from its inputs (parameters already resolved for it, see
    `lattice.learn.mergespec`) and pass the result's raw little-endian blocks, in order,
    to ``emit``. Returns the output's info. Raises MergeInputError naming the tensor for
    a failing input: a different shape or dtype, non-finite values, a non-float tensor
    that differs between inputs."""
    inputs_all = ([base] if base is not None else []) + list(models)
    labels = list(labels) if labels is not None else [f"#{i}" for i in range(len(inputs_all))]
    first = inputs_all[0].info
    for src, label in zip(inputs_all[1:], labels[1:]):
        if src.info.shape != first.shape:
            raise MergeInputError(name, f"input {label} has shape {list(src.info.shape)}, "
                                        f"expected {list(first.shape)}")
        if src.info.dtype != first.dtype:
            raise MergeInputError(name, f"input {label} has dtype {src.info.dtype}, expected {first.dtype}")
    if first.dtype not in FLOAT_TAGS:
        return _pass_through(name, inputs_all, labels, emit)
    tag = out_dtype or first.dtype
    if tag not in FLOAT_TAGS:
        raise MergeInputError(name, f"cannot write float results as {tag}")
    inputs = _Inputs(name, base, models, labels, block)
    KERNELS[method](inputs, _Params(dict(shared), [dict(m) for m in per_model]), _Writer(name, tag, emit))
    return TensorInfo(name, tag, first.shape)


def _pass_through(name: str, inputs: Sequence[Source], labels: Sequence[str],
                  emit: Callable[[np.ndarray], None]) -> TensorInfo:
    """Integer and bool tensors (position ids, masks) are not merged: they must be the
    same in every input and are copied."""
    info = inputs[0].info
    step = BLOCK_ELEMENTS
    for start in range(0, info.count, step):
        stop = min(info.count, start + step)
        first = inputs[0].read(start, stop)
        for src, label in zip(inputs[1:], labels[1:]):
            if not np.array_equal(src.read(start, stop), first):
                raise MergeInputError(name, f"{info.dtype} tensors are not merged and input {label} "
                                            "differs from the first")
        emit(first)
    return info


# -- in memory ---------------------------------------------------------------------------------


def merge_models(method: str, models: Sequence[Mapping[str, np.ndarray]], *,
                 base: Mapping[str, np.ndarray] | None = None, weights: Sequence[float] | None = None,
                 out_dtype: str | None = None, **params: Any) -> dict[str, np.ndarray]:
    """Merge models given as named tensors in memory, tensor by tensor, with scalar
    parameters (`weights` per model; the rest shared or the same for every model).
    Every model (and base) must have the same tensor names. A convenience over
    `lattice.learn.mergespec` and `merge_tensor`; whole models on disk go through
    `lattice.learn.mergeengine`."""
    from lattice.learn.mergespec import MergeSpec

    refs = [f"m{i}" for i in range(len(models))]
    spec = MergeSpec.from_arguments(method, refs, base="base" if base is not None else None,
                                    weights=weights, dtype=out_dtype, **params)
    named = {**{r: m for r, m in zip(refs, models)}, **({"base": base} if base is not None else {})}
    names = sorted(named[refs[0]] if models else ())
    for ref, m in named.items():
        for name in names:
            if name not in m:
                raise MergeInputError(name, f"missing from input {ref}")
        for name in m:
            if name not in names:
                raise MergeInputError(name, f"input {ref} has it, the first model does not")
    layers = spec.layer_count(names)
    out = {}
    for name in names:
        shared, per_model = spec.resolve(name, layers)
        chunks: list[np.ndarray] = []
        info = merge_tensor(spec.method, name, ArraySource(name, base[name]) if base is not None else None,
                            [ArraySource(name, m[name]) for m in models], shared, per_model, chunks.append,
                            out_dtype=spec.dtype, labels=(["base"] if base is not None else []) + refs)
        flat = np.concatenate(chunks) if chunks else np.empty(0, TAGS[info.dtype])
        out[name] = flat.reshape(info.shape)
    return out


def _one(method: str, base: np.ndarray | None, models: Sequence[np.ndarray], **params: Any) -> np.ndarray:
    arrays = [np.asarray(m) for m in models]
    shape = arrays[0].shape
    for i, a in enumerate(arrays[1:] + ([np.asarray(base)] if base is not None else []), 1):
        if a.shape != shape:
            raise ValueError(f"input {i} has shape {a.shape}, expected {shape}")
    return merge_models(method, [{"x": a} for a in arrays],
                        base={"x": np.asarray(base)} if base is not None else None, **params)["x"]


def linear(models: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Linear merge / model soup (Wortsman et al. 2022): the weighted average."""
    return _one("linear", None, models, weights=weights)


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation of two tensors as flat vectors; t=0 gives a, t=1 gives b."""
    return _one("slerp", None, [a, b], t=t)


def task_arithmetic(base: np.ndarray, models: Sequence[np.ndarray], weights: Sequence[float] | None = None,
                    scale: float = 1.0) -> np.ndarray:
    """base + lambda · sum_i w_i (m_i - base) (Ilharco et al. 2023)."""
    return _one("task_arithmetic", base, models, weights=weights, **{"lambda": scale})


def ties(base: np.ndarray, models: Sequence[np.ndarray], weights: Sequence[float] | None = None,
         density: float = 0.2, scale: float = 1.0) -> np.ndarray:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean."""
    return _one("ties", base, models, weights=weights, density=density, **{"lambda": scale})


def dare(base: np.ndarray, models: Sequence[np.ndarray], weights: Sequence[float] | None = None,
         density: float = 0.5, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """DARE (Yu et al. 2024) with linear combination (method dare_linear)."""
    return _one("dare_linear", base, models, weights=weights, density=density, seed=seed, **{"lambda": scale})


# -- the train job's final merge ------------------------------------------------------------------


def _weights(weights: Sequence[float] | None, n: int, *, normalize: bool) -> list[float]:
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} models")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and >= 0, got {w}")
    if normalize:
        total = math.fsum(w)
        if total <= 0:
            raise ValueError("weights sum to zero")
        w = [x / total for x in w]
    return w


def weighted_average(models: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i m_i / sum_i w_i, accumulated in float64 in input order, as float32: the
    final global merge of a train job (weights = samples seen by each participant)."""
    if not models:
        raise ValueError("need at least one model")
    shape = np.shape(models[0])
    for i, m in enumerate(models):
        if np.shape(m) != shape:
            raise ValueError(f"model {i} has shape {np.shape(m)}, expected {shape}")
    w = _weights(weights, len(models), normalize=True)
    acc = np.zeros(shape, dtype=np.float64)
    for m, wi in zip(models, w):
        acc += wi * np.asarray(m, dtype=np.float64)
    return acc.astype(np.float32)

