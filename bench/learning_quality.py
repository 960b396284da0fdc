"""Learning quality of a simulated train job against a centralized baseline.

digits-mlp, 8 participants, the same total samples as one centralized SGD learner:
- IID + pairwise gossip                      target: merged accuracy within 1 point
- Dirichlet(0.1) label skew + pairwise gossip  target: within 2 points
- Dirichlet(0.1), no communication, then one merge: expected to collapse
for each compression codec, with the bytes the exchanges would have sent. Runs in
process (lattice.learn.simulate, the daemon's building blocks), no networking.

    .venv/bin/python bench/learning_quality.py [--compression none,fp16,int8,topk:0.1]
        [--seed 0] [--steps 600] [--sync-every 2] [--algorithm gossip|noloco] [--check]

--check exits 1 if a target is missed. About 30 s on one core.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from lattice.learn.simulate import JobSpec, centralized_baseline, simulate
from lattice.learn.tasks import get_task

IID_TARGET = 1.0  # points below centralized, at most
SKEW_TARGET = 2.0
COLLAPSE = 10.0  # "collapsed" if the no-communication merge is this far below


def _mb(n: int) -> str:
    return f"{n / 1e6:8.2f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compression", default="none,fp16,int8,topk:0.1", help="comma-separated codec specs")
    ap.add_argument("--task", default="digits-mlp")
    ap.add_argument("--participants", type=int, default=JobSpec.participants)
    ap.add_argument("--steps", type=int, default=JobSpec.steps, help="local steps per participant")
    ap.add_argument("--batch", type=int, default=JobSpec.batch)
    ap.add_argument("--sync-every", type=int, default=JobSpec.sync_every)
    ap.add_argument("--lr", type=float, default=JobSpec.lr)
    ap.add_argument("--momentum", type=float, default=JobSpec.momentum)
    ap.add_argument("--algorithm", default="gossip", choices=["gossip", "noloco"])
    ap.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args(argv)

    base = JobSpec(
        task=args.task, participants=args.participants, steps=args.steps, batch=args.batch, lr=args.lr,
        momentum=args.momentum, sync_every=args.sync_every, algorithm=args.algorithm, seed=args.seed,
    )
    task = get_task(base.task)
    codecs = [c.strip() for c in args.compression.split(",") if c.strip()]
    skew = f"dirichlet:{args.alpha:g}"

    t0 = time.perf_counter()
    central = centralized_baseline(task, base.total_samples, batch=base.batch, lr=base.lr, momentum=base.momentum, seed=base.seed)
    t_central = time.perf_counter() - t0
    print(f"{task.name} ({task.num_params} params), {base.participants} participants x {base.steps} local steps "
          f"x batch {base.batch} = {base.total_samples:,} samples; H={base.sync_every}, lr={base.lr}, "
          f"momentum={base.momentum}, algorithm={base.algorithm}, seed={base.seed}")
    print(f"centralized SGD, same {central.total_samples:,} samples ({central.steps} steps): "
          f"test accuracy {100 * central.accuracy:.2f} %  ({t_central:.1f} s)\n")

    header = f"{'scenario':<31} {'compression':<11} {'merged acc':>10} {'vs central':>10} {'target':>14} " \
             f"{'gossip bytes':>12} {'merge bytes':>11} {'mean local':>10} {'time':>6}  result"
    print(header)
    print("-" * len(header))
    missed = []

    def row(label: str, codec: str, spec: JobSpec, target: float | None) -> None:
        t = time.perf_counter()
        r = simulate(spec, task)
        dt = time.perf_counter() - t
        gap = 100 * (r.accuracy - central.accuracy)
        if target is None:
            verdict, tgt = ("collapses" if -gap >= COLLAPSE else "DID NOT COLLAPSE"), "collapse"
        else:
            ok = -gap <= target
            verdict, tgt = ("PASS" if ok else "MISS"), f"within {target:g} pt"
            if not ok:
                missed.append(f"{label} {codec}")
        local = 100 * sum(r.participant_accuracy) / len(r.participant_accuracy)
        print(f"{label:<31} {codec:<11} {100 * r.accuracy:9.2f}% {gap:+10.2f} {tgt:>14} "
              f"{_mb(r.bytes_gossip):>12} {_mb(r.bytes_merge):>11} {local:9.2f}% {dt:5.1f}s  {verdict}", flush=True)

    for codec in codecs:
        row(f"iid + {base.algorithm}", codec, dataclasses.replace(base, partition="iid", compression=codec), IID_TARGET)
    for codec in codecs:
        row(f"{skew} + {base.algorithm}", codec, dataclasses.replace(base, partition=skew, compression=codec), SKEW_TARGET)
    # nothing is sent, so the codec does not matter: one run
    row(f"{skew}, no comm + merge", "-", dataclasses.replace(base, partition=skew, algorithm="none"), None)

    print(f"\n'mean local' = mean test accuracy of the participants' own final models before the merge. "
          f"Total {time.perf_counter() - t0:.0f} s.")
    if missed:
        print("missed targets: " + "; ".join(missed))
        return 1 if args.check else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
