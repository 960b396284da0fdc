"""A participant whose daemon runs the volunteer governor, on the in-memory network in
virtual time, every signal from an injected source (a fake /sys and /proc, a logind
answer, a clock):

- each pause reason pauses the running participant: its entry in the replicated state
  says ``paused`` with the reason, it computes nothing, its partners stop offering it
  exchanges and train on; once the reason lifts it trains on from where it stopped and
  the job completes with it;
- over the memory cap it leaves the job with that reason, and the job completes
  without it;
- outside the transfer schedule it trains alone (no exchange, its streams refused) and
  averages again once the window opens.
"""

from __future__ import annotations

import functools
import random
import re

import pytest
import trio

from lattice.core.governor import Now, VolunteerConfig
from lattice.core.governor.localtime import days_from_civil
from lattice.net.shaping import GovernedNetwork
from latticed.governor import Sources, serve_governor

# virtual time 0 is Wednesday 2025-06-11 12:00 UTC
BASE = days_from_civil(2025, 6, 11) * 86400 + 12 * 3600
PID = 4242


class FakeMachine:
    """What the governor's sources read: /sys power supplies, /proc CPU ticks moving
    with virtual time, /proc/PID/statm, a logind answer, and a clock that can jump."""

    def __init__(self, root) -> None:
        self.root = root
        (root / "proc" / str(PID)).mkdir(parents=True)
        (root / "sys" / "class" / "power_supply").mkdir(parents=True)
        (root / "dev").mkdir()
        self.logind: tuple[bool, float] | None = (True, 0.0)  # idle, never active
        self.others = 0.0  # other programs' share of the machine
        self.clock_offset = 0.0
        self._busy = self._total = 0
        self._at = trio.current_time()
        self.battery("Charging")
        self.rss(50 * 10**6)
        self._write_cpu()

    def now(self) -> Now:
        return Now(BASE + self.clock_offset + trio.current_time(), 0)

    def sources(self) -> Sources:
        async def idle_hint():
            return self.logind
        return Sources(proc=self.root / "proc", sys=self.root / "sys", dev=self.root / "dev",
                       pid=PID, idle_hint=idle_hint, page_size=4096)

    def battery(self, status: str) -> None:
        bat = self.root / "sys" / "class" / "power_supply" / "BAT0"
        bat.mkdir(exist_ok=True)
        (bat / "type").write_text("Battery\n")
        (bat / "status").write_text(status + "\n")

    def rss(self, nbytes: int) -> None:
        (self.root / "proc" / str(PID) / "statm").write_text(f"1000 {nbytes // 4096} 0 0 0 0 0\n")

    def _write_cpu(self) -> None:
        now = trio.current_time()
        ticks = int(200 * (now - self._at))  # two cores, 100 ticks a second each
        self._at = now
        self._total += ticks
        self._busy += int(ticks * self.others)
        proc = self.root / "proc"
        (proc / "stat").write_text(f"cpu  {self._busy} 0 0 {self._total - self._busy} 0 0 0 0\n")
        (proc / str(PID) / "stat").write_text(
            f"{PID} (latticed) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 4 0 1 1 1\n")

    async def serve(self) -> None:
        while True:  # the kernel's counters move on
            await trio.sleep(0.25)
            self._write_cpu()


class VirtualPool:
    """Compute steps that take jittered virtual time, as the cluster's own compute
    (`virtual_compute`): a training round's worth."""

    threads = 1

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.steps_at: list[float] = []

    async def run(self, fn):
        cost = 0.04 * self.rng.uniform(0.5, 1.5)
        await trio.sleep(cost)
        self.steps_at.append(trio.current_time())
        return fn(), cost


def rounds(node, job_id) -> int:
    running = node.jobs.statistics()["running"].get(job_id)
    return running["round"] if running else -1


def entry(observer, job_id, peer) -> dict:
    """``peer``'s participation as ``observer`` sees it in the replicated state."""
    view = observer.store.jobs().get(job_id)
    return (view["participants"].get(peer) or {}) if view else {}


async def finished(node, job_id) -> dict:
    """The job's summary once it ended (virtual time: a hung job fails the test)."""
    with trio.fail_after(900):
        return await node.jobs.wait_job(job_id)


def offers_to(node) -> int:
    """Averaging offers ``node`` was sent (answered, held or refused as busy)."""
    counts = node.jobs.services.gossip.counts
    return sum(n for k, n in counts.items() if k.startswith(("busy_", "responded_")))


