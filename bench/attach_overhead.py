"""Overhead of attaching a training loop: steps per second of the Fashion-MNIST CNN
(examples/fashion_mnist_attach.py), 4 participants on 127.0.0.1, with Lattice
(`lattice.torch`, ``sync_every`` 50) next to the same 4 loops without it and next to
hivemind's `Optimizer` on the same model, peers and target (it averages parameters
every 4 x 50 x 32 samples, i.e. every 50 steps of each peer, with local updates).

Each row runs 4 loop processes at once (one torch thread each), so every row shares
the machine the same way; the baseline runs first and last (the machine's load moves)
and the ratio is against their mean. Needs torch and Debian's dataset-fashion-mnist;
the hivemind row needs bench/anchors/setup.sh's venv.

    .venv/bin/python bench/attach_overhead.py                   # 400 steps per loop
    .venv/bin/python bench/attach_overhead.py --steps 60        # smoke

Top-level imports are stdlib and numpy only: the hivemind row re-runs this file under
its venv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist_attach.py"
HIVEMIND = ROOT / "bench" / ".venv-hivemind" / "bin" / "python"
sys.path.insert(0, str(ROOT / "examples"))


def hivemind_role(args: argparse.Namespace) -> None:
    import fashion_mnist_attach as ex
    import hivemind
    import numpy as np
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(args.rank)
    X, y = ex.load("train")
    mine = np.array_split(np.random.default_rng(0).permutation(len(y)), args.n)[args.rank]
    X, y = X[mine], y[mine]
    model = ex.make_model()
    for attempt in range(3):  # its p2p daemon's bootstrap times out on a loaded machine
        try:
            dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                               initial_peers=args.peers)
            break
        except hivemind.p2p.P2PDaemonError:
            if attempt == 2:
                raise
    if args.rank == 0:
        print(json.dumps({"peers": [str(a) for a in dht.get_visible_maddrs()]}), flush=True)
    opt = hivemind.Optimizer(
        dht=dht, run_id=args.run_id, params=model.parameters(),
        optimizer=lambda params: torch.optim.SGD(params, lr=args.lr, momentum=0.9),
        batch_size_per_step=args.batch, target_batch_size=args.n * args.sync_every * args.batch,
        use_local_updates=True, matchmaking_time=3.0, averaging_timeout=30.0, verbose=False)
    # a barrier: no peer trains (and finishes, and leaves) before every peer is up
    print(json.dumps({"ready": args.rank}), flush=True)
    sys.stdin.readline()
    rng = np.random.default_rng(args.rank)
    started = time.perf_counter()
    for _ in range(args.steps):
        idx = rng.integers(0, len(X), args.batch)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(X[idx])),
                                                 torch.from_numpy(y[idx]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    elapsed = time.perf_counter() - started
    print(json.dumps({"rank": args.rank, "steps_per_s": args.steps / elapsed,
                      "epochs": int(opt.local_epoch)}), flush=True)
    opt.shutdown()
    dht.shutdown()


def run_hivemind(args: argparse.Namespace) -> dict:
    """Peer 0 first (its DHT is the others' bootstrap), then the rest; each reports
    ready once its DHT and Optimizer are up, and all start training together (a peer
    that finished before the others joined would leave them no one to dial). On any
    failure the row says which peer and the last line of what it printed."""
    if not HIVEMIND.exists():
        return {"skipped": "not installed (run bench/anchors/setup.sh)"}
    common = [str(HIVEMIND), __file__, "--_role", "hivemind", "--n", str(args.participants),
              "--steps", str(args.steps), "--sync-every", str(args.sync_every),
              "--run-id", f"fashion-{os.getpid()}"]
    stack = contextlib.ExitStack()
    logs = [stack.enter_context(tempfile.TemporaryFile("w+"))  # noqa: SIM115 (closed below)
            for _ in range(args.participants)]
    procs: list[subprocess.Popen] = []

    def start(rank: int, extra: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(common + ["--rank", str(rank), *extra], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=logs[rank], text=True)
        procs.append(p)
        return p

    def line_of(rank: int, p: subprocess.Popen) -> dict:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            p.wait(60)
            logs[rank].seek(0)
            said = [x for x in logs[rank].read().splitlines() if x.strip()]
            raise RuntimeError(f"hivemind peer {rank} exited with code {p.returncode}: "
                               f"{said[-1] if said else 'nothing on stderr'}")
        return json.loads(line)

    try:
        peers = line_of(0, start(0, []))["peers"]
        for r in range(1, args.participants):
            start(r, ["--peers", *peers])
        for r, p in enumerate(procs):
            line_of(r, p)  # ready
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [line_of(r, p) for r, p in enumerate(procs)]
        for p in procs:
            p.wait(600)
    except (ValueError, KeyError, RuntimeError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stack.close()
    return {"steps_per_s": statistics.mean(o["steps_per_s"] for o in outs),
            "epochs": min(o["epochs"] for o in outs)}


def run_loops(args: argparse.Namespace, sockets: list[Path], job: str | None) -> dict:
    procs = []
    for rank, sock in enumerate(sockets):
        cmd = [sys.executable, str(EXAMPLE), "--participant", "--rank", str(rank),
               "--socket", str(sock), "--steps", str(args.steps), "--participants",
               str(args.participants)]
        procs.append(subprocess.Popen(cmd + (["--job", job] if job else []),
                                      stdout=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        stdout, _ = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"a loop failed (exit {p.returncode})")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return {"steps_per_s": statistics.mean(o["steps_per_s"] for o in outs)}


def run(args: argparse.Namespace) -> dict:
    import lattice
    from lattice.client.localnet import LocalNet
    from lattice.testing.daemons import wait_for

    sys.path.insert(0, str(ROOT / "examples"))
    import fashion_mnist_attach as ex

    ex.load("test")  # raises DataMissing, naming the package
    rows: dict[str, dict] = {}
    base = Path(tempfile.mkdtemp(prefix="lattice-overhead-"))
    with LocalNet(args.participants, base / "net", log_level="warning") as net:
        net.start()
        sockets = [n.socket for n in net.nodes]
        with lattice.connect(sockets[0]) as c:
            wait_for(lambda: sum(1 for m in c.members().values() if m.get("alive"))
                     >= args.participants, 60, "every daemon to be a member", interval=0.1)
        rows["without"] = run_loops(args, sockets, None)
        with lattice.connect(sockets[0]) as c:
            job = c.submit_job({"kind": "attach", "name": "overhead",
                                "min_peers": args.participants, "sync_every": args.sync_every,
                                "merge_timeout": 120})["job_id"]
        rows["lattice"] = run_loops(args, sockets, job)
        rows["without (again)"] = run_loops(args, sockets, None)
        rows["hivemind"] = run_hivemind(args)  # while the daemons idle, as in the others
    base_rate = statistics.mean([rows["without"]["steps_per_s"],
                                 rows["without (again)"]["steps_per_s"]])
    for row in rows.values():
        if "steps_per_s" in row:
            row["ratio"] = row["steps_per_s"] / base_rate
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--participants", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--sync-every", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.add_argument("--_role", default="", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--peers", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--run-id", default="fashion", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=0.05, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._role == "hivemind":
        hivemind_role(args)
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("skipped: needs torch (pip install 'lattice-p2p[torch]')")
        return 0
    sys.path.insert(0, str(ROOT / "examples"))
    import fashion_mnist_attach as ex
    try:
        rows = run(args)
    except ex.DataMissing as e:
        print(f"skipped: {e}")
        return 0
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"Fashion-MNIST CNN, {args.participants} loops on 127.0.0.1, {args.steps} steps each, "
          f"averaging every {args.sync_every} steps (mean steps/s per loop):")
    for name, row in rows.items():
        if "steps_per_s" in row:
            extra = f"  ({row['epochs']} averaging rounds)" if "epochs" in row else ""
            print(f"  {name:<16} {row['steps_per_s']:8.2f} steps/s  {100 * row['ratio']:6.1f}%"
                  f"{extra}")
        else:
            print(f"  {name:<16} {row.get('skipped') or 'error: ' + row.get('error', '?')}")
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
