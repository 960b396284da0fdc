"""A train job with a communication schedule, drift correction and data weighting runs
through the real runner (replicated state, gossip averaging, blobs, merge) and follows
the schedule the learning ring gives: as many rounds as sync points, every step trained,
the same model quality as the in-process simulation of the same spec."""

from __future__ import annotations

import trio

from lattice.core.jobs import parse_train_spec
from lattice.learn.schedule import sync_points
from lattice.learn.simulate import simulate


async def test_a_late_scheduled_logit_adjusted_job_follows_its_schedule(cluster, autojump_clock, small_job):
    nodes = await cluster.add(4)
    options = dict(steps=60, sync_every=2, schedule="late:0.3", correction="logit-adjust", weighting="data",
                   partition="dirichlet:0.3", compression="int8")
    spec = small_job(**options)
    job_id = nodes[0].jobs.submit(spec)
    with trio.fail_after(600):
        summary = await nodes[1].jobs.wait_job(job_id)
    assert summary["status"] == "done"
    points = sync_points("late:0.3", 60, 2)
    # rare early, dense late, fewer averages than constant's 30: a round count only this schedule gives
    assert points[0] == 22 and len(points) == 26
    await cluster.wait_until(lambda: all(
        e["state"] == "done" for e in nodes[2].jobs.get(job_id)["participants"].values()))
    view = nodes[2].jobs.get(job_id)
    for entry in view["participants"].values():
        # one round per sync point: the runner asked the learning ring how long each is
        assert entry["steps"] == 60 and entry["round"] == len(points)
        assert entry["exchanges"] > 0
    record = next(iter(view["models"].values()))
    assert record["missing"] == [] and record["metrics"]["participants"] == 4

    reference = simulate(parse_train_spec(spec))  # the very spec the daemons ran
    assert abs(record["metrics"]["accuracy"] - reference.accuracy) < 0.05
