"""msgpack encoding of everything we define: bounded decoding and canonical bytes.

Owns the one way to turn bytes from a peer or the socket into Python values. Never
pickle. Must not import trio or libp2p.

`canonical()` is the byte form that signatures and content ids are computed over:
maps with keys sorted, so two implementations that agree on the value agree on the
bytes (proto/README.md, "Canonical encoding").
"""

from __future__ import annotations

from typing import Any

import msgpack

DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB: control messages; bulk tensors use their own framing


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


def unpack(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Decode one msgpack value or raise DecodeError. Rejects oversized input, trailing
    bytes, ext types and non-str/bytes/int map keys."""
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds limit {max_bytes}")
    try:
        return msgpack.unpackb(
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


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack ext type {code} not allowed here")


def make_unpacker(*, max_bytes: int = DEFAULT_MAX_BYTES) -> msgpack.Unpacker:
    """A streaming unpacker with the same limits as `unpack` (for framed streams)."""
    return msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=max_bytes,
        ext_hook=_refuse_ext,
    )
