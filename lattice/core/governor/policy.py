"""The volunteer's settings and the decision they imply: from the signals of one
moment (battery, user input, other programs' CPU load, the clock, a pause by the user,
data used this month) to whether job compute and network transfers may run, and
exactly why not.

Must not import trio, sockets or read the clock: the daemon's sources sample the
signals and the clock (`lattice.core.governor.localtime.Now`) and pass them in.

Order of reasons (the first is the one `lattice status` shows; all are listed): a
pause by the user, the battery, the schedule, the user at the keyboard, other
programs' load. A pause by the user stops compute only: the daemon stays in the
network (state sync, DHT, relaying within its limits). Transfers stop only outside
their own schedule or once the month's data allowance is spent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lattice.core.config_errors import InvalidSetting
from lattice.core.governor.budgets import format_bytes
from lattice.core.governor.localtime import Now, next_period_start
from lattice.core.governor.schedule import Schedule, ScheduleError, parse_schedule

RUN_WHEN = ("always", "idle")
# A shaped read takes up to 256 KiB (lattice.net.shaping.READ_SLICE) and then waits for
# its tokens: at 1 Mbit/s about 2 s, inside py-libp2p's 5 s Yamux window timeout.
MIN_DOWNLOAD_MBIT_S = 1.0
PRIORITIES = ("idle", "low", "normal")

# reason kinds, in the order the summary prefers them
USER = "user"
BATTERY = "battery"
SCHEDULE = "schedule"
USER_ACTIVE = "user_active"
BUSY = "busy"
NETWORK_SCHEDULE = "network_schedule"
DATA_CAP = "data_cap"
COMPUTE_REASONS = (USER, BATTERY, SCHEDULE, USER_ACTIVE, BUSY)
NETWORK_REASONS = (NETWORK_SCHEDULE, DATA_CAP)


class VolunteerConfigError(InvalidSetting):
    """A bad ``[volunteer]`` setting; ``key`` names it (``volunteer.cpu_percent``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key.rpartition(".")[2], message)
        self.args = (f"{key} {message}",)
        self.key = key


@dataclass(frozen=True)
class VolunteerConfig:
    """How much of this machine Lattice may use, and when (daemon section ``[volunteer]``)."""

    run_when: str = "always"
    """``always``, or ``idle``: compute only after ``idle_after_min`` without user input."""
    idle_after_min: float = 5.0
    """Minutes without keyboard or mouse input before the machine counts as idle."""
    pause_if_busy_percent: float = 0.0
    """Pause compute while other programs use more than this share of all CPUs, percent
    (0: never; compute already runs at idle priority, so other work goes first)."""
    busy_window_s: float = 10.0
    """Other programs' CPU use is averaged over this many seconds."""
    pause_on_battery: bool = True
    """Pause compute while the machine runs on battery."""
    priority: str = "idle"
    """Compute threads' CPU priority: ``idle`` (SCHED_IDLE, else nice 19), ``low`` (nice
    19) or ``normal`` (as the daemon)."""
    max_cores: int = 0
    """Cores job compute may run on (0: all); compute threads are pinned to them."""
    cpu_percent: float = 100.0
    """Share of those cores' time job compute may use, averaged over a minute, percent
    (a duty cycle, like BOINC's "use at most X% of CPU time")."""
    compute_schedule: str = ""
    """When compute may run, local time: ``"mon-fri 18:00-08:00; sat,sun"`` ("": any time)."""
    network_schedule: str = ""
    """When bulk transfers (model blobs, averaging tensors, relaying) may run ("": any time)."""
    max_memory_mb: float = 0.0
    """Memory job compute may use, MB (0: no cap); a job that would exceed it is left."""
    keep_free_gb: float = 1.0
    """The blob store never fills its disk beyond leaving this much free, GB."""
    upload_mbit_s: float = 0.0
    """Upload rate limit for transfers, Mbit/s (0: none)."""
    download_mbit_s: float = 0.0
    """Download rate limit for transfers, Mbit/s (0: none; else at least 1: a slower
    reader would stall a libp2p stream past its 5 s window timeout)."""
    monthly_data_gb: float = 0.0
    """Transfers stop once this much has moved (up + down) in a month, GB (0: no cap)."""
    data_reset_day: int = 1
    """Day of the month (1-28) the data allowance starts over, like a billing cycle."""
    signal_interval_s: float = 0.5
    """How often battery, input, CPU load and memory are read (a pause takes effect
    within this, plus the compute step running then); every 5 s while no compute runs
    or waits (`latticed.governor.IDLE_SIGNAL_INTERVAL_S`)."""
    duty_burst_s: float = 1.0
    """The duty cycle's bucket holds this many seconds of allowed CPU time: compute runs
    in short bursts instead of a minute on, a minute off."""
    rate_burst_s: float = 0.25
    """Transfer rate limits let this many seconds' worth of bytes through at once."""
    compute_windows: Schedule = field(init=False, repr=False, compare=False)
    network_windows: Schedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise VolunteerConfigError(f"volunteer.{key}", f"{what}, got {getattr(self, key)!r}")
        need(self.run_when in RUN_WHEN, "run_when", "must be always or idle")
        need(self.priority in PRIORITIES, "priority", "must be idle, low or normal")
        need(0 < self.cpu_percent <= 100, "cpu_percent", "must be in (0, 100]")
        need(0 <= self.pause_if_busy_percent <= 100, "pause_if_busy_percent", "must be in [0, 100]")
        need(1 <= self.data_reset_day <= 28, "data_reset_day", "must be in 1..28")
        need(self.max_cores >= 0, "max_cores", "must not be negative")
        for name in ("idle_after_min", "max_memory_mb", "keep_free_gb", "upload_mbit_s",
                     "download_mbit_s", "monthly_data_gb"):
            need(getattr(self, name) >= 0, name, "must not be negative")
        need(self.download_mbit_s == 0 or self.download_mbit_s >= MIN_DOWNLOAD_MBIT_S,
             "download_mbit_s", f"must be 0 or at least {MIN_DOWNLOAD_MBIT_S:g}")
        for name in ("busy_window_s", "signal_interval_s", "duty_burst_s", "rate_burst_s"):
            need(getattr(self, name) > 0, name, "must be positive")
        for name in ("compute", "network"):
            try:
                windows = parse_schedule(getattr(self, f"{name}_schedule"))
            except ScheduleError as e:
                raise VolunteerConfigError(f"volunteer.{name}_schedule", str(e)) from None
            object.__setattr__(self, f"{name}_windows", windows)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> VolunteerConfig:
        """From ``{"volunteer.cpu_percent": 50, ...}`` (the daemon's keys; bare names
        work too). Unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {key.rpartition(".")[2]: v for key, v in values.items()}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise VolunteerConfigError(f"volunteer.{unknown[0]}", "is not a setting")
        return cls(**kwargs)

    @property
    def idle_after_s(self) -> float:
        return self.idle_after_min * 60

    def settings(self) -> dict[str, Any]:
        """Every setting by name (for statistics and `lattice status --json`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


@dataclass(frozen=True)
class UserPause:
    """``lattice pause``: since when, until when (None: until ``lattice resume``), why."""

    since: float
    until: float | None = None
    reason: str = ""

    def expired(self, now: Now) -> bool:
        return self.until is not None and now.wall >= self.until


@dataclass(frozen=True)
class Signals:
    """What the sources read at one moment. None means the signal is unknown (no
    battery, no logind and no terminal, /proc unreadable): it pauses nothing."""

    on_battery: bool | None = None
    last_input: float | None = None
    """Epoch time of the user's last input; None: no user session (a headless server
    counts as idle)."""
    busy_percent: float | None = None
    """Other programs' CPU use, percent of the whole machine (`LoadMeter`)."""
    user_pause: UserPause | None = None
    data_used: int = 0
    """Bytes moved in the current data period."""


@dataclass(frozen=True)
class Reason:
    kind: str
    text: str
    until: float | None = None
    """Epoch time this reason is known to end (None: when its signal changes)."""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "until": self.until}