# reason -> (config, cause, lift, the reason the entry shows: a regular expression)
CASES = {
    "battery": (VolunteerConfig(), lambda m, g: m.battery("Discharging"),
                lambda m, g: m.battery("Charging"), "on battery"),
    "user": (VolunteerConfig(), lambda m, g: g.pause(reason="gaming"),
             lambda m, g: g.resume(), "by user: gaming"),
    "user_active": (VolunteerConfig(run_when="idle", idle_after_min=1),
                    lambda m, g: setattr(m, "logind", (False, 0.0)),
                    lambda m, g: setattr(m, "logind", (True, m.now().wall - 120)),
                    "user active now"),
    "busy": (VolunteerConfig(pause_if_busy_percent=30, busy_window_s=2),
             lambda m, g: setattr(m, "others", 0.7), lambda m, g: setattr(m, "others", 0.0),
             r"other programs use \d+% of the CPU \(limit 30%\)"),  # averaged as it rises
    # the clock jumps an hour on: outside the window until next Wednesday
    "schedule": (VolunteerConfig(compute_schedule="wed 12:00-13:00"),
                 lambda m, g: setattr(m, "clock_offset", 3600.0),
                 lambda m, g: setattr(m, "clock_offset", 0.0),
                 r"outside schedule until 2025-06-18 12:00"),
}


async def start_volunteer(cluster, nursery, tmp_path, config, *, governed_network=False):
    machine = FakeMachine(tmp_path / "machine")
    nursery.start_soon(machine.serve)
    pool = VirtualPool(random.Random(7))
    gov = await nursery.start(functools.partial(
        serve_governor, config, sources=machine.sources(), workers=pool, clock=machine.now))
    nodes = await cluster.add(3, jobs=False)
    await nodes[0].start_jobs()
    await nodes[1].start_jobs()
    volunteer = nodes[2]
    network = GovernedNetwork(volunteer.peer, gov) if governed_network else None
    await volunteer.start_jobs(compute=gov.compute, governance=gov, network=network)
    return machine, gov, pool, nodes, network


@pytest.mark.parametrize("reason", list(CASES))
async def test_each_pause_reason_pauses_a_participant_which_resumes_and_the_job_completes(
        reason, cluster, small_job, tmp_path, autojump_clock, nursery):
    config, cause, lift, shown = CASES[reason]
    machine, gov, pool, nodes, _ = await start_volunteer(cluster, nursery, tmp_path, config)
    volunteer, submitter = nodes[2], nodes[0]
    job_id = submitter.jobs.submit(small_job(min_peers=3, steps=150, merge_timeout=300))
    await cluster.wait_until(lambda: rounds(volunteer, job_id) >= 10)
    assert gov.state.compute

    cause(machine, gov)
    t_signal = trio.current_time()
    with trio.fail_after(config.busy_window_s + 1.0):
        while gov.state.compute:
            await gov.wait_change(gov.version)
    # every peer reads the pause, with its reason, in the replicated state
    await cluster.wait_until(lambda: all(
        entry(n, job_id, volunteer.peer_id).get("state") == "paused" for n in nodes))
    assert re.fullmatch(shown, entry(submitter, job_id, volunteer.peer_id)["reason"])
    assert submitter.jobs.get(job_id)["peers"][volunteer.peer_id] == "paused"
    assert volunteer.jobs.participation_states() == {"paused": 1}
    await trio.sleep(1.0)  # an exchange or step running when the pause came finishes
    frozen, offers, others = rounds(volunteer, job_id), offers_to(volunteer), \
        entry(nodes[1], job_id, nodes[1].peer_id).get("steps", 0)
    paused_at = trio.current_time()
    assert paused_at - t_signal < config.busy_window_s + 2.0

    await trio.sleep(60)
    assert rounds(volunteer, job_id) == frozen  # nothing computed while paused
    assert not [t for t in pool.steps_at if t > paused_at]
    assert offers_to(volunteer) == offers  # partners skip it: not even offered
    assert entry(nodes[1], job_id, nodes[1].peer_id).get("steps", 0) > others  # they go on

    lift(machine, gov)
    await cluster.wait_until(lambda: entry(submitter, job_id, volunteer.peer_id).get("state")
                             in ("running", "merging", "done"))
    assert "reason" not in entry(submitter, job_id, volunteer.peer_id)
    summary = await finished(submitter, job_id)
    assert summary["status"] == "done"
    await cluster.wait_until(lambda: any(r.get("job") == job_id
                                         for r in submitter.store.models().values()))
    (record,) = [r for r in submitter.store.models().values() if r.get("job") == job_id]
    assert record["missing"] == [] and record["metrics"]["participants"] == 3
    assert entry(submitter, job_id, volunteer.peer_id)["steps"] == 150  # on to the end


async def test_a_paused_volunteer_takes_no_new_job_until_it_resumes(
        cluster, small_job, tmp_path, autojump_clock, nursery):
    _, gov, _, nodes, _ = await start_volunteer(cluster, nursery, tmp_path, VolunteerConfig())
    volunteer, submitter = nodes[2], nodes[0]
    gov.pause(reason="gaming")
    await cluster.wait_until(lambda: volunteer.jobs.paused is not None)
    first = submitter.jobs.submit(small_job(min_peers=2, steps=30, merge_timeout=30))
    assert (await finished(submitter, first))["status"] == "done"
    assert entry(submitter, first, volunteer.peer_id) == {}  # never offered to take part

    gov.resume()
    second = submitter.jobs.submit(small_job(min_peers=3, steps=30, merge_timeout=30))
    assert (await finished(submitter, second))["status"] == "done"
    assert volunteer.peer_id in submitter.jobs.get(second)["roster"]


