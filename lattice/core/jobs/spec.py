"""Job spec parsing shared by every job kind: the error, bounded numbers and strings,
task options. Pure: must not import trio, libp2p, lattice.learn or read the clock.

Each kind declares its spec as a frozen dataclass and parses it with `parse_fields`, so
the same checks run on a spec typed by a user and one received from the network:
unknown fields are refused (a typo must not silently fall back to a default), numbers
are bounded, strings are short.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._\-]{0,63}")
_COMPRESSION_RE = re.compile(r"none|fp16|int8(?::([0-9]{1,9}))?|topk:([0-9.eE+\-]+)")
_OPTION_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_STR = 64


class JobSpecError(ValueError):
    """A job spec that is malformed or out of bounds; ``field`` names the culprit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class FloatBound:
    low: float
    high: float
    low_open: bool = False  # (low, high] rather than [low, high]


@dataclass(frozen=True)
class Fields:
    """A kind's field table: name -> bounds. ``other`` are fields the kind parses
    itself (maps, lists); ``required`` must be present."""

    ints: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    floats: Mapping[str, FloatBound] = field(default_factory=dict)
    strs: tuple[str, ...] = ()
    bools: tuple[str, ...] = ()
    other: tuple[str, ...] = ()
    required: tuple[str, ...] = ()

    @property
    def known(self) -> set[str]:
        return (set(self.ints) | set(self.floats) | set(self.strs) | set(self.bools)
                | set(self.other) | {"kind"})


def parse_fields(raw: Any, kind: str, fields: Fields) -> dict[str, Any]:
    """The checked scalar fields of ``raw`` (absent ones left out: the dataclass
    defaults apply); fields in ``fields.other`` are left to the caller. Raises
    JobSpecError."""
    if not isinstance(raw, Mapping):
        raise JobSpecError("spec", f"must be a map, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in fields.known)
    if unknown:
        raise JobSpecError(unknown[0], "unknown field")
    if raw.get("kind", kind) != kind:
        raise JobSpecError("kind", f"this is a {kind!r} spec, not {raw.get('kind')!r}")
    for name in fields.required:
        if name not in raw:
            raise JobSpecError(name, "is required")
    values: dict[str, Any] = {}
    for name, (lo, hi) in fields.ints.items():
        if name in raw:
            v = raw[name]
            if type(v) is not int or not lo <= v <= hi:
                raise JobSpecError(name, f"must be an integer in [{lo}, {hi}]")
            values[name] = v
    for name, b in fields.floats.items():
        if name in raw:
            v = raw[name]
            if type(v) not in (int, float) or not math.isfinite(v) or v > b.high \
                    or v < b.low or (b.low_open and v == b.low):
                bracket = "(" if b.low_open else "["
                raise JobSpecError(name, f"must be a number in {bracket}{b.low}, {b.high}]")
            values[name] = float(v)
    for name in fields.strs:
        if name in raw:
            v = raw[name]
            if not isinstance(v, str) or len(v) > MAX_STR:
                raise JobSpecError(name, f"must be a string of at most {MAX_STR} characters")
            values[name] = v
    for name in fields.bools:
        if name in raw:
            if type(raw[name]) is not bool:
                raise JobSpecError(name, "must be true or false")
            values[name] = raw[name]
    return values


def parse_options(raw: Any, name: str = "task_options") -> dict[str, Any]:
    """At most 16 named scalar options (bool, number, short string)."""
    if not isinstance(raw, Mapping) or len(raw) > 16:
        raise JobSpecError(name, "must be a map of at most 16 options")
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not _OPTION_RE.fullmatch(k):
            raise JobSpecError(name, f"bad option name {str(k)[:64]!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise JobSpecError(f"{name}.{k}", "must be finite")
        if not isinstance(v, (bool, int, float, str)) or (isinstance(v, str) and len(v) > 256):
            raise JobSpecError(f"{name}.{k}", "must be a bool, number or short string")
        out[k] = v
    return out


def positive(text: str) -> bool:
    """``text`` is a finite number > 0."""
    try:
        x = float(text)
    except ValueError:
        return False
    return math.isfinite(x) and x > 0


def check_compression(value: str, name: str = "compression") -> None:
    """A codec spec's syntax (`lattice.learn.compression` owns its meaning): none,
    fp16, int8[:CHUNK] or topk:RATIO. Raises JobSpecError."""
    m = _COMPRESSION_RE.fullmatch(value)
    bad_chunk = m is not None and m.group(1) is not None and int(m.group(1)) < 1
    bad_ratio = m is not None and m.group(2) is not None and not (
        positive(m.group(2)) and float(m.group(2)) <= 1)
    if m is None or bad_chunk or bad_ratio:
        raise JobSpecError(name, "must be none, fp16, int8[:CHUNK] or topk:RATIO (0 < RATIO <= 1)")
