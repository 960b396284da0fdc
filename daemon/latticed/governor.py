"""The volunteer resource governor's I/O: where its signals come from, the CPU controls
of compute threads, and the trio service that runs it (`serve_governor`, handing back a
`Governor`).

Owns: the signal sources (battery from /sys/class/power_supply, other programs' CPU load
from /proc/stat minus our own /proc/PID/stat, the user's last input from logind's
``IdleHint`` over the system D-Bus, else terminal access times, memory from
/proc/PID/statm), each rooted in a directory or a callable so
tests pass fakes; the compute threads (dedicated, so their idle priority, pinning and
name never leak into trio's shared thread cache); `GovernedCompute`, the drop-in
``await compute(fn)`` of `lattice.net.gossip_avg.Compute` that blocks new work while
paused and keeps the duty cycle; `TransferGate`, the ``await acquire(nbytes)`` seam
transfer code calls for the rate limits, the transfer schedule and the data cap; a pause
by the user, kept in ``<state dir>/governor.json`` across restarts. The decisions are
`lattice.core.governor`'s (pure). Must not import libp2p.

The seams the job supervisor and the transfer code use: `Governor.state` and
`Governor.wait_change` (mark participations paused with the reason, and back),
`Governor.compute`, `Governor.memory` (reserve a job's estimate) with
`Governor.check_memory`, and the `lattice.net.shaping.ByteBudget` the transfer seam
awaits (`Governor.refusal`, `Governor.send`, `Governor.receive`: the upload and
download `TransferGate`s and the data allowance). The blob store keeps
``keep_free_gb`` itself (`lattice.net.blob_store.BlobStore`).

Failure policy: a signal that cannot be read (a file missing or garbled, no D-Bus) is
unknown, pauses nothing and is counted under ``signal_errors``; the D-Bus connection is
retried every minute. Work that raises in a compute thread re-raises in the task that
awaited it. Anything else is a bug and propagates.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import resource
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import outcome
import trio
from jeepney import DBusAddress, Properties
from jeepney.io.common import RouterClosed
from jeepney.io.trio import open_dbus_connection
from jeepney.wrappers import DBusErrorResponse, unwrap_msg

from lattice.core.governor import (
    CpuSample,
    DataAllowance,
    GovernorState,
    LoadMeter,
    MemoryBudget,
    Now,
    Signals,
    TokenBucket,
    UserPause,
    VolunteerConfig,
    decide,
)

log = logging.getLogger("latticed.governor")

T = TypeVar("T")
THREAD_NAME = "lattice-compute"  # /proc/PID/task/TID/comm of compute threads (15 chars max)
STATE_FILE = "governor.json"
MAX_STATE_FILE = 64 * 1024
MAX_PAUSE_REASON = 200
SAVE_INTERVAL_S = 60.0  # data used is saved this often (and at exit); pauses at once
IDLE_SIGNAL_INTERVAL_S = 5.0
"""Signals are read this often while no compute runs or waits, none ran for this long
and no job holds memory: there is nothing to pause then, and a compute step that finds
them older than `signal_interval_s` reads them afresh before it starts
(`GovernedCompute`). At 2 Hz the sampling was ~0.07 % of a core of an idle daemon."""
DBUS_RETRY_S = 60.0
DBUS_TIMEOUT_S = 1.0
# Each BLAS library's thread-count variable: one BLAS thread per compute thread, so
# compute runs only on the threads the governor pins, prioritizes and meters.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

Clock = Callable[[], Now]


def system_now() -> Now:
    t = time.time()
    return Now(t, time.localtime(t).tm_gmtoff)


def cap_blas_threads(environ: dict[str, str] | Any = os.environ) -> None:
    """Keep numpy's BLAS to the calling thread (unless the volunteer set otherwise).
    Must run before numpy is imported: BLAS reads these once, when it loads."""
    for name in BLAS_THREAD_VARS:
        environ.setdefault(name, "1")


# -- signal sources ---------------------------------------------------------------------------

IdleHint = Callable[[], Awaitable["tuple[bool, float] | None"]]
"""Answers (every session idle?, since when as epoch seconds; 0: never active), or None
when nobody answers (no system bus, no logind)."""


class LogindIdleHint:
    """logind's combined idle state of all sessions (``IdleHint``, ``IdleSinceHint`` of
    org.freedesktop.login1.Manager) over the system bus. A desktop session sets it after
    its own idle delay; a terminal session from the tty's access time; a machine with no
    session at all answers idle since 0."""

    def __init__(self) -> None:
        self._conn: Any = None
        self._retry_at = 0.0
        self.available = False

    async def __call__(self) -> tuple[bool, float] | None:
        if self._conn is None:
            if trio.current_time() < self._retry_at:
                return None
            try:
                with trio.fail_after(DBUS_TIMEOUT_S):
                    self._conn = await open_dbus_connection(bus="SYSTEM")
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError) as e:
                # no bus socket, refused (AuthenticationError is a ValueError), an
                # address we cannot dial: fall back for a while
                self._give_up(f"cannot reach the system bus: {e!r}")
                return None
        manager = Properties(DBusAddress("/org/freedesktop/login1",
                                         bus_name="org.freedesktop.login1",
                                         interface="org.freedesktop.login1.Manager"))
        try:
            with trio.fail_after(DBUS_TIMEOUT_S):
                async with self._conn.router() as router:
                    idle = unwrap_msg(await router.send_and_get_reply(manager.get("IdleHint")))
                    since = unwrap_msg(await router.send_and_get_reply(manager.get("IdleSinceHint")))
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.EndOfChannel,
                RouterClosed, DBusErrorResponse, ValueError) as e:
            self._give_up(f"logind did not answer: {e!r}")
            await self.aclose()
            return None
        self.available = True
        (_, idle_hint), (_, since_us) = idle[0], since[0]
        return bool(idle_hint), int(since_us) / 1e6

    def _give_up(self, why: str) -> None:
        if self.available or self._retry_at == 0.0:
            log.info("user input: %s; using terminal access times", why)
        self.available = False
        self._retry_at = trio.current_time() + DBUS_RETRY_S

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.aclose()


class Sources:
    """Where the signals come from: real paths by default, a fake tree in tests."""

    def __init__(self, *, proc: Path = Path("/proc"), sys: Path = Path("/sys"),
                 dev: Path = Path("/dev"), pid: int | None = None,
                 idle_hint: IdleHint | None = None,
                 page_size: int | None = None) -> None:
        self.proc, self.sys, self.dev = Path(proc), Path(sys), Path(dev)
        self.pid = os.getpid() if pid is None else pid
        self.idle_hint: IdleHint = idle_hint if idle_hint is not None else LogindIdleHint()
        self.page_size = page_size or resource.getpagesize()
        self.input_source = "none"  # what last_input read last: logind | tty | none
        self.errors: Counter[str] = Counter()

    def on_battery(self) -> bool | None:
        """True on battery, False on mains, None with no power supply to ask (desktops,
        servers, containers). Peripheral batteries (a mouse's: scope Device) are ignored."""
        base = self.sys / "class" / "power_supply"
        adapters: list[bool] = []
        discharging: list[bool] = []
        try:
            supplies = sorted(base.iterdir())
        except OSError:
            return None
        try:
            for supply in supplies:
                kind = _read(supply / "type")
                if kind == "Battery":
                    if _read(supply / "scope", "System") == "Device":
                        continue
                    discharging.append(_read(supply / "status", "Unknown") == "Discharging")
                elif kind in ("Mains", "USB", "USB_C", "USB_PD", "USB_PD_DRP", "Wireless"):
                    adapters.append(_read(supply / "online", "0") == "1")
        except OSError:
            self.errors["battery"] += 1
            return None
        if adapters:
            return not any(adapters)
        if discharging:
            return any(discharging)
        return None

    def cpu_sample(self) -> CpuSample | None:
        try:
            with open(self.proc / "stat", "rb") as f:
                head = f.readline(4096).split()
            if head[:1] != [b"cpu"]:
                raise ValueError("/proc/stat does not start with the cpu line")
            ticks = [int(x) for x in head[1:9]]  # user nice system idle iowait irq softirq steal
            total, idle = sum(ticks), ticks[3] + ticks[4]
            own = (self.proc / str(self.pid) / "stat").read_bytes()[:4096]
            rest = own[own.rindex(b")") + 2:].split()
            mine = int(rest[11]) + int(rest[12])  # utime, stime (fields 14 and 15)
        except (OSError, ValueError, IndexError):
            self.errors["cpu"] += 1
            return None
        return CpuSample(total=total, busy=total - idle, own=mine)

    def rss_bytes(self) -> int | None:
        try:
            pages = int((self.proc / str(self.pid) / "statm").read_bytes()[:256].split()[1])
        except (OSError, ValueError, IndexError):
            self.errors["memory"] += 1
            return None
        return pages * self.page_size

    async def last_input(self, now: float) -> float | None:
        """Epoch time of the user's last input (``now`` while logind says a session is
        active), None with no user session at all (headless: idle)."""
        hint = await self.idle_hint()
        if hint is not None:
            self.input_source = "logind"
            idle, since = hint
            if not idle:
                return now
            return since if since > 0 else None
        self.input_source = "tty"
        times = []
        try:
            pts = [p for p in (self.dev / "pts").iterdir() if p.name.isdigit()]
        except OSError:
            pts = []
        for tty in pts + sorted(self.dev.glob("tty[0-9]*")):
            try:
                times.append(tty.stat().st_atime)  # a terminal's atime moves on input
            except OSError:
                continue  # a pts that closed meanwhile
        if not times:
            self.input_source = "none"
            return None
        return max(times)

    async def aclose(self) -> None:
        close = getattr(self.idle_hint, "aclose", None)
        if close is not None:
            await close()


def _read(path: Path, default: str | None = None) -> str:
    try:
        return path.read_text()[:256].strip()
    except FileNotFoundError:
        if default is None:
            raise
        return default


# -- compute threads -----------------------------------------------------------------------------


def choose_cpus(max_cores: int, allowed: set[int] | None = None) -> frozenset[int] | None:
    """The cores compute is pinned to: the last ``max_cores`` of those this process may
    use (core 0 tends to take interrupts and the desktop), None for all of them."""
    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    if max_cores <= 0 or max_cores >= len(allowed):
        return None
    return frozenset(sorted(allowed)[-max_cores:])


@dataclass(frozen=True)
class CpuControls:
    """What a compute thread does to itself when it starts."""

    priority: str = "idle"  # idle | low | normal
    cpus: frozenset[int] | None = None

    def apply_to_current_thread(self) -> dict[str, Any]:
        """Name, priority and pinning of the calling thread (on Linux each of these
        calls acts on the calling thread only). Returns what took effect."""
        tid = threading.get_native_id()
        applied: dict[str, Any] = {"tid": tid, "policy": "normal", "nice": None, "cpus": None}
        try:
            Path(f"/proc/self/task/{tid}/comm").write_text(THREAD_NAME)
        except OSError:
            pass  # not Linux: the name is cosmetic
        wants_nice = self.priority == "low"
        if self.priority == "idle":
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                applied["policy"] = "idle"
            except (OSError, AttributeError):
                wants_nice = True  # SCHED_IDLE is Linux-only: nice 19 is the next best
        if wants_nice:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, 19)
                applied["nice"] = 19
            except OSError:
                pass
        if self.cpus:
            try:
                os.sched_setaffinity(0, self.cpus)
                applied["cpus"] = sorted(self.cpus)
            except OSError as e:  # a seccomp filter or cgroup that forbids it
                log.warning("compute threads cannot be pinned to cores %s: %s",
                            sorted(self.cpus), e)
        if self.priority != "normal" and applied["policy"] == "normal" and applied["nice"] is None:
            log.warning("compute threads run at normal priority: neither SCHED_IDLE nor "
                        "nice 19 could be set")
        return applied


