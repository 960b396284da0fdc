"""The merge share planner divides tensors by bytes and hands a lost participant's
unfinished share to the others, the same way on every daemon."""

import pytest

from lattice.core.mergeshares import plan_shares, reassign, share_bytes

TENSORS = {f"layers.{i}.w": 100 * (i + 1) for i in range(12)} | {"embed": 2000, "norm": 4}


def test_every_tensor_goes_to_exactly_one_participant_and_bytes_balance():
    shares = plan_shares(TENSORS, ["p1", "p2", "p3"])
    names = [n for s in shares.values() for n in s]
    assert sorted(names) == sorted(TENSORS)
    loads = share_bytes(shares, TENSORS).values()
    assert max(loads) - min(loads) <= max(TENSORS.values())  # LPT: within one tensor
    assert plan_shares(TENSORS, ["p1", "p2", "p3"]) == shares  # deterministic
    assert plan_shares(TENSORS, ["solo"]) == {"solo": sorted(TENSORS)}


def test_a_dead_participants_unfinished_tensors_move_and_the_rest_stay():
    shares = plan_shares(TENSORS, ["p1", "p2", "p3"])
    done = set(shares["p2"][:1])
    after = reassign(shares, TENSORS, gone=["p2"], done=done)
    assert set(after) == {"p1", "p3"}
    for p in ("p1", "p3"):
        assert set(shares[p]) <= set(after[p])
    moved = {n for p in ("p1", "p3") for n in after[p]} - set(shares["p1"]) - set(shares["p3"])
    assert moved == set(shares["p2"]) - done
    with pytest.raises(ValueError):
        reassign(shares, TENSORS, gone=["p1", "p2", "p3"])
