"""Merge methods do what they claim and are recomputable; model ids are content
addresses; both file formats round-trip and malformed files are rejected."""

import hashlib
import io
import json
import struct

import numpy as np
import pytest

from lattice.learn.merge import (
    ModelFormatError,
    canonical_model_bytes,
    dare,
    linear,
    load_npz,
    load_safetensors,
    loads_safetensors,
    merge_models,
    model_id,
    save_npz,
    save_safetensors,
    slerp,
    task_arithmetic,
    ties,
    weighted_average,
)

RNG = np.random.default_rng(0)
M = [RNG.normal(0, 1, 257).astype(np.float32) for _ in range(4)]
BASE = RNG.normal(0, 1, 257).astype(np.float32)


def test_weighted_average_of_identical_models_is_identity():
    out = weighted_average([M[0]] * 5, [1, 2, 3, 4, 100])
    assert out.dtype == np.float32 and out.tobytes() == M[0].tobytes()


def test_weighted_average_respects_weights():
    out = weighted_average(M[:3], [100, 300, 0])
    np.testing.assert_allclose(out, 0.25 * M[0] + 0.75 * M[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(weighted_average(M[:2], [0, 7]), M[1])
    np.testing.assert_allclose(linear(M), np.mean(M, axis=0), atol=1e-6)
    assert weighted_average(M, [1, 2, 3, 4]).tobytes() == weighted_average(M, [1, 2, 3, 4]).tobytes()


@pytest.mark.parametrize("weights", [[1, -1], [0, 0], [1, np.nan], [1]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError):
        weighted_average(M[:2], weights)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        linear([M[0], M[1][:10]])


def test_slerp_endpoints_and_great_circle():
    np.testing.assert_allclose(slerp(M[0], M[1], 0.0), M[0], atol=1e-6)
    np.testing.assert_allclose(slerp(M[0], M[1], 1.0), M[1], atol=1e-6)
    e1, e2 = np.array([1, 0], np.float32), np.array([0, 1], np.float32)
    mid = slerp(e1, e2, 0.5)
    np.testing.assert_allclose(mid, [np.sqrt(0.5)] * 2, rtol=1e-6)  # stays on the unit circle
    np.testing.assert_allclose(slerp(e1, 2 * e1, 0.5), 1.5 * e1)  # parallel: lerp
    np.testing.assert_allclose(slerp(np.zeros(2, np.float32), e1, 0.25), 0.25 * e1)


def test_task_arithmetic_adds_scaled_task_vectors():
    out = task_arithmetic(BASE, M[:2], [0.5, 1.0], scale=2.0)
    np.testing.assert_allclose(out, BASE + 2 * (0.5 * (M[0] - BASE) + (M[1] - BASE)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(task_arithmetic(BASE, [BASE, BASE]), BASE)


def test_ties_trims_elects_sign_and_averages_agreeing_entries():
    base = np.zeros(5, np.float32)
    m1 = np.array([3.0, -1.0, 0.1, 2.0, 0.0], np.float32)
    m2 = np.array([1.0, 2.0, -0.2, -3.0, 0.0], np.float32)
    out = ties(base, [m1, m2], density=1.0)
    # entry 0: both +, mean 2; entry 1: sum +1 -> only m2 agrees -> 2; entry 3: sum -1 -> -3
    np.testing.assert_allclose(out, [2.0, 2.0, -0.2, -3.0, 0.0], rtol=1e-6)
    trimmed = ties(base, [m1], density=0.4)  # keeps the 2 largest magnitudes of m1
    np.testing.assert_allclose(trimmed, [3.0, 0, 0, 2.0, 0])
    assert ties(BASE, M, density=0.3).tobytes() == ties(BASE, M, density=0.3).tobytes()


def test_dare_is_seeded_drops_and_rescales():
    a = dare(BASE, M, density=0.5, seed=1)
    assert a.tobytes() == dare(BASE, M, density=0.5, seed=1).tobytes()
    assert a.tobytes() != dare(BASE, M, density=0.5, seed=2).tobytes()
    np.testing.assert_allclose(dare(BASE, M[:1], density=1.0), M[0], atol=1e-6)
    big = np.ones(20000, np.float32)
    out = dare(np.zeros_like(big), [big], density=0.25, seed=0)
    assert set(np.unique(out)) == {0.0, 4.0}
    assert np.mean(out) == pytest.approx(1.0, abs=0.05)  # unbiased in expectation


def test_merge_models_works_tensor_by_tensor():
    a = {"w": M[0][:10], "b": M[1][:3]}
    b = {"w": M[2][:10], "b": M[3][:3]}
    base = {"w": BASE[:10], "b": BASE[:3]}
    lin = merge_models("linear", [a, b], weights=[1, 3])
    np.testing.assert_allclose(lin["w"], 0.25 * a["w"] + 0.75 * b["w"], rtol=1e-6, atol=1e-6)
    assert merge_models("slerp", [a, b], t=0.0)["b"].tobytes() == a["b"].tobytes()
    ta = merge_models("task_arithmetic", [a, b], base=base)
    np.testing.assert_allclose(ta["b"], a["b"] + b["b"] - base["b"], rtol=1e-5, atol=1e-5)
    assert set(merge_models("ties", [a, b], base=base, density=0.5)) == {"w", "b"}
    d1 = merge_models("dare_linear", [a, b], base=base, density=0.5, seed=3)
    assert d1["w"].tobytes() == merge_models("dare_linear", [a, b], base=base, density=0.5, seed=3)["w"].tobytes()
    with pytest.raises(ValueError, match="base"):
        merge_models("ties", [a, b])
    with pytest.raises(ValueError, match=r"'b'.*missing"):
        merge_models("linear", [a, {"w": a["w"]}])
    with pytest.raises(ValueError, match="unknown"):
        merge_models("frankenmerge", [a])


ARRAYS = {"W1": M[0][:256].reshape(16, 16), "b1": M[1][:16], "count": np.arange(3, dtype=np.int64)}
META = {"task": "digits-mlp", "participants": "8"}


def test_model_id_is_deterministic_and_order_independent():
    reordered = {k: ARRAYS[k] for k in reversed(list(ARRAYS))}
    assert model_id(ARRAYS, META) == model_id(reordered, dict(reversed(list(META.items()))))
    assert model_id(ARRAYS, META) == hashlib.sha256(canonical_model_bytes(ARRAYS, META)).hexdigest()
    big_endian = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in ARRAYS.items()}
    assert model_id(big_endian, META) == model_id(ARRAYS, META)  # values, not memory layout
    fortran = {**ARRAYS, "W1": np.asfortranarray(ARRAYS["W1"])}
    assert model_id(fortran, META) == model_id(ARRAYS, META)


def test_a_golden_vector_pins_the_byte_format():
    # proto/model-format.md shows this example; changing the format changes every id
    data = canonical_model_bytes({"b": np.array([1.0, -2.0], np.float32), "a": np.zeros((1, 1), np.int8)}, {"k": "v"})
    header = b'{"__metadata__":{"k":"v"},"a":{"data_offsets":[0,1],"dtype":"I8","shape":[1,1]},' \
             b'"b":{"data_offsets":[1,9],"dtype":"F32","shape":[2]}}'
    header += b" " * (-len(header) % 8)
    assert data == struct.pack("<Q", len(header)) + header + b"\x00" + np.array([1.0, -2.0], "<f4").tobytes()
    assert hashlib.sha256(data).hexdigest() == "2ea02291888e84b04e91baf1acf10c34077d70097ff1b013f65584e53b73785d"


def test_model_id_changes_with_any_byte():
    ref = model_id(ARRAYS, META)
    flipped = ARRAYS["b1"].copy()
    flipped.view(np.uint32)[3] ^= 1  # one bit of one value
    assert model_id({**ARRAYS, "b1": flipped}, META) != ref
    assert model_id({**ARRAYS, "b1": ARRAYS["b1"].astype(np.float64)}, META) != ref  # dtype
    assert model_id({**ARRAYS, "W1": ARRAYS["W1"].reshape(8, 32)}, META) != ref  # shape
    assert model_id({"W1x": ARRAYS["W1"], "b1": ARRAYS["b1"], "count": ARRAYS["count"]}, META) != ref  # name
    assert model_id(ARRAYS, {**META, "participants": "7"}) != ref
    assert model_id(ARRAYS, {}) != ref


def test_safetensors_round_trip_and_file_hash_is_the_model_id(tmp_path):
    path = tmp_path / "m.safetensors"
    mid = save_safetensors(path, ARRAYS, META)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == mid == model_id(ARRAYS, META)
    arrays, meta = load_safetensors(path)
    assert meta == META and set(arrays) == set(ARRAYS)
    for k in ARRAYS:
        assert arrays[k].dtype == ARRAYS[k].dtype and arrays[k].tobytes() == ARRAYS[k].tobytes()
        assert arrays[k].flags.writeable
    buf = io.BytesIO()
    save_safetensors(buf, ARRAYS)  # file objects work too; no metadata -> no __metadata__
    from_file, meta = load_safetensors(io.BytesIO(buf.getvalue()))
    assert meta == {} and b"__metadata__" not in buf.getvalue()
    assert all(from_file[k].tobytes() == ARRAYS[k].tobytes() for k in ARRAYS)


def _file(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x00",
        struct.pack("<Q", 10**12) + b"{}",
        struct.pack("<Q", 4) + b"{}",  # header longer than file
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 3) + b"{x}",
        struct.pack("<Q", 2) + b"\xff\xfe",
        _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),  # size mismatch
        _file({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),  # unknown dtype
        _file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),  # trailing bytes
        _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),  # hole
        _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
               "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),  # overlap
        _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4),
        _file({"__metadata__": {"k": 1}}),
        _file({"__metadata__": ["k"]}),
        struct.pack("<Q", 17) + b'{"a":{},"a":{}}  ',  # duplicate keys
    ],
)
def test_malformed_safetensors_are_rejected(data):
    with pytest.raises(ModelFormatError):
        loads_safetensors(data)