class WorkerPool(Protocol):
    """Runs ``fn`` somewhere and returns (its result, the CPU seconds it used)."""

    threads: int

    async def run(self, fn: Callable[[], T]) -> tuple[T, float]: ...


class ComputeThreads:
    """``threads`` dedicated compute threads, each applying `CpuControls` to itself
    once. Work waits for its thread without regard to cancellation (as trio's
    ``to_thread.run_sync`` does): a thread cannot be interrupted mid-step."""

    def __init__(self, threads: int, controls: CpuControls) -> None:
        self.threads = threads
        self.controls = controls
        self.applied: list[dict[str, Any]] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self._closed = False

    def start(self) -> None:
        """Start the threads; returns once each has applied its controls (they do it
        first thing, at normal priority: milliseconds), so `applied` is whole."""
        self._token = trio.lowlevel.current_trio_token()
        ready = []
        for i in range(self.threads):
            applied = threading.Event()
            t = threading.Thread(target=self._main, args=(applied,), name=f"{THREAD_NAME}-{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
            ready.append(applied)
        for applied in ready:
            applied.wait(timeout=10.0)

    def _main(self, applied: threading.Event) -> None:
        self.applied.append(self.controls.apply_to_current_thread())
        applied.set()
        mark = time.thread_time()
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, deliver = item
            result = outcome.capture(fn)
            # everything this thread used since the last step (the hand-off included),
            # so the duty cycle meters what the kernel counts
            now = time.thread_time()
            used, mark = now - mark, now
            try:
                self._token.run_sync_soon(deliver, result, used)  # type: ignore[union-attr]
            except trio.RunFinishedError:
                return

    async def run(self, fn: Callable[[], T]) -> tuple[T, float]:
        if self._closed:
            raise trio.ClosedResourceError("the compute threads have stopped")
        done = trio.Event()
        box: list[tuple[outcome.Outcome[T], float]] = []

        def deliver(result: outcome.Outcome[T], used: float) -> None:
            box.append((result, used))
            done.set()

        self._queue.put((fn, deliver))
        with trio.CancelScope(shield=True):
            await done.wait()
        result, used = box[0]
        return result.unwrap(), used

    async def aclose(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        with trio.CancelScope(shield=True):  # each finishes the step it is on
            for t in self._threads:
                await trio.to_thread.run_sync(t.join)


class GovernedCompute:
    """``await compute(fn)``: runs ``fn`` on a compute thread once compute may run and
    the duty cycle has budget, at most one per thread at a time. A step already running
    when a pause comes finishes; nothing new starts until the pause lifts, and the
    caller then goes on where it stopped."""

    def __init__(self, governor: Governor, workers: WorkerPool, duty: TokenBucket | None) -> None:
        self._governor = governor
        self._workers = workers
        self._duty = duty
        self._slots = trio.CapacityLimiter(workers.threads)
        self.steps = 0
        self.cpu_seconds = 0.0
        self.paused_waits = 0
        self.duty_waits = 0
        self.duty_wait_seconds = 0.0
        self.running = 0
        self.wanted = 0
        """Callers inside: running, or waiting for a slot, a pause or the duty cycle."""
        self.last_wanted = -float("inf")
        """When the last caller left (trio time)."""

    def in_use(self, now: float) -> bool:
        return self.wanted > 0 or now - self.last_wanted < IDLE_SIGNAL_INTERVAL_S

    async def __call__(self, fn: Callable[[], T]) -> T:
        self.wanted += 1
        try:
            return await self._governed(fn)
        finally:
            self.wanted -= 1
            self.last_wanted = trio.current_time()

    async def _governed(self, fn: Callable[[], T]) -> T:
        async with self._slots:
            await self._governor.refresh()
            while True:
                if not self._governor.state.compute:
                    self.paused_waits += 1
                    await self._governor.wait_compute_allowed()
                    continue
                if self._duty is not None:
                    wait = self._duty.delay(trio.current_time())
                    if wait > 0:
                        self.duty_waits += 1
                        self.duty_wait_seconds += wait
                        with trio.move_on_after(wait):  # a pause meanwhile is seen on top
                            await self._governor.wait_change(self._governor.version)
                        continue
                break
            self.running += 1  # no checkpoint since the checks above: they still hold
            try:
                result, used = await self._workers.run(fn)
            finally:
                self.running -= 1
            self.steps += 1
            self.cpu_seconds += used
            if self._duty is not None:
                self._duty.charge(used, trio.current_time())
            return result

    def statistics(self) -> dict[str, Any]:
        return {"threads": self._workers.threads, "steps": self.steps, "running": self.running,
                "cpu_seconds": round(self.cpu_seconds, 3), "paused_waits": self.paused_waits,
                "duty_waits": self.duty_waits,
                "duty_wait_seconds": round(self.duty_wait_seconds, 3),
                "duty_rate": self._duty.rate if self._duty is not None else None}


class TransferGate:
    """One direction's rate limit: ``await acquire(nbytes)`` counts ``nbytes`` against
    the data allowance and waits as the token bucket requires. Whether a transfer may
    start at all is `Governor.refusal`'s."""

    def __init__(self, governor: Governor, direction: str, mbit_s: float, burst_s: float) -> None:
        self._governor = governor
        self.direction = direction
        self.rate = mbit_s * 1e6 / 8  # bytes per second; 0: no limit
        self._bucket = TokenBucket(self.rate, self.rate * burst_s) if self.rate else None
        self.bytes = 0
        self.waits = 0
        self.wait_seconds = 0.0

    async def acquire(self, nbytes: int) -> None:
        self._governor._count_data(nbytes)
        self.bytes += nbytes
        if self._bucket is not None:
            wait = self._bucket.reserve(nbytes, trio.current_time())
            if wait > 0:
                self.waits += 1
                self.wait_seconds += wait
                await trio.sleep(wait)

    def statistics(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "limit_bytes_s": self.rate or None,
                "waits": self.waits, "wait_seconds": round(self.wait_seconds, 3)}


# -- the service ---------------------------------------------------------------------------------


@dataclass
class _Persisted:
    pause: UserPause | None = None
    data: dict[str, int] | None = None


class Governor:
    """The handle `serve_governor` gives back. `state` is the decision of the last tick
    (or of the last pause/resume); `version` counts its changes of kind."""

    def __init__(self, config: VolunteerConfig, *, workers: WorkerPool, sources: Sources,
                 clock: Clock = system_now, state_dir: Path | None = None,
                 cores: int | None = None) -> None:
        self.config = config
        self.sources = sources
        self.clock = clock
        self.state_file = state_dir / STATE_FILE if state_dir is not None else None
        cores = cores if cores is not None else len(os.sched_getaffinity(0))
        self.cores = cores
        duty = None
        if config.cpu_percent < 100:
            rate = config.cpu_percent / 100 * cores  # CPU-seconds per second
            duty = TokenBucket(rate, rate * config.duty_burst_s)
        self.workers = workers
        self.compute = GovernedCompute(self, workers, duty)
        self.upload = TransferGate(self, "up", config.upload_mbit_s, config.rate_burst_s)
        self.download = TransferGate(self, "down", config.download_mbit_s, config.rate_burst_s)
        self.memory = MemoryBudget(int(config.max_memory_mb * 1e6),
                                   before_first=self._take_rss_baseline)
        self.data = DataAllowance(int(config.monthly_data_gb * 1e9), config.data_reset_day)
        self.load_meter = LoadMeter(config.busy_window_s)
        self.user_pause: UserPause | None = None
        self.signals = Signals()
        self.state = GovernorState()
        self.version = 0
        self.since = clock().wall
        self.pauses: Counter[str] = Counter()  # how often compute paused, by first reason
        self.transfers_refused = 0
        self.rss_baseline: int | None = None
        self._changed = trio.Event()
        self._data_dirty = False
        self._tick_lock = trio.Lock()
        self._last_tick = -float("inf")
        self._wanted = trio.Event()

    # -- what the supervisor and transfer code use ---------------------------------------------
    async def wait_change(self, after: int) -> GovernorState:
        """The state, once `version` has moved past ``after``."""
        while self.version <= after:
            await self._changed.wait()
        return self.state

    async def wait_compute_allowed(self) -> None:
        while not self.state.compute:
            await self._changed.wait()

    def _take_rss_baseline(self) -> None:
        self.rss_baseline = self.sources.rss_bytes()

    def check_memory(self) -> str | None:
        """Why job compute must give memory back now, or None. What compute uses is
        estimated as the process's RSS above what it was when the first of the jobs
        holding a `memory` reservation now reserved it (one heap serves everything, so it
        is an estimate; the reservations are the precise part)."""
        rss = self.sources.rss_bytes()
        if rss is None or self.rss_baseline is None or not self.memory.reserved:
            return None
        return self.memory.over(max(0, rss - self.rss_baseline))

    # -- the transfer seam (`lattice.net.shaping.ByteBudget`) ---------------------------------
    def refusal(self) -> str | None:
        """Why no transfer may start now: outside the transfer schedule, or the
        month's data allowance spent (None: they may)."""
        state = self.state
        if state.network:
            return None
        self.transfers_refused += 1
        return state.network_reasons[0].text

    async def send(self, nbytes: int) -> None:
        await self.upload.acquire(nbytes)

    async def receive(self, nbytes: int) -> None:
        await self.download.acquire(nbytes)

    # -- the local API ---------------------------------------------------------------------------
    def pause(self, for_s: float | None = None, reason: str = "") -> dict[str, Any]:
        """``lattice pause``: until ``for_s`` from now (None: until resumed)."""
        now = self.clock()
        until = None if for_s is None else now.wall + for_s
        self.user_pause = UserPause(since=now.wall, until=until, reason=reason[:MAX_PAUSE_REASON])
        self._save()
        self._decide(now)  # logs the change
        return self.status()

    def resume(self) -> dict[str, Any]:
        """``lattice resume``: lifts a pause by the user (other reasons stay)."""
        if self.user_pause is not None:
            self.user_pause = None
            self._save()
        self._decide(self.clock())
        return self.status()

    def status(self) -> dict[str, Any]:
        """The block in `lattice status`."""
        st, now = self.state, self.clock()
        pause = self.user_pause
        return {
            "state": "running" if st.compute else "paused",
            "summary": st.summary,
            "reasons": [r.as_dict() for r in st.compute_reasons],
            "since": self.since,
            "transfers": st.network_summary,
            "transfer_reasons": [r.as_dict() for r in st.network_reasons],
            "user_pause": None if pause is None else {"since": pause.since, "until": pause.until,
                                                     "reason": pause.reason},
            "signals": {"on_battery": self.signals.on_battery,
                        "idle_s": None if self.signals.last_input is None
                        else round(max(0.0, now.wall - self.signals.last_input), 1),
                        "input_source": self.sources.input_source,
                        "busy_percent": None if self.signals.busy_percent is None
                        else round(self.signals.busy_percent, 1)},
            "cpu": {"priority": self.config.priority, "cores": self.cores,
                    "cpu_percent": self.config.cpu_percent,
                    "threads": self.compute.statistics()["threads"],
                    "compute_seconds": round(self.compute.cpu_seconds, 3)},
            "data": {"used_bytes": self.data.used(now), "cap_bytes": self.data.limit or None},
        }

    def statistics(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "settings": self.config.settings(),
            "state_version": self.version,
            "pauses": dict(self.pauses),
            "compute": self.compute.statistics(),
            "upload": self.upload.statistics(),
            "download": self.download.statistics(),
            "transfers_refused": self.transfers_refused,
            "data_used_bytes": self.data.used(now),
            "memory_reserved_bytes": self.memory.reserved,
            "signal_errors": dict(self.sources.errors),
            "input_source": self.sources.input_source,
            "threads_applied": list(getattr(self.workers, "applied", [])),  # fakes apply nothing
        }

    # -- the service's loop -------------------------------------------------------------------
    def in_use(self) -> bool:
        """Whether compute runs, waits or ran lately, or a job holds memory: then the
        signals are read every `signal_interval_s`, else every `IDLE_SIGNAL_INTERVAL_S`."""
        return self.compute.in_use(trio.current_time()) or self.memory.reserved > 0

    def next_read(self) -> float:
        """When the signals are next due, on the short interval (trio time)."""
        return self._last_tick + self.config.signal_interval_s

    async def refresh(self) -> None:
        """Read the signals now unless the last read is under `signal_interval_s` old,
        and put the service's loop back on its short interval."""
        if trio.current_time() >= self.next_read():
            await self.tick()
        self._wanted.set()

    async def wait_until_wanted(self, timeout: float) -> None:
        self._wanted = trio.Event()
        with trio.move_on_after(timeout):
            await self._wanted.wait()

    async def tick(self) -> None:
        """Read every signal and decide."""
        async with self._tick_lock:
            self._last_tick = trio.current_time()
            await self._read_and_decide()

    async def _read_and_decide(self) -> None:
        now = self.clock()
        sample = self.sources.cpu_sample()
        busy = self.load_meter.add(trio.current_time(), sample) if sample is not None else None
        last_input = None
        if self.config.run_when == "idle":  # no D-Bus traffic for a setting that is off
            last_input = await self.sources.last_input(now.wall)
        self.signals = Signals(on_battery=self.sources.on_battery(), last_input=last_input,
                               busy_percent=busy)
        self._decide(now)

    def _decide(self, now: Now) -> None:
        if self.user_pause is not None and self.user_pause.expired(now):
            log.info("governor: the user's pause ended")
            self.user_pause = None
            self._save()
        signals = Signals(on_battery=self.signals.on_battery, last_input=self.signals.last_input,
                          busy_percent=self.signals.busy_percent, user_pause=self.user_pause,
                          data_used=self.data.used(now))
        new = decide(self.config, now, signals)
        old, self.state = self.state, new
        if new.kinds() != old.kinds():
            self.version += 1
            self.since = now.wall
            if not new.compute and (old.compute or new.compute_reasons[0].kind
                                    != old.compute_reasons[0].kind):
                self.pauses[new.compute_reasons[0].kind] += 1
            log.info("governor: compute %s; transfers %s", new.summary, new.network_summary)
            changed, self._changed = self._changed, trio.Event()
            changed.set()

    def _count_data(self, nbytes: int) -> None:
        now = self.clock()
        was = self.data.exhausted(now)
        self.data.add(nbytes, now)
        self._data_dirty = True
        if self.data.exhausted(now) and not was:
            self._decide(now)

    # -- persistence ----------------------------------------------------------------------------
    def restore(self) -> None:
        """A pause by the user and the data used this period, from the last run."""
        if self.state_file is None:
            return
        try:
            with open(self.state_file, "rb") as f:
                raw = f.read(MAX_STATE_FILE + 1)
        except FileNotFoundError:
            return
        try:
            if len(raw) > MAX_STATE_FILE:
                raise ValueError(f"larger than {MAX_STATE_FILE} bytes")
            saved = _parse_saved(json.loads(raw))
        except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
            log.warning("ignoring unreadable %s: %s", self.state_file, e)
            return
        self.user_pause = saved.pause
        if saved.data is not None:
            self.data.restore(saved.data, self.clock())

    def _save(self) -> None:
        if self.state_file is None:
            return
        pause = self.user_pause
        doc = {"format": 1,
               "pause": None if pause is None else {"since": pause.since, "until": pause.until,
                                                    "reason": pause.reason},
               "data": self.data.export()}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.state_file)
        self._data_dirty = False


def _parse_saved(doc: Any) -> _Persisted:
    if not isinstance(doc, dict) or doc.get("format") != 1:
        raise ValueError("not a format-1 governor state")
    out = _Persisted()
    pause = doc.get("pause")
    if pause is not None:
        since, until, reason = pause["since"], pause["until"], pause["reason"]
        if not (isinstance(since, (int, float)) and (until is None or isinstance(until, (int, float)))
                and isinstance(reason, str)):
            raise TypeError("bad pause record")
        out.pause = UserPause(float(since), None if until is None else float(until),
                              reason[:MAX_PAUSE_REASON])
    data = doc.get("data")
    if data is not None:
        if not all(isinstance(data.get(k), int) for k in ("year", "month", "used")):
            raise TypeError("bad data record")
        out.data = {k: data[k] for k in ("year", "month", "used")}
    return out


async def serve_governor(config: VolunteerConfig, *, compute_threads: int = 1,
                         state_dir: Path | None = None, sources: Sources | None = None,
                         clock: Clock = system_now, workers: WorkerPool | None = None,
                         cores: int | None = None,
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the governor until cancelled; hands back the `Governor` after its first
    decision (so compute starts paused when it must).

    ``workers`` default to ``compute_threads`` dedicated threads at the configured
    priority, pinned to ``max_cores`` cores; tests pass a pool whose work takes virtual
    time (with ``cores``, what the duty cycle counts them as). ``sources`` and ``clock``
    default to the machine's. Failure policy: see the module docstring."""
    sources = sources or Sources()
    threads: ComputeThreads | None = None
    if workers is None:
        cpus = choose_cpus(config.max_cores)
        cores = len(cpus) if cpus else len(os.sched_getaffinity(0))
        workers = threads = ComputeThreads(compute_threads,
                                           CpuControls(priority=config.priority, cpus=cpus))
    elif cores is None:
        cores = workers.threads
    governor = Governor(config, workers=workers, sources=sources, clock=clock,
                        state_dir=state_dir, cores=cores)
    try:
        if threads is not None:
            threads.start()
        governor.restore()
        await governor.tick()
        task_status.started(governor)
        last_save = trio.current_time()
        while True:
            if governor.in_use():
                await trio.sleep_until(governor.next_read())
            else:
                await governor.wait_until_wanted(max(config.signal_interval_s,
                                                     IDLE_SIGNAL_INTERVAL_S))
            # a step that woke us has just read them: no second read of the same moment
            await governor.refresh()
            if governor._data_dirty and trio.current_time() - last_save >= SAVE_INTERVAL_S:
                governor._save()
                last_save = trio.current_time()
    finally:
        if governor._data_dirty:
            governor._save()
        with trio.CancelScope(shield=True):
            await sources.aclose()
            if threads is not None:
                await threads.aclose()


__all__ = ["BLAS_THREAD_VARS", "THREAD_NAME", "ComputeThreads", "CpuControls", "Governor",
           "GovernedCompute", "LogindIdleHint", "Sources", "TransferGate", "WorkerPool",
           "cap_blas_threads", "choose_cpus", "serve_governor", "system_now"]
