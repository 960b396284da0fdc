"""A small simulated job: gossip beats no communication on label-skewed data, and the
result is a deterministic, recomputable model."""

import dataclasses

import numpy as np
import pytest

from lattice.core.jobs import TrainSpec
from lattice.learn.merge import model_id, weighted_average
from lattice.learn.participant import job_partition, make_participant, merge_weights, participant_round
from lattice.learn.schedule import sync_points
from lattice.learn.simulate import centralized_baseline, final_merge, simulate, sync_pair
from lattice.learn.tasks import get_task

SMALL = TrainSpec(task="digits-mlp", task_options={"hidden": 16}, min_peers=4, steps=80, batch=16, lr=0.05,
                  momentum=0.5, sync_every=3, partition="dirichlet:0.1", seed=1)


@pytest.fixture(scope="module")
def task():
    return get_task(SMALL.task, **SMALL.task_options)


def test_gossip_beats_no_communication_on_a_dirichlet_split(task):
    gossip = simulate(SMALL, task)
    alone = simulate(dataclasses.replace(SMALL, algorithm="none"), task)
    assert gossip.accuracy > alone.accuracy + 0.15  # measured: 0.91 vs 0.66
    assert alone.bytes_gossip == 0 and gossip.bytes_gossip > 0
    assert gossip.exchanges == 2 * 27  # 2 pairs per round, ceil(80 / 3) rounds
    # without communication the local models are specialists; gossip makes them agree
    assert np.mean(alone.participant_accuracy) < np.mean(gossip.participant_accuracy)


def test_simulation_is_deterministic_and_reports_per_step_metrics(task):
    a, b = simulate(SMALL, task), simulate(SMALL, task)
    assert a.model_id == b.model_id and a.accuracy == b.accuracy
    assert len(a.steps) == SMALL.steps
    assert all(np.isfinite(s["loss"]) for s in a.steps)
    assert a.steps[-1]["bytes_sent"] == a.bytes_gossip
    assert sum(a.partition_sizes) == len(task.train_data()[1])
    assert a.model_id != simulate(dataclasses.replace(SMALL, seed=2), task).model_id


def test_compressed_noloco_job_runs_and_sends_fewer_bytes(task):
    plain = simulate(dataclasses.replace(SMALL, partition="iid"), task)
    packed = simulate(dataclasses.replace(SMALL, partition="iid", algorithm="noloco", compression="int8"), task)
    assert packed.bytes_gossip < plain.bytes_gossip / 3
    assert packed.accuracy > 0.8


def test_building_blocks_run_on_their_own(task):
    spec = dataclasses.replace(SMALL, steps=7, sync_every=5)
    p, q = make_participant(spec, task, 0), make_participant(spec, task, 1)
    assert len(participant_round(p, spec)) == 5 and len(participant_round(p, spec)) == 2  # capped at steps
    assert participant_round(p, spec) == []
    participant_round(q, spec)
    sent = sync_pair(p, q, spec)
    assert sent == p.bytes_sent + q.bytes_sent > 0
    assert p.trainer.params.tobytes() == q.trainer.params.tobytes()
    merged, mid = final_merge([q, p], task)
    expected = weighted_average([p.trainer.params, q.trainer.params], [p.trainer.samples_seen, q.trainer.samples_seen])
    assert merged.tobytes() == expected.tobytes()
    assert mid == model_id(task.unflatten(merged), {"task": task.name})


def test_centralized_baseline_uses_the_same_total_samples(task):
    base = centralized_baseline(task, SMALL.total_samples + 5, batch=16, lr=0.05, momentum=0.5, seed=1)
    assert base.total_samples == SMALL.total_samples and base.steps == SMALL.total_samples // 16
    assert base.accuracy > 0.85


@pytest.mark.parametrize("bad", [dict(algorithm="allreduce"), dict(steps=0), dict(partition="shards"),
                                 dict(compression="zip"), dict(weighting="median"), dict(schedule="often"),
                                 dict(correction="fedprox")])
def test_the_simulator_refuses_what_the_learning_ring_cannot_run(bad, task):
    with pytest.raises(ValueError):
        simulate(dataclasses.replace(SMALL, **bad), task)


def test_data_weighting_keeps_the_dataset_weighted_mean_and_merges_by_partition_size(task):
    spec = dataclasses.replace(SMALL, steps=6, weighting="data")
    parts = job_partition(spec, task)
    sizes = np.array([len(p) for p in parts], np.float64)
    assert len(set(sizes)) > 1  # Dirichlet(0.1): unequal parts, the case this is for
    people = [make_participant(spec, task, r, parts) for r in range(4)]
    for p in people:
        participant_round(p, spec)
    assert [p.averaging_samples for p in people] == list(sizes)

    def weighted_mean():
        return sum(s * p.trainer.params.astype(np.float64) for s, p in zip(sizes, people)) / sizes.sum()

    before = weighted_mean()
    sync_pair(people[0], people[3], spec)
    sync_pair(people[1], people[2], spec)
    np.testing.assert_allclose(weighted_mean(), before, rtol=1e-5, atol=1e-6)
    merged, _ = final_merge(people, task)
    np.testing.assert_allclose(merged, before, rtol=1e-5, atol=1e-6)
    assert merge_weights("data", [(0, 999), (3, 5)], people[2].part_sizes) == [sizes[0], sizes[3]]
    assert merge_weights("uniform", [(0, 999), (3, 5)], people[2].part_sizes) == [999, 5]


def test_a_late_schedule_averages_where_the_schedule_says_within_the_same_budget(task):
    constant = simulate(dataclasses.replace(SMALL, sync_every=8, schedule="constant"), task)
    late = simulate(dataclasses.replace(SMALL, sync_every=8, schedule="late"), task)
    points = sync_points("late", SMALL.steps, 8)
    assert late.exchanges == 2 * len(points) <= constant.exchanges == 2 * 10
    averaged_at = [int(s["step"]) for a, s in zip([{"bytes_sent": 0.0}] + late.steps, late.steps)
                   if s["bytes_sent"] > a["bytes_sent"]]
    assert averaged_at == points
    assert late.bytes_gossip <= constant.bytes_gossip
