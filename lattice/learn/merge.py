"""Merging models and the canonical, content-addressed model format.

Owns the merge methods (weighted average by samples, linear/soup, SLERP, task
arithmetic, TIES, DARE), `canonical_model_bytes` / `model_id`, and the `.safetensors`
and `.npz` readers and writers. Pure numpy: must not import trio, libp2p or sockets,
and reads no clock. Never pickle: `.npz` files are read with allow_pickle=False and
`.safetensors` is parsed by hand (8-byte little-endian header length, JSON header,
raw little-endian data), so no new dependency.

Recomputability: a merge result is a new model id that anyone holding the inputs can
recompute, so every method here is deterministic: sums accumulate in float64 in the
order the inputs are given (pass them in a canonical order, e.g. sorted by model id),
element-wise; the few reductions (SLERP's norms and angle) use math.fsum, which is
correctly rounded, so no BLAS or SIMD summation order can change a bit; thresholds are
values rather than argsort positions (ties are kept, not broken arbitrarily); and
DARE's random masks come from a seeded numpy Generator drawn in input order.

The canonical bytes of a model ARE a canonical `.safetensors` file (proto/model-format.md),
so `sha256sum model.safetensors` prints the model id of a file written by
`save_safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np

__all__ = [
    "MAX_HEADER_BYTES",
    "ModelFormatError",
    "canonical_model_bytes",
    "dare",
    "dumps_safetensors",
    "linear",
    "load_npz",
    "load_safetensors",
    "loads_safetensors",
    "MERGE_METHODS",
    "merge_models",
    "model_id",
    "save_npz",
    "save_safetensors",
    "slerp",
    "task_arithmetic",
    "ties",
    "weighted_average",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit
NPZ_META_KEY = "__lattice_meta__"

# numpy dtype -> safetensors dtype tag; data is always little-endian
_DTYPES = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint16"): "U16",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}
_TAGS = {tag: dt.newbyteorder("<") for dt, tag in _DTYPES.items()}


class ModelFormatError(ValueError):
    """Bytes or arguments that are not a valid model file / model."""


# ---------------------------------------------------------------- merge methods


def _stack_check(models: Sequence[np.ndarray]) -> tuple[int, ...]:
    if not models:
        raise ValueError("need at least one model")
    shape = np.shape(models[0])
    for i, m in enumerate(models):
        if np.shape(m) != shape:
            raise ValueError(f"model {i} has shape {np.shape(m)}, expected {shape}")
    return shape


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
    """sum_i w_i m_i / sum_i w_i, as float32: the final global merge of a train job
    (weights = samples seen by each participant)."""
    _stack_check(models)
    w = _weights(weights, len(models), normalize=True)
    acc = np.zeros(np.shape(models[0]), dtype=np.float64)
    for m, wi in zip(models, w):
        acc += wi * np.asarray(m, dtype=np.float64)
    return acc.astype(np.float32)


def linear(models: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Linear merge / model soup (Wortsman et al. 2022): normalized weighted average,
    uniform when no weights are given."""
    return weighted_average(models, _weights(weights, len(models), normalize=False))


