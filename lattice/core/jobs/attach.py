"""The attach job's spec (`AttachSpec`) and the model manifest an attached loop and the
job agree on (`Manifest`), each defined once. Pure: must not import trio, libp2p,
sockets, lattice.learn or read the clock.

An attach job trains the *user's* model: the spec fixes how participants average
(algorithm, compression, how often), not the model. The model is fixed by its
manifest (tensor names, dtypes, shapes), which comes from the job's ``init`` model or
from its first participant (proto/jobs.md, "attach"). The manifest also lays out the
shared memory a loop hands its daemon: every tensor as float32, back to back in
manifest order (proto/attach.md).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from lattice.core.jobs.spec import (
    NAME_RE,
    Fields,
    FloatBound,
    JobSpecError,
    check_compression,
    parse_fields,
)
from lattice.core.jobs.train import MAX_PEERS

KIND_ATTACH = "attach"
ATTACH_ALGORITHMS = ("gossip", "noloco", "diloco")
# The published defaults of the outer step: NoLoCo (Kolehmainen et al. 2025) uses
# momentum 0.3 with its pairwise averaging, DiLoCo (Douillard et al. 2023) 0.9; both lr 0.7.
OUTER_MOMENTUM = {"noloco": 0.3, "diloco": 0.9}
MODEL_DTYPES = ("float32", "float16", "bfloat16", "float64")
"""The dtypes an attached model's tensors may have; every one travels as float32."""
SLOT_ITEMSIZE = 4  # float32
MAX_NDIM = 8
MAX_TENSOR_NAME = 256
_MODEL_ID_RE = re.compile(r"[0-9a-f]{64}")
_TENSOR_NAME_RE = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces


# a loop does not tell its daemon its dataset size: no "data" weighting (train jobs'),
# pairs and the merge weigh by samples trained on or not at all
ATTACH_WEIGHTINGS = ("uniform", "samples")


@dataclass(frozen=True)
class AttachSpec:
    """What every participant of an attach job agrees on. ``max_peers`` 0 means
    ``min_peers``; ``outer_momentum`` < 0 means the algorithm's published default;
    ``overlap`` 1 applies each round's averaged delta one round late, so the loop
    trains on while its daemon averages. ``init``: a model id (a canonical
    .safetensors blob) every participant starts from; empty: the first participant's
    weights."""

    name: str = ""
    min_peers: int = 2
    max_peers: int = 0
    sync_every: int = 50
    # NoLoCo: under Dirichlet(0.3) label skew it kept the merged model within 0.8 point
    # of one process on average over 3 seeds where plain gossip lost up to 8.7
    # (bench/attach_learning.py, Fashion-MNIST CNN, 4 loops)
    algorithm: str = "noloco"
    compression: str = "none"
    weighting: str = "uniform"
    outer_lr: float = 0.7
    outer_momentum: float = -1.0
    overlap: int = 0
    norm_factor: float = 10.0
    merge_timeout: float = 300.0
    init: str = ""

    def __post_init__(self) -> None:
        # resolved once, so the stored (and hashed) record says what participants run
        if self.max_peers == 0:
            object.__setattr__(self, "max_peers", self.min_peers)
        if self.outer_momentum < 0:
            object.__setattr__(self, "outer_momentum", OUTER_MOMENTUM.get(self.algorithm, 0.0))

    @property
    def outer(self) -> bool:
        """Whether the algorithm takes an outer Nesterov step after each average."""
        return self.algorithm in OUTER_MOMENTUM

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS = Fields(
    ints={"min_peers": (1, MAX_PEERS), "max_peers": (0, MAX_PEERS),
          "sync_every": (1, 10_000_000), "overlap": (0, 1)},
    floats={"outer_lr": FloatBound(0.0, 100.0, low_open=True),
            "outer_momentum": FloatBound(-1.0, 0.999999),
            "norm_factor": FloatBound(1.0, 1e6),
            "merge_timeout": FloatBound(1.0, 7 * 86400.0)},
    strs=("name", "algorithm", "compression", "weighting", "init"),
)


def parse_attach_spec(raw: Any) -> AttachSpec:
    """An `AttachSpec` from a plain mapping (user input or a received record).
    Raises JobSpecError."""
    spec = AttachSpec(**parse_fields(raw, KIND_ATTACH, FIELDS))
    if spec.name and not NAME_RE.fullmatch(spec.name):
        raise JobSpecError("name", "must be a name like 'fashion-cnn' (lowercase, digits, .-_)")
    if spec.algorithm not in ATTACH_ALGORITHMS:
        raise JobSpecError("algorithm", f"must be one of {', '.join(ATTACH_ALGORITHMS)}")
    if spec.weighting not in ATTACH_WEIGHTINGS:
        raise JobSpecError("weighting", f"must be one of {', '.join(ATTACH_WEIGHTINGS)}")
    check_compression(spec.compression)
    if spec.max_peers < spec.min_peers:
        raise JobSpecError("max_peers", "must be at least min_peers")
    if spec.init and not _MODEL_ID_RE.fullmatch(spec.init):
        raise JobSpecError("init", "must be a model id (64 lowercase hex digits)")
    return spec