def test_invalid_models_cannot_be_written():
    with pytest.raises(ModelFormatError):
        canonical_model_bytes({"a": np.array(["x"])})
    with pytest.raises(ModelFormatError):
        canonical_model_bytes({"__metadata__": np.zeros(1)})
    with pytest.raises(ModelFormatError):
        canonical_model_bytes({"a": np.zeros(1)}, {"n": 3})  # metadata values are strings


def test_npz_round_trip_and_pickle_is_never_loaded(tmp_path):
    path = tmp_path / "m.npz"
    save_npz(path, ARRAYS, META)
    arrays, meta = load_npz(path)
    assert meta == META
    assert all(arrays[k].tobytes() == ARRAYS[k].tobytes() for k in ARRAYS)
    evil = tmp_path / "evil.npz"
    np.savez(evil, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ModelFormatError):
        load_npz(evil)
    with pytest.raises(ModelFormatError):
        save_npz(tmp_path / "x.npz", {"o": np.array([None], dtype=object)})


def test_npz_refuses_a_tensor_numpy_would_take_for_its_own_option(tmp_path):
    # numpy.savez(file, allow_pickle=..., **arrays): a tensor of that name was dropped
    with pytest.raises(ModelFormatError, match="allow_pickle"):
        save_npz(tmp_path / "m.npz", {"allow_pickle": np.zeros(3), "w": np.ones(2)})


