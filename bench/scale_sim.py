"""Replication and membership of 1,000 and 10,000 daemons, simulated (issue 16).

Runs the real sans-I/O machines — `SyncHub`/`SyncSession` (`lattice.core.state.sync`)
with real stores, signed envelopes and msgpack frames, and `Membership`
(`lattice.core.membership`) — over a discrete-event network in this process: virtual
time, a fixed one-way latency per link (default 50 ms), per-link FIFO. What the
trio driver (`lattice.net.crdt_sync`) does on a timer is done here on the same
schedule: the overlay tick every gossip interval, a reconciliation with one random
session every anti-entropy interval, a keepalive on a session silent for a third of
the idle timeout, a membership probe round every probe interval.

Each daemon dials ``--dial`` random others (so it holds about twice that many
connections, as a connection manager between its water marks would keep). Printed,
per N, with the issue's targets beside: idle bytes and messages per second per daemon,
and for one write: the bytes and messages it cost in all (and as a multiple of
N x the envelope's size), receipts per daemon, and the time until every daemon held
it. Bytes are frame bytes (4-byte length + msgpack); transport overhead (yamux, noise,
TCP/QUIC) is not counted.

    nice -n 19 .venv/bin/python bench/scale_sim.py                 # 1,000 and 10,000
    nice -n 19 .venv/bin/python bench/scale_sim.py --nodes 1000 --writes 3
"""

from __future__ import annotations

import argparse
import heapq
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lattice.core.codec import pack, unpack
from lattice.core.identity import Identity
from lattice.core.membership import Membership
from lattice.core.state import Set, StateStore, SyncHub
from lattice.core.state.sync import SyncSession

FRAME_HEADER = 4
TARGET_IDLE_BYTES = 2000.0
TARGET_WRITE_FACTOR = 20.0
TARGET_WRITE_SECONDS = 3.0  # at 10,000 daemons with 50 ms links


class Sim:
    """Virtual time, a heap of events, and byte/message counters."""

    def __init__(self, latency: float, seed: int) -> None:
        self.now = 0.0
        self.latency = latency
        self.rng = random.Random(seed)
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.bytes = 0
        self.messages = 0

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, action))

    def run_until(self, end: float) -> None:
        while self._events and self._events[0][0] <= end:
            when, _, action = heapq.heappop(self._events)
            self.now = when
            action()
        self.now = end


class Daemon:
    def __init__(self, sim: Sim, identity: Identity, cfg: argparse.Namespace) -> None:
        self.sim = sim
        self.peer_id = identity.peer_id
        self.store = StateStore(identity)
        self._woken: set[int] = set()
        self.hub = SyncHub(self.store, rng=random.Random(sim.rng.getrandbits(32)),
                           wake=lambda s: self._woken.add(id(s)))
        self.links: dict[int, tuple[SyncSession, Daemon, SyncSession]] = {}
        self.last_sent: dict[int, float] = {}
        # steady state: every daemon joined long ago, so joins are not news
        self.membership = Membership(self.peer_id, rng=random.Random(sim.rng.getrandbits(32)),
                                     probe_interval=cfg.probe_interval, gossip_joins=False)
        self.up = True

    # -- sync sessions -------------------------------------------------------------------
    def flush(self) -> None:
        """Send what every woken session has (the driver's writer tasks)."""
        while self._woken:
            key = self._woken.pop()
            link = self.links.get(key)
            if link is None:
                continue
            session, remote, remote_session = link
            while (msg := session.next_message()) is not None:
                self.send(key, msg, remote, remote_session)

    def send(self, key: int, msg: dict, remote: Daemon, remote_session: SyncSession) -> None:
        data = pack(msg)
        self.sim.bytes += len(data) + FRAME_HEADER
        self.sim.messages += 1
        self.last_sent[key] = self.sim.now
        self.sim.at(self.sim.now + self.sim.latency,
                    lambda: remote.deliver(remote_session, data))

    def deliver(self, session: SyncSession, data: bytes) -> None:
        if not self.up:
            return
        self.hub.handle(session, unpack(data), self.sim.now)
        if session.has_pending():
            self._woken.add(id(session))
        self.flush()

    def tick(self, interval: float) -> None:
        self.hub.tick()
        self.flush()
        self.sim.at(self.sim.now + interval, lambda: self.tick(interval))

    def anti_entropy(self, interval: float) -> None:
        session = self.hub.pick_anti_entropy(self.sim.rng, self.sim.now)
        if session is not None:
            session.request_recon()
            self._woken.add(id(session))
            self.flush()
        self.sim.at(self.sim.now + interval * self.sim.rng.uniform(0.5, 1.5),
                    lambda: self.anti_entropy(interval))

    def keepalives(self, every: float) -> None:
        for key, (session, remote, remote_session) in self.links.items():
            if self.last_sent.get(key, 0.0) <= self.sim.now - every:
                msg = session.keepalive()
                if msg is not None:
                    self.send(key, msg, remote, remote_session)
        self.sim.at(self.sim.now + every, lambda: self.keepalives(every))

    # -- membership ----------------------------------------------------------------------
    def probe(self, daemons: dict[str, Daemon]) -> None:
        if self.up:
            for target, msg in self.membership.tick(self.sim.now):
                self.send_member(daemons, target, msg)
        self.sim.at(self.sim.now + self.membership.probe_interval, lambda: self.probe(daemons))

    def send_member(self, daemons: dict[str, Daemon], target: str, msg: dict) -> None:
        data = pack(msg)
        self.sim.bytes += len(data) + FRAME_HEADER
        self.sim.messages += 1
        remote = daemons[target]
        self.sim.at(self.sim.now + self.sim.latency,
                    lambda: remote.on_member(daemons, self.peer_id, data))

    def on_member(self, daemons: dict[str, Daemon], sender: str, data: bytes) -> None:
        if not self.up:
            return
        for target, msg in self.membership.handle(sender, unpack(data), self.sim.now):
            self.send_member(daemons, target, msg)


