"""A fake machine for the governor: /proc, /sys and /dev trees in a temp dir, a logind
answer, a clock in virtual time, and compute steps that take virtual time — so every
pause reason can be driven deterministically under `autojump_clock`."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import trio

from lattice.core.governor import Now
from lattice.core.governor.localtime import days_from_civil
from latticed.governor import Sources

# Wednesday 2025-06-11 12:00 UTC: virtual time 0
BASE = days_from_civil(2025, 6, 11) * 86400 + 12 * 3600
PID = 4242


def virtual_now() -> Now:
    return Now(BASE + trio.current_time(), 0)


class FakeMachine:
    """Writes what the real sources read. Two cores, 100 ticks per second each."""

    def __init__(self, root: Path) -> None:
        self.proc, self.sys, self.dev = root / "proc", root / "sys", root / "dev"
        (self.proc / str(PID)).mkdir(parents=True)
        (self.sys / "class" / "power_supply").mkdir(parents=True)
        (self.dev / "pts").mkdir(parents=True)
        self._fds: dict[Path, int] = {}
        self.logind: tuple[bool, float] | None = None  # None: no system bus
        self._busy = self._own = self._total = 0
        self._others_share = 0.0  # of the whole machine
        self._own_share = 0.0
        self._at = 0.0
        self.set_cpu(others_percent=0.0)
        self.set_rss(100 * 10**6)

    def sources(self) -> Sources:
        async def idle_hint():
            return self.logind

        return Sources(proc=self.proc, sys=self.sys, dev=self.dev, pid=PID, idle_hint=idle_hint,
                       page_size=4096)

    # -- power ---------------------------------------------------------------------------------
    def power(self, *, ac: bool | None = None, battery: str | None = None) -> None:
        base = self.sys / "class" / "power_supply"
        if ac is not None:
            (base / "AC").mkdir(exist_ok=True)
            (base / "AC" / "type").write_text("Mains\n")
            (base / "AC" / "online").write_text("1\n" if ac else "0\n")
        if battery is not None:
            (base / "BAT0").mkdir(exist_ok=True)
            (base / "BAT0" / "type").write_text("Battery\n")
            (base / "BAT0" / "status").write_text(battery + "\n")

    # -- CPU: cumulative ticks advance with virtual time ----------------------------------------
    def set_cpu(self, others_percent: float, own_percent: float = 0.0) -> None:
        """From now on, other programs and we use these shares of the whole machine."""
        self._advance()
        self._others_share = others_percent / 100
        self._own_share = own_percent / 100

    def _advance(self) -> None:
        now = trio.current_time() if _in_trio() else 0.0
        dt, self._at = now - self._at, now
        ticks = int(200 * dt)
        self._total += ticks
        self._busy += int(ticks * self._others_share) + int(ticks * self._own_share)
        self._own += int(ticks * self._own_share)
        self.write_proc()

    def write_proc(self) -> None:
        # fixed-width numbers rewritten in place: truncating a file on ext4 forces a
        # block flush (auto_da_alloc), which made each rewrite cost milliseconds
        idle = self._total - self._busy
        self._rewrite(self.proc / "stat",
                      f"cpu  {self._busy:012d} 0 0 {idle:012d} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")
        self._rewrite(self.proc / str(PID) / "stat",
                      f"{PID} (latticed) S 1 1 1 0 -1 0 0 0 0 0 {self._own:012d} 0 0 0 20 0 4 0 1 1 1\n")

    def _rewrite(self, path: Path, text: str) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, text.encode(), 0)

    async def serve(self) -> None:
        """Keep /proc/stat moving with virtual time, as the kernel does."""
        while True:
            self._advance()
            await trio.sleep(0.25)

    def set_rss(self, nbytes: int) -> None:
        (self.proc / str(PID) / "statm").write_text(f"1000 {nbytes // 4096} 0 0 0 0 0\n")

    # -- user input -----------------------------------------------------------------------------
    def terminal_input(self, at_wall: float, name: str = "0") -> None:
        tty = self.dev / "pts" / name
        tty.touch()
        os.utime(tty, (at_wall, at_wall))


def _in_trio() -> bool:
    try:
        trio.current_time()
    except RuntimeError:
        return False
    return True


class VirtualWorkers:
    """A `WorkerPool` whose steps take ``cost`` seconds of virtual time (and as much
    CPU), recording when each ran."""

    def __init__(self, threads: int = 1, cost: float = 0.05) -> None:
        self.threads = threads
        self.cost = cost
        self.runs: list[tuple[float, float]] = []  # (start, end) virtual times
        self.running = 0

    async def run(self, fn):
        start = trio.current_time()
        self.running += 1
        try:
            await trio.sleep(self.cost)
            result = fn()
        finally:
            self.running -= 1
        self.runs.append((start, trio.current_time()))
        return result, self.cost

    def started_between(self, lo: float, hi: float) -> int:
        return sum(1 for s, _ in self.runs if lo <= s < hi)


class Stream:
    """A participant's compute loop: numbered steps through the governed compute."""

    def __init__(self, compute) -> None:
        self.compute = compute
        self.done: list[int] = []

    async def run(self) -> None:
        i = 0
        while True:
            await self.compute(functools.partial(self.done.append, i))
            i += 1


@pytest.fixture
def machine(tmp_path) -> FakeMachine:
    m = FakeMachine(tmp_path / "machine")
    m.BASE = BASE
    m.now = virtual_now
    yield m
    for fd in m._fds.values():
        os.close(fd)


@pytest.fixture
def start_governor(machine):
    """``await start_governor(nursery, config, workers=None, **kw)`` -> (governor, workers):
    the service on the fake machine, in virtual time, its /proc moving along."""
    from latticed.governor import serve_governor

    async def start(nursery, config, workers=None, cost=0.05, threads=1, **kw):
        nursery.start_soon(machine.serve)
        workers = workers or VirtualWorkers(threads=threads, cost=cost)
        gov = await nursery.start(functools.partial(
            serve_governor, config, sources=machine.sources(), clock=virtual_now,
            workers=workers, **kw))
        return gov, workers
    return start


@pytest.fixture
def stream_of():
    return Stream