def _exact_dot(a: np.ndarray, b: np.ndarray) -> float:
    # math.fsum is correctly rounded, so the result cannot depend on how a BLAS or
    # numpy's SIMD reduction orders the sum on a given CPU
    return math.fsum((a * b).reshape(-1).tolist())


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation between two models treated as flat vectors; t=0 gives
    a, t=1 gives b. Falls back to linear interpolation when they are (anti)parallel
    or one is zero, where the great circle is undefined."""
    _stack_check([a, b])
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = math.sqrt(_exact_dot(a64, a64)), math.sqrt(_exact_dot(b64, b64))
    if na == 0 or nb == 0:
        return ((1 - t) * a64 + t * b64).astype(np.float32)
    cos = _exact_dot(a64, b64) / (na * nb)
    if abs(cos) > 1 - 1e-7:
        return ((1 - t) * a64 + t * b64).astype(np.float32)
    theta = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s * a64 + math.sin(t * theta) / s * b64).astype(np.float32)


def task_arithmetic(
    base: np.ndarray, models: Sequence[np.ndarray], weights: Sequence[float] | None = None, scale: float = 1.0
) -> np.ndarray:
    """base + scale * sum_i w_i (m_i - base) (Ilharco et al. 2023), weights default 1."""
    _stack_check([base, *models])
    w = _weights(weights, len(models), normalize=False)
    b64 = np.asarray(base, np.float64)
    acc = np.zeros_like(b64)
    for m, wi in zip(models, w):
        acc += wi * (np.asarray(m, np.float64) - b64)
    return (b64 + scale * acc).astype(np.float32)


def _trim(tau: np.ndarray, density: float) -> np.ndarray:
    """Keep entries whose magnitude reaches the k-th largest (k = ceil(density * n));
    ties at the threshold are all kept, so the result does not depend on sort order."""
    n = tau.size
    k = max(1, math.ceil(density * n)) if n else 0
    if k >= n:
        return tau
    mag = np.abs(tau).reshape(-1)
    threshold = np.partition(mag, n - k)[n - k]
    return np.where(np.abs(tau) >= threshold, tau, 0.0)


def ties(
    base: np.ndarray,
    models: Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    density: float = 0.2,
    scale: float = 1.0,
) -> np.ndarray:
    """TIES-merging (Yadav et al. 2023): trim each task vector to its top `density`
    fraction by magnitude, elect a sign per entry from the weighted sum, then take
    the weighted mean of the entries that agree with it."""
    _stack_check([base, *models])
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    w = _weights(weights, len(models), normalize=False)
    b64 = np.asarray(base, np.float64)
    taus = [_trim(np.asarray(m, np.float64) - b64, density) for m in models]
    total = np.zeros_like(b64)
    for tau, wi in zip(taus, w):
        total += wi * tau
    sign = np.sign(total)
    num, den = np.zeros_like(b64), np.zeros_like(b64)
    for tau, wi in zip(taus, w):
        agree = (np.sign(tau) == sign) & (tau != 0)
        num += np.where(agree, wi * tau, 0.0)
        den += np.where(agree, wi, 0.0)
    merged = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return (b64 + scale * merged).astype(np.float32)


def dare(
    base: np.ndarray,
    models: Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    seed: int | Sequence[int] = 0,
    scale: float = 1.0,
) -> np.ndarray:
    """DARE (Yu et al. 2024) with linear combination: drop each task-vector entry with
    probability 1 - density, rescale survivors by 1/density, then task arithmetic.
    Masks come from default_rng(seed), drawn in input order."""
    _stack_check([base, *models])
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    w = _weights(weights, len(models), normalize=False)
    rng = np.random.default_rng(seed)
    b64 = np.asarray(base, np.float64)
    acc = np.zeros_like(b64)
    for m, wi in zip(models, w):
        keep = rng.random(b64.shape) < density
        acc += wi * np.where(keep, (np.asarray(m, np.float64) - b64) / density, 0.0)
    return (b64 + scale * acc).astype(np.float32)


MERGE_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare")


def merge_models(
    method: str,
    models: Sequence[Mapping[str, np.ndarray]],
    *,
    base: Mapping[str, np.ndarray] | None = None,
    weights: Sequence[float] | None = None,
    **params: Any,
) -> dict[str, np.ndarray]:
    """Merge models given as named tensors, tensor by tensor (as mergekit does).

    `linear` (weights), `slerp` (exactly two models, `t`), `task_arithmetic`
    (`base`, weights, `scale`), `ties` (`base`, weights, `density`, `scale`), `dare`
    (`base`, weights, `density`, `seed`, `scale`; tensor i of the sorted names uses the
    seed sequence [seed, i]). Every model (and base) must have the same names and
    shapes. Results are float32; inputs should be in canonical order."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}: expected one of {MERGE_METHODS}")
    if not models:
        raise ValueError("need at least one model")
    names = sorted(models[0])
    for i, m in enumerate([*models, *([base] if base is not None else [])]):
        if sorted(m) != names:
            raise ValueError(f"input {i} has tensors {sorted(m)}, expected {names}")
    needs_base = method in ("task_arithmetic", "ties", "dare")
    if needs_base != (base is not None):
        raise ValueError(f"{method} {'needs' if needs_base else 'takes no'} base model")
    if method == "slerp" and (len(models) != 2 or weights is not None):
        raise ValueError("slerp merges exactly two models, with t instead of weights")
    out = {}
    for i, name in enumerate(names):
        tensors = [np.asarray(m[name]) for m in models]
        if method == "linear":
            out[name] = linear(tensors, weights, **params)
        elif method == "slerp":
            out[name] = slerp(tensors[0], tensors[1], **params)
        elif method == "task_arithmetic":
            out[name] = task_arithmetic(base[name], tensors, weights, **params)  # type: ignore[index]
        elif method == "ties":
            out[name] = ties(base[name], tensors, weights, **params)  # type: ignore[index]
        else:
            p = dict(params)
            p["seed"] = [int(p.get("seed", 0)), i]
            out[name] = dare(base[name], tensors, weights, **p)  # type: ignore[index]
    return out


# ---------------------------------------------------------------- canonical bytes


