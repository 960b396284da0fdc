"""The pycrdt side of an author's document: read it, copy it, apply and write updates.

Owns every call into pycrdt, so the rest of the state package deals in plain content
(``{root: {key: value}}``). Must not import trio, libp2p or read the clock.

Each root is a pycrdt ``Map`` whose values are ``codec.canonical`` msgpack bytes, not
Yjs "Any" values: Yjs turns every number into a float (``4`` comes back as ``4.0``,
and integers above 2**53 lose precision), while msgpack round-trips ints, floats,
bytes and nesting exactly, and `codec.unpack` bounds what we decode.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import pycrdt
from pycrdt import Array, Doc, Map

from lattice.core.codec import DecodeError, canonical, unpack
from lattice.core.state.limits import MAX_VALUE_BYTES
from lattice.core.state.schema import ROOTS, Change, OutOfBounds, Set, empty_content, split_path
from lattice.core.state.update_scan import UpdateError, check_update

__all__ = ["StateDoc", "UpdateError", "apply_checked", "copy_doc", "encode_value", "read_content",
           "write_delta", "write_snapshot"]

# Roots are typed Any: a received update decides their type; read_content refuses all
# but maps of encoded values.
StateDoc: TypeAlias = Doc[Any]


def copy_doc(doc: StateDoc | None, client_id: int | None = None) -> StateDoc:
    """A copy of ``doc``. Writers pass their own ``client_id``: Yjs encodes deletions as
    ranges per client, so writing every change under a new random client id would make
    each delta carry one more range than the last."""
    out: StateDoc = Doc(client_id=client_id)
    if doc is not None:
        out.apply_update(doc.get_update())
    return out


def apply_checked(base: StateDoc | None, update: bytes, *, scan: bool = True) -> StateDoc:
    """A new document: ``base`` (None: empty) with ``update`` applied. ``base`` is untouched.

    Raises UpdateError: ``malformed_update`` or ``unsupported_update`` if the bounded
    pre-scan (`update_scan.check_update`, run before pycrdt sees a byte: its decoder
    can overflow its stack) refuses it or pycrdt cannot decode it, and ``incomplete`` if
    some of its items depend on items the document does not have: Yjs would keep those
    pending, invisible, and an honest author never sends them. ``scan=False`` skips the
    pre-scan for an update pycrdt itself just wrote (our own).
    """
    if scan:
        check_update(update)
    candidate = copy_doc(base)
    try:
        candidate.apply_update(update)
        # The part of the update the document still lacks: its first varuint is the
        # number of clients with missing items, 0 when everything was integrated.
        residue = pycrdt.get_update(update, candidate.get_state())
    except ValueError as e:
        raise UpdateError("malformed_update", str(e)) from None
    if not residue or residue[0] != 0:
        raise UpdateError("incomplete", "update depends on items the document lacks")
    return candidate


def read_content(doc: StateDoc) -> dict[str, dict[str, Any]]:
    """The document as content; raises OutOfBounds for anything that is not a known root
    holding a map of encoded values (unknown roots, list or text content, nested types)."""
    content = empty_content()
    for root in list(doc.keys()):
        if root not in content:
            raise OutOfBounds(f"{root[:64]!r}: unknown root")
        # A root's type is not part of a Yjs update: the same root read as a list shows
        # content a map reader would never see. Refuse it rather than carry hidden bytes.
        if len(doc.get(root, type=Array)):
            raise OutOfBounds(f"{root}: list content in a map root")
        entries = content[root]
        for key, raw in doc.get(root, type=Map).items():
            if not isinstance(raw, (bytes, bytearray)):
                raise OutOfBounds(f"{root}/{key[:64]}: value is not encoded bytes")
            try:
                entries[key] = unpack(bytes(raw), max_bytes=MAX_VALUE_BYTES)
            except DecodeError as e:
                raise OutOfBounds(f"{root}/{key[:64]}: {e}") from None
    return content


def encode_value(value: Any) -> bytes:
    data = canonical(value)
    if len(data) > MAX_VALUE_BYTES:
        raise ValueError(f"value of {len(data)} bytes exceeds {MAX_VALUE_BYTES}")
    return data


def write_delta(base: StateDoc | None, changes: list[Change], client_id: int) -> bytes:
    """The update that applies ``changes`` to a copy of ``base`` (``base`` is untouched)."""
    doc = copy_doc(base, client_id)
    before = doc.get_state()
    with doc.transaction():
        for change in changes:
            root, key = split_path(change.path)
            target = doc.get(root, type=Map)
            if isinstance(change, Set):
                target[key] = encode_value(change.value)
            elif key in target:
                del target[key]
    return doc.get_update(before)


def write_snapshot(content: dict[str, dict[str, Any]], client_id: int) -> bytes:
    """The update that creates a fresh document holding exactly ``content``."""
    doc: StateDoc = Doc(client_id=client_id)
    with doc.transaction():
        for root in ROOTS:
            entries = content.get(root)
            if entries:
                target = doc.get(root, type=Map)
                for key in sorted(entries):
                    target[key] = encode_value(entries[key])
    return doc.get_update()
