"""The loop's side of a sync that switches slots (proto/attach.md): `loop.arrays`
follows the daemon to the slot holding the average, and a view of the slot it left
fails loudly instead of training memory the daemon no longer reads."""

from __future__ import annotations

import numpy as np
import pytest

from lattice.attach import AttachedLoop


class Daemon:
    """Answers `attach.sync` as a daemon whose average landed in slot ``slot``,
    writing ``value`` there first (what the exchange computed)."""

    def __init__(self) -> None:
        self.loop: AttachedLoop | None = None
        self.slot, self.value = 1, 0.5

    def call(self, method: str, **params):
        assert method == "attach.sync" and self.loop is not None
        n = self.loop.manifest.num_params
        self.loop._memory[self.slot * n:(self.slot + 1) * n] = self.value
        return {"round": 1, "outcome": "committed", "changed": True, "slot": self.slot,
                "peers": 1}


def test_a_sync_moves_the_arrays_to_the_slot_holding_the_average():
    daemon = Daemon()
    loop = AttachedLoop(daemon, "job", [("w", "float32", (2, 3)), ("b", "float32", (3,))])
    daemon.loop = loop
    arrays = loop.arrays
    stale = arrays["w"]
    stale[...] = 7.0
    report = loop.sync()
    assert report.changed and loop.active == 1
    assert loop.arrays is arrays  # the same dict, now views of slot 1
    np.testing.assert_array_equal(arrays["w"], np.full((2, 3), 0.5, np.float32))
    assert np.shares_memory(arrays["w"], loop.slot)
    with pytest.raises(ValueError, match="read-only"):
        stale -= 1.0
    arrays["w"] -= 1.0  # the new views train
    np.testing.assert_array_equal(loop.slot[:6], -0.5)


def test_a_sync_that_stays_in_its_slot_keeps_the_arrays():
    daemon = Daemon()
    daemon.slot = 0
    loop = AttachedLoop(daemon, "job", [("w", "float32", (4,))])
    daemon.loop = loop
    w = loop.arrays["w"]
    loop.sync()
    assert loop.active == 0 and loop.arrays["w"] is w and w.flags.writeable
