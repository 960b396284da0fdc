"""Every benchmark in bench/ runs and prints its figures (quick settings).

These keep the benchmarks from rotting; the figures worth quoting come from full runs
(see each script's docstring). Anchor rows (hivemind, Lattica) appear when
bench/anchors/setup.sh has built their virtualenvs, as .ci/run does.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ANCHORS = (ROOT / "bench" / ".venv-hivemind" / "bin" / "python").exists() and \
    (ROOT / "bench" / ".venv-lattica" / "bin" / "python").exists()
MERGEKIT = (ROOT / "bench" / ".venv-mergekit" / "bin" / "mergekit-yaml").exists()

pytestmark = pytest.mark.bench

CASES = [
    ("daemon_startup.py", ["--runs", "2", "--idle", "1"],
     [r"mdns off\s+[\d.]+\s+[\d.]+", r"mdns on\s+([\d.]+\s+[\d.]+|skipped: needs)"]),
    ("crdt_convergence.py", ["--sizes", "8", "--writes", "3"], [r"^\s+8\s+3\s+[\d.]+"]),
    ("state_attacks.py", ["--sybils", "2", "--author-mib", "0.25", "--job-authors", "10",
                          "--jobs-per-author", "3"],
     [r"^sybils: 2 authors", r"RSS \d+ -> \d+ MiB", r"^job flood: 10 authors",
      r"status \d+ ms, jobs list \d+ ms"]),
    ("dht_latency.py", ["--nodes", "2", "--ops", "10"], [r"lattice"]),
    ("scale_sim.py", ["--nodes", "100", "--writes", "1", "--idle", "5", "--warmup", "5",
                      "--failure-window", "50"],
     [r"idle bytes/s per daemon\s+\d+ B/s", r"update reaches all daemons\s+[\d.]+ s",
      r"known dead by all\s+[\d.]+ s \(100\.0% know\)"]),
    ("scale.py", ["--nodes", "3", "--idle", "3", "--settle", "1", "--dht-runs", "1",
                  "--job-steps", "10"],
     [r"idle CPU per daemon\s+[\d.]+ %", r"one write reaches all\s+\d+ ms \(3/3\)",
      r"digits-mlp job, 3 participants\s+[\d.]+ s \(done"]),
    ("tensor_transfer.py", ["--mib", "16", "--reps", "1", "--timeout", "90"],
     [r"^raw\s+1\s+\d+", r"^libp2p\s+1\s+\d+", r"^ours\s+1\s+\d+"]),
    ("pairwise_exchange.py", ["--params", "1000000", "--reps", "2", "--timeout", "120"],
     [r"^ours\s+2\s+[\d.]+"]),
    ("gossip_exchange.py", ["--params", "1000000", "--repeat", "2"], [r"median [\d.]+ s"]),
    ("learning_quality.py", ["--quick"],
     [r"^\s+gossip H=2 uniform \(reference\)\s+2\s+[\d.]+\s+100\.00", r"best within budget: .* of the bytes"]),
    ("merge_vs_mergekit.py", ["--hidden", "16", "--layers", "2", "--methods", "linear,ties"],
     [r"^linear\s+(\S+\s+\S+\s+)?[\d.]+", r"^ties\s+"]),
    ("merge_throughput.py", ["--gib", "0.01", "--no-mergekit"],
     [r"^lattice\s+[\d.]+\s+[\d.]+\s+\d+\s+\d+", r"lattice peak RSS within"]),
    ("merge_job.py", ["--gib", "0.01", "--layers", "2"],
     [r"^merge job, 4 daemons\s+[\d.]+\s+\d+\s+\d+", r"equals the one-daemon merge's",
      r"peak RSS within"]),
    ("governor.py", ["--calls", "300", "--rounds", "1", "--trials", "1"],
     [r"empty\s+[\d.]+\s+[\d.]+", r"lattice pause\s+median\s+[\d.]+ ms",
      r"on battery.*median\s+[\d.]+ ms"]),
    ("train_job.py", ["--peers", "2", "--steps", "40"],
     [r"merged model \(network run\)\s+accuracy 0\.\d+", r"centralized SGD baseline"]),
    ("attach_handoff.py", ["--params", "1000000", "--syncs", "2"],
     [r"hand-off \(loop <-> daemon\)\s+[\d.]+ s", r"network exchange.*\s+[\d.]+ s"]),
    ("attach_overhead.py", ["--steps", "30", "--participants", "2", "--sync-every", "10"],
     [r"(with|without|lattice)\s+[\d.]+ steps/s|^skipped: "]),
    ("attach_learning.py", ["--steps", "60", "--partitions", "iid"],
     [r"iid\s+none\s+[\d.]+%|^skipped: "]),
    pytest.param("nat_traversal.py", ["--attempts", "1", "--case", "public_x_cone", "--case",
                                      "nat_cone_x_cone"],
                 [r"^\| nat_cone_x_cone \| 1 \| \d", r"^\| public_x_cone \| 1 \| \d",
                  r"^\| Lattice, cases whose NATs allow direct \| \d+% ",
                  r"^\| libp2p DCUtR \(IPFS network\) \| ~70% "],
                 marks=pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                          reason="the NAT bench needs root and ip netns"),
                 id="nat_traversal.py"),
]
# An anchor row must be there: with its figures, or with the error that stopped it (a
# third-party system hanging in CI must not turn our build red; the row says so).
ANCHOR_ROWS = {
    "tensor_transfer.py": [r"^hivemind\s+(1\s+\d+|error)", r"^lattica\s+(1\s+\d+|error)"],
    "pairwise_exchange.py": [r"^hivemind\s+(2\s+[\d.]+|error)"],
    "dht_latency.py": [r"hivemind", r"[Ll]attica"],
    "attach_overhead.py": [r"hivemind\s+([\d.]+ steps/s|error)|^skipped: "],
    "merge_vs_mergekit.py": [r"^ties\s+(\d\S*\s+\d\S*\s+[\d.]+\s+[\d.]+|error)"],
}


@pytest.mark.parametrize("script,args,expect", CASES,
                         ids=[c[0] if isinstance(c, tuple) else None for c in CASES])
def test_benchmark_prints_its_figures(script, args, expect):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    print(r.stdout)
    anchors = MERGEKIT if script == "merge_vs_mergekit.py" else ANCHORS
    for pattern in expect + (ANCHOR_ROWS.get(script, []) if anchors else []):
        assert re.search(pattern, r.stdout, re.MULTILINE), f"{script}: no line matching {pattern!r}\n{r.stdout}"
