"""The README's main job, and the job-progress renderer the CLI shares with it.

`run_main_job`: a local N-daemon network on 127.0.0.1 trains a task end to end — the
daemons find each other, one submits a train job, all of them join and train with gossip
averaging, the merged model is published — then its test accuracy is printed next to a
centralized SGD baseline that saw the same total samples, and the network is stopped.
Ring: uses the client library and the pure learning ring; never the daemon's internals.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import lattice
from lattice.client.localnet import LocalNet, LocalNetError

TERMINAL = ("done", "failed", "cancelled")


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class ProgressLine:
    """Renders job summaries as one live line on a terminal, or as rate-limited lines
    when output is a file or pipe (CI logs)."""

    def __init__(self, out: TextIO = sys.stdout, *, interval: float = 2.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.interval = interval
        self.started = time.monotonic()
        self._last_print = 0.0
        self._last_text = ""
        self._rate: tuple[float, int] | None = None

    def format(self, s: dict[str, Any]) -> str:
        steps, total = s.get("steps") or 0, s.get("steps_total") or 0
        frac = min(1.0, steps / total) if total else 0.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        elapsed = time.monotonic() - self.started
        eta = "-"
        if 0 < frac < 1 and elapsed > 0:
            eta = f"{elapsed / frac - elapsed:.0f}s"
        peers = s.get("peers") or {}
        active = sum(1 for st in peers.values() if st not in ("left", "failed", "not_selected"))
        if s.get("kind") == "merge":
            # (a tensor merged twice, by a member behind and one taking over, counts once)
            return (f"[{bar}] {100 * frac:5.1f}% {s.get('status', '?'):<9} tensors "
                    f"{min(steps, total) if total else steps}/{total}"
                    f"  fetched {_bytes(s.get('bytes_received') or 0)}  peers {active}  eta {eta}")
        loss = "-" if s.get("loss") is None else f"{s['loss']:.3f}"
        acc = "-" if s.get("accuracy") is None else f"{100 * s['accuracy']:.1f}%"
        return (f"[{bar}] {100 * frac:5.1f}% {s.get('status', '?'):<9} steps {steps}"
                f"{f'/{total}' if total else ''}"  # an attach job has no total
                f"  loss {loss}  acc {acc}  peers {active}  sent {_bytes(s.get('bytes_sent') or 0)}"
                f"  eta {eta}")

    def update(self, summary: dict[str, Any], *, force: bool = False) -> None:
        text = self.format(summary)
        now = time.monotonic()
        if self.tty:
            self.out.write("\r" + text.ljust(len(self._last_text)))
            self.out.flush()
        elif force or (text != self._last_text and now - self._last_print >= self.interval):
            self.out.write(text + "\n")
            self.out.flush()
            self._last_print = now
        self._last_text = text

    def finish(self, summary: dict[str, Any]) -> None:
        self.update(summary, force=True)
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def watch_job(client: lattice.Client, job_id: str, *, out: TextIO = sys.stdout,
              timeout: float | None = None) -> dict[str, Any]:
    """Show a job's progress until it ends; returns its final summary."""
    progress = ProgressLine(out)
    deadline = None if timeout is None else time.monotonic() + timeout
    with client.subscribe(["jobs"], timeout=timeout) as events:
        summary = client.job(job_id)
        progress.update(summary)
        while summary.get("status") not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout:g} s")
            ev = next(events)
            if ev.get("event") == "snapshot":
                continue
            if ev.get("job") == job_id and isinstance(ev.get("summary"), dict):
                summary = ev["summary"]
                progress.update(summary)
            elif ev.get("topic") == "lagged":
                summary = client.job(job_id)
    summary = client.job(job_id)
    progress.finish(summary)
    return summary


def download_model(client: lattice.Client, model_id: str) -> bytes:
    """The model's canonical bytes, read in chunks and checked against its id."""
    chunks, offset, size = [], 0, None
    while size is None or offset < size:
        r = client.read_model(model_id, offset, 1 << 20)
        size = r["size"]
        chunks.append(r["data"])
        offset += len(r["data"])
        if not r["data"] and offset < size:
            raise RuntimeError("the daemon returned an empty chunk")
    data = b"".join(chunks)
    if hashlib.sha256(data).hexdigest() != model_id:
        raise RuntimeError(f"model bytes do not hash to {model_id}")
    return data


def run_main_job(*, nodes: int = 4, task: str = "digits-mlp", steps: int = 300,
                 sync_every: int = 2, partition: str = "iid", seed: int = 0,
                 base_dir: Path | None = None, out: TextIO = sys.stdout,
                 say: Callable[[str], None] | None = None) -> int:
    from lattice.learn import get_task
    from lattice.learn.merge import loads_safetensors
    from lattice.learn.simulate import centralized_baseline

    say = say or (lambda text: print(text, file=out, flush=True))
    base = base_dir or Path(tempfile.mkdtemp(prefix="lattice-main-job-"))
    net = LocalNet(nodes, base, log_level="warning", ready_timeout=60)
    say(f"starting {nodes} daemons on 127.0.0.1 (state under {base})")
    t0 = time.monotonic()
    try:
        try:
            net.start(on_ready=lambda n: say(f"  node {n.index} {n.peer_id} {n.socket}"))
        except LocalNetError as e:
            say(f"lattice: {e}")
            return 1
        client = lattice.connect(net.nodes[0].socket, timeout=120)
        say("waiting for every daemon to see every other as a live member...")
        deadline = time.monotonic() + 60
        while True:
            members = client.members()
            alive = sum(1 for m in members.values() if m.get("alive"))
            if alive >= nodes:
                break
            if time.monotonic() > deadline:
                say(f"lattice: only {alive}/{nodes} members alive after 60 s")
                return 1
            time.sleep(0.2)  # polling a remote condition through the RPC
        say(f"network up in {time.monotonic() - t0:.1f} s: {alive} members")
        spec = {"task": task, "min_peers": nodes, "steps": steps, "sync_every": sync_every,
                "partition": partition, "seed": seed}
        job_id = client.submit_job(spec)["job_id"]
        say(f"submitted train job {job_id}: {task}, {nodes} participants, {steps} steps each, "
            f"gossip averaging every {sync_every} steps")
        summary = watch_job(client, job_id, out=out, timeout=900)
        if summary["status"] != "done" or not summary.get("model"):
            say(f"lattice: job ended {summary['status']} without a model")
            return 1
        model_id = summary["model"]
        data = download_model(client, model_id)
        arrays, meta = loads_safetensors(data)
        t = get_task(task)
        params = t.flatten(arrays)
        merged = t.evaluate(params, *t.test_data())
        job = client.job(job_id)
        total_samples = int(job.get("totals", {}).get("samples") or steps * nodes * 32)
        baseline = centralized_baseline(t, total_samples, seed=seed)
        say(f"merged model {model_id[:16]}… ({len(data)} bytes), fetched and verified")
        say(f"  test accuracy, decentralized ({nodes} daemons, merged): {100 * merged['accuracy']:.2f}%")
        say(f"  test accuracy, centralized SGD, same {total_samples} samples: "
            f"{100 * baseline.accuracy:.2f}%")
        say(f"  averaging traffic: {_bytes(summary.get('bytes_sent') or 0)} sent; "
            f"wall time {time.monotonic() - t0:.1f} s")
        client.close()
        return 0
    finally:
        codes = net.stop()
        bad = {i: c for i, c in codes.items() if c != 0}
        say(f"stopped {len(codes)} daemons" + (f"; non-zero exits: {bad}" if bad else " cleanly"))
