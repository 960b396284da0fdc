"""One array on the wire: its spec, the dtypes peers may send, and the validator every
receiver runs before it allocates anything (proto/bulk.md, "Arrays").

Owns `ArraySpec` (dtype, shape, nbytes), `ArrayLimits` and `parse_array_spec`, used by
both protocols that carry tensors: `/lattice/bulk/2` (`lattice.core.bulk_frames`) and
`/lattice/gossip-avg/2`'s ``arrays`` header (`lattice.core.gossip_messages`); and
`prepare_array`, how we put one of our own arrays on the wire. Pure: must not import
trio, libp2p or sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Plain little-endian numeric dtypes, as numpy's `dtype.str`: no objects, no structured
# or big-endian types (a receiver views the raw bytes as the array, uninterpreted). bool
# is left out: bytes other than 0/1 make an array numpy treats inconsistently.
WIRE_DTYPES = frozenset({
    "<f2", "<f4", "<f8",
    "|i1", "<i2", "<i4", "<i8",
    "|u1", "<u2", "<u4", "<u8",
})
SPEC_FIELDS = frozenset({"dtype", "shape", "nbytes"})


class ArrayFormatError(ValueError):
    """An array spec from a peer that is malformed or outside our limits."""


@dataclass(frozen=True)
class ArrayLimits:
    """What a receiver accepts (daemon config section `[bulk]`; gossip averaging sets
    ``max_bytes`` from the job's model)."""

    max_bytes: int = 1 << 30
    """Per array, and per set of arrays received together."""
    max_ndim: int = 8
    dtypes: frozenset[str] = field(default_factory=lambda: WIRE_DTYPES)


@dataclass(frozen=True)
class ArraySpec:
    """dtype (numpy ``dtype.str``), shape and size of an array a side will send."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


def parse_array_spec(obj: Any, limits: ArrayLimits) -> ArraySpec:
    """A validated spec from the wire, or ArrayFormatError saying which limit it breaks.

    What passes can be allocated: numpy multiplies *every* dimension when it allocates,
    so each dimension counts against ``max_bytes`` with zeros counted as 1 (a shape
    ``[0, 2**40, 2**40]`` holds 0 bytes, and `np.empty` refused it with ValueError)."""
    if not isinstance(obj, dict) or set(obj) != SPEC_FIELDS:
        raise ArrayFormatError("an array spec is a map of exactly dtype, shape, nbytes")
    dtype, shape, nbytes = obj["dtype"], obj["shape"], obj["nbytes"]
    if not isinstance(dtype, str) or dtype not in limits.dtypes:
        raise ArrayFormatError(f"dtype {str(dtype)[:16]!r} is not allowed")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise ArrayFormatError(f"shape must be a list of at most {limits.max_ndim} dims")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise ArrayFormatError("shape dims must be non-negative integers")
    if type(nbytes) is not int or nbytes < 0:
        raise ArrayFormatError("nbytes must be a non-negative integer")
    if nbytes > limits.max_bytes:
        raise ArrayFormatError(f"array of {nbytes} bytes exceeds limit {limits.max_bytes}")
    itemsize = np.dtype(dtype).itemsize
    count = extent = 1
    for d in shape:
        count *= d
        extent *= max(d, 1)
        if extent * itemsize > limits.max_bytes:
            raise ArrayFormatError(f"shape {shape[:8]} exceeds limit {limits.max_bytes} bytes")
    if count * itemsize != nbytes:
        raise ArrayFormatError(f"nbytes {nbytes} does not match shape {shape} of {dtype}")
    return ArraySpec(dtype, tuple(shape), nbytes)


def prepare_array(array: Any) -> tuple[ArraySpec, memoryview]:
    """The spec of one of *our* arrays and a flat byte view of it (copied only if it is
    not contiguous little-endian already). ValueError for a dtype peers would refuse:
    that is our bug, not a peer's."""
    a = np.asarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if a.dtype.str not in WIRE_DTYPES:
        raise ValueError(f"cannot send dtype {a.dtype} (allowed: {sorted(WIRE_DTYPES)})")
    if not a.flags.c_contiguous:
        a = a.copy(order="C")  # (not ascontiguousarray: it turns 0-d arrays into 1-d)
    view = a.reshape(-1).view(np.uint8).data
    return ArraySpec(a.dtype.str, tuple(int(d) for d in a.shape), int(a.nbytes)), view


def empty_like_spec(spec: ArraySpec) -> np.ndarray:
    """A fresh, writable array for ``spec`` (a validated spec always allocates)."""
    return np.empty(spec.shape, dtype=spec.numpy_dtype)


def byte_view(array: np.ndarray) -> memoryview:
    """A flat writable byte view of a C-contiguous array (a receive buffer)."""
    return array.reshape(-1).view(np.uint8).data
