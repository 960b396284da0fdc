"""Golden fixtures made with mergekit 0.1.5 (bench/merge_vs_mergekit.py --golden): each
method, merged by Lattice from the same inputs, matches mergekit's output at float32
rounding level, and Lattice's own result bytes are pinned so a change to the math or
its rounding is a deliberate one (proto/merge.md)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lattice.learn.mergeengine import merge_plan, merge_share, open_model_path
from lattice.learn.mergespec import MergeSpec
from lattice.learn.modelfile import load_safetensors

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "merge"
CASES = json.loads((FIXTURES / "cases.json").read_text())
DIGESTS = json.loads((FIXTURES / "lattice-digests.json").read_text())


def _lattice(method):
    case = CASES[method]
    readers = {n: open_model_path(FIXTURES / f"input-{n}.safetensors") for n in ("base", "m1", "m2", "m3")}
    spec = MergeSpec(method, tuple(case["models"]), "base" if case["base"] else None, case["parameters"],
                     tuple(case["model_parameters"]), "F32")
    pieces = {}

    def emit(piece):
        pid = hashlib.sha256(piece).hexdigest()
        pieces[pid] = piece
        return pid

    result = merge_share(spec, readers, merge_plan(spec, readers), emit)
    return {n: np.frombuffer(b"".join(pieces[p] for p in t.pieces), np.float32).reshape(t.info.shape)
            for n, t in result.items()}


@pytest.mark.parametrize("method", sorted(CASES))
def test_lattice_matches_mergekit_and_its_own_pinned_bytes(method):
    ours = _lattice(method)
    theirs, _ = load_safetensors(FIXTURES / f"mergekit-{method}.safetensors")
    assert set(ours) == set(theirs)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7, err_msg=name)
    digest = hashlib.sha256(b"".join(ours[n].tobytes() for n in sorted(ours))).hexdigest()
    assert digest == DIGESTS[method]