# -- the manifest ---------------------------------------------------------------------------


class ManifestError(ValueError):
    """A manifest that is malformed or over this daemon's limits."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class Manifest:
    """A model's tensors in the loop's order; each one's float32 elements sit at
    ``offsets[i]`` in the shared slot."""

    tensors: tuple[TensorSpec, ...]

    @property
    def num_params(self) -> int:
        return sum(t.size for t in self.tensors)

    @property
    def slot_bytes(self) -> int:
        return self.num_params * SLOT_ITEMSIZE

    @property
    def region_bytes(self) -> int:
        """The shared memory: two slots, the loop's and the spare an average lands in
        (proto/attach.md)."""
        return 2 * self.slot_bytes

    @property
    def offsets(self) -> list[int]:
        out, at = [], 0
        for t in self.tensors:
            out.append(at)
            at += t.size
        return out

    def to_wire(self) -> list[list[Any]]:
        """``[[name, dtype, shape], ...]``: what `attach.open` carries."""
        return [[t.name, t.dtype, list(t.shape)] for t in self.tensors]

    def to_json(self) -> str:
        """The form kept in a model file's metadata (str -> str)."""
        return json.dumps(self.to_wire(), separators=(",", ":"))

    def first_difference(self, job: Manifest) -> str | None:
        """None when this (a loop's) manifest matches the job's; else what differs
        first, in this manifest's order, naming the tensor."""
        theirs = {t.name: t for t in job.tensors}
        for t in self.tensors:
            other = theirs.get(t.name)
            if other is None:
                return f"tensor {t.name!r} is not in the job's model"
            if other.shape != t.shape or other.dtype != t.dtype:
                return (f"tensor {t.name!r} is {t.describe()} here but "
                        f"{other.describe()} in the job's model")
        ours = {t.name for t in self.tensors}
        for t in job.tensors:
            if t.name not in ours:
                return f"tensor {t.name!r} of the job's model is missing here"
        return None  # the same tensors, perhaps in another order: each slot has its own


def parse_manifest(raw: Any, *, max_tensors: int, max_params: int) -> Manifest:
    """A manifest from ``[[name, dtype, shape], ...]``, every count and size checked
    before anything is allocated. Raises ManifestError."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= max_tensors:
        raise ManifestError(f"tensors must be a list of 1 to {max_tensors} entries")
    tensors: list[TensorSpec] = []
    names: set[str] = set()
    total = 0
    for i, item in enumerate(raw):
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise ManifestError(f"tensor #{i} must be [name, dtype, shape]")
        name, dtype, shape = item
        if not isinstance(name, str) or not _TENSOR_NAME_RE.fullmatch(name) \
                or name == "__metadata__":
            raise ManifestError(f"tensor #{i}: name must be 1..{MAX_TENSOR_NAME} printable "
                                "ASCII characters without spaces")
        if name in names:
            raise ManifestError(f"tensor {name!r} appears twice")
        if dtype not in MODEL_DTYPES:
            raise ManifestError(f"tensor {name!r}: dtype must be one of {', '.join(MODEL_DTYPES)}")
        if not (isinstance(shape, (list, tuple)) and len(shape) <= MAX_NDIM
                and all(type(d) is int and 0 <= d <= max_params for d in shape)):
            raise ManifestError(f"tensor {name!r}: shape must be at most {MAX_NDIM} sizes in "
                                f"[0, {max_params}]")
        spec = TensorSpec(name, dtype, tuple(shape))
        total += spec.size
        if total > max_params:
            raise ManifestError(f"the model has more than {max_params} parameters, this "
                                "daemon's limit (jobs.max_params)")
        names.add(name)
        tensors.append(spec)
    if total == 0:
        raise ManifestError("the model has no parameters")
    return Manifest(tuple(tensors))


def manifest_of(items: Iterable[tuple[str, str, Iterable[int]]]) -> Manifest:
    """A manifest from (name, dtype, shape) triples already known to be sane (a model
    file we parsed, a loop's own tensors)."""
    return Manifest(tuple(TensorSpec(n, d, tuple(int(x) for x in s)) for n, d, s in items))


def manifest_from_json(text: str, *, max_tensors: int, max_params: int) -> Manifest:
    """The manifest kept in a model file's metadata; raises ManifestError."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise ManifestError("the manifest in the model's metadata is not JSON") from None
    return parse_manifest(raw, max_tensors=max_tensors, max_params=max_params)

