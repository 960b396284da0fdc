"""Schedule windows: the grammar volunteers write, windows crossing midnight and the
week's end, and when the next change comes (what `lattice status` says "until")."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattice.core.governor import ScheduleError, parse_schedule

H = 3600
D = 24 * H
MON, TUE, WED, THU, FRI, SAT, SUN = (i * D for i in range(7))


def at(day: int, hh: int, mm: int = 0) -> int:
    return day + hh * H + mm * 60


def test_empty_text_means_any_time():
    s = parse_schedule("  ")
    assert s.always and s.contains(at(WED, 3)) and s.seconds_to_change(at(WED, 3)) is None


def test_weekday_evenings_crossing_midnight():
    s = parse_schedule("mon-fri 18:00-08:00")
    assert not s.contains(at(MON, 12))
    assert s.contains(at(MON, 18)) and s.contains(at(TUE, 7, 59))
    assert not s.contains(at(TUE, 8))
    assert s.contains(at(SAT, 7, 59))  # Friday's window runs into Saturday morning
    assert not s.contains(at(SAT, 8)) and not s.contains(at(SUN, 23))
    assert not s.contains(at(MON, 7))  # Sunday evening is not in the schedule
    assert s.seconds_to_change(at(MON, 12)) == 6 * H
    assert s.seconds_to_change(at(MON, 18)) == 14 * H


def test_next_change_from_the_weekend_is_monday_evening():
    s = parse_schedule("mon-fri 18:00-08:00")
    assert s.seconds_to_change(at(SAT, 9)) == (at(MON, 18) + 7 * D) - at(SAT, 9)


def test_days_alone_ranges_alone_lists_and_wrapping_day_ranges():
    weekend = parse_schedule("sat,sun")
    assert weekend.contains(at(SAT, 0)) and weekend.contains(at(SUN, 23, 59))
    assert not weekend.contains(at(MON, 0)) and not weekend.contains(at(FRI, 23, 59))
    nights = parse_schedule("22:00-06:00")
    assert all(nights.contains(at(d, 23)) and nights.contains(at(d, 5)) for d in range(0, 7 * D, D))
    assert not nights.contains(at(WED, 12))
    wrap = parse_schedule("sat-mon")
    assert wrap.contains(at(MON, 12)) and wrap.contains(at(SAT, 1)) and not wrap.contains(at(TUE, 1))
    assert parse_schedule("Monday,wed-thu 09:00-17:00").contains(at(THU, 16, 59))


def test_sunday_night_window_wraps_into_monday():
    s = parse_schedule("sun 22:00-02:00")
    assert s.contains(at(SUN, 23)) and s.contains(at(MON, 1)) and not s.contains(at(MON, 2))
    assert s.seconds_to_change(at(SUN, 23)) == 3 * H  # across the week boundary


def test_whole_week_never_changes_and_whole_day_with_24_00():
    assert parse_schedule("daily").seconds_to_change(at(WED, 1)) is None
    s = parse_schedule("mon-sun 00:00-24:00")
    assert s.contains(at(SUN, 23, 59)) and s.seconds_to_change(at(SUN, 23)) is None
    assert parse_schedule("* 00:00-24:00").intervals == s.intervals


@pytest.mark.parametrize("text", [
    "mon-fry 18:00-08:00", "mon 25:00-26:00", "mon 18:00-18:00", "mon 18:00", "18:00-08:00 mon",
    "mon 18:00-08:00 extra", "mon 09:00-10:00-11:00", "mon 09:60-10:00", "mon 00:00-24:01",
    ";".join(["mon"] * 65),
])
def test_bad_schedules_are_refused_naming_the_entry(text):
    with pytest.raises(ScheduleError):
        parse_schedule(text)


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 1439),
                                  st.integers(0, 1439)), min_size=1, max_size=4),
       moment=st.integers(0, 7 * D - 1))
def test_nothing_changes_before_the_announced_change_and_it_does_change(entries, moment):
    days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    text = "; ".join(f"{days[a]}-{days[b]} {s // 60:02d}:{s % 60:02d}-{e // 60:02d}:{e % 60:02d}"
                     for a, b, s, e in entries if s != e)
    if not text:
        return
    sched = parse_schedule(text)
    wait = sched.seconds_to_change(moment)
    inside = sched.contains(moment)
    if wait is None:
        assert all(sched.contains(moment + k * 600) == inside for k in range(7 * 24 * 6))
        return
    assert 0 < wait <= 7 * D
    for k in range(0, int(wait), 600):  # every 10 min up to the change
        assert sched.contains(moment + k) == inside
    assert sched.contains(moment + wait) != inside