# -- hostile headers (issue 11, item 4): only ModelFormatError, bounded before parsing ----------


def _raw(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


@pytest.mark.parametrize(
    "data",
    [
        _raw(b"[" * 100_000 + b"]" * 100_000),  # would overflow json's recursion
        _raw(b'{"a":' + b"{" * 50_000 + b"}" * 50_000 + b"}"),
        _raw(b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', b"\0" * 4),
        _raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"4" * 30 + b"]}}", b"\0" * 4),
        _file({"a": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 4]}}, b"\0" * 4),
        _file({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4),
        _file({"a": {"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]}}, b"\0" * 4),
        _file({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4),
        _file({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
        _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
        _file({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        _file({"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        _raw(b'{"a":1e999999}'),
        _raw(b'{"a":"\\ud800"}'),
    ],
)
def test_hostile_headers_raise_only_model_format_error(data):
    with pytest.raises(ModelFormatError):
        loads_safetensors(data)


def test_empty_tensors_are_valid():
    arrays, _ = loads_safetensors(canonical_model_bytes({"e": np.zeros((0, 5), np.float32), "x": np.ones(2, np.int8)}))
    assert arrays["e"].shape == (0, 5) and arrays["x"].tolist() == [1, 1]


def test_a_header_limit_below_the_reference_one_is_enforced():
    data = canonical_model_bytes({"w": np.zeros(3, np.float32)}, {"k": "v" * 1000})
    assert loads_safetensors(data)[1]["k"] == "v" * 1000
    with pytest.raises(ModelFormatError, match="header length"):
        loads_safetensors(data, max_header_bytes=512)


# -- BF16 -----------------------------------------------------------------------------------------

from lattice.learn.modelfile import BFLOAT16, bf16_to_f32, f32_to_bf16  # noqa: E402


def test_bf16_is_kept_as_words_and_round_trips_byte_for_byte():
    words = np.array([0x3F80, 0xC049, 0x7F80, 0x0001, 0x7FC1], "<u2")  # 1, -3.14, inf, subnormal, NaN payload
    bf = words.view(BFLOAT16)
    data = canonical_model_bytes({"w": bf.reshape(5, 1)})
    assert b'"dtype":"BF16"' in data and data.endswith(words.tobytes())
    arrays, _ = loads_safetensors(data)
    assert arrays["w"].dtype == BFLOAT16 and arrays["w"].tobytes() == words.tobytes()
    assert model_id({"w": arrays["w"]}) == hashlib.sha256(data).hexdigest()


def test_bf16_conversion_is_exact_up_and_rounds_to_nearest_even_down():
    words = np.arange(0, 1 << 16, dtype=np.uint32).astype("<u2")
    values = bf16_to_f32(words)
    finite = np.isfinite(values)
    assert f32_to_bf16(values[finite]).view("<u2").tolist() == words[finite].tolist()  # exact both ways
    one = np.float32(1.0).view(np.uint32)
    halfway = np.array([one + 0x8000, one + 0x18000, one + 0x8001, one + 0x7FFF], np.uint32).view(np.float32)
    # 1 + half an ulp ties to even (1.0); 1 + 3 half ulps ties to even (1 + 2 ulp); just above rounds up
    assert f32_to_bf16(halfway).view("<u2").tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80]
    assert f32_to_bf16(np.array([3.4e38], np.float32)).view("<u2").tolist() == [0x7F80]  # overflow -> inf
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))
