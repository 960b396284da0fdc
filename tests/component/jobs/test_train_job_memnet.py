"""Whole train jobs on the in-memory network: the result matches the in-process
simulation, is published as a content-addressed model anyone can fetch and recompute,
and survives participants that die, restart or get cancelled."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import trio

from lattice.core.jobs import parse_train_spec
from lattice.jobs import NotSubmitter
from lattice.jobs.train import merge_finals
from lattice.learn.merge import loads_safetensors
from lattice.learn.participant import job_partition
from lattice.learn.simulate import simulate
from lattice.learn.tasks import get_task


def _entry(node, job_id, peer=None):
    """``peer``'s participation entry as ``node`` sees it ({} until it arrives)."""
    view = node.store.jobs().get(job_id)
    return {} if view is None else view["participants"].get(peer or node.peer_id, {})


def _model_of(node, job_id):
    models = {mid: rec for mid, rec in node.store.models().items() if rec.get("job") == job_id}
    assert len(models) == 1, models
    return next(iter(models.items()))


async def test_four_daemons_train_merge_and_publish_what_the_simulation_reaches(cluster, autojump_clock, small_job):
    nodes = await cluster.add(4)
    spec = small_job()
    job_id = nodes[0].jobs.submit(spec)
    with trio.fail_after(600):
        summary = await nodes[2].jobs.wait_job(job_id)
    assert summary["status"] == "done"
    await cluster.wait_until(lambda: all(n.store.models() for n in nodes))
    mid, record = _model_of(nodes[3], job_id)
    assert record["missing"] == [] and record["metrics"]["participants"] == 4
    assert record["metrics"]["samples"] == 4 * 60 * 32

    learn_spec = parse_train_spec(spec)  # the simulator runs the very spec the daemons ran
    reference = simulate(learn_spec)
    assert abs(record["metrics"]["accuracy"] - reference.accuracy) < 0.03
    # every participant averaged with others along the way (AD-PSGD), and said so
    await cluster.wait_until(lambda: all(
        e["state"] == "done" for e in nodes[1].jobs.get(job_id)["participants"].values()))
    view = nodes[1].jobs.get(job_id)
    for entry in view["participants"].values():
        assert entry["state"] == "done" and entry["steps"] == 60
        assert entry["exchanges"] > 0 and entry["bytes_sent"] > 0

    # any daemon fetches the model by id; its bytes hash to the id
    data = await nodes[3].jobs.fetch_model(mid)
    assert hashlib.sha256(data).hexdigest() == mid
    task = get_task("digits-softmax")
    arrays, meta = loads_safetensors(data)
    assert meta == {"task": "digits-softmax", "job": job_id}
    params = task.flatten(arrays)
    assert task.evaluate(params, *task.test_data())["accuracy"] == record["metrics"]["accuracy"]

    # anyone holding the inputs and the spec recomputes the same model id (weighting
    # "data": each rank weighs its partition's size, a function of the spec)
    sizes = [len(p) for p in job_partition(learn_spec, task)]
    finals = []
    for item in record["inputs"]:
        blob = await nodes[3].jobs.blobs.fetch(item["blob"], hints=[item["peer"]])
        finals.append((item["rank"], loads_safetensors(blob)[0]["params"], sizes[item["rank"]]))
    assert merge_finals(task, job_id, finals)[1] == mid


async def test_a_participant_killed_mid_job_neither_stalls_it_nor_is_forgotten(cluster, autojump_clock, small_job):
    nodes = await cluster.add(4)
    job_id = nodes[0].jobs.submit(small_job(steps=90))
    victim = nodes[2]
    await cluster.wait_until(lambda: _entry(victim, job_id).get("steps", 0) >= 30)
    victim.crash()
    with trio.fail_after(600):
        summary = await nodes[0].jobs.wait_job(job_id)
    assert summary["status"] == "done"
    # a model counts once its merger's done claim arrived too (the views check both)
    await cluster.wait_until(lambda: nodes[1].store.jobs()[job_id]["model"] is not None)
    _, record = _model_of(nodes[1], job_id)
    assert record["missing"] == [victim.peer_id]
    assert record["metrics"]["participants"] == 3 and record["metrics"]["accuracy"] > 0.85
    # exchanges with the dead peer failed and were retried with others
    stats = [n.jobs.statistics()["gossip"] for n in nodes if n is not victim]
    assert sum(s.get("initiated_failed", 0) for s in stats) >= 1


async def test_the_submitter_cancels_and_every_participant_stops(cluster, autojump_clock, small_job):
    nodes = await cluster.add(4)
    job_id = nodes[1].jobs.submit(small_job(steps=3000))
    await cluster.wait_until(lambda: nodes[1].store.jobs()[job_id]["status"] == "running")
    assert nodes[1].jobs.cancel(job_id)
    with trio.fail_after(5):  # promptly: within a training round and a state push
        await cluster.wait_until(lambda: all(
            e.get("state") == "left" for e in nodes[3].jobs.get(job_id)["participants"].values()))
    view = nodes[3].jobs.get(job_id)
    assert view["status"] == "cancelled"
    assert all(e["reason"] == "cancelled" and e.get("steps", 0) < 3000 for e in view["participants"].values())
    assert all(not n.jobs.statistics()["running"] for n in nodes)
    assert not nodes[1].jobs.cancel(job_id)  # already over
    with pytest.raises(NotSubmitter):
        nodes[3].jobs.cancel(job_id)


