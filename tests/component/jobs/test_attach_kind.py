"""The attach kind over the in-memory network: loops (driven here as the local API
would drive them, on plain arrays instead of shared memory) join a job, start from
the same weights, average every round, and the merger publishes the weighted average
of their finals; a mismatching loop is refused naming the tensor; a loop that goes
away makes its daemon leave while the others finish."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from lattice.core.jobs import STATUS_ORDER
from lattice.core.jobs.attach import manifest_of
from lattice.jobs.attach import LoopSession, SessionError, _apply_delta, _LoopParams
from lattice.learn.merge import loads_safetensors

SHAPES = {"w": (3, 2), "b": (2,)}


def manifest_for(shapes):
    return manifest_of([(n, "float32", s) for n, s in shapes.items()])


class Loop:
    """A user's loop as `lattice.attach` runs it, minus the socket: each round moves
    its parameters towards its own target (its "data"), then syncs."""

    def __init__(self, node, job_id, target: float, shapes=SHAPES, seed: int = 0):
        self.node = node
        self.job_id = job_id
        self.target = np.float32(target)
        self.manifest = manifest_for(shapes)
        rng = np.random.default_rng(seed)
        self.memory = np.zeros(2 * self.manifest.num_params, np.float32)  # two slots
        self.active = 0
        self.slot[:] = rng.normal(size=self.manifest.num_params)
        self.initial = self.slot.copy()
        self.kind = node.jobs.kinds["attach"]
        self.session = None
        self.steps = self.samples = 0
        self.replies = []

    @property
    def slot(self):
        n = self.manifest.num_params
        return self.memory[self.active * n:(self.active + 1) * n]

    async def attach(self):
        with trio.fail_after(60):  # the job reaches this daemon's replica first
            await self.node.jobs.wait_job(self.job_id, set(STATUS_ORDER))
        self.node.jobs.join(self.job_id)
        self.kind = self.node.jobs.kinds["attach"]  # a restarted daemon has a new one
        if self.active:  # attaching again: new memory, the parameters in its first slot
            self.memory, self.active = np.concatenate([self.slot, self.slot]), 0
        self.session = self.kind.attach(self.job_id, self.manifest, None, self.memory)
        return self.session

    async def sync(self):
        """`attach.sync`, following the daemon to the slot that holds the result."""
        reply = await self.session.request(self.steps, self.samples, 0.5, finish=False)
        self.active = reply["slot"]
        return reply

    async def wait_ready(self):
        with trio.fail_after(300):
            while True:
                info = await self.session.wait("ready", 30)
                if info["state"] != "attached":
                    return info

    async def train_round(self, steps: int = 5):
        for _ in range(steps):
            await trio.sleep(0.01)
            slot = self.slot
            slot += np.float32(0.2) * (self.target - slot)
            self.steps += 1
            self.samples += 8

    async def run(self, rounds: int):
        await self.attach()
        info = await self.wait_ready()
        self.start = self.slot.copy()
        for _ in range(rounds):
            await self.train_round()
            self.replies.append(await self.sync())
        self.final = self.slot.copy()
        await self.session.request(self.steps, self.samples, None, finish=True)
        with trio.fail_after(300):
            while (done := await self.session.wait("done", 30))["state"] != "done":
                pass
        return info, done


def attach_job(**kw):
    spec = {"kind": "attach", "min_peers": 3, "sync_every": 5, "merge_timeout": 30.0}
    spec.update(kw)
    return spec


async def test_loops_start_equal_average_and_merge(cluster, autojump_clock):
    nodes = await cluster.add(3)
    # plain averages (no outer step) land in the loop's spare slot: a sync switches slots
    job_id = nodes[0].jobs.submit(attach_job(algorithm="gossip"))
    loops = [Loop(n, job_id, target=i, seed=i) for i, n in enumerate(nodes)]
    results = [None] * 3

    async def run(i):
        results[i] = await loops[i].run(rounds=6)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(run, i)
    infos = [r[0] for r in results]
    # everyone started from the reference member's weights: the lowest rank's own
    ref = next(loop for loop, info in zip(loops, infos, strict=True) if info["rank"] == 0)
    assert not next(info for info in infos if info["rank"] == 0)["loaded"]
    assert all(info["loaded"] for info in infos if info["rank"] != 0)
    for loop in loops:
        np.testing.assert_array_equal(loop.start, ref.initial)
    # averaging happened: most syncs changed the loop's parameters
    changed = sum(r["changed"] for loop in loops for r in loop.replies)
    assert changed >= 6
    # averages landed in the loop's spare slot: syncs switched slots instead of copying
    assert all(any(r["slot"] == 1 for r in loop.replies) for loop in loops)
    assert {r["outcome"] for loop in loops for r in loop.replies} <= {"committed", "served", "skipped"}
    model_id = results[0][1]["model_id"]
    assert model_id and all(r[1]["model_id"] == model_id for r in results)
    record = nodes[1].jobs.models()[model_id]
    assert record["kind"] == "attach" and record["missing"] == []
    assert record["metrics"]["samples"] == 3 * 6 * 5 * 8
    # the model is the samples-weighted average of the finals, under the loops' names
    data = await nodes[2].jobs.fetch_model(model_id)
    arrays, meta = loads_safetensors(data)
    expected = np.mean([loop.final for loop in loops], axis=0)
    assert set(arrays) == set(SHAPES) and meta["job"] == job_id
    np.testing.assert_allclose(np.concatenate([arrays["w"].reshape(-1), arrays["b"]]),
                               expected, rtol=1e-6)


async def test_a_mismatching_loop_is_refused_naming_the_tensor(cluster, autojump_clock):
    nodes = await cluster.add(3)
    job_id = nodes[0].jobs.submit(attach_job())
    loops = [Loop(n, job_id, target=1.0, seed=i) for i, n in enumerate(nodes)]
    odd_one = max(range(3), key=lambda i: nodes[i].peer_id)  # not the reference (rank 0)
    loops[odd_one] = Loop(nodes[odd_one], job_id, 1.0, shapes={"w": (3, 3), "b": (2,)})
    errors = []

    async def run(i):
        try:
            await loops[i].run(rounds=3)
        except SessionError as e:
            errors.append((i, str(e)))

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(run, i)
    assert errors == [(odd_one, "this loop's model does not match the job's: tensor 'w' is "
                                "float32[3, 3] here but float32[3, 2] in the job's model")]
    job = nodes[0].jobs.get(job_id)
    assert job["status"] == "done"
    entry = job["participants"][nodes[odd_one].peer_id]
    assert entry["state"] == "failed" and "tensor 'w'" in entry["reason"]
    model = nodes[0].jobs.models()[job["model"]]
    assert model["missing"] == [nodes[odd_one].peer_id]


async def test_a_loop_that_goes_away_makes_its_daemon_leave(cluster, autojump_clock):
    nodes = await cluster.add(3)
    job_id = nodes[0].jobs.submit(attach_job())
    loops = [Loop(n, job_id, target=2.0, seed=i) for i, n in enumerate(nodes)]

    async def crash_after_two_rounds(loop):
        await loop.attach()
        await loop.wait_ready()
        for _ in range(2):
            await loop.train_round()
            await loop.sync()
        loop.kind.release(loop.session, "connection closed")  # what the local API does

    async with trio.open_nursery() as nursery:
        nursery.start_soon(crash_after_two_rounds, loops[1])
        nursery.start_soon(loops[0].run, 8)
        nursery.start_soon(loops[2].run, 8)
    job = nodes[0].jobs.get(job_id)
    assert job["status"] == "done"
    gone = job["participants"][nodes[1].peer_id]
    assert gone["state"] == "left" and "went away" in gone["reason"]
    assert nodes[0].jobs.models()[job["model"]]["missing"] == [nodes[1].peer_id]


async def test_only_daemons_whose_user_asked_take_part(cluster, autojump_clock):
    nodes = await cluster.add(3)
    job_id = nodes[0].jobs.submit(attach_job(min_peers=2))
    loops = [Loop(nodes[i], job_id, target=1.0, seed=i) for i in (1, 2)]
    async with trio.open_nursery() as nursery:
        for loop in loops:
            nursery.start_soon(loop.run, 2)
    job = nodes[0].jobs.get(job_id)
    assert job["status"] == "done"
    assert sorted(job["roster"]) == sorted([nodes[1].peer_id, nodes[2].peer_id])
    assert nodes[0].peer_id not in job["participants"]


@pytest.mark.parametrize("algorithm", ["noloco", "diloco"])
async def test_outer_algorithms_and_overlap_run_to_a_merged_model(cluster, autojump_clock,
                                                                  algorithm):
    nodes = await cluster.add(3)
    job_id = nodes[0].jobs.submit(attach_job(algorithm=algorithm, overlap=1,
                                             compression="int8"))
    spec = nodes[0].jobs.get(job_id)["spec"]
    assert spec["outer_momentum"] == {"noloco": 0.3, "diloco": 0.9}[algorithm]
    loops = [Loop(n, job_id, target=i, seed=i) for i, n in enumerate(nodes)]
    async with trio.open_nursery() as nursery:
        for loop in loops:
            nursery.start_soon(loop.run, 6)
    for loop in loops:  # the first sync only snapshots; later ones bring averaged deltas
        assert loop.replies[0]["changed"] is False
        assert any(r["changed"] for r in loop.replies[1:])
    assert nodes[0].jobs.get(job_id)["status"] == "done"


def test_a_sync_switches_to_the_slot_its_average_landed_in():
    manifest = manifest_for(SHAPES)
    n = manifest.num_params
    session = LoopSession("s", "j", manifest, None, np.zeros(2 * n, np.float32))
    assert not session.adopt(session.slot)  # nothing averaged: nothing changed
    into = session.average_into(session.slot)
    assert into is session.slots[1]
    into[:] = 1.0
    assert session.adopt(into) and session.active == 1
    np.testing.assert_array_equal(session.slot, 1.0)
    # two exchanges in one sync: the second average lands in the active slot, whose
    # contents the first one superseded; it still counts as a change
    first = session.average_into(session.slot)
    first[:] = 2.0
    second = session.average_into(first)
    assert second is session.slot
    second[:] = 3.0
    assert session.adopt(second) and session.active == 1
    assert not session.adopt(session.slot)
    # an outer step's result is a new array: copied into the active slot
    assert session.adopt(np.full(n, 4.0, np.float32)) and session.active == 1
    np.testing.assert_array_equal(session.slot, 4.0)


def test_overlap_adds_the_averaged_delta_to_what_the_loop_trained_since():
    slot = np.array([1.0, 2.0, 3.0], np.float32)
    trainer = _LoopParams(slot)
    changed, base = _apply_delta(slot, trainer, None)  # first sync: a snapshot, no delta
    assert not changed and trainer.params is base and base is not slot
    trainer.params = base + np.float32(0.5)  # an exchange moved the snapshot by +0.5
    slot += np.float32(10.0)  # meanwhile the loop trained on
    changed, base2 = _apply_delta(slot, trainer, base)
    assert changed
    np.testing.assert_array_equal(slot, [11.5, 12.5, 13.5])
    np.testing.assert_array_equal(base2, slot)
    assert trainer.params is base2


async def test_a_restarted_daemon_resumes_and_the_loop_attaches_again(cluster, autojump_clock):
    nodes = await cluster.add(2)
    job_id = nodes[0].jobs.submit(attach_job(min_peers=2, compression="int8"))
    steady = Loop(nodes[0], job_id, target=1.0, seed=1)
    restarted = Loop(nodes[1], job_id, target=2.0, seed=2)

    async def interrupted():
        await restarted.attach()
        await restarted.wait_ready()
        for _ in range(3):
            await restarted.train_round()
            await restarted.sync()
        trained = restarted.slot.copy()
        nodes[1].stop_jobs()  # the daemon goes away mid-job (its checkpoint stays)
        with pytest.raises(SessionError):
            await restarted.sync()
        await nodes[1].start_jobs()
        await restarted.attach()  # the loop attaches again, keeping what it trained
        info = await restarted.wait_ready()
        assert info["resumed"] and not info["loaded"]
        np.testing.assert_array_equal(restarted.slot, trained)
        for _ in range(3):
            await restarted.train_round()
            await restarted.sync()
        await restarted.session.request(restarted.steps, restarted.samples, None, finish=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(steady.run, 10)
        nursery.start_soon(interrupted)
    await cluster.wait_until(lambda: nodes[0].jobs.get(job_id)["status"] == "done")
    job = nodes[0].jobs.get(job_id)
    entry = job["participants"][nodes[1].peer_id]
    assert entry["resumed"] == 1 and entry["samples"] == 6 * 5 * 8
    assert nodes[0].jobs.models()[job["model"]]["missing"] == []


async def test_loops_that_report_no_samples_merge_with_equal_weights(cluster, autojump_clock):
    nodes = await cluster.add(2)
    job_id = nodes[0].jobs.submit(attach_job(min_peers=2))
    loops = [Loop(n, job_id, target=i, seed=i) for i, n in enumerate(nodes)]
    async with trio.open_nursery() as nursery:
        for loop in loops:
            nursery.start_soon(loop.run, 0)  # finish at once: no steps, no samples
    job = nodes[0].jobs.get(job_id)
    assert job["status"] == "done"
    arrays, _ = loads_safetensors(await nodes[0].jobs.fetch_model(job["model"]))
    np.testing.assert_allclose(arrays["b"], np.mean([loop.final for loop in loops], axis=0)[6:],
                               rtol=1e-6)
