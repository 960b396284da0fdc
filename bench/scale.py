"""N real daemons on loopback: the columns of issue 16's table, with its targets.

Starts N `latticed` processes (default config, mDNS off, logs at warning) bootstrapped
off the first, waits until every daemon lists every member alive, lets them settle
(--settle, 60 s by default: past the startup schedule of a daemon, whose DHT looks
itself up 3, 10 and 30 s after joining and whose relays announce themselves once
reachability is known; with 10 s those one-off lookups were most of the "idle" CPU),
waits until every daemon holds at most the high water mark of connections (the
connection manager trims only connections older than its grace period; after
--connections-timeout it goes on and says the connections did not settle), then
measures over --idle seconds:

- idle CPU per daemon (utime + stime from /proc, % of one core), mean and max;
- idle sync traffic of all daemons (`state.stats` bytes, both directions halved) and
  all loopback traffic (/proc/net/dev, includes DHT, membership probes, pings);
- connections per daemon (`status`), mean and max;
- one write (`state.set counters/...` on one daemon), once the sync traffic is flat
  (two 3 s windows agree): the sync bytes it cost in all, minus the idle rate of the
  window right before over the same time, as a multiple of N x its envelope size, and
  the time until every daemon's `state` subscription reported it;
- DHT put on one daemon, then a fresh get on another (median of --dht-runs);
- a --job-steps digits-mlp job with N participants (submit to done; --job-max limits the
  N it runs at), and the CPU all daemons spent meanwhile, as a share of the machine: a
  job that keeps every core busy scales with participants per core, not with networking.

A daemon that exits during the run is named, with the end of its log. --water LOW HIGH
sets the daemons' connection water marks, to see the trimmed regime on a small box.

    .venv/bin/python bench/scale.py --nodes 8 --idle 20                 # a small box
    .venv/bin/python bench/scale.py --nodes 16 48 96 --idle 30          # 16 cores

Targets (issue 16) print beside the figures: idle < 0.5 % of a core and < 2 KB/s per
daemon, flat in N; one write ≤ 20·N·size bytes reaching all within 1 s at 96;
connections ≤ the high water mark (64) plus job partners; the 48-participant job within
2x the 16-participant one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

import lattice
from lattice.core.connections import WaterMarks
from lattice.core.identity import Identity
from lattice.core.state import Set, StateStore
from lattice.testing.daemons import DaemonProc, wait_for

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])  # received = sent on loopback
    return 0


def sync_bytes(daemons: list[DaemonProc], pool: ThreadPoolExecutor) -> int:
    def one(d: DaemonProc) -> int:
        with d.client() as c:
            s = c.call("state.stats")["sync"]["sync"]
            return s["bytes_sent"] + s["bytes_received"]
    return sum(pool.map(one, daemons)) // 2  # each byte is sent once and received once


def envelope_size() -> int:
    """The size of the envelope `write_one` makes (the same change on a like document)."""
    store = StateStore(Identity.generate())
    store.apply_local([Set("member/peer_id", store.peer_id), Set("member/name", "x" * 12),
                       Set("member/heartbeat", time.time())], time.time())
    env = store.apply_local([Set("counters/scale-bench", 1)], time.time())
    assert env is not None
    return len(env.raw)


def start_all(n: int, root: Path, pool: ThreadPoolExecutor, water: WaterMarks
              ) -> list[DaemonProc]:
    extra: tuple[str, ...] = ("--log-level", "warning")
    if water != WaterMarks():  # a small box can try the trimmed regime at small N
        config = root / "latticed.toml"
        config.write_text(f"[connections]\nlow_water = {water.low}\n"
                          f"high_water = {water.high}\n")
        extra += ("--config", str(config))
    first = DaemonProc(root / "d0", *extra).start()
    first.wait_running(60)
    boot = first.addr()
    rest = [DaemonProc(root / f"d{i}", *extra, "--bootstrap", boot) for i in range(1, n)]
    batch = max(4, (os.cpu_count() or 2))
    for i in range(0, len(rest), batch):  # a burst of imports would starve the first
        group = rest[i:i + batch]
        for d in group:
            d.start()
        list(pool.map(lambda d: d.wait_running(120), group))
    return [first, *rest]


def wait_members(daemons: list[DaemonProc], timeout: float) -> float:
    t0 = time.monotonic()

    def everyone_alive() -> bool:
        for d in daemons:
            with d.client() as c:
                members = c.call("members.list")
            if sum(1 for m in members.values() if m.get("alive")) < len(daemons):
                return False
        return True
    wait_for(everyone_alive, timeout, "every daemon to list every member alive", interval=1.0)
    return time.monotonic() - t0


def connections(daemons: list[DaemonProc], pool: ThreadPoolExecutor) -> list[int]:
    def one(d: DaemonProc) -> int:
        with d.client() as c:
            return int(c.status()["peers"])
    return list(pool.map(one, daemons))


def wait_connections(daemons: list[DaemonProc], high: int, timeout: float,
                     pool: ThreadPoolExecutor) -> tuple[float, bool]:
    """Wait until every daemon holds at most the high water mark of connections (the
    connection manager trims a connection only after its grace period), or ``timeout``
    seconds; returns (seconds waited, whether they settled)."""
    t0 = time.monotonic()
    while True:
        if max(connections(daemons, pool)) <= high:
            return time.monotonic() - t0, True
        if time.monotonic() - t0 >= timeout:
            return time.monotonic() - t0, False
        time.sleep(1.0)


def wait_quiet_sync(daemons: list[DaemonProc], pool: ThreadPoolExecutor, *, window: float,
                    timeout: float) -> tuple[float, bool]:
    """The idle sync rate (all daemons, bytes/s) once two windows in a row agree within
    25 % (or 200 B/s), so the start-up traffic does not count as the cost of a write;
    after ``timeout`` seconds, the last window's rate. Returns (rate, whether flat)."""
    t0 = time.monotonic()
    last_bytes, last_t = sync_bytes(daemons, pool), time.monotonic()
    rate = None
    while True:
        time.sleep(window)
        b, t = sync_bytes(daemons, pool), time.monotonic()
        new_rate = (b - last_bytes) / (t - last_t)
        last_bytes, last_t = b, t
        if rate is not None and abs(new_rate - rate) <= max(0.25 * rate, 200.0):
            return new_rate, True
        rate = new_rate
        if t - t0 >= timeout:
            return rate, False


