"""Attached loops on one GPU: 4 participants, each its own process on the same GPU with
its own daemon on 127.0.0.1, training the Fashion-MNIST CNN of
examples/fashion_mnist_attach.py (on synthetic batches of its shape: no dataset is
needed), steps/s with and without Lattice; then the hand-off of GPU tensors: a model of
``--handoff-params`` float32 parameters on the GPU, staged through pinned memory into
the shared memory (GPU -> daemon) and back (daemon -> GPU), and one whole sync.

    python bench/attach_gpu.py                      # about 2-3 minutes on one H200
    python bench/attach_gpu.py --steps 100 --handoff-params 1000000    # quick
    python bench/attach_gpu.py --json > result.json

Needs torch with CUDA and Lattice's dependencies (pip install -e .); prints
"skipped: ..." without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))


def _device(args: argparse.Namespace):
    """The GPU; ``--device cpu`` is a dry run of the same code (float64 models, so that
    the staged path runs as it does for GPU tensors)."""
    import torch
    if args.device == "cpu":
        return torch.device("cpu"), torch.float64
    return torch.device("cuda"), torch.float32


def _say(what: str) -> None:
    print(f"[attach_gpu] {time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


def _timed(fn, into: list):
    def run():
        started = time.perf_counter()
        fn()
        into.append(time.perf_counter() - started)
    return run


def loop_role(args: argparse.Namespace) -> None:
    import fashion_mnist_attach as ex
    import torch

    import lattice
    from lattice.torch import DecentralizedTraining

    torch.manual_seed(args.rank)
    device, dtype = _device(args)
    model = ex.make_model().to(device, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(args.batch, 1, 28, 28, device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def steps(n: int, on_step=None) -> float:
        sync()
        started = time.perf_counter()
        for _ in range(n):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if on_step is not None:
                on_step()
        sync()
        return n / (time.perf_counter() - started)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps(20)  # warm up kernels
    out: dict = {"rank": args.rank}
    if not args.job:
        out["steps_per_s"] = steps(args.steps)
    else:
        with lattice.connect(args.socket, timeout=300) as client:
            with DecentralizedTraining(client, args.job, model, opt, timeout=300) as dt:
                stage_in, stage_out, syncs = [], [], []
                dt.loop.stage_in = _timed(dt.loop.stage_in, stage_in)
                dt.loop.stage_out = _timed(dt.loop.stage_out, stage_out)

                def step() -> None:
                    report = dt.step(samples=args.batch)
                    if report is not None:
                        syncs.append((report.seconds, report.exchange_s))
                out["steps_per_s"] = steps(args.steps, step)
                out["stage_in_s"], out["stage_out_s"] = stage_in, stage_out
                out["syncs"] = syncs
    print(json.dumps(out), flush=True)


def handoff_role(args: argparse.Namespace) -> None:
    """One loop, alone in its job, with a big model on the GPU: the staging each way
    and one whole sync (alone: the daemon averages with nobody, so this is the
    hand-off itself)."""
    import torch

    import lattice
    from lattice.torch import DecentralizedTraining

    width = 4096
    rows = max(1, args.handoff_params // width)
    device, dtype = _device(args)
    model = torch.nn.Sequential(torch.nn.Linear(width, rows, bias=False)).to(device, dtype)
    with lattice.connect(args.socket, timeout=600) as client:
        with DecentralizedTraining(client, args.job, model, timeout=600) as dt:
            ins, outs, syncs = [], [], []
            for _ in range(args.reps):
                started = time.perf_counter()
                dt._stage_in()
                ins.append(time.perf_counter() - started)
                started = time.perf_counter()
                dt._stage_out()
                outs.append(time.perf_counter() - started)
                syncs.append(dt.sync().seconds)  # stage in + the call (+ out if changed)
    print(json.dumps({"params": rows * width, "stage_in_s": ins, "stage_out_s": outs,
                      "sync_s": syncs}), flush=True)


def _procs(args: argparse.Namespace, sockets: list, job: str | None, role: str = "loop",
           n: int | None = None) -> list[dict]:
    procs = []
    for rank, sock in enumerate(sockets[: n or len(sockets)]):
        cmd = [sys.executable, __file__, "--_role", role, "--rank", str(rank), "--socket",
               str(sock), "--steps", str(args.steps), "--batch", str(args.batch),
               "--handoff-params", str(args.handoff_params), "--reps", str(args.reps),
               "--device", args.device]
        procs.append(subprocess.Popen(cmd + (["--job", job] if job else []),
                                      stdout=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"a {role} process failed (exit {p.returncode})")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def run(args: argparse.Namespace) -> dict:
    import torch

    import lattice
    from lattice.client.localnet import LocalNet
    from lattice.testing.daemons import wait_for

    base = Path(tempfile.mkdtemp(prefix="lattice-gpu-"))
    config = base / "latticed.toml"
    config.write_text(f"[jobs]\nmax_params = {args.handoff_params + 100_000}\n")
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (dry run)"
    out: dict = {"gpu": gpu, "participants": 4,
                 "steps": args.steps, "batch": args.batch, "sync_every": args.sync_every}
    with LocalNet(4, base / "net", log_level="warning",
                  extra_args=["--config", str(config)]) as net:
        net.start()
        sockets = [n.socket for n in net.nodes]
        with lattice.connect(sockets[0]) as c:
            wait_for(lambda: sum(1 for m in c.members().values() if m.get("alive")) >= 4, 60,
                     "4 members", interval=0.1)
        _say("4 loops without Lattice")
        without = _procs(args, sockets, None)
        out["without_steps_per_s"] = statistics.mean(o["steps_per_s"] for o in without)
        out["rows"] = []
        for overlap in args.overlap:
            with lattice.connect(sockets[0]) as c:
                job = c.submit_job({"kind": "attach", "name": f"gpu-cnn-{overlap}",
                                    "min_peers": 4, "sync_every": args.sync_every,
                                    "overlap": overlap, "merge_timeout": 120})["job_id"]
            _say(f"4 loops with Lattice, overlap {overlap}")
            with_ = _procs(args, sockets, job)
            rate = statistics.mean(o["steps_per_s"] for o in with_)
            syncs = [s for o in with_ for s in o["syncs"]]
            out["rows"].append({
                "overlap": overlap, "steps_per_s": rate,
                "ratio": rate / out["without_steps_per_s"],
                "stage_in_s": statistics.median(s for o in with_ for s in o["stage_in_s"]),
                "stage_out_s": statistics.median(
                    [s for o in with_ for s in o["stage_out_s"]] or [0.0]),
                "sync_s": statistics.median(s for s, _ in syncs) if syncs else 0.0,
                "sync_p90_s": sorted(s for s, _ in syncs)[int(0.9 * len(syncs))] if syncs else 0.0,
                "exchange_s": statistics.median(x for _, x in syncs) if syncs else 0.0,
                "syncs": len(syncs)})
            with lattice.connect(sockets[0]) as c:
                wait_for(lambda job=job: c.job(job)["status"] == "done", 120, "the CNN job to end", 0.2)
        _say("4 loops without Lattice (again)")
        again = _procs(args, sockets, None)
        out["without_again_steps_per_s"] = statistics.mean(o["steps_per_s"] for o in again)
        for row in out["rows"]:  # against both baselines' mean: the machine's load moves
            row["ratio"] = row["steps_per_s"] / statistics.mean(
                [out["without_steps_per_s"], out["without_again_steps_per_s"]])
        with lattice.connect(sockets[0]) as c:
            solo = c.submit_job({"kind": "attach", "name": "gpu-handoff", "min_peers": 1,
                                 "sync_every": 1, "merge_timeout": 60})["job_id"]
        _say("the hand-off of GPU tensors")
        (handoff,) = _procs(args, sockets, solo, role="handoff", n=1)
    out["handoff_params"] = handoff["params"]
    out["handoff_stage_in_s"] = statistics.median(handoff["stage_in_s"])
    out["handoff_stage_out_s"] = statistics.median(handoff["stage_out_s"])
    out["handoff_sync_s"] = statistics.median(handoff["sync_s"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sync-every", type=int, default=50)
    p.add_argument("--overlap", type=int, nargs="+", default=[0, 1],
                   help="a Lattice row per value of the job's overlap")
    p.add_argument("--handoff-params", type=int, default=100_000_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    p.add_argument("--_role", default="", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--socket", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: needs torch with CUDA")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA GPU here")
        return 0
    if args._role == "loop":
        loop_role(args)
        return 0
    if args._role == "handoff":
        handoff_role(args)
        return 0
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['gpu']}: 4 attached loops on one GPU, Fashion-MNIST CNN, batch {args.batch}, "
          f"{args.steps} steps each, sync every {args.sync_every}")
    print(f"  without Lattice       {out['without_steps_per_s']:9.1f} steps/s per loop, "
          f"{out['without_again_steps_per_s']:.1f} again after the Lattice rows")
    for row in out["rows"]:
        print(f"  with Lattice, overlap {row['overlap']} {row['steps_per_s']:7.1f} steps/s per loop "
              f"({100 * row['ratio']:.1f}%; target >= 90%); per sync: median "
              f"{1e3 * row['sync_s']:.1f} ms (p90 {1e3 * row['sync_p90_s']:.1f}), of which "
              f"exchange {1e3 * row['exchange_s']:.1f} ms, staging GPU -> shm "
              f"{1e3 * row['stage_in_s']:.2f} ms, shm -> GPU {1e3 * row['stage_out_s']:.2f} ms")
    mb = out["handoff_params"] * 4 / 1e6
    print(f"hand-off of GPU tensors, {out['handoff_params']:,} float32 ({mb:.0f} MB), median:")
    print(f"  GPU -> pinned -> shared memory   {out['handoff_stage_in_s']:.3f} s")
    print(f"  shared memory -> pinned -> GPU   {out['handoff_stage_out_s']:.3f} s")
    print(f"  one sync (alone: no exchange)    {out['handoff_sync_s']:.3f} s")
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
