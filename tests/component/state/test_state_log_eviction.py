"""Evicted authors leave the state log, so a restart does not load them again."""

from lattice.core.identity import Identity
from lattice.core.state import StateLimits
from lattice.net.crdt_sync import open_state
from lattice.testing.hostile.state import Author

NOW = 10_000.0
MiB = 1 << 20


def test_evicted_authors_are_rewritten_out_of_the_log(tmp_path):
    me = Identity.generate()
    limits = StateLimits(max_state_bytes=2 * MiB)
    store, log = open_state(me, tmp_path / "state.log", now=NOW, limits=limits)
    honest = Author()
    store.receive(honest.member(NOW), NOW)
    sybils = [Author(snapshots=False) for _ in range(6)]
    for sybil in sybils:
        for raw in sybil.bulk(MiB - 64 * 1024, NOW):
            store.receive(raw, NOW)
    held = set(store.summary())
    evicted = {s.peer_id for s in sybils} - held
    assert len(evicted) >= 4 and honest.peer_id in held
    assert log.statistics()["compactions"] >= 1
    assert log.size < 3 * MiB  # not the ~6 MiB that arrived
    log.close()

    again, log2 = open_state(me, tmp_path / "state.log", now=NOW, limits=limits)
    assert set(again.summary()) == held  # the evicted are not loaded back
    assert again.statistics()["evicted"] == 0
    log2.close()
