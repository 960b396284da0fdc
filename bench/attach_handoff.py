"""Hand-off cost of an attached loop: one sync of a big float32 model between the
user's process and its daemon, both directions, next to the same sync's network
exchange.

Two daemons on 127.0.0.1 (``jobs.max_params`` raised to fit), an attach job with two
numpy loops (each its own process, lattice.attach). Each loop changes its parameters
and syncs ``--syncs`` times; every sync averages with the other loop, so the result
really comes back. Per sync, from the loop's side:

  sync       the whole `step()` that synced, as the loop waits for it
  exchange   of which the daemon averaged with the peer (the network exchange)
  hand-off   the rest: the call over the socket and handing the result to the loop (the
             loop's parameters live in the shared memory, and the average is written
             into its spare slot there: the loop switches slots; nothing else moves)
  staged     a loop whose parameters live elsewhere (its own arrays; a GPU is the same
             plus the device copies, bench/attach_gpu.py) adds one copy in and one out

    .venv/bin/python bench/attach_handoff.py                  # 100M parameters
    .venv/bin/python bench/attach_handoff.py --params 1000000 --syncs 2   # smoke
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def loop_role(args: argparse.Namespace) -> None:
    import lattice
    import lattice.attach
    from lattice.testing.daemons import wait_for

    params = {"w": np.zeros((args.params // 1000, 1000), np.float32),
              "b": np.zeros(args.params % 1000 or 1, np.float32)}
    with lattice.connect(args.socket, timeout=600) as client:
        loop = lattice.attach.attach(client, args.job, params, timeout=600)
        # both loops sync at the same moments (a real loop's rounds take time; these
        # take none): start once every member's loop is ready (its entry has steps)
        wait_for(lambda: all("steps" in e for e in client.job(args.job)["participants"].values()),
                 600, "every loop to be ready", interval=0.05)
        staged_in, staged_out = [], []
        mine = {k: v.copy() for k, v in loop.arrays.items()}  # a loop's own arrays
        rows = []
        for _ in range(args.syncs):
            loop.arrays["w"][:8] += np.float32(args.rank + 1)  # something to average
            loop.steps += loop.sync_every - 1
            report = loop.step(samples=1)
            assert report is not None
            rows.append({"sync": report.seconds, "exchange": report.exchange_s,
                         "copy": report.copy_s, "changed": report.changed,
                         "outcome": report.outcome})
            t = time.perf_counter()  # what a loop with its own arrays adds: in, then out
            for k in mine:
                np.copyto(loop.arrays[k], mine[k])
            staged_in.append(time.perf_counter() - t)
            t = time.perf_counter()
            for k in mine:
                np.copyto(mine[k], loop.arrays[k])
            staged_out.append(time.perf_counter() - t)
        loop.finish(timeout=1200)
    print(json.dumps({"rank": args.rank, "rows": rows, "staged_in": staged_in,
                      "staged_out": staged_out}), flush=True)


def run(args: argparse.Namespace) -> dict:
    import lattice
    from lattice.client.localnet import LocalNet
    from lattice.testing.daemons import wait_for

    base = Path(tempfile.mkdtemp(prefix="lattice-handoff-"))
    config = base / "latticed.toml"
    config.write_text(f"[jobs]\nmax_params = {args.params + 1000}\n"
                      f"[blobs]\nmax_store_bytes = {16 * (args.params * 4 + (1 << 20))}\n")
    with LocalNet(2, base / "net", log_level=args.log_level,
                  extra_args=["--config", str(config)]) as net:
        net.start()
        with lattice.connect(net.nodes[0].socket) as c:
            wait_for(lambda: sum(1 for m in c.members().values() if m.get("alive")) >= 2, 60,
                     "2 members", interval=0.1)
            job = c.submit_job({"kind": "attach", "name": "handoff", "min_peers": 2,
                                "sync_every": 1, "merge_timeout": 600})["job_id"]
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--_role", "loop", "--socket", str(n.socket), "--job", job,
             "--params", str(args.params), "--syncs", str(args.syncs), "--rank", str(i)],
            stdout=subprocess.PIPE, text=True) for i, n in enumerate(net.nodes)]
        outs = []
        for p in procs:
            stdout, _ = p.communicate(timeout=3600)
            if p.returncode != 0:
                raise RuntimeError(f"a loop failed (exit {p.returncode})")
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    rows = [r for o in outs for r in o["rows"] if r["changed"]]
    handoff = [r["sync"] - r["exchange"] for r in rows]
    return {"params": args.params, "syncs": len(rows),
            "sync_s": statistics.median(r["sync"] for r in rows) if rows else None,
            "exchange_s": statistics.median(r["exchange"] for r in rows) if rows else None,
            "handoff_s": statistics.median(handoff) if rows else None,
            "copy_s": statistics.median(r["copy"] for r in rows) if rows else None,
            "staged_s": statistics.median(a + b for o in outs
                                          for a, b in zip(o["staged_in"], o["staged_out"], strict=True)),
            "outcomes": sorted({r["outcome"] for o in outs for r in o["rows"]}),
            "all": [r for o in outs for r in o["rows"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=100_000_000)
    p.add_argument("--syncs", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--log-level", default="warning", help="the daemons' (in a temp dir)")
    p.add_argument("--_role", default="", help=argparse.SUPPRESS)
    p.add_argument("--socket", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._role == "loop":
        loop_role(args)
        return 0
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return 0
    mb = args.params * 4 / 1e6
    print(f"attach hand-off, {args.params:,} float32 parameters ({mb:.0f} MB), "
          f"{out['syncs']} syncs that changed the model (median):")
    print(f"  {'sync, as the loop waits':<38} {out['sync_s']:8.3f} s")
    print(f"  {'  network exchange (daemon <-> peer)':<38} {out['exchange_s']:8.3f} s")
    print(f"  {'  hand-off (loop <-> daemon)':<38} {out['handoff_s']:8.3f} s")
    print(f"  {'    of which the result to the loop':<38} {out['copy_s']:8.3f} s")
    print(f"  {'staged loop adds (copy in + out)':<38} {out['staged_s']:8.3f} s")
    print(f"  outcomes: {', '.join(out['outcomes'])}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
