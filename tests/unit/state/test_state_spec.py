"""proto/crdt-sync.md and the code agree: limits, and the golden envelope vectors."""

import re
from pathlib import Path

from lattice.core.identity import Identity
from lattice.core.state import limits, open_envelope
from lattice.core.state.envelope import seal

SPEC = (Path(__file__).resolve().parents[3] / "proto" / "crdt-sync.md").read_text()


def test_limits_table_matches_the_code():
    table = dict(re.findall(r"^\| `(MAX_[A-Z_]+)` \| (\d+) \|$", SPEC, re.M))
    assert table, "limits table not found"
    assert {name: int(v) for name, v in table.items()} == {
        name: getattr(limits, name) for name in table}
    assert set(table) == {n for n in dir(limits) if n.startswith("MAX_") and n != "MAX_SEQ"}


def test_golden_vectors():
    me = Identity(bytes(range(32)))
    assert me.peer_id in SPEC
    first = seal(me, 1, "delta", b"\x00\x00")
    second = seal(me, 2, "snapshot", b"\x00\x00", first.digest)
    for env in (first, second):
        assert env.digest.hex() in SPEC and env.signature.hex() in SPEC
        assert open_envelope(env.raw).digest == env.digest
