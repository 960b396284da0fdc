"""Bring your own model: a small PyTorch CNN on Fashion-MNIST, trained by 4 loops that
are attached to one Lattice job, next to one process trained on the same samples.

    pip install 'lattice-p2p[torch]'        # torch==2.13.0, the CPU build
    apt install dataset-fashion-mnist       # the data, in /usr/share/datasets/fashion-mnist
    python examples/fashion_mnist_attach.py                     # IID, 4 participants
    python examples/fashion_mnist_attach.py --partition dirichlet:0.3 --algorithm diloco

What it does: starts 4 daemons on 127.0.0.1 (what `lattice localnet --nodes 4` runs),
submits an attach job from the first, and runs 4 participant processes, each with its
own daemon and its own share of the training set. Each one is an ordinary training loop
plus three lines: `DecentralizedTraining(...)`, `dt.step(...)`, `dt.result.model_id`.
The merged model comes back by id; its test accuracy is printed next to a single
process that trained the same CNN on the same samples (all four shares, as many steps
as the four together).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DataMissing(RuntimeError):
    pass


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic (dtype, ndim), sizes, raw bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(split: str, directory: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """(images as float32 in [0, 1], shape (n, 1, 28, 28); labels as int64)."""
    images, labels = (directory / name for name in FILES[split])
    if not images.exists() or not labels.exists():
        raise DataMissing(f"Fashion-MNIST is not in {directory}: install Debian's {PACKAGE}")
    X = _idx(images).astype(np.float32)[:, None] / 255.0
    return (X - 0.2860) / 0.3530, _idx(labels).astype(np.int64)


def make_model():
    import torch

    class SmallCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16 * 7 * 7, 10)

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            return self.fc(x.flatten(1))

    return SmallCNN()


def shares(y: np.ndarray, participants: int, scheme: str, seed: int) -> list[np.ndarray]:
    from lattice.learn.partition import partition
    return partition(y, participants, scheme, seed)


def accuracy(model, X: np.ndarray, y: np.ndarray) -> float:
    import torch
    model.eval()
    with torch.no_grad():
        right = sum(int((model(torch.from_numpy(X[i:i + 2000])).argmax(1)
                         == torch.from_numpy(y[i:i + 2000])).sum())
                    for i in range(0, len(X), 2000))
    model.train()
    return right / len(X)


def train_loop(model, X, y, steps: int, batch: int, lr: float, seed: int, on_step=None,
               correction: str = "none"):
    """The user's ordinary training loop (``on_step`` is where Lattice's line goes).

    ``correction="logit-adjust"`` trains against this loop's own label prior (the loss
    sees ``logits + log(prior)``; the model is used without it): under label skew each
    loop then learns the class-balanced decision rule instead of its own classes'
    (Menon et al. 2021, "Long-tail learning via logit adjustment"; Zhang et al. 2022,
    FedLC), so the averaged models agree more."""
    import torch
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    shift = None
    if correction == "logit-adjust":
        prior = np.bincount(y, minlength=10).astype(np.float32) + 1.0  # +1: no log(0)
        shift = torch.from_numpy(np.log(prior / prior.sum()))
    elif correction != "none":
        raise ValueError(f"unknown correction {correction!r}: none | logit-adjust")
    rng = np.random.default_rng(seed)
    order, at = rng.permutation(len(X)), 0
    for _ in range(steps):
        if at + batch > len(order):
            order, at = rng.permutation(len(X)), 0
        idx = order[at:at + batch]
        at += batch
        x, t = torch.from_numpy(X[idx]), torch.from_numpy(y[idx])
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits if shift is None else logits + shift, t)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(len(idx), loss)
    return opt


# -- one participant (its own process) ------------------------------------------------------


def participant(args: argparse.Namespace) -> None:
    import torch

    import lattice
    from lattice.torch import DecentralizedTraining

    torch.set_num_threads(1)
    torch.manual_seed(args.seed + args.rank)
    X, y = load("train")
    mine = shares(y, args.participants, args.partition, args.seed)[args.rank]
    model = make_model()
    result = None
    if args.job is None:  # the same loop without Lattice (the overhead benchmark's baseline)
        started = time.perf_counter()
        train_loop(model, X[mine], y[mine], args.steps, args.batch, args.lr, args.rank,
                   correction=args.correction)
        elapsed = time.perf_counter() - started
    else:
        with lattice.connect(args.socket, timeout=300) as client:
            with DecentralizedTraining(client, args.job, model, timeout=300) as dt:
                started = time.perf_counter()
                train_loop(model, X[mine], y[mine], args.steps, args.batch, args.lr,
                           args.rank, on_step=lambda n, loss: dt.step(samples=n),
                           correction=args.correction)
                elapsed = time.perf_counter() - started
            result = dt.result.model_id
    print(json.dumps({"rank": args.rank, "model_id": result, "steps": args.steps,
                      "seconds": elapsed, "steps_per_s": args.steps / elapsed,
                      "samples": len(mine)}), flush=True)


# -- the whole run ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """4 daemons, an attach job, 4 participant processes; then the merged model's and
    the single process's test accuracy."""
    import torch

    import lattice
    from lattice.client.localnet import LocalNet
    from lattice.demo import download_model
    from lattice.learn.merge import loads_safetensors
    from lattice.testing.daemons import wait_for

    X_test, y_test = load("test")
    load("train")  # fail early, naming the package, when the data is missing
    base = Path(args.dir or tempfile.mkdtemp(prefix="lattice-fashion-"))
    out: dict = {"partition": args.partition, "algorithm": args.algorithm,
                 "participants": args.participants, "steps": args.steps,
                 "sync_every": args.sync_every, "correction": args.correction}
    with LocalNet(args.participants, base / "net", log_level="warning") as net:
        net.start()
        with lattice.connect(net.nodes[0].socket) as client:
            wait_for(lambda: sum(1 for m in client.members().values() if m.get("alive"))
                     >= args.participants, 60, "every daemon to be a member", interval=0.1)
            job = client.submit_job({
                "kind": "attach", "name": "fashion-cnn", "min_peers": args.participants,
                "sync_every": args.sync_every, "algorithm": args.algorithm,
                "compression": args.compression, "overlap": args.overlap,
                "merge_timeout": 120})["job_id"]
        print(f"job {job}: {args.participants} loops, {args.partition}, {args.algorithm}, "
              f"sync every {args.sync_every} steps", flush=True)
        results = _participants(args, [n.socket for n in net.nodes], job)
        with lattice.connect(net.nodes[0].socket) as client:
            data = download_model(client, results[0]["model_id"])
    merged = make_model()
    arrays, _ = loads_safetensors(data)
    merged.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    out["model_id"] = results[0]["model_id"]
    out["merged_accuracy"] = accuracy(merged, X_test, y_test)
    out["steps_per_s"] = [r["steps_per_s"] for r in results]
    # one process, the same samples: all four shares, as many steps as the four together
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    X, y = load("train")
    union = np.concatenate(shares(y, args.participants, args.partition, args.seed))
    single = make_model()
    started = time.perf_counter()
    train_loop(single, X[union], y[union], args.steps * args.participants, args.batch,
               args.lr, args.seed, correction=args.correction)
    out["single_seconds"] = time.perf_counter() - started
    out["single_accuracy"] = accuracy(single, X_test, y_test)
    return out


