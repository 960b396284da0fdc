"""What a merge is: method, inputs, parameters — from CLI arguments or a mergekit YAML
config — and the parameters of each tensor. Spec: proto/merge.md.

Owns `MergeSpec` (method, base, models in order, parameter settings as mergekit writes
them: scalars, layer gradients as lists, per-tensor ``filter`` entries; output dtype),
the parameter table of every method (scope, type, default, range), reading mergekit's
YAML subset (anything else is refused by name, never ignored), resolving a tensor's
parameters, and the canonical JSON that goes into a merged model's metadata so anyone
can recompute it. Pure: must not import trio, libp2p or sockets; reads no clock.
PyYAML's safe loader only, with aliases refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lattice.learn.merge import MERGE_METHODS
from lattice.learn.modelfile import FLOAT_TAGS, canonical_json

MAX_CONFIG_BYTES = 256 * 1024
MAX_SETTING_ITEMS = 1024
MAX_MODELS = 64
METADATA_KEY = "lattice.merge"
"""The merged model's metadata key holding `MergeSpec.to_json()`."""
SPEC_VERSION = 1
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
"""Tensors of transformer layer i (`model.layers.i.…`): layer gradients apply to them."""

DTYPE_NAMES = {"float32": "F32", "fp32": "F32", "float": "F32", "float16": "F16", "fp16": "F16",
               "half": "F16", "bfloat16": "BF16", "bf16": "BF16", "float64": "F64", "double": "F64",
               **{t: t for t in FLOAT_TAGS}}


class MergeSpecError(ValueError):
    """A merge request that cannot be carried out as asked; the message names the
    offending method, key or parameter."""


@dataclass(frozen=True)
class Param:
    name: str
    per_model: bool
    kind: str  # float | bool | int
    default: Any = None  # None: required
    check: Callable[[Any], str | None] | None = None


def _unit(lo_open: bool, hi_open: bool) -> Callable[[Any], str | None]:
    def check(v: float) -> str | None:
        ok = (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
        return None if ok else f"must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"
    return check


_WEIGHT = Param("weight", True, "float", 1.0)
_DENSITY = Param("density", True, "float", 1.0, _unit(True, False))
_LAMBDA = Param("lambda", False, "float", 1.0)
_INT8 = Param("int8_mask", False, "bool", False)  # a memory saving in mergekit: no effect on results
_SEED = Param("seed", False, "int", 0, lambda v: None if 0 <= v < 1 << 63 else "must be in [0, 2^63)")


def _gta(normalize: bool, rescale: bool, *extra: Param, seed: bool = False) -> tuple[Param, ...]:
    return (_WEIGHT, _DENSITY, *extra, _LAMBDA, Param("normalize", False, "bool", normalize),
            Param("rescale", False, "bool", rescale), _INT8, *((_SEED,) if seed else ()))


@dataclass(frozen=True)
class Method:
    params: tuple[Param, ...]
    base: str  # required | optional | forbidden
    models: tuple[int, int]  # non-base models: min, max


METHODS: dict[str, Method] = {
    "linear": Method((_WEIGHT, Param("normalize", False, "bool", True)), "forbidden", (1, MAX_MODELS)),
    "slerp": Method((Param("t", False, "float", None, _unit(False, False)),), "optional", (1, 2)),
    "task_arithmetic": Method((_WEIGHT, _LAMBDA, Param("normalize", False, "bool", False), _INT8),
                              "required", (1, MAX_MODELS)),
    "ties": Method(_gta(True, False), "required", (1, MAX_MODELS)),
    "dare_linear": Method(_gta(False, True, seed=True), "required", (1, MAX_MODELS)),
    "dare_ties": Method(_gta(False, True, seed=True), "required", (1, MAX_MODELS)),
    "breadcrumbs": Method(_gta(False, False, Param("gamma", True, "float", 0.01, _unit(False, True))),
                          "required", (1, MAX_MODELS)),
    "della": Method(_gta(True, True, Param("epsilon", True, "float", 0.15, _unit(False, True)), seed=True),
                    "required", (1, MAX_MODELS)),
    "model_stock": Method((Param("filter_wise", False, "bool", False),), "required", (2, MAX_MODELS)),
    "nuslerp": Method((_WEIGHT, Param("nuslerp_flatten", False, "bool", True),
                       Param("nuslerp_row_wise", False, "bool", False)), "optional", (2, 2)),
}
assert set(METHODS) == set(MERGE_METHODS)


# -- settings (mergekit's ParameterSetting) ---------------------------------------------------


def _scalar(param: Param, value: Any, where: str) -> Any:
    if param.kind == "bool":
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
    elif param.kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise MergeSpecError(f"{where}: {param.name} must be {param.kind}, got {str(value)[:40]!r}")


def _setting(param: Param, value: Any, where: str, depth: int = 0) -> Any:
    """A validated, normalized copy of a setting: a scalar, a gradient (list of
    scalars), {filter, value}, or a list of those."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"filter", "value"}
        if unknown or "value" not in value:
            raise MergeSpecError(f"{where}: {param.name}: a conditional setting has exactly 'value' and "
                                 f"an optional 'filter' (got {sorted(map(str, value))})")
        flt = value.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise MergeSpecError(f"{where}: {param.name}: filter must be a string")
        if depth > 1:
            raise MergeSpecError(f"{where}: {param.name}: conditional settings do not nest")
        out = {"value": _setting(param, value["value"], where, depth + 1)}
        if flt is not None:
            out["filter"] = flt
        return out
    if isinstance(value, list):
        if len(value) > MAX_SETTING_ITEMS:
            raise MergeSpecError(f"{where}: {param.name}: more than {MAX_SETTING_ITEMS} entries")
        if all(not isinstance(v, (list, Mapping)) for v in value):
            return [_scalar(param, v, where) for v in value]
        if depth > 0 or not all(isinstance(v, Mapping) for v in value):
            raise MergeSpecError(f"{where}: {param.name}: a list is a gradient of scalars or a list of "
                                 "{filter, value} entries")
        return [_setting(param, v, where, depth + 1) for v in value]
    return _scalar(param, value, where)


def _evaluate(setting: Any, tensor: str, t: float) -> Any:
    """mergekit's evaluate_setting: None when nothing applies to ``tensor``."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if not isinstance(setting[0], dict):  # a gradient over the layers
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor and flt in tensor):
            return _evaluate(cond["value"], tensor, t)
    return None