def measure_idle(daemons: list[DaemonProc], seconds: float, pool: ThreadPoolExecutor
                 ) -> dict[str, Any]:
    pids = [d.proc.pid for d in daemons]
    c0 = [cpu_seconds(p) for p in pids]
    s0, l0, t0 = sync_bytes(daemons, pool), loopback_bytes(), time.monotonic()
    time.sleep(seconds)
    c1 = [cpu_seconds(p) for p in pids]
    s1, l1, t1 = sync_bytes(daemons, pool), loopback_bytes(), time.monotonic()
    dt = t1 - t0
    cpu = [100 * (b - a) / dt for a, b in zip(c0, c1, strict=True)]
    return {"cpu_mean": statistics.mean(cpu), "cpu_max": max(cpu),
            "sync_bps": (s1 - s0) / dt, "lo_bps": (l1 - l0) / dt}


def write_one(daemons: list[DaemonProc], pool: ThreadPoolExecutor) -> dict[str, Any]:
    """One `state.set` on the first daemon: the time until every daemon's subscription
    saw it, and the sync bytes it cost in all, less the idle rate measured right before
    (`wait_quiet_sync`) over the same time."""
    idle_sync_bps, flat = wait_quiet_sync(daemons, pool, window=3.0, timeout=30.0)
    path = "counters/scale-bench"
    value = int(time.time())
    arrived: dict[int, float] = {}
    ready = threading.Barrier(len(daemons) + 1)
    done = threading.Event()

    def watch(i: int, d: DaemonProc) -> None:
        with d.client() as c, c.subscribe(["state"], timeout=30) as events:
            ready.wait()
            for ev in events:
                if ev.get("event") == "change" and ev.get("path", "").startswith(
                        "counters/scale-bench"):
                    arrived[i] = time.monotonic()
                    break
        if len(arrived) == len(daemons):
            done.set()

    watchers = [threading.Thread(target=watch, args=(i, d), daemon=True)
                for i, d in enumerate(daemons)]
    for t in watchers:
        t.start()
    ready.wait()
    before = sync_bytes(daemons, pool)
    t0 = time.monotonic()
    with daemons[0].client() as c:
        c.call("state.set", path=path, value=value)
    done.wait(30)
    reach = max(arrived.values()) - t0 if len(arrived) == len(daemons) else float("inf")
    time.sleep(2.0)  # announcements and pulls of the gossip tick after it
    spent = sync_bytes(daemons, pool) - before - idle_sync_bps * (time.monotonic() - t0)
    return {"reach_s": reach, "bytes": max(spent, 0.0), "reached": len(arrived),
            "idle_bps": idle_sync_bps, "idle_flat": flat}


