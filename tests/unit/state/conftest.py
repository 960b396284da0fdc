"""Helpers for the state tests: forge envelopes the honest write path would refuse."""

import pytest
from pycrdt import Doc, Map

from lattice.core.codec import canonical
from lattice.core.identity import Identity
from lattice.core.state.envelope import KIND_DELTA, seal


def forge(identity: Identity, seq: int, entries: dict, *, after=None, kind: str = KIND_DELTA,
          encode: bool = True):
    """Sign an arbitrary write ``{(root, key): value}`` as ``identity``, building on
    ``after`` (the previous ``(envelope, doc)``); returns ``(envelope, doc)``."""
    doc = Doc()
    if after is not None:
        doc.apply_update(after[1].get_update())
    before = doc.get_state() if kind == KIND_DELTA else b"\x00"
    with doc.transaction():
        for (root, key), value in entries.items():
            doc.get(root, type=Map)[key] = canonical(value) if encode else value
    prev = after[0].digest if after is not None else (b"" if seq == 1 else b"\x00" * 32)
    return seal(identity, seq, kind, doc.get_update(before), prev), doc


@pytest.fixture
def forger():
    return forge