def connect(a: Daemon, b: Daemon) -> None:
    sa = a.hub.open_session(b.peer_id, initiator=True, session_id=f"{id(a):x}-{id(b):x}",
                            now=a.sim.now)
    sb = b.hub.open_session(a.peer_id, initiator=False, session_id=None, now=b.sim.now)
    a.links[id(sa)] = (sa, b, sb)
    b.links[id(sb)] = (sb, a, sa)
    a.membership.add_neighbour(b.peer_id, a.sim.now)
    b.membership.add_neighbour(a.peer_id, b.sim.now)
    a._woken.add(id(sa))
    a.flush()


def run(n: int, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    sim = Sim(args.latency, args.seed)
    daemons = [Daemon(sim, Identity.generate(), args) for _ in range(n)]
    by_id = {d.peer_id: d for d in daemons}
    for d in daemons:
        for other in sim.rng.sample(daemons, args.dial + 1):
            if other is not d and not d.hub.has_session(other.peer_id):
                connect(d, other)
    sim.run_until(1.0)
    for d in daemons:  # the driver's timers, at random phases
        sim.at(sim.now + sim.rng.uniform(0, args.gossip_interval),
               lambda d=d: d.tick(args.gossip_interval))
        sim.at(sim.now + sim.rng.uniform(0, args.anti_entropy_interval),
               lambda d=d: d.anti_entropy(args.anti_entropy_interval))
        sim.at(sim.now + sim.rng.uniform(0, args.idle_timeout / 3),
               lambda d=d: d.keepalives(args.idle_timeout / 3))
        sim.at(sim.now + sim.rng.uniform(0, args.probe_interval), lambda d=d: d.probe(by_id))
    sim.run_until(sim.now + args.warmup)
    setup_s = time.perf_counter() - t0
    connections = sum(len(d.links) for d in daemons) / n
    mesh = sum(d.hub.statistics()["mesh"] for d in daemons) / n

    # idle
    b0, m0 = sim.bytes, sim.messages
    sim.run_until(sim.now + args.idle)
    idle_bytes = (sim.bytes - b0) / args.idle / n
    idle_msgs = (sim.messages - m0) / args.idle / n

    # writes: one author at a time, each measured over a window after it
    results = []
    for w in range(args.writes):
        author = sim.rng.choice(daemons)
        arrived: dict[str, float] = {}
        seq = author.store.seq_of(author.peer_id) + 1
        for d in daemons:
            d.store.add_envelope_listener(
                lambda env, local, d=d, a=author.peer_id, s=seq, seen=arrived:
                seen.setdefault(d.peer_id, sim.now) if env.author == a and env.seq == s
                else None)
        b0, m0, dup0 = sim.bytes, sim.messages, _dups(daemons)
        start = sim.now
        env = author.store.apply_local([Set(f"counters/w{w}", w + 1)], sim.now)
        author.flush()
        sim.run_until(start + args.window)
        spent = (sim.bytes - b0) - idle_bytes * n * args.window
        msgs = (sim.messages - m0) - idle_msgs * n * args.window
        reached = len(arrived)
        results.append({
            "size": len(env.raw), "bytes": spent, "messages": msgs,
            "factor": spent / (n * len(env.raw)), "reached": reached,
            "time": max(arrived.values()) - start if reached == n else float("inf"),
            "receipts": 1 + (_dups(daemons) - dup0) / n,
        })
    # a daemon fails: how long until the others all know
    victim = sim.rng.choice(daemons)
    victim.up = False
    down_at = sim.now
    sim.run_until(sim.now + args.failure_window)
    knowing = [d for d in daemons if d is not victim
               and d.membership.status(victim.peer_id) == "dead"]
    detect = max((d.membership.heard_dead(victim.peer_id) or 0) - down_at
                 for d in knowing) if knowing else float("inf")
    return {
        "n": n, "connections": connections, "mesh": mesh,
        "idle_bytes": idle_bytes, "idle_msgs": idle_msgs, "writes": results,
        "dead_known": len(knowing) / (n - 1), "dead_after": detect,
        "members_tracked": sum(d.membership.tracked() for d in daemons) / n,
        "setup_s": setup_s, "wall_s": time.perf_counter() - t0,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _dups(daemons: list[Daemon]) -> int:
    return sum(d.hub.statistics()["duplicates_received"] for d in daemons)


def report(r: dict[str, Any]) -> None:
    n = r["n"]
    w = r["writes"]
    mean = lambda k: sum(x[k] for x in w) / len(w)  # noqa: E731
    worst_time = max(x["time"] for x in w)
    print(f"\nN = {n:,} simulated daemons ({r['connections']:.1f} connections, mesh "
          f"{r['mesh']:.1f} each; setup {r['setup_s']:.0f} s, run {r['wall_s']:.0f} s, "
          f"peak RSS {r['rss_mb']:.0f} MiB)")
    rows = [
        ("idle bytes/s per daemon", f"{r['idle_bytes']:.0f} B/s",
         f"< {TARGET_IDLE_BYTES:.0f} B/s, flat in N"),
        ("idle messages/s per daemon", f"{r['idle_msgs']:.2f}", "flat in N"),
        ("update size (envelope)", f"{mean('size'):.0f} B", ""),
        ("bytes per update, all daemons", f"{mean('bytes') / 1e6:.2f} MB = {mean('factor'):.1f}·N·size",
         f"≤ {TARGET_WRITE_FACTOR:.0f}·N·size"),
        ("messages per update", f"{mean('messages'):,.0f} ({mean('messages') / n:.1f} per daemon)", ""),
        ("receipts of each update per daemon", f"{mean('receipts'):.1f}", "a small constant"),
        ("update reaches all daemons", f"{worst_time:.2f} s (worst of {len(w)}; "
         f"{min(x['reached'] for x in w):,}/{n:,} reached)",
         f"≤ {TARGET_WRITE_SECONDS:.0f} s at 10,000 (50 ms links)"),
        ("a failed daemon known dead by all", f"{r['dead_after']:.1f} s "
         f"({100 * r['dead_known']:.1f}% know)", ""),
        ("membership entries held per daemon", f"{r['members_tracked']:.0f}", "not O(N)"),
    ]
    width = max(len(a) for a, _, _ in rows)
    for name, value, target in rows:
        print(f"  {name:<{width}}  {value:<40} {('target ' + target) if target else ''}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--latency", type=float, default=0.05, help="one-way link latency, s")
    p.add_argument("--dial", type=int, default=6, help="random peers each daemon dials")
    p.add_argument("--writes", type=int, default=3)
    p.add_argument("--window", type=float, default=5.0, help="seconds measured per write")
    p.add_argument("--idle", type=float, default=30.0, help="idle seconds measured")
    p.add_argument("--warmup", type=float, default=12.0)
    p.add_argument("--failure-window", type=float, default=60.0)
    p.add_argument("--gossip-interval", type=float, default=1.0)
    p.add_argument("--anti-entropy-interval", type=float, default=10.0)
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--probe-interval", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    print("scale_sim: real sync and membership machines, discrete-event network, "
          f"{args.latency * 1000:.0f} ms links, each daemon dials {args.dial}")
    for n in args.nodes:
        report(run(n, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
