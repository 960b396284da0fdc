"""The volunteer governor's cost and reaction time, with real compute threads.

1. Overhead when nothing pauses: ``await compute(fn)`` through the governor
   (dedicated idle-priority threads, pause check, duty cycle off at cpu_percent=100)
   against the runner's plain ``thread_compute`` (trio's worker threads behind a
   CapacityLimiter), for an empty step and for a 1 ms numpy step; and what one signal
   read costs (the real /proc and /sys of this machine) per second of daemon life.
2. How fast a pause takes effect: a stream of numpy steps runs; a signal arrives (the
   volunteer's ``lattice pause``, or the battery going to discharging in a fake /sys
   read at the default 0.5 s interval); measured is the time from the signal to the
   end of the last step that runs (no compute after it), median and max over trials.
   Goal: under 1 s.

    .venv/bin/python bench/governor.py [--calls 20000] [--trials 10] [--step-ms 20]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from latticed.governor import cap_blas_threads

cap_blas_threads()  # as latticed does, before numpy loads

import numpy as np  # noqa: E402
import trio  # noqa: E402

from lattice.core.governor import VolunteerConfig  # noqa: E402
from lattice.net.gossip_avg import thread_compute  # noqa: E402
from latticed.governor import Sources, serve_governor  # noqa: E402


def numpy_step(ms: float):
    """A step of about ``ms`` milliseconds of matrix products, sized once."""
    a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < 0.05:
        a @ a
        reps += 1
    per = (time.perf_counter() - start) / reps
    n = max(1, round(ms / 1000 / per))

    def step():
        for _ in range(n):
            a @ a
    return step


def fake_machine(root: Path, status: str) -> None:
    bat = root / "sys" / "class" / "power_supply" / "BAT0"
    bat.mkdir(parents=True, exist_ok=True)
    (bat / "type").write_text("Battery\n")
    (bat / "status").write_text(status + "\n")


async def no_logind():
    return None


async def per_call(compute, fn, calls: int) -> float:
    for _ in range(min(200, calls)):  # warm the threads
        await compute(fn)
    start = time.perf_counter()
    for _ in range(calls):
        await compute(fn)
    return (time.perf_counter() - start) / calls


async def overhead(calls: int, rounds: int) -> None:
    step_1ms = numpy_step(1.0)
    plain = thread_compute(trio.CapacityLimiter(1))
    async with trio.open_nursery() as nursery:
        gov = await nursery.start(functools.partial(serve_governor, VolunteerConfig()))
        print("overhead when nothing pauses (µs per `await compute(step)`, "
              f"best of {rounds} runs of {calls}):")
        print(f"  {'step':<14}{'thread_compute':>16}{'governed':>12}{'difference':>13}")
        for name, fn, n in (("empty", lambda: None, calls),
                            ("numpy ~1 ms", step_1ms, max(200, calls // 20))):
            a = min([await per_call(plain, fn, n) for _ in range(rounds)])
            b = min([await per_call(gov.compute, fn, n) for _ in range(rounds)])
            print(f"  {name:<14}{a * 1e6:>16.1f}{b * 1e6:>12.1f}{(b - a) * 1e6:>+12.1f} "
                  f"({(b - a) / a * 100:+.1f}%)")
        ticks = 200
        start = time.perf_counter()
        for _ in range(ticks):
            await gov.tick()
        tick = (time.perf_counter() - start) / ticks
        interval = gov.config.signal_interval_s
        print(f"  one signal read (real /proc, /sys): {tick * 1e6:.0f} µs, every {interval:g} s: "
              f"{tick / interval * 100:.3f}% of a core")
        nursery.cancel_scope.cancel()


async def pause_latency(trials: int, step_ms: float) -> None:
    step = numpy_step(step_ms)
    root = Path(tempfile.mkdtemp(prefix="lattice-bench-governor-"))
    results: dict[str, list[float]] = {"lattice pause": [], "on battery (0.5 s reads)": []}
    for signal in results:
        for _ in range(trials):
            fake_machine(root, "Charging")
            sources = Sources(proc=Path("/proc"), sys=root / "sys", dev=root / "dev",
                              idle_hint=no_logind)
            ends: list[float] = []

            def timed():
                step()
                ends.append(time.perf_counter())

            async with trio.open_nursery() as nursery:
                gov = await nursery.start(functools.partial(serve_governor, VolunteerConfig(),
                                                            sources=sources))

                async def stream():
                    while True:
                        await gov.compute(timed)
                nursery.start_soon(stream)
                await trio.sleep(0.3 + 0.5 * np.random.default_rng().random())  # any phase
                t_signal = time.perf_counter()
                if signal == "lattice pause":
                    gov.pause(reason="bench")
                else:
                    fake_machine(root, "Discharging")
                await trio.sleep(2.0)  # long after any step could have started
                assert not gov.state.compute
                last = max(e for e in ends)
                results[signal].append(max(0.0, last - t_signal))
                nursery.cancel_scope.cancel()
    print(f"how fast a pause takes effect (signal -> the last step ends; steps of ~{step_ms:g} ms, "
          f"{trials} trials; goal < 1 s):")
    for signal, xs in results.items():
        print(f"  {signal:<26} median {statistics.median(xs) * 1000:7.1f} ms   "
              f"max {max(xs) * 1000:7.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--step-ms", type=float, default=20.0)
    args = ap.parse_args()
    trio.run(overhead, args.calls, args.rounds)
    trio.run(pause_latency, args.trials, args.step_ms)


if __name__ == "__main__":
    main()
