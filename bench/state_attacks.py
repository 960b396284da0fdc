"""What hostile authors cost a real daemon: memory, disk and CPU (issue 11).

    .venv/bin/python bench/state_attacks.py [--sybils 16] [--author-mib 1]
                                            [--job-authors 400] [--jobs-per-author 25]

Starts one `latticed` on loopback and attacks it from a py-libp2p attacker host with
the kit in `lattice.testing.hostile.state`, over `/lattice/crdt-sync/2`:

- **sybils**: fresh authors of about ``--author-mib`` MiB each (valid, signed,
  schema-conforming padding records), sent over one session (``--own-connections``:
  each Sybil over its own connection, as itself). Printed: what the daemon
  kept (authors, retained bytes), its RSS and state-log growth, refusals by reason, and
  the RSS and authors after a restart (what the log reloads).
- **job flood**: ``--job-authors`` authors each submitting ``--jobs-per-author`` valid
  job specs, as fast as the session takes them. Printed: jobs the daemon shows, the CPU
  seconds it burns in the 10 s after the flood (no further input: CPU time, not a
  share, so a busy machine does not hide it), and how long ``status`` and ``jobs
  list`` take through the local RPC (those do depend on the machine's load, printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lattice.testing.daemons import DaemonProc
from lattice.testing.hostile.state import Author, job_records, open_attacker, sybils

MiB = 1 << 20
TICKS = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def store_stats(d: DaemonProc) -> dict:
    with d.client() as c:
        return c.state_stats()


async def send_all(addr: str, envelopes: list[bytes], batch_bytes: int = 480 * 1024,
                   identity=None) -> float:
    """Send ``envelopes`` over one session in frames of at most ``batch_bytes``; returns
    the seconds it took (the victim reading as fast as it accepts)."""
    async with open_attacker(identity) as attacker:
        peer = await attacker.connect(addr)
        session = await attacker.open_session(peer)
        start = time.perf_counter()
        batch: list[bytes] = []
        size = 0
        for raw in envelopes:
            if batch and size + len(raw) > batch_bytes:
                await session.send_envelopes(batch)
                batch, size = [], 0
            batch.append(raw)
            size += len(raw)
        if batch:
            await session.send_envelopes(batch)
        # a summary round trip: the victim has handled everything sent before it
        await session.send({"t": "summary", "sid": session.sid, "summary": {}, "reply": False})
        with trio.move_on_after(120):
            while True:
                msg = await session.recv()
                if msg.get("t") == "summary":
                    break
        return time.perf_counter() - start


def daemon(base: Path, name: str) -> DaemonProc:
    d = DaemonProc(base / name, env={"LATTICE_LOG_LEVEL": "warning"})
    d.args[d.args.index("--log-level") + 1] = "warning"
    d.start()
    d.wait_running(60)
    return d


def sybil_attack(base: Path, n: int, author_mib: float, own_connections: bool) -> None:
    d = daemon(base, f"sybil-{n}-{own_connections}")
    pid = d.proc.pid
    log_path = d.state_dir / "state.log"
    authors = sybils(n, snapshots=False)
    envelopes = [] if own_connections else [
        raw for a in authors for raw in a.bulk(int(author_mib * MiB))]
    sent = n * author_mib * MiB
    time.sleep(2)
    rss0, log0 = rss_mib(pid), log_path.stat().st_size
    addr = d.addr()
    if own_connections:  # every Sybil connects as itself: no author tokens needed

        async def each() -> float:
            start = time.perf_counter()
            for a in authors:
                await send_all(addr, a.bulk(int(author_mib * MiB)), identity=a.identity)
            return time.perf_counter() - start

        seconds = trio.run(each)
    else:
        seconds = trio.run(send_all, addr, envelopes)
    time.sleep(1)
    rss1, log1 = rss_mib(pid), log_path.stat().st_size
    st = store_stats(d)["store"]
    kept = sum(1 for a in authors if a.peer_id in _authors(d))
    how = "each over its own connection" if own_connections else "over one connection"
    print(f"sybils: {n} authors x {author_mib:g} MiB = {sent / MiB:.1f} MiB sent {how} "
          f"in {seconds:.1f} s")
    print(f"  kept {kept}/{n} authors; retained {st['retained_bytes'] / MiB:.1f} MiB; "
          f"refused {st['refused']}; rejected {st['rejected']}")
    print(f"  RSS {rss0:.0f} -> {rss1:.0f} MiB (+{rss1 - rss0:.1f} MiB, "
          f"{(rss1 - rss0) / n:.2f} MiB/author); state log +{(log1 - log0) / MiB:.1f} MiB")
    d.stop()
    d2 = DaemonProc(d.state_dir, env={"LATTICE_LOG_LEVEL": "warning"})
    d2.start()
    d2.wait_running(60)
    time.sleep(1)
    kept2 = sum(1 for a in authors if a.peer_id in _authors(d2))
    print(f"  after restart: {kept2}/{n} attacker authors reloaded, RSS {rss_mib(d2.proc.pid):.0f} "
          f"MiB, state log {log_path.stat().st_size / MiB:.1f} MiB")
    d2.stop()


def _authors(d: DaemonProc) -> set[str]:
    with d.client() as c:
        return set(c.state_get("authors"))


def job_flood(base: Path, n_authors: int, per_author: int) -> None:
    d = daemon(base, "jobs")
    pid = d.proc.pid
    now = time.time()
    envelopes = [job_records(Author(), per_author, now)[1] for _ in range(n_authors)]
    seconds = trio.run(send_all, d.addr(), envelopes)
    with d.client() as c:
        shown = len(c.jobs())
    print(f"job flood: {n_authors} authors x {per_author} specs sent in {seconds:.1f} s; "
          f"the daemon shows {shown} jobs")
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(10)
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    with d.client() as c:
        t = time.perf_counter()
        c.status()
        status_s = time.perf_counter() - t
        t = time.perf_counter()
        c.jobs()
        list_s = time.perf_counter() - t
    print(f"  CPU used in the {wall:.0f} s after the flood (no input): {cpu:.1f} s "
          f"(machine load {os.getloadavg()[0]:.1f}); status {status_s * 1000:.0f} ms, "
          f"jobs list {list_s * 1000:.0f} ms")
    d.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sybils", type=int, default=16)
    parser.add_argument("--author-mib", type=float, default=1.0)
    parser.add_argument("--job-authors", type=int, default=400)
    parser.add_argument("--jobs-per-author", type=int, default=25)
    parser.add_argument("--own-connections", action="store_true",
                        help="every Sybil author connects as itself (one host each)")
    parser.add_argument("--only", choices=["sybils", "jobs"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lattice-attack-bench-") as tmp:
        if args.only in (None, "sybils"):
            sybil_attack(Path(tmp), args.sybils, args.author_mib, args.own_connections)
        if args.only in (None, "jobs"):
            job_flood(Path(tmp), args.job_authors, args.jobs_per_author)


if __name__ == "__main__":
    main()
