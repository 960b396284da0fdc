"""The merge job's spec (`MergeJobSpec`), defined once: the merge kind, the local API
that prepares it and the benchmarks all use it. Pure: must not import trio, libp2p,
lattice.learn or read the clock.

The merge itself — method, base, models, parameter settings, output dtype — is the
learning ring's `lattice.learn.mergespec.MergeSpec` in its JSON form (`merge_json`);
only its syntax and size are bounded here (model ids, bounded parameter maps). The
merge kind (`lattice.jobs.merge`) checks the meaning with `MergeSpec.from_json` when
it parses a spec, so a spec typed by a user and one received from the network pass the
same checks. Spec: proto/jobs.md, "The merge kind".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lattice.core.codec import canonical
from lattice.core.jobs.spec import MAX_STR, Fields, FloatBound, JobSpecError, parse_fields

KIND_MERGE = "merge"
MAX_MODELS = 64
"""Models in one merge (`lattice.learn.mergespec.MAX_MODELS`)."""
MAX_PARAMETER_BYTES = 16 * 1024
"""Canonical msgpack of ``parameters`` and ``model_parameters`` together."""
MAX_PARAMETERS = 32
MAX_SETTING_DEPTH = 3
"""Containers inside one setting: a list of {filter, value} whose value is a gradient."""
MAX_SETTING_ITEMS = 4096
"""Scalars and containers in all settings together (checked before anything recurses)."""
MAX_PEERS = 256
MAX_TENSORS = 1 << 20
"""Tensors in a model (`lattice.learn.modelfile.MAX_TENSORS`)."""
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

_MODEL_ID_RE = re.compile(r"[0-9a-f]{64}")
_METHOD_RE = re.compile(r"[a-z][a-z_]{0,31}")


@dataclass(frozen=True)
class MergeJobSpec:
    """What every participant of a merge job agrees on: the merge (method, models in
    order, optional base, parameter settings as mergekit writes them, output dtype),
    the result's registry ``name``, the inputs' total bytes and the output's tensor
    count (the submitting daemon reads them from the manifests: volunteers decide by
    ``input_bytes``, progress counts tensors; participants check both), and the job's
    participants: between ``min_peers`` and ``max_peers``, gathered for at most
    ``join_window`` seconds. ``merge_timeout`` bounds how long the merger waits for the
    others' shares after finishing its own."""

    method: str
    models: tuple[str, ...]
    base: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    model_parameters: tuple[Mapping[str, Any], ...] = ()
    dtype: str | None = None
    name: str | None = None
    input_bytes: int = 0
    tensors: int = 0
    min_peers: int = 1
    max_peers: int = 8
    join_window: float = 5.0
    merge_timeout: float = 120.0

    def to_dict(self) -> dict[str, Any]:
        """Every field, explicitly: the form stored in the job record and hashed."""
        return {"method": self.method, "models": list(self.models), "base": self.base,
                "parameters": dict(self.parameters),
                "model_parameters": [dict(m) for m in self.model_parameters],
                "dtype": self.dtype, "name": self.name, "input_bytes": self.input_bytes,
                "tensors": self.tensors, "min_peers": self.min_peers,
                "max_peers": self.max_peers, "join_window": self.join_window,
                "merge_timeout": self.merge_timeout}

    def merge_json(self) -> dict[str, Any]:
        """The merge as `lattice.learn.mergespec.MergeSpec.from_json` reads it."""
        return {"version": 1, "method": self.method, "base": self.base,
                "models": list(self.models), "parameters": dict(self.parameters),
                "model_parameters": [dict(m) for m in self.model_parameters],
                "dtype": self.dtype}


FIELDS = Fields(
    ints={"min_peers": (1, MAX_PEERS), "max_peers": (1, MAX_PEERS),
          "input_bytes": (1, 1 << 62), "tensors": (1, MAX_TENSORS)},
    floats={"join_window": FloatBound(0.0, 3600.0),
            "merge_timeout": FloatBound(1.0, 7 * 86400.0)},
    strs=("method",),
    other=("models", "base", "parameters", "model_parameters", "dtype", "name"),
    required=("method", "models", "input_bytes", "tensors"),
)


