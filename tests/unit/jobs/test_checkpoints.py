"""Checkpoint files keep arrays exactly and metadata as the types it had (no string
round trips), survive a crash mid-write, and refuse what they cannot read back."""

import numpy as np
import pytest

from lattice.jobs.checkpoints import CheckpointError, Checkpoints


def test_arrays_and_typed_metadata_round_trip(tmp_path):
    ck = Checkpoints(tmp_path)
    arrays = {"trainer.params": np.arange(5, dtype=np.float32), "order": np.array([3, 1], np.int64)}
    meta = {"round": 7, "loss": 0.25, "roster": ["a", "b"], "final": None, "kind": {"x": "y"}}
    ck.save("j1", arrays, meta)
    got_arrays, got_meta = ck.load("j1")
    assert got_meta == meta and type(got_meta["round"]) is int
    assert set(got_arrays) == set(arrays)
    for k, v in arrays.items():
        assert got_arrays[k].dtype == v.dtype and np.array_equal(got_arrays[k], v)


def test_missing_is_none_corrupt_is_an_error_and_drop_removes(tmp_path):
    ck = Checkpoints(tmp_path)
    assert ck.load("none") is None
    ck.path("bad").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError):
        ck.load("bad")
    ck.save("j", {}, {"round": 1})
    ck.drop("j")
    assert ck.load("j") is None


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = Checkpoints(tmp_path)
    ck.save("j", {"a": np.zeros(2)}, {"round": 1})

    def crash(*a, **k):
        raise OSError("disk died")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError):
        ck.save("j", {"a": np.ones(2)}, {"round": 2})
    assert ck.load("j")[1] == {"round": 1}


def test_checkpoints_off_without_a_directory():
    ck = Checkpoints(None)
    ck.save("j", {"a": np.zeros(1)}, {})
    assert ck.load("j") is None