def dht_latency(daemons: list[DaemonProc], runs: int) -> tuple[float, float]:
    puts, gets = [], []
    for r in range(runs):
        key = f"scale-bench-{os.getpid()}-{r}-{time.time_ns()}"
        with daemons[0].client() as c:
            t0 = time.perf_counter()
            c.call("dht.put", key=key, value=b"x" * 32, ttl=600.0)
            puts.append(time.perf_counter() - t0)
        with daemons[-1].client() as c:
            t0 = time.perf_counter()
            c.call("dht.get", key=key, fresh=True)
            gets.append(time.perf_counter() - t0)
    return statistics.median(puts), statistics.median(gets)


def run_job(daemons: list[DaemonProc], steps: int, timeout: float) -> dict[str, Any]:
    """Submit a digits-mlp job for every daemon and follow it on the submitter: seconds
    from submission to each phase (roster sealed, running, first steps counted, half and
    all steps counted, merging, done), read from `jobs.get` every 0.25 s."""
    spec = {"task": "digits-mlp", "steps": steps, "min_peers": len(daemons)}
    phases: dict[str, float] = {}
    pids = [d.proc.pid for d in daemons if d.proc is not None]
    cpu0 = sum(cpu_seconds(p) for p in pids)

    def mark(name: str, now: float) -> None:
        phases.setdefault(name, now - t0)

    with daemons[0].client() as c:
        submitted = c.call("jobs.submit", spec=spec)
        job_id = submitted["job_id"] if isinstance(submitted, dict) else submitted
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            job = c.call("jobs.get", job_id=job_id)
            now, status = time.monotonic(), job.get("status")
            joined = sum(1 for v in (job.get("peers") or {}).values() if v is not None)
            if joined >= len(daemons):
                mark("all joined", now)
            if job.get("roster"):
                mark("roster sealed", now)
            if status in ("running", "merging", "done"):
                mark("running", now)
            total, done_steps = job.get("steps_total") or 0, job.get("steps") or 0
            if done_steps > 0:
                mark("first steps", now)
            if total and done_steps >= total / 2:
                mark("half the steps", now)
            if total and done_steps >= total:
                mark("all steps", now)
            if status in ("merging", "done"):
                mark("merging", now)
            if status in ("done", "failed", "cancelled"):
                mark(status, now)
                cpu = sum(cpu_seconds(p) for p in pids) - cpu0
                return {"status": status, "total_s": now - t0, "phases": phases,
                        "cpu_s": cpu, "busy": cpu / ((now - t0) * (os.cpu_count() or 1)),
                        "running_s": now - t0 - phases["running"] if "running" in phases
                        else None}
            time.sleep(0.25)
    return {"status": "timeout", "total_s": float("inf"), "running_s": None, "phases": phases}


def one_n(n: int, args: argparse.Namespace, size: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix=f"lattice-scale-{n}-")
    with ThreadPoolExecutor(max_workers=32) as pool:
        daemons: list[DaemonProc] = []
        try:
            t0 = time.monotonic()
            daemons = start_all(n, Path(tmp), pool, args.water)
            started = time.monotonic() - t0
            members_s = wait_members(daemons, args.settle_timeout)
            time.sleep(args.settle)
            settle_s, settled = wait_connections(daemons, args.water.high,
                                                 args.connections_timeout, pool)
            idle = measure_idle(daemons, args.idle, pool)
            conns = connections(daemons, pool)
            write = write_one(daemons, pool)
            put, get = dht_latency(daemons, args.dht_runs)
            job = (run_job(daemons, args.job_steps, args.job_timeout)
                   if n <= args.job_max else None)
            result = {"n": n, "started_s": started, "members_s": members_s,
                      "conn_settle_s": settle_s, "conn_settled": settled, **idle,
                      "conn_mean": statistics.mean(conns), "conn_max": max(conns),
                      "write": write, "size": size, "dht": (put, get), "job": job,
                      "high": args.water.high}
        except BaseException:
            report_dead(daemons)
            print(f"  (state dirs and logs kept in {tmp})", file=sys.stderr)
            raise
        finally:
            list(pool.map(_stop, daemons))
    shutil.rmtree(tmp, ignore_errors=True)  # kept above when the run failed
    return result


