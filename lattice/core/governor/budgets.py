"""The governor's meters, pure: a token bucket (rate limits and the CPU duty cycle),
the monthly data allowance, the non-Lattice CPU load meter, and the memory and disk
checks. Time is passed in (``now``: monotonic seconds, or a `Now` for the calendar).

Must not import trio, sockets or read the clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from lattice.core.governor.localtime import Now, month_period


def format_bytes(n: float) -> str:
    """Decimal units, as ISPs and disk vendors count (the config says GB and MB)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


MIN_WAIT = 1e-6


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up.

    A caller may overdraw: `reserve` takes what it asks for at once and returns how long
    to wait for the debt to refill, so a request larger than the burst still passes at
    the average rate, and concurrent callers queue in the order they asked. Over any
    interval T the tokens taken are at most ``burst + rate * T`` plus the one request
    that overdrew (with `charge`, the cost of work measured after it ran)."""

    def __init__(self, rate: float, burst: float) -> None:
        if not rate > 0 or burst < 0:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 0, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.level = burst
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self.level = min(self.burst, self.level + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now

    def delay(self, now: float) -> float:
        """Seconds until the level is back to zero (0: go now). A wait under a
        microsecond is none: rounding leaves such debts, and a clock cannot wait them."""
        self._refill(now)
        wait = -self.level / self.rate
        return wait if wait >= MIN_WAIT else 0.0

    def charge(self, amount: float, now: float) -> None:
        """Take ``amount`` (may overdraw)."""
        self._refill(now)
        self.level -= amount

    def reserve(self, amount: float, now: float) -> float:
        """Take ``amount`` and return the seconds to wait before using it."""
        self.charge(amount, now)
        return self.delay(now)


class DataAllowance:
    """Bytes moved in the current monthly period against a cap (0: no cap). The period
    rolls over at 00:00 local on ``reset_day``; `export`/`restore` carry it across a
    restart."""

    def __init__(self, limit_bytes: int, reset_day: int = 1) -> None:
        if not 1 <= reset_day <= 28:
            raise ValueError(f"the data period must start on day 1..28, not {reset_day}")
        self.limit = max(0, int(limit_bytes))
        self.reset_day = reset_day
        self._period: tuple[int, int] | None = None
        self._used = 0

    def _roll(self, now: Now) -> None:
        period = month_period(now, self.reset_day)
        if period != self._period:
            self._period, self._used = period, 0

    def add(self, nbytes: int, now: Now) -> None:
        self._roll(now)
        self._used += max(0, int(nbytes))

    def used(self, now: Now) -> int:
        self._roll(now)
        return self._used

    def exhausted(self, now: Now) -> bool:
        return self.limit > 0 and self.used(now) >= self.limit

    def export(self) -> dict[str, int] | None:
        if self._period is None:
            return None
        return {"year": self._period[0], "month": self._period[1], "used": self._used}

    def restore(self, saved: dict[str, int], now: Now) -> None:
        """Take the saved count if it is for the period running now."""
        if month_period(now, self.reset_day) == (saved["year"], saved["month"]):
            self._period, self._used = (saved["year"], saved["month"]), max(0, saved["used"])


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU ticks: the whole machine (``total`` = all states, ``busy`` = not
    idle nor waiting for I/O, from /proc/stat) and our own process (utime + stime)."""

    total: int
    busy: int
    own: int


class LoadMeter:
    """Non-Lattice CPU use, percent of the whole machine, averaged over ``window``
    seconds: (busy ticks - our ticks) / all ticks between the oldest sample in the
    window and the newest. Averaging keeps a compile's short burst or a one-second
    lull from flapping the pause."""

    def __init__(self, window: float, max_samples: int = 1024) -> None:
        self.window = window
        self._samples: deque[tuple[float, CpuSample]] = deque(maxlen=max_samples)
        self.percent: float | None = None

    def add(self, now: float, sample: CpuSample) -> float | None:
        self._samples.append((now, sample))
        # keep one sample at or before the window's start as the base
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        (_, base), (_, last) = self._samples[0], self._samples[-1]
        total = last.total - base.total
        if total > 0:
            others = (last.busy - base.busy) - (last.own - base.own)
            self.percent = min(100.0, max(0.0, 100.0 * others / total))
        return self.percent


class MemoryBudget:
    """The memory job compute may use (0: no cap). The supervisor reserves a job's
    estimate before it joins (`reserve` says why not, when it would exceed the cap) and
    checks what compute really uses while it runs (`over`)."""

    def __init__(self, cap_bytes: int,
                 before_first: Callable[[], None] | None = None) -> None:
        self.cap = max(0, int(cap_bytes))
        self._reserved: dict[str, int] = {}
        self._before_first = before_first
        """Called as a reservation is made while none is held (the governor reads the
        daemon's own memory then, the baseline compute's use is measured from)."""

    @property
    def reserved(self) -> int:
        return sum(self._reserved.values())

    def reserve(self, key: str, nbytes: int) -> str | None:
        """Reserve ``nbytes`` for ``key`` (a job id); returns the reason it would exceed
        the cap (nothing reserved then), or None."""
        others = self.reserved - self._reserved.get(key, 0)
        if self.cap and others + nbytes > self.cap:
            return (f"memory: needs {format_bytes(nbytes)}, {format_bytes(self.cap - others)} "
                    f"of the {format_bytes(self.cap)} compute cap left")
        if not self._reserved and self._before_first is not None:
            self._before_first()
        self._reserved[key] = int(nbytes)
        return None

    def release(self, key: str) -> None:
        self._reserved.pop(key, None)

    def over(self, used_bytes: int) -> str | None:
        """The reason compute must give memory back, when ``used_bytes`` exceeds the cap."""
        if self.cap and used_bytes > self.cap:
            return (f"memory: job compute uses {format_bytes(used_bytes)}, over the "
                    f"{format_bytes(self.cap)} cap")
        return None


def disk_refusal(free_bytes: int, nbytes: int, keep_free_bytes: int) -> str | None:
    """Why writing ``nbytes`` would leave less than ``keep_free_bytes`` free, or None."""
    if free_bytes - nbytes < keep_free_bytes:
        return (f"disk: writing {format_bytes(nbytes)} would leave {format_bytes(max(0, free_bytes - nbytes))} "
                f"free, less than the {format_bytes(keep_free_bytes)} to keep free")
    return None