def _check_meta(meta: object) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise ModelFormatError(f"model metadata must be a mapping, got {type(meta).__name__}")
    meta = dict(meta)
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ModelFormatError(f"model metadata must map str to str, got {k!r}: {type(v).__name__}")
    return meta


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def canonical_model_bytes(arrays: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> bytes:
    """The one byte form of a model: a canonical safetensors file.

    Tensors sorted by name (code point order), data little-endian C-order packed in
    that order, header JSON with sorted keys and no whitespace, `__metadata__`
    (str -> str) present iff `meta` is non-empty, header padded with spaces to a
    multiple of 8. See proto/model-format.md."""
    meta = _check_meta(meta)
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(arrays):
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ModelFormatError(f"invalid tensor name {name!r}")
        arr = np.asarray(arrays[name])
        tag = _DTYPES.get(arr.dtype.newbyteorder("="))
        if tag is None:
            raise ModelFormatError(f"tensor {name!r}: unsupported dtype {arr.dtype}")
        data = np.ascontiguousarray(arr, dtype=_TAGS[tag]).tobytes()
        header[name] = {"dtype": tag, "shape": [int(s) for s in arr.shape], "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if meta:
        header["__metadata__"] = meta
    hjson = _canonical_json(header)
    hjson += b" " * (-len(hjson) % 8)
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(chunks)


def model_id(arrays: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> str:
    """SHA-256 hex of `canonical_model_bytes(arrays, meta)`."""
    return hashlib.sha256(canonical_model_bytes(arrays, meta)).hexdigest()


dumps_safetensors = canonical_model_bytes


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ModelFormatError("duplicate key in safetensors header")
    return dict(pairs)


def loads_safetensors(data: bytes | bytearray | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into (arrays, metadata). Accepts any valid file (not
    only canonical ones) and rejects anything malformed with ModelFormatError.
    Arrays are fresh, writable copies in native byte order."""
    buf = memoryview(data).cast("B")
    if len(buf) < 8:
        raise ModelFormatError("file shorter than the 8-byte header length")
    (hlen,) = struct.unpack("<Q", buf[:8])
    if hlen > MAX_HEADER_BYTES or hlen > len(buf) - 8:
        raise ModelFormatError(f"header length {hlen} exceeds the limit or the file")
    try:
        header = json.loads(bytes(buf[8 : 8 + hlen]).decode("utf-8"), object_pairs_hook=_strict_object)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelFormatError("header is not a JSON object")
    meta = _check_meta(header.pop("__metadata__", None))
    body = buf[8 + hlen :]
    spans, arrays = [], {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ModelFormatError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _TAGS:
            raise ModelFormatError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise ModelFormatError(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise ModelFormatError(f"tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end <= len(body) or end - begin != math.prod(shape) * _TAGS[dtype].itemsize:
            raise ModelFormatError(f"tensor {name!r}: data_offsets {offs} do not fit shape {shape} / body")
        spans.append((begin, end))
        arrays[name] = np.frombuffer(body[begin:end], dtype=_TAGS[dtype]).reshape(shape).astype(_TAGS[dtype].newbyteorder("="))
    # the format requires the data to be covered exactly, with no holes or overlaps
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ModelFormatError("tensor data has holes or overlaps")
        position = end
    if position != len(body):
        raise ModelFormatError(f"{len(body) - position} trailing bytes after the tensor data")
    return arrays, meta


def save_safetensors(path: str | os.PathLike[str] | IO[bytes], arrays: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> str:
    """Write the canonical bytes; returns the model id (the file's SHA-256)."""
    data = canonical_model_bytes(arrays, meta)
    if hasattr(path, "write"):
        path.write(data)  # type: ignore[union-attr]
    else:
        with open(path, "wb") as f:  # type: ignore[arg-type]
            f.write(data)
    return hashlib.sha256(data).hexdigest()


def load_safetensors(path: str | os.PathLike[str] | IO[bytes]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if hasattr(path, "read"):
        return loads_safetensors(path.read())  # type: ignore[union-attr]
    with open(path, "rb") as f:  # type: ignore[arg-type]
        return loads_safetensors(f.read())


def save_npz(path: str | os.PathLike[str] | IO[bytes], arrays: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> None:
    """numpy .npz (uncompressed); metadata is canonical JSON in a uint8 array named
    `__lattice_meta__`. Not canonical bytes (zip headers): ids come from safetensors."""
    meta = _check_meta(meta)
    if NPZ_META_KEY in arrays:
        raise ModelFormatError(f"tensor name {NPZ_META_KEY!r} is reserved")
    for name, arr in arrays.items():
        if np.asarray(arr).dtype.hasobject:
            raise ModelFormatError(f"tensor {name!r}: object arrays are not allowed")
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload[NPZ_META_KEY] = np.frombuffer(_canonical_json(meta), dtype=np.uint8)
    np.savez(path, **payload)


def load_npz(path: str | os.PathLike[str] | IO[bytes]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:  # numpy's message when an entry would need pickle
        raise ModelFormatError(f"not a plain-array .npz: {exc}") from None
    raw = arrays.pop(NPZ_META_KEY, None)
    meta: dict[str, str] = {}
    if raw is not None:
        try:
            meta = _check_meta(json.loads(raw.astype(np.uint8).tobytes().decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
            raise ModelFormatError(f"bad {NPZ_META_KEY}: {exc}") from None
    return arrays, meta
