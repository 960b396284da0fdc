"""Lossy codecs for what participants send, and error-feedback memory.

Owns the codec registry (`none`, `fp16`, `int8[:CHUNK]`, `topk:RATIO`), the parsing of
their spec strings, and `ErrorFeedback`. Pure numpy functions with no networking (as in
hivemind's compression/base.py): must not import trio, libp2p or sockets, and reads
no clock.

A codec turns a float32 array into a payload, a flat dict of numpy arrays, plus the
number of bytes of array data it holds (what the wire carries, framing excluded). The
network layer moves each array as raw bytes; the receiver rebuilds the arrays with the
dtypes listed in `Codec.payload_dtypes` and calls `decode` with the shape it expects
(it always knows it: the job fixes the model). `decode` validates everything a peer
controls and raises `InvalidTensor("payload", ...)` for anything malformed, before
allocating an array of a size the peer chose.

Error feedback (Seide et al. 2014 "1-bit SGD"; Karimireddy et al. 2019 "EF-SGD";
CHOCO-SGD and 1-bit Adam use the same memory): what a lossy codec drops is kept in a
residual and added to the next input, so nothing is lost for good: after any
sequence of committed sends, sum(sent) + residual == sum(inputs) (up to float32
rounding). `prepare` computes a send without changing the memory and `commit` applies
it, so an aborted exchange leaves the memory untouched.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lattice.learn.validate import InvalidTensor

__all__ = [
    "CODECS",
    "Codec",
    "CompressionSpecError",
    "ErrorFeedback",
    "Fp16",
    "Int8",
    "NoCompression",
    "Prepared",
    "TopK",
    "get_codec",
]

MAX_NDIM = 32
FP16_MAX = float(np.finfo(np.float16).max)


class CompressionSpecError(ValueError):
    """A compression spec string that does not name a valid codec."""


Payload = dict[str, np.ndarray]


def _as_f32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"codecs encode floating-point arrays, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _payload_nbytes(payload: Payload) -> int:
    return sum(int(v.nbytes) for v in payload.values())


def _shape_array(shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(shape, dtype=np.int64).reshape(-1)


class Codec(ABC):
    """A pure codec. `spec` is the string that parses back to an equal codec."""

    spec: str
    # key -> dtype of every array a payload of this codec carries (besides "shape")
    payload_dtypes: ClassVar[Mapping[str, np.dtype]]

    @abstractmethod
    def _encode_flat(self, flat: np.ndarray) -> Payload: ...

    @abstractmethod
    def _decode_flat(self, payload: Mapping[str, np.ndarray], size: int) -> np.ndarray: ...

    def encode(self, x: np.ndarray) -> tuple[Payload, int]:
        """(payload, nbytes of array data in it). `x` is any float array."""
        x = _as_f32(x)
        payload = self._encode_flat(x.reshape(-1))
        payload["shape"] = _shape_array(x.shape)
        return payload, _payload_nbytes(payload)

    def decode(self, payload: Mapping[str, object], expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The float32 array a payload stands for.

        Pass `expected_shape` for anything received from a peer: a payload of another
        shape is rejected before any allocation. Malformed payloads raise
        InvalidTensor("payload")."""
        if not isinstance(payload, Mapping):
            raise InvalidTensor("payload", f"expected a mapping, got {type(payload).__name__}")
        expected_keys = set(self.payload_dtypes) | {"shape"}
        if set(payload) != expected_keys:
            raise InvalidTensor("payload", f"{self.spec}: keys {sorted(map(str, payload))}, expected {sorted(expected_keys)}")
        shape_arr = _check_array(payload, "shape", np.dtype(np.int64))
        if shape_arr.ndim != 1 or len(shape_arr) > MAX_NDIM or (shape_arr < 0).any():
            raise InvalidTensor("payload", f"bad shape field {shape_arr!r}")
        shape = tuple(int(s) for s in shape_arr)
        if expected_shape is not None and shape != tuple(expected_shape):
            raise InvalidTensor("payload", f"shape {shape}, expected {tuple(expected_shape)}")
        for key, dtype in self.payload_dtypes.items():
            _check_array(payload, key, dtype)
        size = math.prod(shape)
        return self._decode_flat(payload, size).reshape(shape)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return f"<codec {self.spec}>"