async def test_a_restarted_daemon_resumes_from_its_checkpoint(cluster, autojump_clock, small_job):
    nodes = await cluster.add(4)
    job_id = nodes[0].jobs.submit(small_job(steps=90, schedule="constant"))  # rounds of 3 steps
    node = nodes[3]

    def progressed():
        return _entry(node, job_id).get("round", 0) >= 12

    await cluster.wait_until(progressed)
    node.stop_jobs()
    await trio.sleep(1.0)
    await node.start_jobs()
    with trio.fail_after(600):
        summary = await nodes[0].jobs.wait_job(job_id)
    assert summary["status"] == "done"
    await cluster.wait_until(lambda: _entry(nodes[1], job_id, node.peer_id)["state"] == "done")
    entry = _entry(nodes[1], job_id, node.peer_id)
    assert entry["resumed"] == 1 and entry["state"] == "done" and entry["steps"] == 90
    # it went on from its last checkpoint (every 5 rounds of 3 steps), not from scratch
    assert 0 < entry["resumed_from"] < 90 and entry["resumed_from"] % 15 == 0
    _, record = _model_of(nodes[0], job_id)
    assert record["missing"] == [] and record["metrics"]["accuracy"] > 0.85


async def test_a_restart_without_a_checkpoint_leaves_the_job_and_says_so(cluster, autojump_clock, small_job, tmp_path):
    nodes = await cluster.add(4)
    job_id = nodes[0].jobs.submit(small_job(steps=90))
    node = nodes[3]
    await cluster.wait_until(lambda: _entry(node, job_id).get("round", 0) >= 3)
    node.stop_jobs()
    await node.start_jobs(checkpoint_dir=tmp_path / "empty")
    with trio.fail_after(600):
        summary = await nodes[0].jobs.wait_job(job_id)
    assert summary["status"] == "done"
    entry = nodes[1].jobs.get(job_id)["participants"][node.peer_id]
    assert entry["state"] == "left" and "checkpoint" in entry["reason"]
    _, record = _model_of(nodes[0], job_id)
    assert record["missing"] == [node.peer_id]


async def test_only_volunteers_for_the_task_join_and_extra_joiners_step_aside(cluster, autojump_clock, small_job, fast_config):
    picky = await cluster.add(1, config=replace(fast_config, accept_tasks=("digits-mlp",)))
    nodes = await cluster.add(5)
    job_id = nodes[0].jobs.submit(small_job(steps=30))
    with trio.fail_after(600):
        await nodes[0].jobs.wait_job(job_id)
    await cluster.wait_until(lambda: sorted(
        e["state"] for e in nodes[0].jobs.get(job_id)["participants"].values()).count("done") == 4)
    view = nodes[0].jobs.get(job_id)
    assert picky[0].peer_id not in view["participants"]
    assert len(view["roster"]) == 4
    states = {p: e["state"] for p, e in view["participants"].items()}
    assert all(s in ("done", "left") for s in states.values())
    assert [e.get("reason") for e in view["participants"].values() if e["state"] == "left"] in (
        [], ["not_selected"])
    assert np.isfinite(view["accuracy"])


async def test_with_math_in_worker_threads_and_the_real_clock(cluster, small_job):
    """The daemon's configuration: training and averaging in a worker thread. Real
    time (no autojump: a thread's work is invisible to the virtual clock); the bounds
    are generous upper limits, nothing sleeps."""
    nodes = await cluster.add(2, jobs=False)
    for node in nodes:
        await node.start_jobs(compute=None)
    job_id = nodes[0].jobs.submit(small_job(min_peers=2, steps=30))
    with trio.fail_after(60):
        summary = await nodes[1].jobs.wait_job(job_id)
    assert summary["status"] == "done"
    await cluster.wait_until(lambda: nodes[0].store.models(), timeout=30)
    _, record = _model_of(nodes[0], job_id)
    assert record["metrics"]["participants"] == 2 and record["metrics"]["accuracy"] > 0.85


async def test_when_the_merger_dies_the_next_in_rank_takes_over(cluster, autojump_clock, small_job):
    nodes = await cluster.add(4)
    job_id = nodes[0].jobs.submit(small_job(steps=60))
    await cluster.wait_until(lambda: nodes[0].store.jobs()[job_id]["spec"].get("roster"))
    roster = nodes[0].store.jobs()[job_id]["spec"]["roster"]
    merger = next(n for n in nodes if n.peer_id == roster[0])
    crashed = trio.Event()

    def crash_once_final_published(event):
        if not crashed.is_set() and _entry(merger, job_id).get("final"):
            crashed.set()
            merger.crash()  # its final is announced, but it never merges

    merger.store.subscribe(crash_once_final_published)
    with trio.fail_after(600):
        summary = await nodes[(nodes.index(merger) + 1) % 4].jobs.wait_job(job_id)
    assert crashed.is_set() and summary["status"] == "done"
    survivor = next(n for n in nodes if n is not merger)
    await cluster.wait_until(lambda: any(r.get("job") == job_id for r in survivor.store.models().values()))
    _, record = _model_of(survivor, job_id)
    assert record["producer"] == roster[1]
    assert record["missing"] == [merger.peer_id] and record["metrics"]["participants"] == 3


async def test_a_job_nobody_can_run_fails_with_the_reasons(cluster, autojump_clock, small_job, fast_config):
    nodes = await cluster.add(3, config=replace(fast_config, max_params=100))
    job_id = nodes[0].jobs.submit(small_job(min_peers=3))
    with trio.fail_after(60):
        summary = await nodes[1].jobs.wait_job(job_id)
    assert summary["status"] == "failed"
    entries = nodes[1].jobs.get(job_id)["participants"].values()
    assert all(e["state"] == "failed" and "exceed" in e["reason"] for e in entries)
