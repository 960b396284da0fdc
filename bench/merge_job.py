"""A merge job across 4 daemons on loopback: time, bytes moved, every participant's
peak RSS, next to the same merge on one daemon (issue 14).

Writes three synthetic Llama-like BF16 models of about --gib GiB each (a base and two
fine-tunes: `bench/merge_throughput.py`'s), then in the same run:

  one daemon   the streaming engine merges them with `ties` from a model store's pieces
               (`merge_throughput.py`'s child: its peak RSS is its own)
  merge job    4 `latticed` on 127.0.0.1 (`LocalNet`); daemon 0 imports the three models
               (`--spread`: one model each on daemons 1-3), then `jobs submit merge`
               with the same spec, --min-peers 4: the tensors are divided among the 4,
               each fetches the input pieces of its own tensors, the merger fetches the
               others' output pieces and writes the model

and checks the job's model id is the one-daemon merge's. Time is submit -> done (the
roster seals as soon as the 4 joined). Bytes moved are the pieces the participants
fetched (their entries' ``bytes_received``; input pieces, output pieces to the merger,
and what the merger recomputes to check shares). Peak RSS is each daemon's high-water
mark (VmHWM), reset after the imports (clear_refs 5), so it is the merge's. The bound
checked is issue 14's: peak RSS <= 2 x the largest tensor + 300 MiB, for every
participant. Run it niced: the machine is shared, and the load average is printed.

    nice -n 19 .venv/bin/python bench/merge_job.py [--gib 1.0] [--density 0.5] [--spread]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
MIB = 1 << 20
DAEMONS = 4
LAST_TIME = {"one daemon": (85.0, 148), "mergekit": (208.0, 4951)}
"""Issue 14's one-daemon figures on an idle box: seconds, peak RSS MiB."""


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_hwm(pid: int) -> bool:
    """Reset a process's peak RSS to its current RSS (Linux >= 4.0; our own children)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> int:
    from bench.merge_throughput import plan, run_measured

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="size of each model (default 1)")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="transformer layers (default: as many as --gib holds)")
    ap.add_argument("--spread", action="store_true", help="import one model on each of daemons 1-3")
    ap.add_argument("--timeout", type=float, default=3600.0, help="give up on the job after this long")
    ap.add_argument("--tmp", help="work directory (default: a new temp dir, removed at the end)")
    args = ap.parse_args()

    import lattice
    from lattice.client.localnet import LocalNet
    from lattice.demo import watch_job
    from lattice.testing.daemons import wait_for

    _, shapes = plan(args.gib, args.layers)
    largest = max(2 * _count(s) for s in shapes.values())
    total = sum(2 * _count(s) for s in shapes.values())
    bound = 2 * largest + 300 * MIB
    throughput = str(HERE / "merge_throughput.py")
    with tempfile.TemporaryDirectory(prefix="merge-job-", dir=args.tmp) as tmp:
        work = Path(tmp)
        _, _, out, rc = run_measured([sys.executable, throughput, "--prepare", str(work), "--gib",
                                      str(args.gib), "--seed", str(args.seed),
                                      *(["--layers", str(args.layers)] if args.layers else [])])
        if rc:
            print(out)
            return 1
        prep = json.loads(out.strip().splitlines()[-1])
        ids, dirs = prep["ids"], prep["dirs"]
        print(f"inputs: 3 Llama-like BF16 models of {total / (1 << 30):.2f} GiB ({len(shapes)} tensors; "
              f"largest tensor {largest / MIB:.0f} MiB)", flush=True)
        _wall1, peak1, out, _rc = run_measured([sys.executable, throughput, "--child", str(work / "store"),
                                              json.dumps(ids), str(args.density)])
        if rc:
            print(out)
            return 1
        single = json.loads(out.strip().splitlines()[-1])
        peak1 = max(peak1, single["vmhwm"])
        print(f"one daemon: {single['seconds']:.1f} s, peak RSS {peak1 / MIB:.0f} MiB", flush=True)

        config = work / "latticed.toml"
        config.write_text(f"[blobs]\nmax_store_bytes = {16 * total + (1 << 30)}\n"
                          f"[jobs]\nmerge_max_bytes = {4 * total}\n")
        with LocalNet(DAEMONS, work / "net", extra_args=["--config", str(config)],
                      log_level="warning") as net:
            net.start()
            clients = [lattice.connect(n.socket, timeout=None) for n in net.nodes]
            wait_for(lambda: sum(1 for m in clients[0].members().values() if m.get("alive")) >= DAEMONS,
                     60, f"{DAEMONS} live members", interval=0.2)
            t0 = time.perf_counter()
            for i, name in enumerate(["base", "ft1", "ft2"]):
                holder = clients[1 + i] if args.spread else clients[0]
                got = holder.import_model(dirs[name], name)["id"]
                assert got == ids[name], (name, got, ids[name])
            print(f"imported into daemon{'s 1-3' if args.spread else ' 0'} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            wait_for(lambda: all(set(ids.values()) <= set(c.models()) for c in clients), 60,
                     "the model records everywhere", interval=0.2)
            pids = [n.process.pid for n in net.nodes]
            reset = all(reset_hwm(pid) for pid in pids)
            before = [c.jobs_stats()["blobs"] for c in clients]
            t0 = time.perf_counter()
            job_id = clients[0].submit_job({
                "kind": "merge", "method": "ties", "base": ids["base"], "models": [ids["ft1"], ids["ft2"]],
                "weights": [1.0, 1.0], "parameters": {"density": args.density},
                "min_peers": DAEMONS, "max_peers": DAEMONS})["job_id"]
            summary = watch_job(clients[0], job_id, timeout=args.timeout)
            seconds = time.perf_counter() - t0
            peaks = [vm_hwm(pid) for pid in pids]
            after = [c.jobs_stats()["blobs"] for c in clients]
            job = clients[0].job(job_id)
            for c in clients:
                c.close()
        if summary.get("status") != "done":
            print(f"the job ended {summary.get('status')}: {summary.get('reason')}")
            return 1
        entries = job["participants"]
        record = job["models"][summary["model"]]
        moved = sum(int(e.get("bytes_received") or 0) for e in entries.values())
        served = sum(a.get("bytes_served", 0) - b.get("bytes_served", 0)
                     for a, b in zip(after, before, strict=True))
        merger = record["producer"]
        print(f"\nties, density {args.density}, 3 x {total / (1 << 30):.2f} GiB BF16, inputs on "
              f"{'daemons 1-3' if args.spread else 'daemon 0'}; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
        print(f"{'daemon':<10} {'tensors':>8} {'taken over':>10} {'fetched MiB':>12} {'peak RSS MiB':>13} "
              f"{'bound MiB':>10}")
        for i, (node, peak) in enumerate(zip(net.nodes, peaks, strict=True)):
            e = entries.get(node.peer_id, {})
            role = " (merger)" if node.peer_id == merger else ""
            print(f"{i:<10} {e.get('steps', 0):>8} {e.get('helped', 0):>10} "
                  f"{int(e.get('bytes_received') or 0) / MIB:>12.0f} {peak / MIB:>13.0f} "
                  f"{bound / MIB:>10.0f}{role}")
        print(f"\n{'row':<22} {'wall s':>8} {'peak RSS MiB':>13} {'moved MiB':>10}")
        print(f"{'merge job, 4 daemons':<22} {seconds:>8.1f} {max(peaks) / MIB:>13.0f} {moved / MIB:>10.0f}")
        print(f"{'one daemon, this run':<22} {single['seconds']:>8.1f} {peak1 / MIB:>13.0f} {0:>10}")
        for name, (s, m) in LAST_TIME.items():
            print(f"{name + ', idle box':<22} {s:>8.1f} {m:>13.0f} {'-':>10}")
        print(f"bytes served by the daemons' blob services: {served / MIB:.0f} MiB")
        same = summary["model"] == single["model"]
        print(f"model {summary['model'][:16]}… {'equals' if same else 'DIFFERS FROM'} the one-daemon merge's")
        within = all(p <= bound for p in peaks)
        print(f"every participant's peak RSS {'within' if within else 'ABOVE'} 2 x largest tensor + 300 MiB"
              + ("" if reset else " (peak not reset after the imports: includes them)"))
        return 0 if same else 1


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())
