"""Real compute threads: each sets its own idle priority, pinning and name (and no
other thread's), returns results and exceptions to the awaiting task, meters its CPU,
and all of them are gone when the service stops."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import pytest
import trio

from lattice.core.governor import VolunteerConfig
from latticed.governor import THREAD_NAME, ComputeThreads, CpuControls, choose_cpus, serve_governor


def whoami() -> dict:
    tid = threading.get_native_id()
    return {"tid": tid, "policy": os.sched_getscheduler(0), "cpus": os.sched_getaffinity(0),
            "nice": os.getpriority(os.PRIO_PROCESS, tid),
            "comm": Path(f"/proc/self/task/{tid}/comm").read_text().strip()}


def spin(seconds: float) -> int:
    import time
    end, n = time.thread_time() + seconds, 0
    while time.thread_time() < end:
        n += 1
    return n


async def test_threads_run_at_idle_priority_pinned_and_named():
    last_cpu = max(os.sched_getaffinity(0))
    pool = ComputeThreads(2, CpuControls(priority="idle", cpus=frozenset({last_cpu})))
    pool.start()
    try:
        seen = [await pool.run(whoami) for _ in range(4)]
    finally:
        await pool.aclose()
    for me, used in seen:
        assert me["policy"] == os.SCHED_IDLE and me["cpus"] == {last_cpu}
        assert me["comm"] == THREAD_NAME and used >= 0
    assert me["tid"] != threading.get_native_id()
    # the event loop's thread is untouched
    assert os.sched_getscheduler(0) == os.SCHED_OTHER and len(os.sched_getaffinity(0)) >= 1


async def test_low_priority_is_nice_19_and_normal_changes_nothing():
    for priority, nice, policy in (("low", 19, os.SCHED_OTHER), ("normal", os.nice(0), os.SCHED_OTHER)):
        pool = ComputeThreads(1, CpuControls(priority=priority))
        pool.start()
        try:
            me, _ = await pool.run(whoami)
        finally:
            await pool.aclose()
        assert me["nice"] == nice and me["policy"] == policy
        assert me["cpus"] == os.sched_getaffinity(0)


async def test_results_exceptions_and_cpu_time_come_back():
    pool = ComputeThreads(1, CpuControls(priority="normal"))
    pool.start()
    try:
        n, used = await pool.run(functools.partial(spin, 0.05))
        assert n > 0 and 0.05 <= used < 1.0
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
        assert (await pool.run(lambda: "still serving"))[0] == "still serving"
    finally:
        await pool.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await pool.run(lambda: None)


def compute_threads_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


async def test_the_service_owns_its_threads_and_stops_them(tmp_path):
    before = len(compute_threads_alive())
    async with trio.open_nursery() as nursery:
        gov = await nursery.start(functools.partial(
            serve_governor, VolunteerConfig(max_cores=1), compute_threads=2, state_dir=tmp_path))
        assert len(compute_threads_alive()) == before + 2
        assert await gov.compute(lambda: 6 * 7) == 42
        me = await gov.compute(whoami)
        assert me["policy"] == os.SCHED_IDLE and len(me["cpus"]) == 1
        applied = gov.statistics()["threads_applied"]
        assert {a["policy"] for a in applied} == {"idle"} and len(applied) == 2
        nursery.cancel_scope.cancel()
    assert len(compute_threads_alive()) == before


def test_choose_cpus_takes_the_last_cores():
    assert choose_cpus(0, {0, 1, 2, 3}) is None
    assert choose_cpus(4, {0, 1, 2, 3}) is None
    assert choose_cpus(2, {0, 1, 2, 3}) == {2, 3}
    assert choose_cpus(1, {0, 5, 9}) == {9}