def parse_merge_spec(raw: Any) -> MergeJobSpec:
    """A `MergeJobSpec` from a plain mapping (user input or a received record), its
    syntax and sizes checked (the merge's meaning is the kind's to check). Raises
    JobSpecError."""
    values = parse_fields(raw, KIND_MERGE, FIELDS)
    if not _METHOD_RE.fullmatch(values["method"]):
        raise JobSpecError("method", "must be a merge method name like 'ties'")
    models = raw["models"]
    if not isinstance(models, list) or not 1 <= len(models) <= MAX_MODELS \
            or not all(isinstance(m, str) and _MODEL_ID_RE.fullmatch(m) for m in models):
        raise JobSpecError("models", f"must be a list of 1 to {MAX_MODELS} model ids (64 hex digits)")
    base = raw.get("base")
    if base is not None and not (isinstance(base, str) and _MODEL_ID_RE.fullmatch(base)):
        raise JobSpecError("base", "must be a model id (64 hex digits) or null")
    parameters = raw.get("parameters", {})
    if not isinstance(parameters, Mapping) or len(parameters) > MAX_PARAMETERS \
            or not all(isinstance(k, str) and len(k) <= MAX_STR for k in parameters):
        raise JobSpecError("parameters", f"must be a map of at most {MAX_PARAMETERS} named settings")
    per_model = raw.get("model_parameters", [])
    if not isinstance(per_model, list) or len(per_model) not in (0, len(models)) or not all(
            isinstance(m, Mapping) and len(m) <= MAX_PARAMETERS
            and all(isinstance(k, str) and len(k) <= MAX_STR for k in m) for m in per_model):
        raise JobSpecError("model_parameters", "must be one map of named settings per model "
                           "(or none)")
    _check_nesting([parameters, *per_model])
    try:
        size = len(canonical([dict(parameters), [dict(m) for m in per_model]]))
    except (TypeError, ValueError, OverflowError) as e:
        raise JobSpecError("parameters", f"settings must be plain numbers, lists and maps ({e})") \
            from None
    if size > MAX_PARAMETER_BYTES:
        raise JobSpecError("parameters", f"settings take {size} bytes, more than "
                           f"{MAX_PARAMETER_BYTES}")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise JobSpecError("dtype", f"must be one of {', '.join(FLOAT_DTYPES)} or null")
    name = raw.get("name")
    if name is not None and not (isinstance(name, str) and 0 < len(name) <= MAX_STR):
        raise JobSpecError("name", f"must be a string of 1 to {MAX_STR} characters or null")
    spec = MergeJobSpec(**values, models=tuple(models), base=base, parameters=dict(parameters),
                        model_parameters=tuple(dict(m) for m in per_model), dtype=dtype, name=name)
    if spec.min_peers > spec.max_peers:
        raise JobSpecError("min_peers", "must not exceed max_peers")
    return spec


def _check_nesting(maps: list[Mapping[str, Any]]) -> None:
    """Every setting nests at most MAX_SETTING_DEPTH containers and all of them hold at
    most MAX_SETTING_ITEMS values: walked without recursion, before anything recurses."""
    stack: list[tuple[Any, int]] = [(v, 0) for m in maps for v in m.values()]
    seen = len(stack)
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, tuple, Mapping)):
            if depth >= MAX_SETTING_DEPTH:
                raise JobSpecError("parameters", f"a setting nests more than {MAX_SETTING_DEPTH} "
                                   "lists or maps")
            seen += len(value)
            if seen > MAX_SETTING_ITEMS:
                raise JobSpecError("parameters", f"more than {MAX_SETTING_ITEMS} values in the "
                                   "settings")
            items = value.values() if isinstance(value, Mapping) else value
            stack.extend((v, depth + 1) for v in items)
