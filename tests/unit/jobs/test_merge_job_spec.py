"""The merge job's spec, pure: every field written out, bounds refused by name, the
settings bounded before anything walks them, and whatever arrives parsed or refused
with JobSpecError, never a crash."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattice.core import jobs as J
from lattice.core.jobs.merge import MAX_SETTING_ITEMS, parse_merge_spec
from lattice.jobs.merge import parse_merge_job

A, B, C = "a" * 64, "b" * 64, "c" * 64


def raw(**kw):
    spec = {"method": "ties", "models": [A, B], "base": C, "input_bytes": 3 << 30, "tensors": 201}
    spec.update(kw)
    return spec


def test_a_minimal_spec_gets_every_field_written_out_and_parses_back():
    spec = parse_merge_spec(raw())
    assert spec.to_dict() == {
        "method": "ties", "models": [A, B], "base": C, "parameters": {}, "model_parameters": [],
        "dtype": None, "name": None, "input_bytes": 3 << 30, "tensors": 201, "min_peers": 1,
        "max_peers": 8, "join_window": 5.0, "merge_timeout": 120.0}
    assert parse_merge_spec(spec.to_dict()) == spec
    density = [{"filter": "mlp", "value": [1.0, 0.5]}, {"value": 0.7}]
    full = parse_merge_spec(raw(parameters={"density": density},
                                model_parameters=[{"weight": 1}, {"weight": 0.5}], dtype="BF16", name="soup",
                                min_peers=2, max_peers=2, join_window=0, merge_timeout=30))
    assert parse_merge_spec(full.to_dict()) == full
    assert full.merge_json() == {"version": 1, "method": "ties", "base": C, "models": [A, B],
                                 "parameters": full.to_dict()["parameters"],
                                 "model_parameters": [{"weight": 1}, {"weight": 0.5}], "dtype": "BF16"}
    # the lifecycle knows the kind, and its job id commits to the spec
    job_id, record = J.new_job_record(full, "submitter", "0" * 32, 0.0, kind=J.KIND_MERGE)
    assert J.read_job(job_id, record) == full


@pytest.mark.parametrize("bad,field", [
    ({"models": []}, "models"),
    ({"models": [A] * 65}, "models"),
    ({"models": ["not-an-id"]}, "models"),
    ({"base": "B"}, "base"),
    ({"method": "Ties!"}, "method"),
    ({"method": None}, "method"),
    ({"parameters": [1]}, "parameters"),
    ({"parameters": {f"p{i}": 1 for i in range(33)}}, "parameters"),
    ({"parameters": {"density": [[[[1.0]]]]}}, "parameters"),  # nests 4 lists
    ({"parameters": {"weight": [0.5] * (MAX_SETTING_ITEMS + 1)}}, "parameters"),
    ({"parameters": {"weight": [{"filter": "x" * 1000, "value": 1.0}] * 40}}, "parameters"),  # > 16 KiB
    ({"parameters": {"weight": {1}}}, "parameters"),  # not msgpack
    ({"model_parameters": [{}]}, "model_parameters"),  # one per model
    ({"dtype": "I8"}, "dtype"),
    ({"name": ""}, "name"),
    ({"name": "x" * 65}, "name"),
    ({"input_bytes": 0}, "input_bytes"),
    ({"tensors": -1}, "tensors"),
    ({"min_peers": 3, "max_peers": 2}, "min_peers"),
    ({"join_window": 4000}, "join_window"),
    ({"merge_timeout": float("nan")}, "merge_timeout"),
    ({"seed": 3}, "seed"),  # a parameter of the DARE methods, not a job field
    ({"kind": "train"}, "kind"),
])
def test_bad_specs_are_refused_naming_the_field(bad, field):
    with pytest.raises(J.JobSpecError) as e:
        parse_merge_spec(raw(**bad))
    assert e.value.field == field


def test_required_fields_are_named():
    for name in ("method", "models", "input_bytes", "tensors"):
        spec = raw()
        del spec[name]
        with pytest.raises(J.JobSpecError, match=f"{name}: is required"):
            parse_merge_spec(spec)


_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=20)


_FIELDS = sorted(raw()) + ["parameters", "model_parameters", "dtype", "name", "min_peers",
                           "join_window", "x"]


@given(st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=10))
def test_arbitrary_maps_are_parsed_or_refused_never_crash(fields):
    try:
        parse_merge_job(raw(**fields))  # the syntax, then the meaning
    except J.JobSpecError:
        pass


@given(st.dictionaries(st.sampled_from(["weight", "density", "lambda", "normalize", "seed", "t", "gamma"]),
                       _values, max_size=4),
       st.sampled_from(["ties", "linear", "slerp", "dare_ties", "della", "model_stock", "nuslerp"]))
def test_arbitrary_settings_are_parsed_or_refused_never_crash(settings, method):
    try:
        parse_merge_job(raw(method=method, parameters=settings, model_parameters=[settings, {}]))
    except J.JobSpecError:
        pass


def test_the_merge_itself_is_checked_by_the_learning_ring():
    assert parse_merge_job(raw(parameters={"density": 0.5})).parameters == {"density": 0.5}
    for bad, message in [({"base": None}, "ties needs a base model"),
                         ({"method": "frankenmerge"}, "unknown merge method 'frankenmerge'"),
                         ({"parameters": {"t": 0.5}}, "'t' is not a parameter of ties"),
                         ({"dtype": "F32", "model_parameters": [{"lambda": 1}, {}]},
                          "not a per-model parameter")]:
        with pytest.raises(J.JobSpecError) as e:
            parse_merge_job(raw(**bad))
        assert e.value.field == "merge" and message in str(e.value), e.value
