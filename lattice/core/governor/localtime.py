"""Local wall-clock arithmetic without reading the clock: weekdays, dates and month
boundaries from an epoch time and the local UTC offset the caller passes in.

Must not import time, datetime or anything that reads the clock: the daemon samples
`Now` once per tick (``time.time()`` and ``tm_gmtoff``) and tests pass fixed values.
The date algorithms are Howard Hinnant's ``days_from_civil`` / ``civil_from_days``
(proleptic Gregorian, exact for any year we will meet).
"""

from __future__ import annotations

from dataclasses import dataclass

DAY = 86400
WEEK = 7 * DAY
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


@dataclass(frozen=True)
class Now:
    """One sample of the clock: seconds since the epoch and the local UTC offset."""

    wall: float
    utc_offset: int = 0
    """Local time minus UTC, seconds (``time.localtime().tm_gmtoff``)."""

    def local(self, wall: float | None = None) -> float:
        """Seconds since 1970-01-01 00:00 *local* time, for ``wall`` (default: now).
        A time far from now uses today's offset: a daylight-saving change in between
        shifts it by an hour, which only the text we show would notice."""
        return (self.wall if wall is None else wall) + self.utc_offset

    def week_second(self, wall: float | None = None) -> float:
        """Seconds since Monday 00:00 local time."""
        local = self.local(wall)
        days = int(local // DAY)
        return ((days + _EPOCH_WEEKDAY) % 7) * DAY + (local - days * DAY)

    def date(self, wall: float | None = None) -> tuple[int, int, int]:
        """(year, month, day) in local time."""
        return civil_from_days(int(self.local(wall) // DAY))

    def wall_at_local_midnight(self, year: int, month: int, day: int) -> float:
        """The epoch time of 00:00 local on that date (at today's offset)."""
        return days_from_civil(year, month, day) * DAY - self.utc_offset

    def describe(self, wall: float) -> str:
        """A future time as a volunteer reads it: ``14:00`` today, ``tue 14:00``
        within the week, else ``2025-07-01 14:00``."""
        local = self.local(wall)
        days, today = int(local // DAY), int(self.local() // DAY)
        minute = int(round(local - days * DAY)) // 60
        if minute == 24 * 60:  # rounding up to midnight
            days, minute = days + 1, 0
        hhmm = f"{minute // 60:02d}:{minute % 60:02d}"
        if days == today:
            return hhmm
        if 0 < days - today < 7:
            return f"{WEEKDAYS[(days + _EPOCH_WEEKDAY) % 7]} {hhmm}"
        y, m, d = civil_from_days(days)
        return f"{y:04d}-{m:02d}-{d:02d} {hhmm}"


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(z: int) -> tuple[int, int, int]:
    """The (year, month, day) of ``z`` days since 1970-01-01."""
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (m <= 2), m, d


def month_period(now: Now, reset_day: int) -> tuple[int, int]:
    """The (year, month) whose data allowance is running: a period starts at 00:00 local
    on ``reset_day`` (1..28) of a month, like an ISP's billing cycle."""
    y, m, d = now.date()
    if d < reset_day:
        y, m = (y, m - 1) if m > 1 else (y - 1, 12)
    return y, m


def next_period_start(now: Now, reset_day: int) -> float:
    """Epoch time at which the next data period begins."""
    y, m = month_period(now, reset_day)
    y, m = (y, m + 1) if m < 12 else (y + 1, 1)
    return now.wall_at_local_midnight(y, m, reset_day)
