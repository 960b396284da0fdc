"""One `/lattice/gossip-avg/2` exchange of a 10M-parameter float32 model, end to end.

Two parties on the in-memory network (no sockets: this isolates the protocol and the
math — prepare, transfer through the `TensorTransport` seam, validate, average, commit —
from the transport; over real daemons the transfer is the bulk layer's). Prints the
median wall time of an exchange with the math on the event loop and in worker threads.

    .venv/bin/python bench/gossip_exchange.py [--params 10000000] [--repeat 5] [--compression none]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lattice.learn.gossip import ParamChannel
from lattice.net.gossip_avg import (
    AveragingParty,
    Outcome,
    compute_inline,
    serve_gossip_avg,
    thread_compute,
)
from lattice.testing.memnet import MemoryNetwork


@dataclass
class _Trainer:
    params: np.ndarray
    samples_seen: int = 1000


@dataclass
class _Participant:  # what AveragingParty reads of lattice.learn.participant.Participant
    trainer: _Trainer
    channel: ParamChannel
    outer: None = None

    @property
    def averaging_samples(self) -> int:
        return self.trainer.samples_seen


async def run(n: int, repeat: int, compression: str, threaded: bool) -> list[float]:
    net = MemoryNetwork()
    rng = np.random.default_rng(0)
    reference = rng.standard_normal(n).astype(np.float32)
    times = []
    async with trio.open_nursery() as nursery:
        peers = [net.add_peer() for _ in range(2)]
        services = []
        for p in peers:
            await nursery.start(p.serve)
            services.append(await nursery.start(lambda task_status, p=p: serve_gossip_avg(p, task_status=task_status)))
        roster = [p.peer_id for p in peers]
        compute = thread_compute(trio.CapacityLimiter(1)) if threaded else compute_inline
        parties = []
        for p, s in zip(peers, services):
            params = reference + rng.standard_normal(n).astype(np.float32) * 0.01
            part = _Participant(_Trainer(params), ParamChannel(compression, reference=reference))
            party = AveragingParty("bench", p.peer_id, roster, part, compute=compute)
            s.register(party)
            parties.append(party)
        for _ in range(repeat):
            start = time.perf_counter()
            outcome = await services[0].initiate(parties[0], peers[1].peer_id)
            times.append(time.perf_counter() - start)
            assert outcome is Outcome.COMMITTED, outcome
        nursery.cancel_scope.cancel()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compression", default="none")
    args = ap.parse_args()
    print(f"one exchange, {args.params:,} float32 parameters ({args.params * 4 / 2**20:.0f} MiB each way), "
          f"compression {args.compression}, in-memory network")
    for threaded in (False, True):
        times = trio.run(run, args.params, args.repeat, args.compression, threaded)
        where = "worker thread" if threaded else "event loop  "
        print(f"  math on the {where}: median {statistics.median(times):.3f} s  "
              f"(min {min(times):.3f}, max {max(times):.3f}, n={len(times)})")


if __name__ == "__main__":
    main()
