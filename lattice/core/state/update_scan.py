"""A bounded pre-scan of Yjs v1 updates, before pycrdt decodes them.

Owns what a received update may contain, checked on the wire: pycrdt's decoder recurses
once per nesting level of a value and overflows its stack (SIGSEGV: no exception, no
log) on ~30,000 nested arrays, which fit in one 256 KiB envelope; and a shared type
nested in another is read back recursively too. Must not import trio, libp2p, pycrdt
or read the clock.

The scan walks the lib0 encoding (Yjs ``encoding.js``; yrs ``updates/decoder.rs``)
without recursion, every count bounded by the bytes left before anything is looped
over, and accepts exactly what our documents hold (`lattice.core.state.document`):
items whose parent is a *root* (a map named by a string) or the item they follow,
holding a deleted range or "any" values that are not arrays or maps (we write bytes),
plus GC and skip ranges and the delete set. Everything else (a nested shared type, a
parent given by an item id, text, JSON, embeds, formats, sub-documents, a nested value)
is refused with `UpdateError`, the only exception `check_update` raises.

Layout (v1)::

    update      = varuint n_clients, n_clients x client_structs, delete_set
    client_structs = varuint n_structs, varuint client, varuint clock, n_structs x struct
    struct      = u8 info, then by info & 0x1f: 0 GC / 10 skip: varuint length;
                  else an item: [id origin if info & 0x80] [id right if info & 0x40]
                  [if neither: varuint parent_kind (1: root name, a varstring; else an
                  item id), varstring key if info & 0x20], content
    delete_set  = varuint n, n x (varuint client, varuint n_ranges,
                  n_ranges x (varuint clock, varuint length))
"""

from __future__ import annotations

MAX_VARUINT = 2**53
"""lib0 numbers are JavaScript numbers: exact up to 2^53."""
MAX_CLOCK = 2**32 - 1
"""yrs keeps clocks as u32; an item past it is no honest peer's."""
_MAX_VARINT_BYTES = 8  # 7 bits each: 56 bits, more than MAX_VARUINT needs

_GC, _DELETED, _ANY, _SKIP = 0, 1, 8, 10
_CONTENT_NAMES = {2: "JSON", 3: "binary", 4: "string", 5: "embed", 6: "format",
                  7: "shared type", 9: "sub-document"}
_HAS_ORIGIN, _HAS_RIGHT_ORIGIN, _HAS_PARENT_SUB = 0x80, 0x40, 0x20
_PARENT_IS_ROOT = 1

# lib0 "any" tags (encoding.js writeAny)
_ANY_FIXED = {127: 0, 126: 0, 121: 0, 120: 0, 124: 4, 123: 8, 122: 8}  # tag -> bytes
_ANY_VARINT, _ANY_STRING, _ANY_MAP, _ANY_ARRAY, _ANY_BUFFER = 125, 119, 118, 117, 116


class UpdateError(ValueError):
    """An update we refuse as a whole. ``reason`` is the statistics key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _malformed(detail: str) -> UpdateError:
    return UpdateError("malformed_update", detail)


def _unsupported(detail: str) -> UpdateError:
    return UpdateError("unsupported_update", detail)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise _malformed("truncated")
        byte = self.data[self.pos]
        self.pos += 1
        return byte

    def skip(self, n: int) -> None:
        if n > self.left:
            raise _malformed(f"{n} bytes announced, {self.left} left")
        self.pos += n

    def varuint(self, limit: int = MAX_VARUINT) -> int:
        value = shift = 0
        for _ in range(_MAX_VARINT_BYTES):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if value > limit:
                    raise _malformed(f"number {value} > {limit}")
                return value
            shift += 7
        raise _malformed("varint longer than 8 bytes")

    def varint(self) -> None:
        """A signed lib0 varint (first byte: continuation, sign, 6 bits)."""
        for _ in range(_MAX_VARINT_BYTES):
            if self.u8() < 0x80:
                return
        raise _malformed("varint longer than 8 bytes")

    def count(self, min_bytes_each: int) -> int:
        """A count of elements that take at least ``min_bytes_each`` bytes each: no
        larger than what is left, so no loop runs longer than the update is long."""
        n = self.varuint()
        if n * min_bytes_each > self.left:
            raise _malformed(f"count {n} exceeds the {self.left} bytes left")
        return n

    def varbytes(self) -> None:
        self.skip(self.varuint())

    def varstring(self) -> str:
        n = self.varuint()
        start = self.pos
        self.skip(n)
        try:
            return self.data[start:self.pos].decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed("string is not UTF-8") from None


def _any_value(r: _Reader) -> None:
    tag = r.u8()
    if tag in _ANY_FIXED:
        r.skip(_ANY_FIXED[tag])
    elif tag == _ANY_VARINT:
        r.varint()
    elif tag == _ANY_STRING:
        r.varstring()
    elif tag == _ANY_BUFFER:
        r.varbytes()
    elif tag in (_ANY_ARRAY, _ANY_MAP):
        raise _unsupported("a nested value (our documents hold bytes)")
    else:
        raise _malformed(f"unknown value tag {tag}")


def _item(r: _Reader, info: int) -> int:
    """Scan one item after its info byte; returns its length in clock ticks."""
    ref = info & 0x1F
    if ref not in (_DELETED, _ANY):
        name = _CONTENT_NAMES.get(ref)
        if name is None:
            raise _malformed(f"unknown content kind {ref}")
        raise _unsupported(f"{name} content (our documents hold maps of bytes)")
    if info & _HAS_ORIGIN:
        r.varuint(), r.varuint(MAX_CLOCK)
    if info & _HAS_RIGHT_ORIGIN:
        r.varuint(), r.varuint(MAX_CLOCK)
    if not info & (_HAS_ORIGIN | _HAS_RIGHT_ORIGIN):
        if r.varuint() != _PARENT_IS_ROOT:
            raise _unsupported("an item inside another item (nested shared types)")
        r.varstring()
        if info & _HAS_PARENT_SUB:
            r.varstring()
    if ref == _DELETED:
        return r.varuint(MAX_CLOCK)
    n = r.count(1)  # values in one item: each takes at least its tag byte
    for _ in range(n):
        _any_value(r)
    return n


def check_update(update: bytes) -> None:
    """Raise `UpdateError` unless ``update`` is a Yjs v1 update made only of what our
    documents hold (module docstring). Linear in ``len(update)``, no recursion."""
    r = _Reader(bytes(update))
    for _ in range(r.count(3)):
        n_structs = r.count(1)
        r.varuint()  # client id
        clock = r.varuint(MAX_CLOCK)
        for _ in range(n_structs):
            info = r.u8()
            if (info & 0x1F) in (_GC, _SKIP):
                length = r.varuint(MAX_CLOCK)
            else:
                length = _item(r, info)
            if length < 1:
                raise _malformed("a struct of length 0")
            clock += length
            if clock > MAX_CLOCK:
                raise _malformed(f"clock {clock} beyond {MAX_CLOCK}")
    for _ in range(r.count(2)):
        r.varuint()  # client id
        for _ in range(r.count(2)):
            r.varuint(MAX_CLOCK), r.varuint(MAX_CLOCK)
    if r.left:
        raise _malformed(f"{r.left} bytes after the update")
