"""A participant whose compute runs through the volunteer governor: when its machine
goes on battery (or its volunteer pauses it) it computes nothing, the job goes on with
the others, and once it resumes it trains on from where it stopped and the job
completes with it. In-memory network, virtual time, the governor reading a fake /sys."""

from __future__ import annotations

import functools
import random

import pytest
import trio

from lattice.core.governor import Now, VolunteerConfig
from latticed.governor import Sources, serve_governor


class VirtualPool:
    """Compute steps that take jittered virtual time, as the cluster's own compute."""

    threads = 1

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.steps_at: list[float] = []

    async def run(self, fn):
        cost = 0.01 * self.rng.uniform(0.5, 1.5)
        await trio.sleep(cost)
        self.steps_at.append(trio.current_time())
        return fn(), cost


def battery(root, status: str) -> None:
    bat = root / "sys" / "class" / "power_supply" / "BAT0"
    bat.mkdir(parents=True, exist_ok=True)
    (bat / "type").write_text("Battery\n")
    (bat / "status").write_text(status + "\n")


def steps(node, job_id) -> int:
    """``node``'s own progress as it published it."""
    view = node.store.jobs().get(job_id)
    return (view["participants"].get(node.peer_id) or {}).get("steps", 0) if view else 0


def rounds(node, job_id) -> int:
    running = node.jobs.statistics()["running"].get(job_id)
    return running["round"] if running else -1


@pytest.mark.parametrize("reason", ["battery", "user"])
async def test_paused_participant_stops_then_resumes_and_the_job_completes_with_it(
        reason, cluster, small_job, tmp_path, autojump_clock, nursery):
    root = tmp_path / "machine"
    battery(root, "Charging")

    async def no_logind():
        return None

    sources = Sources(proc=root / "proc", sys=root / "sys", dev=root / "dev", pid=1,
                      idle_hint=no_logind)
    pool = VirtualPool(random.Random(7))
    gov = await nursery.start(functools.partial(
        serve_governor, VolunteerConfig(), sources=sources, workers=pool,
        clock=lambda: Now(1.75e9 + trio.current_time())))

    nodes = await cluster.add(3, jobs=False)
    await nodes[0].start_jobs()
    await nodes[1].start_jobs()
    volunteer = nodes[2]
    await volunteer.start_jobs(compute=gov.compute)
    job_id = nodes[0].jobs.submit(small_job(min_peers=3, steps=150, merge_timeout=300))
    await cluster.wait_until(lambda: rounds(volunteer, job_id) >= 10)

    if reason == "battery":
        battery(root, "Discharging")
    else:
        gov.pause(reason="gaming")
    await trio.sleep(0.5 + 0.02)  # one signal read, and the step running then
    assert not gov.state.compute
    frozen, others = rounds(volunteer, job_id), steps(nodes[1], job_id)
    paused_at = trio.current_time()
    await trio.sleep(60)
    assert rounds(volunteer, job_id) == frozen  # nothing computed while paused
    assert not [t for t in pool.steps_at if t > paused_at]
    assert steps(nodes[1], job_id) > others  # the others trained on meanwhile

    if reason == "battery":
        battery(root, "Charging")
    else:
        gov.resume()
    with trio.fail_after(900):
        summary = await nodes[0].jobs.wait_job(job_id)
    assert summary["status"] == "done"
    await cluster.wait_until(lambda: any(r.get("job") == job_id for r in nodes[0].store.models().values()))
    (record,) = [r for r in nodes[0].store.models().values() if r.get("job") == job_id]
    assert record["missing"] == [] and record["metrics"]["participants"] == 3
    entry = nodes[0].store.jobs()[job_id]["participants"][volunteer.peer_id]
    assert entry["steps"] == 150  # it trained on from where it stopped, to the end
