"""Communication schedules: the averages a job makes, where they fall, and that the
spec refuses what no schedule means."""

import pytest

from lattice.core.jobs import JobSpecError, parse_train_spec
from lattice.learn.schedule import ScheduleSpecError, parse_schedule, steps_until_sync, sync_points


def test_constant_averages_every_sync_every_steps_and_after_the_last():
    assert sync_points("constant", 10, 3) == [3, 6, 9, 10]
    assert sync_points("constant", 600, 2) == list(range(2, 601, 2))


@pytest.mark.parametrize("schedule", ["late", "late:0.3", "late:1", "tail", "tail:0.25", "tail:1"])
@pytest.mark.parametrize("steps,sync_every", [(600, 2), (600, 11), (600, 32), (37, 5), (5, 5), (1, 1)])
def test_every_schedule_keeps_the_budget_and_ends_with_an_average(schedule, steps, sync_every):
    points = sync_points(schedule, steps, sync_every)
    budget = len(sync_points("constant", steps, sync_every))
    assert len(points) <= budget
    assert points == sorted(set(points)) and points[0] >= 1 and points[-1] == steps


def test_late_is_rare_early_and_dense_near_the_end():
    points = sync_points("late", 600, 11)
    gaps = [b - a for a, b in zip([0] + points, points)]
    assert len(points) == 55  # ceil(600 / 11): no average lost to rounding here
    assert gaps[0] > 50 and max(gaps[-10:]) <= 7
    assert all(a >= b - 1 for a, b in zip(gaps, gaps[1:]))  # spacing never grows (up to rounding)
    assert sync_points("late:1", 600, 10) == sync_points("constant", 600, 10)


def test_tail_averages_only_in_the_last_fraction():
    points = sync_points("tail:0.25", 600, 32)
    assert len(points) == 19 and points[0] > 450 and points[-1] == 600


def test_steps_until_sync_walks_the_points_from_any_step():
    points = sync_points("late:0.5", 1000, 7)
    for done in range(0, 1000, 13):
        nxt = next(p for p in points if p > done)
        assert steps_until_sync("late:0.5", 1000, 7, done) == nxt - done
    assert steps_until_sync("late", 1000, 7, 1000) == 0
    # a huge job costs a binary search, not a list of its points
    assert 0 < steps_until_sync("late", 10_000_000, 1, 5_000_000) <= 2


@pytest.mark.parametrize("bad", ["", "late:0", "late:1.5", "tail:-1", "late:nan", "late:x", "constant:2",
                                 "every", "late:inf"])
def test_unknown_or_out_of_range_schedules_are_refused(bad):
    with pytest.raises(ScheduleSpecError):
        parse_schedule(bad)
    with pytest.raises(JobSpecError, match="schedule"):
        parse_train_spec({"task": "digits-mlp", "schedule": bad})


def test_the_spec_accepts_what_the_learning_ring_parses():
    for good in ["constant", "late", "late:0.25", "tail:0.5", "tail:1"]:
        assert parse_train_spec({"task": "digits-mlp", "schedule": good}).schedule == good
        parse_schedule(good)
