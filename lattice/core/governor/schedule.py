"""Weekly time windows: ``"mon-fri 18:00-08:00; sat,sun"`` parsed into intervals of the
local week, asked whether a moment is inside and when that next changes.

Must not read the clock: moments are seconds since Monday 00:00 local time
(`Now.week_second`).

Grammar (entries separated by ``;``; each has days, a time range, or both)::

    entry  = [days] [HH:MM-HH:MM]
    days   = day ["-" day] *("," day ["-" day]) | "*" | "daily"
    day    = mon | tue | wed | thu | fri | sat | sun   (full names work too)

A range whose end is not after its start crosses midnight: ``fri 22:00-02:00`` runs
from Friday 22:00 to Saturday 02:00; a day range may wrap (``sat-mon``). Days alone
mean the whole day; a range alone means every day. ``24:00`` is allowed as an end. An
empty text means no restriction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lattice.core.governor.localtime import WEEKDAYS

MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
MAX_ENTRIES = 64  # a hand-written setting; more is a mistake, not a schedule
_DAY_NAMES = {name: i for i, name in enumerate(WEEKDAYS)}
_DAY_NAMES.update({full: i for i, full in enumerate(
    ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))})
_RANGE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


class ScheduleError(ValueError):
    """A schedule text that does not parse; the message names the entry."""


@dataclass(frozen=True)
class Schedule:
    """Merged, sorted ``[start, end)`` minute intervals of the week (Monday 00:00 = 0).
    ``always`` when the text was empty."""

    text: str
    intervals: tuple[tuple[int, int], ...]
    always: bool = False

    def contains(self, week_second: float) -> bool:
        if self.always:
            return True
        minute = (week_second % (MINUTES_PER_WEEK * 60)) / 60
        return any(start <= minute < end for start, end in self.intervals)

    def seconds_to_change(self, week_second: float) -> float | None:
        """Seconds until `contains` flips, or None if it never does (no restriction,
        or windows covering the whole week)."""
        if self.always or self.intervals == ((0, MINUTES_PER_WEEK),):
            return None
        if not self.intervals:
            return None
        points = {s for s, _ in self.intervals} | {e for _, e in self.intervals}
        if self.intervals[0][0] == 0 and self.intervals[-1][1] == MINUTES_PER_WEEK:
            points -= {0, MINUTES_PER_WEEK}  # a window running over Sunday midnight
        week = MINUTES_PER_WEEK * 60
        now = week_second % week
        deltas = [((p * 60) - now) % week for p in points]
        return min(d if d > 0 else week for d in deltas)


def parse_schedule(text: str) -> Schedule:
    """Parse a schedule (grammar in the module docstring); raises ScheduleError."""
    entries = [e.strip() for e in text.split(";") if e.strip()]
    if not entries:
        return Schedule(text="", intervals=(), always=True)
    if len(entries) > MAX_ENTRIES:
        raise ScheduleError(f"more than {MAX_ENTRIES} entries")
    raw: list[tuple[int, int]] = []
    for entry in entries:
        raw.extend(_entry_intervals(entry))
    return Schedule(text="; ".join(entries), intervals=_merge(raw))


def _entry_intervals(entry: str) -> list[tuple[int, int]]:
    parts = entry.lower().split()
    if len(parts) > 2:
        raise ScheduleError(f"{entry!r}: expected 'DAYS HH:MM-HH:MM', 'DAYS' or 'HH:MM-HH:MM'")
    days: list[int] = list(range(7))
    span: tuple[int, int] | None = None
    for i, part in enumerate(parts):
        if _RANGE.match(part):
            if span is not None:
                raise ScheduleError(f"{entry!r}: two time ranges")
            span = _time_range(entry, part)
        elif i == 0:
            days = _days(entry, part)
        else:
            raise ScheduleError(f"{entry!r}: {part!r} is not a time range like 18:00-08:00")
    start, end = span if span is not None else (0, MINUTES_PER_DAY)
    if end <= start:
        end += MINUTES_PER_DAY  # crosses midnight into the next day
    out = []
    for day in days:
        lo, hi = day * MINUTES_PER_DAY + start, day * MINUTES_PER_DAY + end
        if hi > MINUTES_PER_WEEK:  # Sunday into Monday: wrap around the week
            out += [(lo, MINUTES_PER_WEEK), (0, hi - MINUTES_PER_WEEK)]
        else:
            out.append((lo, hi))
    return out


def _days(entry: str, text: str) -> list[int]:
    if text in ("*", "daily"):
        return list(range(7))
    out: list[int] = []
    for item in text.split(","):
        first, sep, last = item.partition("-")
        a, b = _day(entry, first), _day(entry, last) if sep else None
        if b is None:
            out.append(a)
        else:
            out.extend((a + i) % 7 for i in range((b - a) % 7 + 1))  # sat-mon wraps
    return sorted(set(out))


def _day(entry: str, name: str) -> int:
    if name not in _DAY_NAMES:
        raise ScheduleError(f"{entry!r}: {name!r} is not a day (mon, tue, ... sun)")
    return _DAY_NAMES[name]


def _time_range(entry: str, text: str) -> tuple[int, int]:
    h1, m1, h2, m2 = (int(g) for g in _RANGE.match(text).groups())  # type: ignore[union-attr]
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or m2 > 59 or end > MINUTES_PER_DAY:
        raise ScheduleError(f"{entry!r}: {text!r} is not a valid time range (00:00 to 24:00)")
    if start == end:
        raise ScheduleError(f"{entry!r}: {text!r} is empty; use 00:00-24:00 for the whole day")
    return start, end


def _merge(intervals: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)
