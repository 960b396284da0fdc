"""The attach spec and the model manifest: defaults resolved into the stored record,
bad fields refused by name, every manifest count and size bounded before anything is
allocated, and the first difference between two manifests named."""

import pytest

from lattice.core.jobs import JobSpecError, new_job_record, read_job
from lattice.core.jobs.attach import (
    Manifest,
    ManifestError,
    manifest_from_json,
    manifest_of,
    parse_attach_spec,
    parse_manifest,
)


def test_defaults_are_resolved_so_the_record_says_what_participants_run():
    spec = parse_attach_spec({"kind": "attach", "min_peers": 4, "algorithm": "diloco"})
    assert (spec.max_peers, spec.outer_lr, spec.outer_momentum) == (4, 0.7, 0.9)
    assert parse_attach_spec({"algorithm": "noloco"}).outer_momentum == 0.3
    assert parse_attach_spec({"algorithm": "noloco", "outer_momentum": 0.5}).outer_momentum == 0.5
    default = parse_attach_spec({})  # NoLoCo: the best under label skew (bench/attach_learning.py)
    assert (default.algorithm, default.outer, default.outer_momentum) == ("noloco", True, 0.3)
    assert parse_attach_spec({"algorithm": "gossip"}).outer is False
    # the stored form parses back to the same spec, and the id commits to it
    job_id, record = new_job_record(spec, "peer", "n" * 16, 0.0, kind="attach")
    assert read_job(job_id, record) == spec


@pytest.mark.parametrize("raw,field", [
    ({"algorithm": "adam"}, "algorithm"),
    ({"compression": "int4"}, "compression"),
    ({"overlap": 2}, "overlap"),
    ({"min_peers": 4, "max_peers": 2}, "max_peers"),
    ({"init": "not-a-model-id"}, "init"),
    ({"name": "Has Spaces"}, "name"),
    ({"task": "digits-mlp"}, "task"),  # a train field: refused, not ignored
    ({"kind": "train"}, "kind"),
    ({"weighting": "data"}, "weighting"),  # a loop does not report its dataset size
])
def test_bad_specs_are_refused_by_field(raw, field):
    with pytest.raises(JobSpecError) as e:
        parse_attach_spec(raw)
    assert e.value.field == field


def test_a_manifest_lays_tensors_back_to_back_as_float32():
    m = parse_manifest([["a", "bfloat16", [2, 3]], ["b", "float32", []], ["c", "float16", [4]]],
                       max_tensors=8, max_params=100)
    assert m.offsets == [0, 6, 7] and m.num_params == 11 and m.slot_bytes == 44
    assert manifest_from_json(m.to_json(), max_tensors=8, max_params=100) == m


@pytest.mark.parametrize("raw,message", [
    ([], "1 to 4 entries"),
    ([["x", "float32", [1]]] * 5, "1 to 4 entries"),
    ([["x", "float32", [1]], ["x", "float32", [1]]], "appears twice"),
    ([["x", "int64", [1]]], "dtype must be one of"),
    ([["x y", "float32", [1]]], "printable ASCII"),
    ([["__metadata__", "float32", [1]]], "printable ASCII"),
    ([["x", "float32", [1] * 9]], "at most 8 sizes"),
    ([["x", "float32", [-1]]], "at most 8 sizes"),
    ([["x", "float32", [11, 11]]], "more than 100 parameters"),
    ([["x", "float32", [10]], ["y", "float32", [91]]], "more than 100 parameters"),
    ([["x", "float32", [0]]], "no parameters"),
    ([["x", "float32"]], "must be [name, dtype, shape]"),
    ("x", "must be a list"),
])
def test_manifests_are_bounded_before_allocation(raw, message):
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_manifest(raw, max_tensors=4, max_params=100)


def test_the_first_difference_is_named():
    job = manifest_of([("conv.weight", "float32", (8, 1, 3, 3)), ("fc.bias", "float32", (10,))])
    assert manifest_of([("fc.bias", "float32", (10,)),
                        ("conv.weight", "float32", (8, 1, 3, 3))]).first_difference(job) is None
    assert (manifest_of([("conv.weight", "float32", (8, 1, 5, 5)), ("fc.bias", "float32", (10,))])
            .first_difference(job)) == ("tensor 'conv.weight' is float32[8, 1, 5, 5] here but "
                                        "float32[8, 1, 3, 3] in the job's model")
    assert (manifest_of([("conv.weight", "bfloat16", (8, 1, 3, 3)), ("fc.bias", "float32", (10,))])
            .first_difference(job)) == ("tensor 'conv.weight' is bfloat16[8, 1, 3, 3] here but "
                                        "float32[8, 1, 3, 3] in the job's model")
    assert (manifest_of([("conv.weight", "float32", (8, 1, 3, 3)), ("fc.b", "float32", (10,))])
            .first_difference(job)) == "tensor 'fc.b' is not in the job's model"
    assert (manifest_of([("conv.weight", "float32", (8, 1, 3, 3))]).first_difference(job)
            == "tensor 'fc.bias' of the job's model is missing here")
    assert isinstance(job, Manifest)
