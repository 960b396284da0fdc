"""The governor's meters: token bucket (rate limits, the CPU duty cycle), the monthly
data allowance, the CPU load meter, memory and disk checks."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattice.core.governor import (
    CpuSample,
    DataAllowance,
    LoadMeter,
    MemoryBudget,
    Now,
    TokenBucket,
    disk_refusal,
)
from lattice.core.governor.localtime import days_from_civil

DAY = 86400


def test_bucket_lets_a_burst_through_then_paces_to_the_rate():
    b = TokenBucket(rate=100.0, burst=50.0)
    assert b.reserve(50, now=0.0) == 0.0
    assert b.reserve(100, now=0.0) == pytest.approx(1.0)   # 100 tokens of debt at 100/s
    assert b.reserve(10, now=0.5) == pytest.approx(0.6)    # queues behind it: goes at t=1.1
    assert b.delay(now=1.6) == pytest.approx(0.0)
    assert b.delay(now=100.0) == 0.0 and b.level == 50.0   # never saves more than the burst


def test_bucket_charged_after_the_fact_is_a_duty_cycle():
    """The CPU duty cycle: work is admitted at level >= 0 and charged what it used."""
    rate = 0.25  # a quarter of one core
    b = TokenBucket(rate=rate, burst=rate * 1.0)
    t, used = 0.0, 0.0
    while t < 600:
        t += b.delay(t)
        b.charge(0.05, t)  # a 50 ms step
        used += 0.05
        t += 0.05
    assert used / t == pytest.approx(rate, rel=0.02)


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(1, 1e6), burst_s=st.floats(0, 2),
       asks=st.lists(st.tuples(st.floats(0, 5), st.integers(1, 10**6)), min_size=1, max_size=40))
def test_bucket_never_lets_more_than_burst_plus_rate_times_time(rate, burst_s, asks):
    b = TokenBucket(rate=rate, burst=rate * burst_s)
    now, release_times = 0.0, []
    for gap, n in asks:
        now += gap
        release_times.append((now + b.reserve(n, now), n))
    last = max(t for t, _ in release_times)
    total = sum(n for _, n in release_times)
    assert total <= rate * burst_s + rate * last + 1e-6 * total + 1


def test_bucket_refuses_nonsense():
    for rate, burst in ((0, 1), (-1, 1), (1, -1), (float("nan"), 1)):
        with pytest.raises(ValueError):
            TokenBucket(rate, burst)


def now_on(y, m, d, hh=12, offset=0):
    return Now(days_from_civil(y, m, d) * DAY + hh * 3600 - offset, offset)


def test_data_allowance_counts_per_month_and_starts_over():
    cap = DataAllowance(limit_bytes=1000, reset_day=1)
    cap.add(600, now_on(2025, 6, 3))
    assert not cap.exhausted(now_on(2025, 6, 3))
    cap.add(400, now_on(2025, 6, 30))
    assert cap.exhausted(now_on(2025, 6, 30)) and cap.used(now_on(2025, 6, 30)) == 1000
    assert cap.used(now_on(2025, 7, 1, hh=0)) == 0 and not cap.exhausted(now_on(2025, 7, 1))


def test_data_allowance_with_a_billing_day_and_across_new_year_and_restart():
    cap = DataAllowance(limit_bytes=10, reset_day=15)
    cap.add(9, now_on(2025, 12, 20))
    cap.add(1, now_on(2026, 1, 14))     # still the period that began on Dec 15
    assert cap.exhausted(now_on(2026, 1, 14, hh=23))
    saved = cap.export()
    again = DataAllowance(limit_bytes=10, reset_day=15)
    again.restore(saved, now_on(2026, 1, 14))
    assert again.used(now_on(2026, 1, 14)) == 10
    later = DataAllowance(limit_bytes=10, reset_day=15)
    later.restore(saved, now_on(2026, 1, 15))  # a new period: the old count is dropped
    assert later.used(now_on(2026, 1, 15)) == 0


def test_period_follows_local_midnight_not_utc():
    cap = DataAllowance(limit_bytes=10)
    east = 9 * 3600  # UTC+9: 2025-06-30 20:00 UTC is already July 1st locally
    utc_evening = Now(days_from_civil(2025, 6, 30) * DAY + 20 * 3600, east)
    cap.add(10, Now(utc_evening.wall - 86400, east))
    assert cap.used(utc_evening) == 0


def test_load_meter_subtracts_our_own_use_and_averages_over_the_window():
    m = LoadMeter(window=10.0)
    assert m.add(0.0, CpuSample(total=0, busy=0, own=0)) is None
    # two cores, 100 ticks/s each: others use 50 ticks/s, we use 100 ticks/s
    for t in range(1, 21):
        pct = m.add(float(t), CpuSample(total=200 * t, busy=150 * t, own=100 * t))
    assert pct == pytest.approx(25.0)
    # others stop; within the window the average falls gradually, then reaches 0
    for t in range(21, 26):
        pct = m.add(float(t), CpuSample(total=200 * t, busy=150 * 20 + 100 * (t - 20), own=100 * t))
    assert 0 < pct < 25
    for t in range(26, 40):
        pct = m.add(float(t), CpuSample(total=200 * t, busy=150 * 20 + 100 * (t - 20), own=100 * t))
    assert pct == pytest.approx(0.0)


def test_memory_budget_reserves_per_job_and_says_why_not():
    mb = MemoryBudget(cap_bytes=1000)
    assert mb.reserve("a", 600) is None
    why = mb.reserve("b", 500)
    assert why is not None and "memory" in why and mb.reserved == 600
    assert mb.reserve("a", 900) is None  # a job re-estimating replaces its own reservation
    mb.release("a")
    assert mb.reserve("b", 1000) is None
    assert mb.over(1001) and mb.over(999) is None
    assert MemoryBudget(0).reserve("x", 10**15) is None and MemoryBudget(0).over(10**15) is None


def test_disk_keeps_the_free_space_the_volunteer_asked_for():
    assert disk_refusal(free_bytes=5_000, nbytes=1_000, keep_free_bytes=4_000) is None
    why = disk_refusal(free_bytes=5_000, nbytes=1_001, keep_free_bytes=4_000)
    assert why is not None and "keep free" in why


def test_bucket_waits_no_rounding_debt():
    """A debt left by float rounding must not ask for a wait no clock can make (a
    deadline equal to now would spin forever)."""
    b = TokenBucket(rate=0.1, burst=0.1)
    b.charge(0.1 + 1e-15, now=0.0)
    assert b.delay(now=0.0) == 0.0
    b.charge(0.05, now=0.0)
    assert b.delay(now=0.0) == pytest.approx(0.5)
