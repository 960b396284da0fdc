"""A user's numpy training loop, run as its own process by test_attach_jobs.py: linear
regression on its own synthetic data, attached to a job through lattice.attach.

    python attach_loop.py SOCKET JOB_ID OUT.npz [--steps N] [--seed S] [--wide]
                                                [--die-after STEPS]
Exit codes: 0 finished (OUT.npz has the final parameters and the model id), 3 refused
by the daemon (the message on stderr), 137 when it killed itself (--die-after)."""

import argparse
import os
import signal
import sys

import numpy as np

import lattice
import lattice.attach
from lattice.api.errors import LatticeError

p = argparse.ArgumentParser()
p.add_argument("socket")
p.add_argument("job")
p.add_argument("out")
p.add_argument("--steps", type=int, default=60)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--wide", action="store_true", help="a model the job does not have")
p.add_argument("--die-after", type=int, default=0)
args = p.parse_args()

dim = 7 if args.wide else 6
rng = np.random.default_rng(args.seed)
truth = np.arange(1.0, 7.0)  # every loop's data comes from the same line...
X = rng.normal(size=(512, 6))
y = X @ truth + rng.normal(scale=0.1, size=512) + args.seed  # ...with its own offset
w0 = {"w": rng.normal(size=dim).astype(np.float32), "b": np.zeros(1, np.float32)}

with lattice.connect(args.socket, timeout=120) as client:
    try:
        loop = lattice.attach.attach(client, args.job, w0, timeout=120)
    except LatticeError as e:
        print(f"refused: {e}", file=sys.stderr)
        sys.exit(3)
    start = {k: v.copy() for k, v in loop.arrays.items()}
    for step in range(args.steps):
        w, b = loop.arrays["w"], loop.arrays["b"]  # a sync may switch slots: index each step
        idx = rng.integers(0, len(X), 32)
        err = X[idx] @ w + b[0] - y[idx]
        w -= np.float32(0.05) * (X[idx].T @ err / 32).astype(np.float32)
        b -= np.float32(0.05) * np.float32(err.mean())
        loop.step(samples=32, loss=float((err ** 2).mean()))
        if args.die_after and step + 1 == args.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
    final = {k: v.copy() for k, v in loop.arrays.items()}
    result = loop.finish(timeout=180)
    np.savez(args.out, model_id=np.array(result.model_id), samples=np.array(loop.samples),
             rounds=np.array(loop.round), **{f"final_{k}": v for k, v in final.items()},
             **{f"start_{k}": v for k, v in start.items()})
