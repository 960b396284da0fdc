"""A whole train job over the job runner, next to the centralized baseline.

Two networks run the same spec:
- in memory (default): N job-running nodes on the in-memory network (replicated state,
  gossip averaging, blobs, the final merge; math in worker threads, real clock);
- `--daemons`: N real `latticed` processes on 127.0.0.1 (`lattice.client.localnet`),
  the job submitted and its model downloaded through the local RPC socket, as a user
  would (`lattice jobs submit train ...`).
It waits for the model and prints: the merged model's test accuracy, the in-process
simulation of the same spec (`lattice.learn.simulate`), the centralized SGD baseline
with the same total samples, bytes sent for averaging (and their share of what H=2
constant gossip would send), exchanges, rounds without a partner and wall time.

    .venv/bin/python bench/train_job.py                       # digits-mlp, 8 peers, iid
    .venv/bin/python bench/train_job.py --partition dirichlet:0.1
    .venv/bin/python bench/train_job.py --algorithm none --partition dirichlet:0.1
    .venv/bin/python bench/train_job.py --task digits-softmax --peers 4 --steps 200 --json
    nice -n 19 .venv/bin/python bench/train_job.py --daemons --task fashion-mlp --peers 4 \
        --partition dirichlet:0.1 --compression int8 --budget 0.05 --schedule late

`--budget SHARE` sets sync_every to the most averages whose bytes (with the final
merge) fit in SHARE of what H=2 constant gossip sends, as bench/learning_quality.py
computes it for its budget rows.

(The daemons accept the job's task through a config file this script writes; fashion
tasks need Debian's dataset-fashion-mnist.)
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy, and inherited by the daemons

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learning_quality import budget_sync_every

from lattice.core.jobs import TrainSpec, parse_train_spec
from lattice.jobs import JobsConfig, serve_jobs
from lattice.learn.merge import loads_safetensors
from lattice.learn.simulate import centralized_baseline, simulate
from lattice.learn.tasks import get_task
from lattice.net.crdt_sync import (
    SyncConfig,
    open_state,
    serve_crdt_sync,
    serve_heartbeat,
)
from lattice.testing.memnet import MemoryNetwork


async def run_memnet(spec: dict, peers: int, seed: int) -> dict:
    accept = tuple(sorted({*JobsConfig().accept_tasks, spec["task"]}))
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
                p, s, y, config=JobsConfig(accept_tasks=accept, progress_interval=1.0, reconcile_interval=0.2),
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


def run_daemons(spec: dict, peers: int) -> dict:
    """The job on `peers` real daemons; every figure read through the client library."""
    import lattice
    from lattice.client.localnet import LocalNet
    from lattice.demo import download_model

    base = Path(tempfile.mkdtemp(prefix="lattice-train-job-"))
    config = base / "latticed.toml"
    accept = sorted({"digits-softmax", "digits-mlp", "breast-cancer-logreg", spec["task"]})
    config.write_text("[jobs]\naccept_tasks = [" + ", ".join(f'"{t}"' for t in accept) + "]\n")
    net = LocalNet(peers, base, extra_args=["--config", str(config)], log_level="warning", ready_timeout=120)
    try:
        net.start()
        with lattice.connect(net.nodes[0].socket, timeout=120) as client:
            deadline = time.monotonic() + 120
            while sum(1 for m in client.members().values() if m.get("alive")) < peers:
                if time.monotonic() > deadline:
                    raise RuntimeError("the daemons did not all see each other within 120 s")
                time.sleep(0.2)  # polling a remote condition through the RPC
            started = time.perf_counter()
            job_id = client.submit_job(spec)["job_id"]
            with client.subscribe(["jobs"], timeout=1800) as events:
                while client.job(job_id)["status"] not in ("done", "failed", "cancelled"):
                    next(events)  # any job event: re-read the job
            wall = time.perf_counter() - started
            job = client.job(job_id)
            if job["status"] != "done" or not job.get("model"):
                raise RuntimeError(f"job {job_id} ended {job['status']} without a model")
            data = download_model(client, job["model"])
    finally:
        codes = net.stop()
    task = get_task(spec["task"])
    params = task.flatten(loads_safetensors(data)[0])
    entries = job["participants"].values()
    record = job["models"][job["model"]]
    return {
        "status": job["status"],
        "accuracy": task.evaluate(params, *task.test_data())["accuracy"],
        "record_accuracy": record["metrics"]["accuracy"],
        "missing": record["missing"],
        "wall_s": wall,
        "bytes_sent": sum(e.get("bytes_sent", 0) for e in entries),
        "exchanges": sum(e.get("exchanges", 0) for e in entries) // 2,
        "skipped_rounds": sum(e.get("skipped", 0) for e in entries),
        "rounds": [e.get("round", 0) for e in entries],
        "exit_codes": codes,
        "model": job["model"],
        "model_bytes": len(data),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="digits-mlp")
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--sync-every", type=int, default=2)
    ap.add_argument("--budget", type=float, help="sync_every from this share of H=2's bytes (overrides it)")
    ap.add_argument("--schedule", default=TrainSpec.schedule)
    ap.add_argument("--algorithm", default="gossip")
    ap.add_argument("--partition", default="iid")
    ap.add_argument("--compression", default="none")
    ap.add_argument("--weighting", default=TrainSpec.weighting)
    ap.add_argument("--correction", default=TrainSpec.correction)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--daemons", action="store_true", help="real latticed processes instead of the in-memory network")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.budget is not None:
        base = TrainSpec(task=args.task, min_peers=args.peers, steps=args.steps)
        args.sync_every = budget_sync_every(args.budget, base, get_task(args.task).num_params, args.compression)
    spec = {"task": args.task, "min_peers": args.peers, "steps": args.steps, "sync_every": args.sync_every,
            "schedule": args.schedule, "algorithm": args.algorithm, "partition": args.partition,
            "compression": args.compression, "weighting": args.weighting, "correction": args.correction,
            "seed": args.seed}
    parsed = parse_train_spec(spec)  # the simulator runs the very spec the network gets
    task = get_task(args.task)
    t = time.perf_counter()
    sim = simulate(parsed, task)
    sim_wall = time.perf_counter() - t
    base = centralized_baseline(task, parsed.total_samples, batch=parsed.batch, lr=parsed.lr,
                                momentum=parsed.momentum, seed=args.seed)
    h2_bytes = simulate(dataclasses.replace(parsed, sync_every=2, schedule="constant", compression="none",
                                            algorithm="gossip"), task).bytes_gossip
    result = run_daemons(spec, args.peers) if args.daemons else trio.run(run_memnet, spec, args.peers, args.seed)
    network = f"{args.peers} real daemons" if args.daemons else "in-memory network"
    out = {"spec": spec, "network": network, "result": result,
           "simulation": {"accuracy": sim.accuracy, "bytes_sent": sim.bytes_gossip, "exchanges": sim.exchanges,
                          "wall_s": sim_wall, "h2_bytes": h2_bytes},
           "centralized": {"accuracy": base.accuracy, "samples": base.total_samples}}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"job: {args.task}, {args.peers} peers, {args.steps} steps, H={args.sync_every} {args.schedule}, "
          f"{args.algorithm}, {args.partition}, compression {args.compression}, weighting {args.weighting}, "
          f"correction {args.correction}, seed {args.seed}; {network}")
    print(f"  merged model (network run)   accuracy {result['accuracy']:.4f}   "
          f"missing {len(result['missing'])}   wall {result['wall_s']:.1f} s")
    print(f"  in-process simulation        accuracy {sim.accuracy:.4f}   wall {sim_wall:.1f} s")
    print(f"  centralized SGD baseline     accuracy {base.accuracy:.4f}   ({base.total_samples} samples)")
    print(f"  network: {result['bytes_sent'] / 1e6:.2f} MB sent for averaging, {result['exchanges']} exchanges, "
          f"{result['skipped_rounds']} rounds without a partner; simulation: {sim.bytes_gossip / 1e6:.2f} MB, "
          f"{sim.exchanges} exchanges")
    if h2_bytes:  # 0 with one peer
        print(f"  H=2 constant gossip would send {h2_bytes / 1e6:.1f} MB: this job sent "
              f"{100 * result['bytes_sent'] / h2_bytes:.2f} % of it (the simulation {100 * sim.bytes_gossip / h2_bytes:.2f} %)")
    if args.daemons:
        print(f"  rounds per participant {result['rounds']}; model {result['model'][:16]}… "
              f"({result['model_bytes']} bytes, downloaded and verified; the record says accuracy "
              f"{result['record_accuracy']:.4f}); daemon exit codes {result['exit_codes']}")


if __name__ == "__main__":
    main()
