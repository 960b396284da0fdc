"""msgpack encoding of everything we define: bounded decoding and canonical bytes.

Owns the one way to turn bytes from a peer or the socket into Python values. Never
pickle. Must not import trio or libp2p.

`canonical()` is the byte form that signatures and content ids are computed over:
maps with keys sorted, so two implementations that agree on the value agree on the
bytes (proto/README.md, "Canonical encoding").

Bounds on what a peer can make us build: `unpack` refuses input over ``max_bytes``,
and values nested deeper than ``max_depth`` (32). msgpack's own decoder is iterative
(its C stack stops at 1024 levels), but everything that later walks a value in Python
recurses - ``repr``, ``==``, `canonical`, msgpack's packer - and a 1,000-level list
(2 KB on the wire) raised RecursionError in a handler. Integers need no bound here:
msgpack cannot encode one outside [-2**63, 2**64).
"""

from __future__ import annotations

from typing import Any

import msgpack

DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB: control messages; bulk tensors use their own framing
# Deepest nesting of lists and maps we decode. Our deepest message (a DHT answer) is 4
# levels; replicated values and local RPC params get the rest. Python recursion (1000
# frames) stays far away.
DEFAULT_MAX_DEPTH = 32


class DecodeError(ValueError):
    """Bytes that do not decode to a value of the allowed shape or size."""


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=_sort_key)}
    if isinstance(value, (list, tuple)):
        return [_sorted(v) for v in value]
    return value


def _sort_key(key: Any) -> tuple[int, Any]:
    # keys of mixed type sort by type first so the order is total
    if isinstance(key, str):
        return (0, key)
    if isinstance(key, bytes):
        return (1, key)
    if isinstance(key, int):
        return (2, key)
    raise TypeError(f"unsupported map key type {type(key).__name__}")


def canonical(value: Any) -> bytes:
    """Deterministic msgpack: sorted map keys, bin for bytes, no floats folded."""
    return msgpack.packb(_sorted(value), use_bin_type=True)


def unpack(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES,
           max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Decode one msgpack value or raise DecodeError. Rejects oversized input, trailing
    bytes, ext types, map keys other than str/bytes, and nesting beyond ``max_depth``."""
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds limit {max_bytes}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
        )
    except DecodeError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        # ValueError covers truncated input ("Unpack failed: incomplete input"),
        # invalid utf-8 in str and limit violations.
        raise DecodeError(f"malformed msgpack: {e}") from None
    check_depth(value, max_depth)
    return value


def check_depth(value: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """DecodeError if lists and maps nest deeper than ``max_depth`` in a decoded value
    (a scalar is depth 0, ``[1]`` depth 1). Iterative, so it cannot itself overflow; a
    long container without nested ones costs one C-speed pass (`set(map(type, ...))`)."""
    if type(value) is not list and type(value) is not dict:
        return
    stack = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        container, depth = pop()
        if depth > max_depth:
            raise DecodeError(f"value nested deeper than {max_depth} levels")
        items = container.values() if type(container) is dict else container
        if len(items) > 16:
            kinds = set(map(type, items))
            if list not in kinds and dict not in kinds:
                continue
        for item in items:
            if type(item) is list or type(item) is dict:
                push((item, depth + 1))


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack ext type {code} not allowed here")


def make_unpacker(*, max_bytes: int = DEFAULT_MAX_BYTES) -> msgpack.Unpacker:
    """A streaming unpacker with the byte limit of `unpack` (for plain msgpack streams).
    It cannot bound depth itself: pass every value it yields through `check_depth`."""
    return msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=max_bytes,
        ext_hook=_refuse_ext,
    )