@dataclass(frozen=True)
class GovernorState:
    """Whether compute and transfers may run now, and every reason they may not."""

    compute_reasons: tuple[Reason, ...] = ()
    network_reasons: tuple[Reason, ...] = ()

    @property
    def compute(self) -> bool:
        return not self.compute_reasons

    @property
    def network(self) -> bool:
        return not self.network_reasons

    @property
    def summary(self) -> str:
        """``running``, ``paused: on battery``, ``paused by user until 14:00: REASON``."""
        if self.compute:
            return "running"
        first = self.compute_reasons[0]
        return f"paused {first.text}" if first.kind == USER else f"paused: {first.text}"

    @property
    def network_summary(self) -> str:
        return "allowed" if self.network else f"paused: {self.network_reasons[0].text}"

    def kinds(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What a change subscriber cares about: the reasons' kinds, not their text
        (``user active 40 s ago`` ticks every second)."""
        return (tuple(r.kind for r in self.compute_reasons),
                tuple(r.kind for r in self.network_reasons))


def decide(config: VolunteerConfig, now: Now, signals: Signals) -> GovernorState:
    """The governor's state for these signals at ``now``."""
    compute: list[Reason] = []
    pause = signals.user_pause
    if pause is not None and not pause.expired(now):
        text = "by user"
        if pause.until is not None:
            text += f" until {now.describe(pause.until)}"
        if pause.reason:
            text += f": {pause.reason}"
        compute.append(Reason(USER, text, pause.until))
    if config.pause_on_battery and signals.on_battery:
        compute.append(Reason(BATTERY, "on battery"))
    week_second = now.week_second()
    if not config.compute_windows.contains(week_second):
        compute.append(_outside(SCHEDULE, "outside schedule", config.compute_windows, now))
    if config.run_when == "idle" and signals.last_input is not None:
        idle = now.wall - signals.last_input
        if idle < config.idle_after_s:
            ago = "now" if idle < 1 else f"{_span(idle)} ago"
            compute.append(Reason(USER_ACTIVE, f"user active {ago}",
                                  signals.last_input + config.idle_after_s))
    limit = config.pause_if_busy_percent
    if limit > 0 and signals.busy_percent is not None and signals.busy_percent > limit:
        compute.append(Reason(BUSY, f"other programs use {signals.busy_percent:.0f}% of the "
                                    f"CPU (limit {limit:g}%)"))

    network: list[Reason] = []
    if not config.network_windows.contains(week_second):
        network.append(_outside(NETWORK_SCHEDULE, "outside transfer schedule",
                                config.network_windows, now))
    cap = int(config.monthly_data_gb * 1e9)
    if cap and signals.data_used >= cap:
        until = next_period_start(now, config.data_reset_day)
        network.append(Reason(DATA_CAP, f"monthly data cap reached ({format_bytes(signals.data_used)}"
                                        f" of {format_bytes(cap)}) until {now.describe(until)}", until))
    return GovernorState(tuple(compute), tuple(network))


def _outside(kind: str, text: str, windows: Schedule, now: Now) -> Reason:
    wait = windows.seconds_to_change(now.week_second())
    if wait is None:
        return Reason(kind, text)
    until = now.wall + wait
    return Reason(kind, f"{text} until {now.describe(until)}", until)


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{int(seconds)} s"
    if seconds < 120 * 60:
        return f"{int(seconds // 60)} min"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} d"