# -- the spec -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeSpec:
    """A merge: `method` over `models` (non-base, in order) and optional `base`, all
    model ids (or references before `resolve_refs`); parameter settings globally and
    per model; the output dtype (None: each tensor keeps its input's)."""

    method: str
    models: tuple[str, ...]
    base: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    model_parameters: tuple[dict[str, Any], ...] = ()

    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MergeSpecError(f"unknown merge method {self.method!r}: Lattice has {', '.join(MERGE_METHODS)}")
        m = METHODS[self.method]
        if not self.model_parameters:
            object.__setattr__(self, "model_parameters", tuple({} for _ in self.models))
        if len(self.model_parameters) != len(self.models):
            raise MergeSpecError("one parameter map per model")
        if m.base == "required" and self.base is None:
            raise MergeSpecError(f"{self.method} needs a base model")
        if m.base == "forbidden" and self.base is not None:
            raise MergeSpecError(f"{self.method} does not use a base model (base_model)")
        lo, hi = m.models
        if self.method == "slerp":
            lo = hi = 1 if self.base is not None else 2
        if not lo <= len(self.models) <= hi:
            raise MergeSpecError(f"{self.method} merges {lo if lo == hi else f'{lo} to {hi}'} model(s)"
                                 f"{' besides the base' if self.base else ''}, got {len(self.models)}")
        table = {p.name: p for p in m.params}
        params = {}
        for name, value in self.parameters.items():
            p = table.get(name)
            if p is None:
                raise MergeSpecError(f"parameter {name!r} is not a parameter of {self.method}")
            params[name] = _setting(p, value, "parameters")
        object.__setattr__(self, "parameters", params)
        per_model = []
        for i, settings in enumerate(self.model_parameters):
            checked = {}
            for name, value in settings.items():
                p = table.get(name)
                if p is None or not p.per_model:
                    raise MergeSpecError(f"models[{i}]: {name!r} is not a per-model parameter of {self.method}")
                checked[name] = _setting(p, value, f"models[{i}]")
            per_model.append(checked)
        object.__setattr__(self, "model_parameters", tuple(per_model))
        if self.dtype is not None and self.dtype not in FLOAT_TAGS:
            raise MergeSpecError(f"dtype {self.dtype!r}: the output dtype is one of {', '.join(FLOAT_TAGS)}")

    # construction ------------------------------------------------------------------------------
    @classmethod
    def from_arguments(cls, method: str, models: Sequence[str], *, base: str | None = None,
                       weights: Sequence[float] | None = None, dtype: str | None = None,
                       **params: Any) -> MergeSpec:
        """The spec of `lattice models merge --method M --models A B [--base C]
        [--weights ...] [--density d] [--lambda l] [--t t] ...`: scalar parameters,
        weights per model."""
        if weights is not None and len(weights) != len(models):
            raise MergeSpecError(f"{len(weights)} weights for {len(models)} models")
        per_model: tuple[dict[str, Any], ...] = (
            tuple({"weight": w} for w in weights) if weights is not None else tuple({} for _ in models))
        if dtype is not None:
            dtype = _dtype(dtype, "dtype")
        return cls(method, tuple(models), base, {k: v for k, v in params.items() if v is not None}, per_model, dtype)

    @classmethod
    def from_request(cls, doc: Any) -> MergeSpec:
        """The spec a client sends as a map (`models.merge`'s ``spec``, a merge job's
        request): method, models, base, weights, dtype, parameters; references are
        left as given (`with_ids` resolves them)."""
        if not isinstance(doc, Mapping):
            raise MergeSpecError("a merge spec is a map")
        unknown = set(doc) - {"method", "models", "base", "weights", "dtype", "parameters"}
        if unknown:
            raise MergeSpecError(f"unknown spec field(s): {', '.join(sorted(map(str, unknown)))}")
        method, models = doc.get("method"), doc.get("models")
        if not isinstance(method, str) or not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise MergeSpecError("spec needs method (str) and models (list of ids or names)")
        if len(models) > MAX_MODELS:
            raise MergeSpecError(f"more than {MAX_MODELS} models")
        weights = doc.get("weights")
        if weights is not None and (not isinstance(weights, list) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
            raise MergeSpecError("weights must be a list of numbers")
        params = doc.get("parameters") or {}
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise MergeSpecError("parameters must be a map")
        clash = sorted(set(params) & {"method", "models", "base", "weights", "dtype"})
        if clash:
            raise MergeSpecError(f"parameter {clash[0]!r} is not a parameter of {method}")
        base = doc.get("base")
        if base is not None and not isinstance(base, str):
            raise MergeSpecError("base must be a model id or name")
        return cls.from_arguments(method, models, base=base, weights=weights, dtype=doc.get("dtype"), **params)

    @classmethod
    def from_yaml(cls, text: str, resolve: Callable[[str], str] = lambda ref: ref) -> MergeSpec:
        """mergekit's YAML config, for the subset these methods use; ``resolve`` maps a
        model reference to a model id (raising MergeSpecError)."""
        import yaml

        if len(text.encode()) > MAX_CONFIG_BYTES:
            raise MergeSpecError(f"config larger than {MAX_CONFIG_BYTES} bytes")

        class Loader(yaml.SafeLoader):
            def compose_node(self, parent: Any, index: Any) -> Any:
                if self.check_event(yaml.AliasEvent):
                    raise MergeSpecError("YAML aliases (*name) are not supported")
                return super().compose_node(parent, index)

        try:
            doc = yaml.load(text, Loader=Loader)
        except (yaml.YAMLError, RecursionError) as e:
            raise MergeSpecError(f"not valid YAML: {str(e)[:200]}") from None
        if not isinstance(doc, dict):
            raise MergeSpecError("a merge config is a YAML mapping")
        for key in ("slices", "modules", "tokenizer_source", "tokenizer", "chat_template"):
            if key in doc:
                raise MergeSpecError(f"{key!r} is not supported by Lattice merges")
        unknown = set(doc) - {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype"}
        if unknown:
            raise MergeSpecError(f"unknown config key(s): {', '.join(sorted(map(str, unknown)))}")
        method = doc.get("merge_method")
        if not isinstance(method, str):
            raise MergeSpecError("merge_method is required")
        base = _ref(doc["base_model"], "base_model", resolve) if doc.get("base_model") is not None else None
        entries = doc.get("models")
        if not isinstance(entries, list) or not entries:
            raise MergeSpecError("models: a non-empty list is required")
        if len(entries) > MAX_MODELS:
            raise MergeSpecError(f"more than {MAX_MODELS} models")
        models, per_model = [], []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "model" not in entry:
                raise MergeSpecError(f"models[{i}]: each entry is a mapping with 'model'")
            extra = set(entry) - {"model", "parameters"}
            if extra:
                raise MergeSpecError(f"models[{i}]: {', '.join(sorted(map(str, extra)))} not supported")
            mid = _ref(entry["model"], f"models[{i}]", resolve)
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                raise MergeSpecError(f"models[{i}].parameters must be a mapping")
            if mid == base:
                continue  # the base listed among the models, as mergekit configs do
            models.append(mid)
            per_model.append(params)
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergeSpecError("parameters must be a mapping")
        dtype = doc.get("out_dtype") if doc.get("out_dtype") is not None else doc.get("dtype")
        return cls(method, tuple(models), base, params, tuple(per_model),
                   _dtype(dtype, "dtype") if dtype is not None else None)

    # the canonical form -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"version": SPEC_VERSION, "method": self.method, "base": self.base, "models": list(self.models),
                "parameters": self.parameters, "model_parameters": list(self.model_parameters),
                "dtype": self.dtype}

    def canonical(self) -> str:
        return canonical_json(self.to_json()).decode()

    @classmethod
    def from_json(cls, doc: Any) -> MergeSpec:
        if not isinstance(doc, dict) or doc.get("version") != SPEC_VERSION:
            raise MergeSpecError("not a version-1 merge spec")
        try:
            return cls(doc["method"], tuple(doc["models"]), doc.get("base"), dict(doc.get("parameters") or {}),
                       tuple(dict(m) for m in doc.get("model_parameters") or ()), doc.get("dtype"))
        except (KeyError, TypeError) as e:
            raise MergeSpecError(f"malformed merge spec: {e}") from None

    def with_ids(self, resolve: Callable[[str], str]) -> MergeSpec:
        return MergeSpec(self.method, tuple(resolve(m) for m in self.models),
                         resolve(self.base) if self.base is not None else None, self.parameters,
                         self.model_parameters, self.dtype)

    # per tensor -----------------------------------------------------------------------------------
    @staticmethod
    def layer_count(names: Sequence[str]) -> int:
        """Transformer layers in a model, from its tensor names (0: none)."""
        found = [int(m.group(1)) for n in names if (m := LAYER_RE.search(n))]
        return max(found) + 1 if found else 0

    @staticmethod
    def layer_t(name: str, layers: int) -> float:
        """Where a tensor sits for layer gradients: layer i of L -> i / (L - 1); tensors
        outside the layers (embeddings, final norm, head) -> 0, as mergekit does."""
        m = LAYER_RE.search(name)
        if m is None:
            return 0.0
        return int(m.group(1)) / (layers - 1) if layers > 1 else 1.0

    def resolve(self, tensor: str, layers: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(shared parameters, one map per model) of ``tensor`` in a model of ``layers``
        layers. Raises MergeSpecError naming the tensor and parameter."""
        t = self.layer_t(tensor, layers)
        shared: dict[str, Any] = {}
        per_model: list[dict[str, Any]] = [{} for _ in self.models]
        for p in METHODS[self.method].params:
            if not p.per_model:
                shared[p.name] = self._value(p, [self.parameters], tensor, t)
            else:
                for i, own in enumerate(self.model_parameters):
                    per_model[i][p.name] = self._value(p, [own, self.parameters], tensor, t)
        if self.method == "della":
            for i, m in enumerate(per_model):
                if m["density"] < 1 and not (m["density"] - m["epsilon"] > 0 and m["density"] + m["epsilon"] < 1):
                    raise MergeSpecError(f"tensor {tensor!r}: della needs 0 < density ± epsilon < 1 "
                                         f"(model {i}: density {m['density']}, epsilon {m['epsilon']})")
        return shared, per_model

    @staticmethod
    def _value(p: Param, scopes: list[dict[str, Any]], tensor: str, t: float) -> Any:
        for scope in scopes:
            if p.name in scope:
                value = _evaluate(scope[p.name], tensor, t)
                if value is not None:
                    break
        else:
            value = None
        if value is None:
            if p.default is None:
                raise MergeSpecError(f"tensor {tensor!r}: parameter {p.name!r} is required")
            value = p.default
        if p.kind == "float":
            value = float(value)
        if p.check is not None and (problem := p.check(value)):
            raise MergeSpecError(f"tensor {tensor!r}: {p.name} = {value} {problem}")
        return value


def _ref(value: Any, where: str, resolve: Callable[[str], str]) -> str:
    if isinstance(value, dict):
        raise MergeSpecError(f"{where}: a model reference is a model id or name")
    if not isinstance(value, str) or not value:
        raise MergeSpecError(f"{where}: a model reference is a model id or name")
    if "+" in value:
        raise MergeSpecError(f"{where}: LoRA references ({value!r}) are not supported")
    if "@" in value:
        raise MergeSpecError(f"{where}: revisions ({value!r}) are not supported")
    return resolve(value)


def _dtype(value: Any, where: str) -> str:
    tag = DTYPE_NAMES.get(str(value))
    if tag is None:
        raise MergeSpecError(f"{where} {value!r} is not supported: use float32, float16, bfloat16 or float64")
    return tag