def _check_array(payload: Mapping[str, object], key: str, dtype: np.dtype) -> np.ndarray:
    value = payload[key]
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != 1:
        desc = f"{value.dtype}[{value.ndim}d]" if isinstance(value, np.ndarray) else type(value).__name__
        raise InvalidTensor("payload", f"field {key!r} must be a 1-D {dtype} array, got {desc}")
    return value


def _check_len(arr: np.ndarray, key: str, n: int) -> None:
    if len(arr) != n:
        raise InvalidTensor("payload", f"field {key!r} has {len(arr)} elements, expected {n}")


class NoCompression(Codec):
    spec = "none"
    payload_dtypes: ClassVar[Mapping[str, np.dtype]] = {"data": np.dtype(np.float32)}

    def _encode_flat(self, flat: np.ndarray) -> Payload:
        return {"data": flat.copy()}

    def _decode_flat(self, payload: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        _check_len(payload["data"], "data", size)
        # no copy: callers never write into a decoded array (pair_average allocates)
        return payload["data"]


class Fp16(Codec):
    """IEEE half precision. Values beyond +-65504 are clipped, not turned into inf."""

    spec = "fp16"
    payload_dtypes: ClassVar[Mapping[str, np.dtype]] = {"data": np.dtype(np.float16)}

    def _encode_flat(self, flat: np.ndarray) -> Payload:
        return {"data": np.clip(flat, -FP16_MAX, FP16_MAX).astype(np.float16)}

    def _decode_flat(self, payload: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        _check_len(payload["data"], "data", size)
        return payload["data"].astype(np.float32)


class Int8(Codec):
    """Symmetric 8-bit quantization with one float32 scale per chunk of `chunk` values.

    Per element |x - decode(encode(x))| <= scale / 2 = max|chunk| / 254."""

    payload_dtypes: ClassVar[Mapping[str, np.dtype]] = {"q": np.dtype(np.int8), "scale": np.dtype(np.float32)}

    def __init__(self, chunk: int = 1024):
        if chunk < 1:
            raise CompressionSpecError(f"int8 chunk must be >= 1, got {chunk}")
        self.chunk = chunk
        self.spec = "int8" if chunk == 1024 else f"int8:{chunk}"

    def _encode_flat(self, flat: np.ndarray) -> Payload:
        n = flat.size
        n_chunks = -(-n // self.chunk)
        padded = np.zeros(n_chunks * self.chunk, dtype=np.float32)
        padded[:n] = flat
        blocks = padded.reshape(n_chunks, self.chunk)
        scale = (np.abs(blocks).max(axis=1) / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0))
        q = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8)
        return {"q": q.reshape(-1)[:n], "scale": scale}

    def _decode_flat(self, payload: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        q, scale = payload["q"], payload["scale"]
        _check_len(q, "q", size)
        _check_len(scale, "scale", -(-size // self.chunk))
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise InvalidTensor("payload", "int8 scales must be finite and >= 0")
        per_elem = np.repeat(scale, self.chunk)[:size]
        decoded: np.ndarray = q.astype(np.float32) * per_elem
        return decoded


class TopK(Codec):
    """Keep the k = ceil(ratio * n) largest-magnitude values (at least one) with their
    uint32 indices, sorted ascending; the rest decode to zero. Meant for quantities
    that are sparse-ish (updates, deltas), with ErrorFeedback."""

    payload_dtypes: ClassVar[Mapping[str, np.dtype]] = {"idx": np.dtype(np.uint32), "val": np.dtype(np.float32)}

    def __init__(self, ratio: float):
        if not (0 < ratio <= 1) or not math.isfinite(ratio):
            raise CompressionSpecError(f"topk ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.spec = f"topk:{ratio:g}"

    def k_for(self, n: int) -> int:
        return 0 if n == 0 else min(n, max(1, math.ceil(self.ratio * n)))

    def _encode_flat(self, flat: np.ndarray) -> Payload:
        n = flat.size
        if n > np.iinfo(np.uint32).max:
            raise ValueError(f"topk indexes with uint32: {n} elements is too many")
        k = self.k_for(n)
        if k == n:
            idx = np.arange(n)
        else:
            idx = np.sort(np.argpartition(np.abs(flat), n - k)[n - k :])
        return {"idx": idx.astype(np.uint32), "val": flat[idx].copy()}

    def _decode_flat(self, payload: Mapping[str, np.ndarray], size: int) -> np.ndarray:
        idx, val = payload["idx"], payload["val"]
        k = self.k_for(size)
        _check_len(idx, "idx", k)
        _check_len(val, "val", k)
        if k and (int(idx[-1]) >= size or (k > 1 and not (np.diff(idx.astype(np.int64)) > 0).all())):
            raise InvalidTensor("payload", "topk indices must be strictly increasing and < size")
        out = np.zeros(size, dtype=np.float32)
        out[idx] = val
        return out


def _no_arg(cls: type[Codec]) -> Callable[[str | None], Codec]:
    def make(arg: str | None) -> Codec:
        if arg is not None:
            raise CompressionSpecError(f"{cls.spec} takes no argument, got {arg!r}")
        return cls()
    return make


def _int8(arg: str | None) -> Codec:
    if arg is None:
        return Int8()
    try:
        return Int8(int(arg))
    except ValueError:
        raise CompressionSpecError(f"int8:{arg}: chunk must be an integer") from None


def _topk(arg: str | None) -> Codec:
    if arg is None:
        raise CompressionSpecError("topk needs a ratio, e.g. 'topk:0.1'")
    try:
        ratio = float(arg)
    except ValueError:
        raise CompressionSpecError(f"topk:{arg}: ratio must be a number") from None
    return TopK(ratio)


# name -> factory(argument after ':' or None)
CODECS: dict[str, Callable[[str | None], Codec]] = {
    "none": _no_arg(NoCompression),
    "fp16": _no_arg(Fp16),
    "int8": _int8,
    "topk": _topk,
}


def get_codec(spec: str | Codec) -> Codec:
    """Parse `none`, `fp16`, `int8`, `int8:CHUNK` or `topk:RATIO` into a codec."""
    if isinstance(spec, Codec):
        return spec
    if not isinstance(spec, str):
        raise CompressionSpecError(f"compression spec must be a string, got {type(spec).__name__}")
    name, sep, arg = spec.strip().partition(":")
    if name not in CODECS:
        raise CompressionSpecError(f"unknown compression {spec!r}: expected one of none, fp16, int8, topk:RATIO")
    return CODECS[name](arg if sep else None)


@dataclass(frozen=True)
class Prepared:
    """One send computed by ErrorFeedback.prepare, not yet committed."""

    payload: Payload
    nbytes: int
    sent: np.ndarray  # what the receiver will decode
    residual: np.ndarray  # the memory after commit
    generation: int  # the memory generation it was computed from


class ErrorFeedback:
    """Residual memory for one stream of sends through one codec."""

    def __init__(self, codec: Codec | str, shape: tuple[int, ...] | int):
        self.codec = get_codec(codec)
        self.residual = np.zeros(shape, dtype=np.float32)
        self.generation = 0

    def prepare(self, x: np.ndarray) -> Prepared:
        """Compress x + residual; the memory is unchanged until `commit`."""
        corrected = _as_f32(x) + self.residual
        payload, nbytes = self.codec.encode(corrected)
        sent = self.codec.decode(payload, corrected.shape)
        return Prepared(payload, nbytes, sent, corrected - sent, self.generation)

    def commit(self, prepared: Prepared) -> None:
        if prepared.generation != self.generation:
            # committing a send computed from an older memory would count it twice
            raise RuntimeError("stale Prepared: the memory changed since it was prepared")
        self.residual = prepared.residual
        self.generation += 1

    def compress(self, x: np.ndarray) -> Prepared:
        """prepare + commit."""
        prepared = self.prepare(x)
        self.commit(prepared)
        return prepared
