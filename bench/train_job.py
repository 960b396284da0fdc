"""A whole train job over the job runner, next to the centralized baseline.

Runs N job-running nodes on the in-memory network (replicated state, gossip averaging,
blobs, the final merge; math in worker threads, real clock), submits one job, waits
for its model and prints: the merged model's test accuracy, the in-process simulation
of the same spec (`lattice.learn.simulate`), the centralized SGD baseline with the same
total samples, bytes sent for averaging, exchanges, skipped rounds and wall time.

    .venv/bin/python bench/train_job.py                       # digits-mlp, 8 peers, iid
    .venv/bin/python bench/train_job.py --partition dirichlet:0.1
    .venv/bin/python bench/train_job.py --algorithm none --partition dirichlet:0.1
    .venv/bin/python bench/train_job.py --task digits-softmax --peers 4 --steps 200 --json

(Real daemons: the same job through `lattice jobs submit` once the daemon wires
`serve_jobs`; this script's numbers are the reference for that run.)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lattice.core.jobs import parse_train_spec  # noqa: E402
from lattice.learn.simulate import JobSpec, centralized_baseline, simulate  # noqa: E402
from lattice.learn.tasks import get_task  # noqa: E402
from lattice.net.crdt_sync import (  # noqa: E402
    SyncConfig,
    open_state,
    serve_crdt_sync,
    serve_heartbeat,
)
from lattice.jobs import JobsConfig, serve_jobs  # noqa: E402
from lattice.testing.memnet import MemoryNetwork  # noqa: E402


async def run_memnet(spec: dict, peers: int, seed: int) -> dict:
    net = MemoryNetwork()
    rng = random.Random(seed)
    nodes = []
    async with trio.open_nursery() as nursery:
        for _ in range(peers):
            peer = net.add_peer()
            await nursery.start(peer.serve)
            store, _ = open_state(peer.identity, None, now=time.time())
            sync = await nursery.start(lambda task_status, p=peer, s=store: serve_crdt_sync(
                p, s, config=SyncConfig(anti_entropy_interval=2.0), rng=rng,
                task_status=task_status))
            # every daemon publishes a member record with a heartbeat: only live members
            # are sealed into a roster
            nursery.start_soon(lambda p=peer, s=store, y=sync: serve_heartbeat(
                s, {"name": p.peer_id[-6:]}, interval=5.0, sync=y))
            nodes.append((peer, store, sync))
        for i, (peer, _, sync) in enumerate(nodes):
            for other, _, _ in nodes[i + 1:]:
                await sync.connect(other.peer_id)
        services = []
        for i, (peer, store, sync) in enumerate(nodes):
            services.append(await nursery.start(lambda task_status, p=peer, s=store, y=sync, i=i: serve_jobs(
                p, s, y, config=JobsConfig(progress_interval=1.0, reconcile_interval=0.2),
                rng=random.Random(seed + i), task_status=task_status)))
        started = time.perf_counter()
        job_id = services[0].submit(spec)
        summary = await services[0].wait_job(job_id)
        wall = time.perf_counter() - started
        while True:  # the model record travels with the job's done claim
            models = [r for r in services[0].models().values() if r.get("job") == job_id]
            if models:
                break
            await trio.sleep(0.05)
        view = services[0].get(job_id)
        nursery.cancel_scope.cancel()
    entries = view["participants"].values()
    record = models[0]
    return {
        "status": summary["status"],
        "accuracy": record["metrics"]["accuracy"],
        "missing": record["missing"],
        "wall_s": wall,
        "bytes_sent": sum(e.get("bytes_sent", 0) for e in entries),
        "exchanges": sum(e.get("exchanges", 0) for e in entries) // 2,
        "skipped_rounds": sum(e.get("skipped", 0) for e in entries),
        "local_accuracy_mean": sum(e.get("accuracy", 0.0) for e in entries) / max(1, len(entries)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="digits-mlp")
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--sync-every", type=int, default=2)
    ap.add_argument("--algorithm", default="gossip")
    ap.add_argument("--partition", default="iid")
    ap.add_argument("--compression", default="none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    spec = {"task": args.task, "min_peers": args.peers, "steps": args.steps, "sync_every": args.sync_every,
            "algorithm": args.algorithm, "partition": args.partition, "compression": args.compression,
            "seed": args.seed}
    parsed = parse_train_spec(spec)
    task = get_task(args.task)
    reference = JobSpec(task=args.task, participants=args.peers, steps=args.steps, sync_every=args.sync_every,
                        algorithm=args.algorithm, partition=args.partition, compression=args.compression,
                        seed=args.seed, batch=parsed.batch, lr=parsed.lr, momentum=parsed.momentum)
    t = time.perf_counter()
    sim = simulate(reference, task)
    sim_wall = time.perf_counter() - t
    base = centralized_baseline(task, reference.total_samples, batch=parsed.batch, lr=parsed.lr,
                                momentum=parsed.momentum, seed=args.seed)
    result = trio.run(run_memnet, spec, args.peers, args.seed)
    out = {"spec": spec, "network": result,
           "simulation": {"accuracy": sim.accuracy, "bytes_sent": sim.bytes_gossip, "exchanges": sim.exchanges,
                          "wall_s": sim_wall},
           "centralized": {"accuracy": base.accuracy, "samples": base.total_samples}}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"job: {args.task}, {args.peers} peers, {args.steps} steps, H={args.sync_every}, "
          f"{args.algorithm}, {args.partition}, compression {args.compression}, seed {args.seed}")
    print(f"  merged model (network run)   accuracy {result['accuracy']:.4f}   "
          f"missing {len(result['missing'])}   wall {result['wall_s']:.1f} s")
    print(f"  in-process simulation        accuracy {sim.accuracy:.4f}   wall {sim_wall:.1f} s")
    print(f"  centralized SGD baseline     accuracy {base.accuracy:.4f}   ({base.total_samples} samples)")
    print(f"  network: {result['bytes_sent'] / 1e6:.2f} MB sent for averaging, {result['exchanges']} exchanges, "
          f"{result['skipped_rounds']} rounds without a partner; simulation: {sim.bytes_gossip / 1e6:.2f} MB, "
          f"{sim.exchanges} exchanges")


if __name__ == "__main__":
    main()