def _participants(args: argparse.Namespace, sockets: list, job: str | None) -> list[dict]:
    procs = []
    for rank, sock in enumerate(sockets):
        cmd = [sys.executable, os.path.abspath(__file__), "--participant", "--rank", str(rank),
               "--socket", str(sock), "--steps", str(args.steps), "--batch", str(args.batch),
               "--lr", str(args.lr), "--seed", str(args.seed), "--partition", args.partition,
               "--correction", args.correction,
               "--participants", str(args.participants)]
        if job is not None:
            cmd += ["--job", job]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, _ = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"a participant failed (exit {p.returncode})")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return sorted(results, key=lambda r: r["rank"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--participants", type=int, default=4)
    p.add_argument("--steps", type=int, default=600, help="steps per participant")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sync-every", type=int, default=50)
    p.add_argument("--algorithm", default="noloco", help="noloco (the default) | gossip | diloco")
    p.add_argument("--compression", default="none")
    p.add_argument("--overlap", type=int, default=0)
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA")
    p.add_argument("--correction", default="none",
                   help="none | logit-adjust: each loop trains against its label prior")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="where the daemons keep their state (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    # a participant process (started by the run)
    p.add_argument("--participant", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--socket", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.participant:
        participant(args)
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("skipped: this example needs PyTorch: pip install 'lattice-p2p[torch]'")
        return 0
    try:
        out = run(args)
    except DataMissing as e:
        print(f"skipped: {e}")
        return 0
    if args.json:
        print(json.dumps(out))
    else:
        print(f"merged model {out['model_id'][:16]}  test accuracy "
              f"{100 * out['merged_accuracy']:.2f}%")
        print(f"one process, same samples    test accuracy "
              f"{100 * out['single_accuracy']:.2f}%")
        print("steps/s per participant: "
              + ", ".join(f"{s:.1f}" for s in out["steps_per_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
