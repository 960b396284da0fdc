"""Local time without reading the clock: weekdays, dates, how a future time is shown."""

from hypothesis import given
from hypothesis import strategies as st

from lattice.core.governor import Now, next_period_start
from lattice.core.governor.localtime import civil_from_days, days_from_civil

DAY = 86400


@given(st.integers(-800_000, 800_000))
def test_civil_dates_round_trip(days):
    assert days_from_civil(*civil_from_days(days)) == days


def test_known_dates_and_weekdays():
    assert civil_from_days(0) == (1970, 1, 1)
    assert days_from_civil(2024, 2, 29) - days_from_civil(2024, 2, 28) == 1
    wed = Now(days_from_civil(2025, 6, 11) * DAY)
    assert wed.week_second() == 2 * DAY
    # 23:30 UTC on a Sunday is Monday 01:30 at UTC+2
    sunday_late = Now(days_from_civil(2025, 6, 15) * DAY + 23.5 * 3600, 7200)
    assert sunday_late.week_second() == 1.5 * 3600 and sunday_late.date() == (2025, 6, 16)


def test_describe_today_this_week_and_later():
    now = Now(days_from_civil(2025, 6, 11) * DAY + 9 * 3600, 3600)  # 10:00 local
    assert now.describe(now.wall + 4 * 3600) == "14:00"
    assert now.describe(now.wall + 86400) == "thu 10:00"
    assert now.describe(now.wall + 8 * 86400) == "2025-06-19 10:00"


def test_next_data_period_starts_at_local_midnight_of_the_reset_day():
    now = Now(days_from_civil(2025, 12, 20) * DAY, -5 * 3600)  # Dec 19, 19:00 local
    start = next_period_start(now, 1)
    assert start == days_from_civil(2026, 1, 1) * DAY + 5 * 3600
    assert next_period_start(now, 20) == days_from_civil(2025, 12, 20) * DAY + 5 * 3600
