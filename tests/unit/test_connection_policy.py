"""The connection manager's water marks (`lattice.core.connections`)."""

import random

import pytest

from lattice.core.connections import WaterMarks, choose_trims

MARKS = WaterMarks(low=4, high=8, grace=10.0)


def test_nothing_is_trimmed_at_or_below_the_high_water_mark():
    opened = {f"p{i}": 0.0 for i in range(8)}
    assert choose_trims(opened, set(), MARKS, 100.0, random.Random(0)) == []


def test_above_high_water_unprotected_old_connections_go_down_to_low_water():
    opened = {f"p{i}": 0.0 for i in range(12)}
    protected = {"p0", "p1", "p2"}
    trims = choose_trims(opened, protected, MARKS, 100.0, random.Random(0))
    assert len(trims) == 8 and not set(trims) & protected


def test_protected_and_young_connections_are_kept_even_if_that_stays_above_low_water():
    opened = {f"p{i}": 0.0 for i in range(6)} | {f"new{i}": 95.0 for i in range(6)}
    protected = {"p0", "p1", "p2", "p3"}
    trims = choose_trims(opened, protected, MARKS, 100.0, random.Random(0))
    assert sorted(trims) == ["p4", "p5"]  # the young ones are in their grace period


def test_water_marks_must_be_ordered():
    with pytest.raises(ValueError):
        WaterMarks(low=10, high=5)
