"""One pairwise averaging exchange of a 10M-parameter float32 model (40 MB each way) on
loopback, two daemons-worth of processes, next to hivemind's DecentralizedAverager with
2 peers on the same payload (issue 6; target: <= 0.12 s).

Rows
  ours          lattice.net.bulk.exchange_arrays over a libp2p control stream (side
                channel) into a receive buffer reused across rounds, then the average
                (a + b) / 2 computed off the event loop; timed on
                the initiating peer from opening the stream on the existing connection
                until it holds the average (the exchange returns only once the other side
                confirmed it received ours intact)
  ours-yamux    the same, forced onto the fallback path (both arrays over the Yamux stream)
  hivemind      DecentralizedAverager, 2 peers, group of 2; timed from the all-reduce
                trigger (after matchmaking, which hivemind runs ahead on a schedule) until
                both peers hold the result

    .venv/bin/python bench/pairwise_exchange.py [--params 10000000] [--reps 9]

Top-level imports are stdlib only: the hivemind row re-runs this file under its venv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HIVEMIND = HERE / ".venv-hivemind/bin/python"
ROWS = ["ours", "ours-yamux", "hivemind"]
PROTOCOL = "/bench/average/1"


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def cpu() -> float:
    return time.process_time()


# -- ours ---------------------------------------------------------------------------------


def _ours(args, role: str) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import trio

    from lattice.core.identity import Identity
    from lattice.net.bulk import BulkConfig, exchange_arrays, serve_bulk_listener
    from lattice.net.host import open_libp2p_node, quiet_libp2p_logging

    config = BulkConfig(direct=not args.yamux)
    rng = np.random.default_rng(0 if role == "a" else 1)
    model = rng.standard_normal(args.params, dtype=np.float32)
    average = np.empty_like(model)
    inbox = np.empty_like(model)  # reused across rounds, as a training loop would
    limiter = trio.CapacityLimiter(1)

    def mean_into(theirs):
        np.add(model, theirs, out=average)
        np.multiply(average, 0.5, out=average)

    async def main():
        quiet_libp2p_logging(40)
        async with open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as node:
            async with trio.open_nursery() as nursery:
                listener = await nursery.start(serve_bulk_listener)
                if role == "b":
                    served = trio.Event()
                    count = [0]

                    async def handler(stream):
                        theirs = await exchange_arrays(stream, model, listener=listener,
                                                       config=config, out=inbox)
                        await trio.to_thread.run_sync(mean_into, theirs, limiter=limiter)
                        count[0] += 1
                        if count[0] == args.reps:
                            served.set()

                    node.set_stream_handler(PROTOCOL, handler)
                    emit(addr=f"{node.listen_addrs()[0]}/p2p/{node.peer_id}")
                    await served.wait()
                else:
                    peer = await node.connect(args.peer)
                    for _ in range(args.reps):
                        t, c = time.perf_counter(), cpu()
                        stream = await node.open_stream(peer, PROTOCOL)
                        theirs = await exchange_arrays(stream, model, listener=listener,
                                                       config=config, out=inbox)
                        await trio.to_thread.run_sync(mean_into, theirs, limiter=limiter)
                        await stream.close()
                        emit(secs=time.perf_counter() - t, cpu=cpu() - c)
                        await trio.sleep(0.05)
                    expected = (model + np.random.default_rng(1).standard_normal(
                        args.params, dtype=np.float32)) * 0.5
                    assert np.array_equal(average, expected), "wrong average"
                await trio.sleep(0.1)
                nursery.cancel_scope.cancel()

    trio.run(main)


def run_ours(args, yamux: bool) -> dict:
    base = [sys.executable, str(Path(__file__).resolve()), "--params", str(args.params),
            "--reps", str(args.reps)] + (["--_yamux"] if yamux else [])
    b = subprocess.Popen(base + ["--_role", "b"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        first = b.stdout.readline()
        if not first.startswith("{"):
            raise RuntimeError(f"peer b did not start: {b.stderr.read()[-300:]}")
        a = subprocess.run(base + ["--_role", "a", "--_peer", json.loads(first)["addr"]],
                           capture_output=True, text=True, timeout=args.timeout)
        if a.returncode:
            raise RuntimeError(a.stderr.strip().splitlines()[-1][:300])
        records = [json.loads(x) for x in a.stdout.splitlines() if x.startswith("{")]
        b.wait(timeout=60)
    finally:
        if b.poll() is None:
            b.kill()
            b.wait()
    return summarize("ours-yamux" if yamux else "ours", records)


# -- hivemind (its venv) ------------------------------------------------------------------


def hivemind_role(args) -> None:
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage

    dht1 = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dht2 = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                        initial_peers=dht1.get_visible_maddrs())
    gen = torch.Generator().manual_seed(0)
    averagers = [hivemind.averaging.DecentralizedAverager(
        [torch.randn(args.params, generator=gen)], dht=dht, prefix="bench_pairwise",
        target_group_size=2, min_group_size=2, min_matchmaking_time=1.0, request_timeout=1.0,
        start=True) for dht in (dht1, dht2)]
    try:
        for _ in range(args.reps + 1):  # the first round warms up
            controls = [av.step(wait=False, require_trigger=True, timeout=60)
                        for av in averagers]
            deadline = time.monotonic() + 60
            while not all(c.stage == AveragingStage.AWAITING_TRIGGER for c in controls):
                if time.monotonic() > deadline or any(c.done() for c in controls):
                    raise RuntimeError("hivemind matchmaking failed")
                time.sleep(0.002)
            t, c = time.perf_counter(), cpu()
            for control in controls:
                control.allow_allreduce()
            for control in controls:
                control.result(timeout=60)
            emit(secs=time.perf_counter() - t, cpu=cpu() - c)
    finally:
        for av in averagers:
            av.shutdown()
        dht2.shutdown()
        dht1.shutdown()


def run_hivemind(args) -> dict:
    if not HIVEMIND.exists():
        return {"row": "hivemind", "skipped": "not installed (run bench/anchors/setup.sh)"}
    p = subprocess.run([str(HIVEMIND), str(Path(__file__).resolve()), "--params",
                        str(args.params), "--reps", str(args.reps), "--_role", "hivemind"],
                       capture_output=True, text=True, timeout=args.timeout)
    records = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not records:
        raise RuntimeError((p.stderr.strip().splitlines() or ["no output"])[-1][:300])
    return summarize("hivemind", records[1:])


# -- orchestration --------------------------------------------------------------------------


def summarize(row: str, records: list[dict]) -> dict:
    secs = [r["secs"] for r in records]
    return {"row": row, "reps": len(secs), "median_s": statistics.median(secs),
            "min_s": min(secs), "max_s": max(secs),
            "cpu_s": statistics.median(r["cpu"] for r in records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_role", help=argparse.SUPPRESS)
    ap.add_argument("--_peer", help=argparse.SUPPRESS)
    ap.add_argument("--_yamux", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._role == "hivemind":
        hivemind_role(args)
        return
    if args._role:
        args.peer, args.yamux = args._peer, args._yamux
        _ours(args, args._role)
        return
    results = []
    for row in args.rows.split(","):
        try:
            results.append(run_ours(args, yamux=row == "ours-yamux") if row.startswith("ours")
                           else run_hivemind(args))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            results.append({"row": row, "error": str(e)[:300]})
        print(f"  {row}: done", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    mb = args.params * 4 / 1e6
    print(f"pairwise averaging exchange, {args.params:,} float32 params ({mb:.0f} MB each way), "
          f"loopback; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    print(f"{'row':<11} {'reps':>4} {'median s':>9} {'(min-max)':>15} {'initiator CPU-s':>16}")
    for r in results:
        if "median_s" not in r:
            print(f"{r['row']:<11} {r.get('skipped') or 'error: ' + r.get('error', '')}")
            continue
        print(f"{r['row']:<11} {r['reps']:>4} {r['median_s']:>9.3f} "
              f"{'(' + format(r['min_s'], '.3f') + '-' + format(r['max_s'], '.3f') + ')':>15} "
              f"{r['cpu_s']:>16.3f}")


if __name__ == "__main__":
    main()
