"""The hole-punching prototype over real py-libp2p hosts in the NAT testbed (scratch).

Runs one attempt of `bench/nat_traversal.py --mode fast` per case: separate peer
processes inside the namespaces, a Circuit Relay v2 hop on the public relay. Guards the
study's result until `lattice/net/holepunch.py` replaces the prototype: direct within
3 s of the first relayed byte wherever the NATs allow it, relayed (and still carrying
data) where they do not. Real network, real time (~5-10 s per case).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.nat

BENCH = Path(__file__).resolve().parents[2] / "bench" / "nat_traversal.py"


@pytest.mark.parametrize(("case", "expect_direct"), [
    ("public_x_cone", True),
    ("nat_cone_x_cone", True),
    ("nat_symmetric_x_symmetric", False),
])
def test_prototype_goes_direct_where_nats_allow_and_stays_relayed_elsewhere(
        case, expect_direct, tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--mode", "fast", "--attempts", "1", "--case", case,
         "--json", str(out), "--logdir", str(tmp_path)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads(out.read_text())[case]
    assert "error" not in result, result
    assert result["data_ok"], "a new stream must carry 1 MiB, direct or relayed"
    assert result["first_byte_s"] < 3.0
    if expect_direct:
        assert result["direct_s"] is not None and result["direct_s"] < 3.0, result
        assert result["new_stream_via"] == "direct"
    else:
        assert result["direct_s"] is None and result["new_stream_via"] == "relayed", result
