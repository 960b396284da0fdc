"""The governor's limits in virtual time: the CPU duty cycle, transfer rate limits,
the transfer schedule and the monthly data cap, the memory check."""

from __future__ import annotations

import pytest
import trio

from lattice.core.governor import VolunteerConfig


@pytest.mark.parametrize("percent", [10, 25, 60])
async def test_duty_cycle_keeps_compute_within_cpu_percent_over_every_minute(
        percent, start_governor, stream_of, nursery, autojump_clock):
    cost = 0.05
    gov, workers = await start_governor(nursery, VolunteerConfig(cpu_percent=percent),
                                        cost=cost, cores=1)
    nursery.start_soon(stream_of(gov.compute).run)
    await trio.sleep(600)
    rate = percent / 100
    used = len(workers.runs) * cost
    assert used == pytest.approx(rate * 600, rel=0.03)
    # any minute: at most its share, plus the one-second burst and the step that overdrew
    for start in range(0, 540, 7):
        in_window = sum(cost for s, _ in workers.runs if start <= s < start + 60)
        assert in_window <= rate * 60 + rate * 1.0 + cost + 1e-9
    st = gov.compute.statistics()
    assert st["duty_waits"] > 0 and st["cpu_seconds"] == pytest.approx(used)


async def test_no_duty_cycle_at_100_percent(start_governor, stream_of, nursery, autojump_clock):
    gov, workers = await start_governor(nursery, VolunteerConfig(), cost=0.05, cores=1)
    nursery.start_soon(stream_of(gov.compute).run)
    await trio.sleep(10)
    assert len(workers.runs) == pytest.approx(200, abs=1)
    assert gov.compute.statistics()["duty_rate"] is None


async def test_duty_cycle_counts_all_the_cores_it_may_use(start_governor, stream_of, nursery,
                                                          autojump_clock):
    """50% of two cores is one core's worth: two compute threads share it."""
    gov, workers = await start_governor(nursery, VolunteerConfig(cpu_percent=50), cost=0.05,
                                        cores=2, threads=2)
    for _ in range(2):
        nursery.start_soon(stream_of(gov.compute).run)
    await trio.sleep(300)
    assert len(workers.runs) * 0.05 == pytest.approx(300, rel=0.03)


async def test_upload_rate_limit_paces_bytes(start_governor, nursery, autojump_clock):
    gov, _ = await start_governor(nursery, VolunteerConfig(upload_mbit_s=8))  # 1 MB/s
    start = trio.current_time()
    for _ in range(10):
        await gov.upload.acquire(1_000_000)
    # a quarter second of burst, then the rate
    assert trio.current_time() - start == pytest.approx(9.75)
    assert gov.upload.statistics()["bytes"] == 10_000_000
    t = trio.current_time()
    await gov.download.acquire(50_000_000)  # no download limit
    assert trio.current_time() == t


async def test_transfers_refused_outside_their_schedule(start_governor, nursery, autojump_clock):
    # virtual time 0 is Wednesday 12:00
    gov, _ = await start_governor(nursery, VolunteerConfig(network_schedule="wed 13:00-14:00"))
    assert gov.state.compute  # compute is not affected
    assert gov.refusal() == "outside transfer schedule until 13:00"
    assert gov.status()["transfers"] == "paused: outside transfer schedule until 13:00"
    await trio.sleep(3600 + 0.5)  # the window opens; the next signal read sees it
    assert gov.refusal() is None
    await gov.receive(1000)
    assert gov.download.statistics() == {"bytes": 1000, "limit_bytes_s": None,
                                         "waits": 0, "wait_seconds": 0.0}
    assert gov.statistics()["transfers_refused"] == 1


async def test_data_cap_stops_transfers_for_the_rest_of_the_month_across_restarts(
        start_governor, tmp_path, autojump_clock):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = VolunteerConfig(monthly_data_gb=2e-6)  # 2000 bytes
    async with trio.open_nursery() as nursery:
        gov, _ = await start_governor(nursery, config, state_dir=state_dir)
        assert gov.refusal() is None
        await gov.send(1500)
        await gov.receive(600)  # crosses the cap: counted, then transfers stop
        assert not gov.state.network and gov.state.compute
        assert gov.refusal().startswith("monthly data cap reached")
        assert gov.status()["data"] == {"used_bytes": 2100, "cap_bytes": 2000}
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        gov, _ = await start_governor(nursery, config, state_dir=state_dir)
        assert gov.state.network_summary == ("paused: monthly data cap reached (2.1 kB of 2.0 kB)"
                                             " until 2025-07-01 00:00")
        nursery.cancel_scope.cancel()


async def test_memory_cap_check_and_reservations(machine, start_governor, nursery, autojump_clock):
    machine.set_rss(80 * 10**6)
    gov, _ = await start_governor(nursery, VolunteerConfig(max_memory_mb=50))
    machine.set_rss(100 * 10**6)  # the daemon grows while no job runs: not compute's
    await trio.sleep(1)
    assert gov.check_memory() is None
    assert gov.memory.reserve("job-a", 30 * 10**6) is None
    assert "memory" in gov.memory.reserve("job-b", 30 * 10**6)
    machine.set_rss(140 * 10**6)
    assert gov.check_memory() is None
    machine.set_rss(160 * 10**6)
    await trio.sleep(1)  # the baseline stays put while a job holds memory
    assert gov.check_memory() == "memory: job compute uses 60.0 MB, over the 50.0 MB cap"
    gov.memory.release("job-a")
    assert gov.check_memory() is None
