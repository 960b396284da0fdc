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

pytestmark = pytest.mark.bench

CASES = [
    ("daemon_startup.py", ["--runs", "2", "--idle", "1"],
     [r"mdns off\s+[\d.]+\s+[\d.]+", r"mdns on\s+([\d.]+\s+[\d.]+|skipped: needs)"]),
    ("crdt_convergence.py", ["--sizes", "8", "--writes", "3"], [r"^\s+8\s+3\s+[\d.]+"]),
    ("dht_latency.py", ["--nodes", "2", "--ops", "10"], [r"lattice"]),
    ("tensor_transfer.py", ["--mib", "16", "--reps", "1", "--timeout", "90"],
     [r"^raw\s+1\s+\d+", r"^libp2p\s+1\s+\d+", r"^ours\s+1\s+\d+"]),
    ("pairwise_exchange.py", ["--params", "1000000", "--reps", "2", "--timeout", "120"],
     [r"^ours\s+2\s+[\d.]+"]),
    ("gossip_exchange.py", ["--params", "1000000", "--repeat", "2"], [r"median [\d.]+ s"]),
    ("train_job.py", ["--peers", "2", "--steps", "40"],
     [r"merged model \(network run\)\s+accuracy 0\.\d+", r"centralized SGD baseline"]),
    pytest.param("nat_traversal.py", ["--attempts", "1", "--case", "public_x_cone", "--case",
                                      "nat_cone_x_cone"],
                 [r"^\| nat_cone_x_cone \| 1 \| \d", r"^\| public_x_cone \| 1 \| \d"],
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
}


@pytest.mark.parametrize("script,args,expect", CASES,
                         ids=[c[0] if isinstance(c, tuple) else None for c in CASES])
def test_benchmark_prints_its_figures(script, args, expect):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    print(r.stdout)
    for pattern in expect + (ANCHOR_ROWS.get(script, []) if ANCHORS else []):
        assert re.search(pattern, r.stdout, re.MULTILINE), f"{script}: no line matching {pattern!r}\n{r.stdout}"
