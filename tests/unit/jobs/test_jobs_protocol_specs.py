"""proto/gossip-avg.md, proto/blob.md and proto/jobs.md agree with the code: limits
tables, the array-header checks, and the job-id golden vector."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lattice.core import gossip_messages
from lattice.core import jobs as J
from lattice.core.arrays import ArraySpec
from lattice.core.gossip_messages import GossipFormatError, parse_array_header
from lattice.net import blob, gossip_avg

PROTO = Path(__file__).resolve().parents[3] / "proto"


def _limits(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^\| `(MAX_[A-Z_]+)` \| (\d+) \|$", text, re.M)}


@pytest.mark.parametrize("doc,module", [("gossip-avg.md", gossip_messages), ("blob.md", blob)])
def test_limits_tables_match_the_code(doc, module):
    table = _limits((PROTO / doc).read_text())
    assert table
    assert table == {name: getattr(module, name) for name in table}
    assert set(table) == {n for n in dir(module) if n.startswith("MAX_")}


def test_protocol_ids_are_the_specs():
    assert "`/lattice/gossip-avg/2`" in (PROTO / "gossip-avg.md").read_text()
    assert gossip_avg.PROTOCOL == "/lattice/gossip-avg/2" and blob.PROTOCOL == "/lattice/blob/1"


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


def test_the_private_job_token_golden_vector():
    from lattice.core.identity import Identity

    text = (PROTO / "jobs.md").read_text()
    token = J.job_token(Identity(bytes(range(32))), "fefce12cca7d662479523f9b882b074f")
    proof = J.join_proof(token, "fefce12cca7d662479523f9b882b074f", "12D3KooWExampleJoiner")
    assert f"token `{token}`" in text and f"`{proof}`" in text


def test_every_spec_field_is_documented():
    text = (PROTO / "jobs.md").read_text()
    train, merge = text.split("## The merge kind")
    for name in J.TrainSpec(task="x").to_dict():
        assert f"| `{name}` |" in train, name
    for name in J.MergeJobSpec(method="ties", models=("a" * 64,)).to_dict():
        assert f"| `{name}` |" in merge, name


EXPECT = {"data": np.dtype(np.float32), "shape": np.dtype(np.int64)}


def header(*items):
    return {"t": "arrays", "items": [[n, {"dtype": d, "shape": s, "nbytes": b}]
                                     for n, d, s, b in items]}


def test_a_well_formed_header_is_read():
    specs = parse_array_header(header(["data", "<f4", [10], 40], ["shape", "<i8", [1], 8]),
                               expect=EXPECT, max_bytes=1000)
    assert specs == [("data", ArraySpec("<f4", (10,), 40)), ("shape", ArraySpec("<i8", (1,), 8))]


@pytest.mark.parametrize("bad", [
    None,
    {"t": "other", "items": []},
    header(["data", "<f4", [10], 40]),  # a name missing
    header(["data", "<f8", [10], 80], ["shape", "<i8", [1], 8]),  # dtype not on the wire
    header(["data", "<f2", [10], 20], ["shape", "<i8", [1], 8]),  # not what the codec sends
    header(["data", "<f4", [10], 41], ["shape", "<i8", [1], 8]),  # nbytes lies
    header(["data", "<f4", [-1], -4], ["shape", "<i8", [1], 8]),
    header(["data", "<f4", [1000], 4000], ["shape", "<i8", [1], 8]),  # over max_bytes
    header(["data", "<f4", [10], 40], ["data", "<f4", [10], 40]),
    header(["data", "<f4", [10], 40], ["shape", "<i8", [1], 8], ["extra", "|i1", [1], 1]),
    {"t": "arrays", "items": [["data", "<f4", [2] * 33, 4 * 2 ** 33]]},
    # zero bytes, but numpy multiplies every dimension when it allocates
    header(["data", "<f4", [0, 10**6, 10**6, 10**6], 0], ["shape", "<i8", [1], 8]),
    header(["data", "<f4", [0, 1000], 0], ["shape", "<i8", [1], 8]),
    header(["data", "<f4", [True] * 3, 4], ["shape", "<i8", [1], 8]),
    header([["data"], "<f4", [10], 40], ["shape", "<i8", [1], 8]),
    header(["data", ["<f4"], [10], 40], ["shape", "<i8", [1], 8]),
])
def test_bad_headers_are_refused_before_any_allocation(bad):
    with pytest.raises(GossipFormatError):
        parse_array_header(bad, expect=EXPECT, max_bytes=1000)


def test_an_accepted_header_always_allocates():
    # the largest extents the checks let through allocate without error
    for shape in ([0, 250], [250, 0], [0], [1] * 8, [0] * 8):
        nbytes = int(np.prod(shape)) * 4
        (_, spec), _ = parse_array_header(
            header(["data", "<f4", shape, nbytes], ["shape", "<i8", [1], 8]),
            expect=EXPECT, max_bytes=1000)
        assert np.empty(spec.shape, dtype=spec.numpy_dtype).nbytes == nbytes