async def test_a_participant_over_the_memory_cap_leaves_with_the_reason_and_the_job_completes(
        cluster, small_job, tmp_path, autojump_clock, nursery):
    # digits-softmax: 650 parameters, 1437 training images of 64 float64 pixels
    _, gov, _, nodes, _ = await start_volunteer(cluster, nursery, tmp_path,
                                                VolunteerConfig(max_memory_mb=0.1))
    volunteer, submitter = nodes[2], nodes[0]
    job_id = submitter.jobs.submit(small_job(min_peers=3, steps=60, merge_timeout=30))
    await cluster.wait_until(lambda: entry(submitter, job_id, volunteer.peer_id).get("state")
                             == "left")
    reason = entry(submitter, job_id, volunteer.peer_id)["reason"]
    assert reason.startswith("memory: needs ") and "of the 100.0 kB compute cap left" in reason
    listed = {j["id"]: j for j in submitter.jobs.list()}[job_id]
    assert listed["peers"][volunteer.peer_id] == "left"
    assert (await finished(submitter, job_id))["status"] == "done"
    (record,) = [r for r in submitter.store.models().values() if r.get("job") == job_id]
    assert record["missing"] == [volunteer.peer_id] and record["metrics"]["participants"] == 2
    assert gov.memory.reserved == 0


async def test_a_participant_growing_over_the_memory_cap_while_it_runs_leaves(
        cluster, small_job, tmp_path, autojump_clock, nursery):
    machine, gov, _, nodes, _ = await start_volunteer(cluster, nursery, tmp_path,
                                                      VolunteerConfig(max_memory_mb=20))
    volunteer, submitter = nodes[2], nodes[0]
    job_id = submitter.jobs.submit(small_job(min_peers=3, steps=300, merge_timeout=30))
    await cluster.wait_until(lambda: rounds(volunteer, job_id) >= 5)
    machine.rss(50 * 10**6 + 25 * 10**6)  # job compute now holds 25 MB
    await cluster.wait_until(lambda: entry(submitter, job_id, volunteer.peer_id).get("state")
                             == "left")
    assert entry(submitter, job_id, volunteer.peer_id)["reason"] == \
        "memory: job compute uses 25.0 MB, over the 20.0 MB cap"
    assert (await finished(submitter, job_id))["status"] == "done"
    assert gov.memory.reserved == 0


async def test_outside_the_transfer_schedule_a_participant_trains_alone_then_averages_again(
        cluster, small_job, tmp_path, autojump_clock, nursery):
    config = VolunteerConfig(network_schedule="wed 12:00-13:00")
    machine, gov, _, nodes, network = await start_volunteer(
        cluster, nursery, tmp_path, config, governed_network=True)
    volunteer, submitter = nodes[2], nodes[0]
    job_id = submitter.jobs.submit(small_job(min_peers=3, steps=2500, merge_timeout=300))
    await cluster.wait_until(lambda: rounds(volunteer, job_id) >= 10)
    def progress(name):  # the volunteer's own live progress (entries are rate-limited)
        return volunteer.jobs.statistics()["running"].get(job_id, {}).get(name, 0)
    exchanges = functools.partial(progress, "exchanges")
    await cluster.wait_until(lambda: exchanges() > 0)

    machine.clock_offset = 3600.0  # 13:00: outside the window until next Wednesday
    with trio.fail_after(2):
        while gov.state.network:
            await gov.wait_change(gov.version)
    assert gov.state.compute  # compute goes on
    await trio.sleep(0.5)  # the exchange in flight finishes
    before, steps = exchanges(), progress("steps")
    await trio.sleep(3)  # alone, a round is only its local steps: ~300 steps a second
    assert exchanges() == before  # no averaging...
    assert progress("steps") > steps  # ...local steps only
    assert entry(submitter, job_id, volunteer.peer_id)["state"] == "running"
    assert gov.status()["transfers"] == "paused: outside transfer schedule until 2025-06-18 12:00"
    assert network.statistics()["refused"]  # partners' offers and fetches were refused

    machine.clock_offset = 0.0
    await cluster.wait_until(lambda: exchanges() > before)
    assert (await finished(submitter, job_id))["status"] == "done"
    (record,) = [r for r in submitter.store.models().values() if r.get("job") == job_id]
    assert record["missing"] == []
    assert network.traffic.bytes[("/lattice/gossip-avg/2", "out")] > 0