def report_dead(daemons: list[DaemonProc]) -> None:
    """Name the daemons that exited while the benchmark ran, with their logs' last
    lines: the figures cannot be measured, and the crash is the finding. One whose
    socket just failed may still be on its way out: a few seconds for that."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and all(
            d.proc is None or d.proc.poll() is None for d in daemons):
        time.sleep(0.5)
    for i, d in enumerate(daemons):
        if d.proc is not None and d.proc.poll() is not None:
            print(f"\n  daemon d{i} exited with {d.proc.returncode}; its log ends:\n"
                  f"{d.log_text()}", file=sys.stderr)


def _stop(d: DaemonProc) -> None:
    """Stop a daemon; one that does not stop in time is killed (a loaded box), so the
    figures measured before still print."""
    try:
        d.stop(timeout=60)
    except AssertionError as e:
        print(f"  (a daemon did not stop within 60 s and was killed: {str(e)[:80]})")


def report(r: dict[str, Any]) -> None:
    n, w = r["n"], r["write"]
    factor = w["bytes"] / (n * r["size"])
    job = r["job"]
    job_text = ("not run" if job is None else
                f"{job['total_s']:.1f} s ({job['status']}; running {job['running_s'] or 0:.1f} s)")
    job_cpu = ("" if job is None or "cpu_s" not in job else
               f"{job['cpu_s']:.0f} core-s ({job['cpu_s'] / n:.2f} per daemon), "
               f"{100 * job['busy']:.0f} % of the machine")
    rows = [
        ("daemons up / all members alive", f"{r['started_s']:.0f} s / {r['members_s']:.0f} s", ""),
        ("connections ≤ high water before idle",
         f"{'settled' if r['conn_settled'] else 'NOT settled'} after {r['conn_settle_s']:.0f} s",
         ""),
        ("idle CPU per daemon", f"{r['cpu_mean']:.2f} % of a core (max {r['cpu_max']:.2f})",
         "< 0.5 %, flat in N"),
        ("idle sync traffic, all daemons", f"{r['sync_bps'] / 1e3:.2f} KB/s "
         f"({r['sync_bps'] / n:.0f} B/s per daemon)", "< 2 KB/s per daemon"),
        ("idle loopback traffic, all", f"{r['lo_bps'] / 1e3:.2f} KB/s "
         f"({r['lo_bps'] / n:.0f} B/s per daemon)", "< 2 KB/s per daemon"),
        ("bytes to replicate one write", f"{w['bytes'] / 1e3:.1f} KB = {factor:.1f}·N·size "
         f"(size {r['size']} B)", "≤ 20·N·size"),
        ("  idle sync rate subtracted", f"{w['idle_bps'] / 1e3:.2f} KB/s "
         f"({'flat' if w['idle_flat'] else 'NOT flat within 30 s'})", ""),
        ("one write reaches all", f"{1000 * w['reach_s']:.0f} ms ({w['reached']}/{n})",
         "≤ 1 s at 96"),
        ("connections per daemon", f"{r['conn_mean']:.1f} (max {r['conn_max']})",
         f"≤ {r['high']} + job partners"),
        ("DHT put / fresh get", f"{1000 * r['dht'][0]:.0f} / {1000 * r['dht'][1]:.1f} ms", ""),
        (f"digits-mlp job, {n} participants", job_text, "48 within 2x the 16"),
    ]
    if job_cpu:  # a job that saturates the cores cannot get faster by better networking
        rows.append(("  CPU of all daemons during it", job_cpu, ""))
    print(f"\nN = {n} real daemons")
    width = max(len(a) for a, _, _ in rows)
    for name, value, target in rows:
        print(f"  {name:<{width}}  {value:<46} {('target ' + target) if target else ''}")
    if job is not None:
        print("  job phases, s after submit: " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(job["phases"].items(), key=lambda kv: kv[1])))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[8])
    p.add_argument("--idle", type=float, default=30.0, help="idle seconds measured")
    p.add_argument("--settle", type=float, default=60.0,
                   help="seconds after every member is alive before measuring")
    p.add_argument("--settle-timeout", type=float, default=120.0)
    p.add_argument("--connections-timeout", type=float, default=90.0,
                   help="seconds to wait for every daemon to be at most the high water "
                        "mark of connections before the idle window")
    p.add_argument("--dht-runs", type=int, default=5)
    p.add_argument("--job-steps", type=int, default=100)
    p.add_argument("--job-max", type=int, default=48,
                   help="run the job only at N up to this")
    p.add_argument("--job-timeout", type=float, default=300.0)
    p.add_argument("--water", type=int, nargs=2, metavar=("LOW", "HIGH"),
                   default=[WaterMarks().low, WaterMarks().high],
                   help="the daemons' connection water marks (default the daemon's): "
                        "lower ones show the trimmed regime with fewer daemons")
    args = p.parse_args(argv)
    args.water = WaterMarks(low=args.water[0], high=args.water[1])
    print(f"scale: real latticed daemons on loopback, {lattice.__name__} from "
          f"{Path(lattice.__file__).parent}, {os.cpu_count()} cores")
    size = envelope_size()
    for n in args.nodes:
        report(one_n(n, args, size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
