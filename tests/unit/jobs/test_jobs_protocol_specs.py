"""proto/gossip-avg.md, proto/blob.md and proto/jobs.md agree with the code: limits
tables, the array-header checks, and the job-id golden vector."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lattice.core import jobs as J
from lattice.net import blob, gossip_avg
from lattice.net.gossip_avg import TensorFormatError, parse_array_header

PROTO = Path(__file__).resolve().parents[3] / "proto"


def _limits(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^\| `(MAX_[A-Z_]+)` \| (\d+) \|$", text, re.M)}


@pytest.mark.parametrize("doc,module", [("gossip-avg.md", gossip_avg), ("blob.md", blob)])
def test_limits_tables_match_the_code(doc, module):
    table = _limits((PROTO / doc).read_text())
    assert table
    assert table == {name: getattr(module, name) for name in table}
    assert set(table) == {n for n in dir(module) if n.startswith("MAX_")}


def test_protocol_ids_are_the_specs():
    assert "`/lattice/gossip-avg/1`" in (PROTO / "gossip-avg.md").read_text()
    assert gossip_avg.PROTOCOL == "/lattice/gossip-avg/1" and blob.PROTOCOL == "/lattice/blob/1"


def test_the_job_id_golden_vector():
    text = (PROTO / "jobs.md").read_text()
    spec = J.parse_train_spec({"task": "digits-mlp", "min_peers": 4, "steps": 600, "seed": 7})
    job_id, _ = J.new_job_record(spec, "12D3KooWExampleSubmitter", "00112233445566778899aabbccddeeff", 0.0)
    assert f"job id `{job_id}`" in text
    merge = J.parse_merge_spec({"method": "ties", "models": ["a" * 64, "b" * 64], "base": "c" * 64,
                                "parameters": {"density": 0.5}, "input_bytes": 3 << 30, "tensors": 201})
    job_id, _ = J.new_job_record(merge, "12D3KooWExampleSubmitter", "00112233445566778899aabbccddeeff",
                                 0.0, kind=J.KIND_MERGE)
    assert f"job id `{job_id}`" in text


def test_every_spec_field_is_documented():
    text = (PROTO / "jobs.md").read_text()
    train, merge = text.split("## The merge kind")
    for name in J.TrainSpec(task="x").to_dict():
        assert f"| `{name}` |" in train, name
    for name in J.MergeJobSpec(method="ties", models=("a" * 64,)).to_dict():
        assert f"| `{name}` |" in merge, name


EXPECT = {"data": np.dtype(np.float32), "shape": np.dtype(np.int64)}


def header(*items):
    return {"t": "arrays", "items": [list(i) for i in items]}


def test_a_well_formed_header_is_read():
    specs = parse_array_header(header(["data", "float32", [10], 40], ["shape", "int64", [1], 8]),
                               expect=EXPECT, max_bytes=1000)
    assert specs == [("data", np.dtype(np.float32), (10,)), ("shape", np.dtype(np.int64), (1,))]


@pytest.mark.parametrize("bad", [
    None,
    {"t": "other", "items": []},
    header(["data", "float32", [10], 40]),  # a name missing
    header(["data", "float64", [10], 80], ["shape", "int64", [1], 8]),  # dtype not on the wire
    header(["data", "float16", [10], 20], ["shape", "int64", [1], 8]),  # not what the codec sends
    header(["data", "float32", [10], 41], ["shape", "int64", [1], 8]),  # nbytes lies
    header(["data", "float32", [-1], -4], ["shape", "int64", [1], 8]),
    header(["data", "float32", [1000], 4000], ["shape", "int64", [1], 8]),  # over max_bytes
    header(["data", "float32", [10], 40], ["data", "float32", [10], 40]),
    header(["data", "float32", [10], 40], ["shape", "int64", [1], 8], ["extra", "int8", [1], 1]),
    {"t": "arrays", "items": [["data", "float32", [2] * 33, 4 * 2 ** 33]]},
])
def test_bad_headers_are_refused_before_any_allocation(bad):
    with pytest.raises(TensorFormatError):
        parse_array_header(bad, expect=EXPECT, max_bytes=1000)
