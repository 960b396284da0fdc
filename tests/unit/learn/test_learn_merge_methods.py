"""Each merge method computes what proto/merge.md defines, the same bits for any block
size, and a failing input names its tensor."""

import math

import numpy as np
import pytest

from lattice.learn.merge import (
    REDUCE_BLOCK,
    ArraySource,
    MergeInputError,
    merge_models,
    merge_tensor,
)
from lattice.learn.mergespec import MergeSpec
from lattice.learn.modelfile import BFLOAT16, bf16_to_f32, f32_to_bf16

RNG = np.random.default_rng(7)
SHAPE = (300, 700)  # 210k elements: several REDUCE_BLOCKs, so blocks really split the tensor
BASE = RNG.normal(0, 1, SHAPE).astype(np.float32)
MODELS = [BASE + RNG.normal(0, 0.1, SHAPE).astype(np.float32) for _ in range(3)]

CASES = {
    "linear": (False, 3, {"weights": [1, 2, 3]}),
    "slerp": (True, 1, {"t": 0.3}),
    "task_arithmetic": (True, 3, {"weights": [1, 0.5, -0.5], "lambda": 0.8}),
    "ties": (True, 3, {"density": 0.3, "weights": [1, 1, 2]}),
    "dare_linear": (True, 3, {"density": 0.4, "seed": 5}),
    "dare_ties": (True, 3, {"density": 0.4, "seed": 5}),
    "breadcrumbs": (True, 3, {"density": 0.6, "gamma": 0.05}),
    "della": (True, 3, {"density": 0.5, "epsilon": 0.2, "seed": 1}),
    "model_stock": (True, 3, {}),
    "nuslerp": (True, 2, {"weights": [1, 3]}),
}


def _merge(method, *, block, shape=SHAPE, dtype=None, extra=None, name="model.layers.0.w"):
    has_base, n, params = CASES[method]
    params = {**params, **(extra or {})}
    weights = params.pop("weights", None)
    spec = MergeSpec.from_arguments(method, [f"m{i}" for i in range(n)], base="b" if has_base else None,
                                    weights=weights, **params)
    shared, per_model = spec.resolve(name, 1)
    conv = (lambda a: f32_to_bf16(a)) if dtype == "BF16" else (lambda a: a)
    chunks = []
    merge_tensor(method, name, ArraySource(name, conv(BASE.reshape(shape))) if has_base else None,
                 [ArraySource(name, conv(m.reshape(shape))) for m in MODELS[:n]], shared, per_model,
                 chunks.append, block=block)
    return np.concatenate(chunks)


@pytest.mark.parametrize("method", sorted(CASES))
def test_every_method_gives_the_same_bits_for_any_block_size(method):
    whole = _merge(method, block=1 << 22)
    assert whole.size == BASE.size and np.isfinite(whole).all()
    assert _merge(method, block=REDUCE_BLOCK).tobytes() == whole.tobytes()
    assert _merge(method, block=3 * REDUCE_BLOCK).tobytes() == whole.tobytes()


@pytest.mark.parametrize("method", sorted(CASES))
def test_bf16_inputs_merge_to_bf16(method):
    out = _merge(method, block=REDUCE_BLOCK, dtype="BF16")
    assert out.dtype == BFLOAT16
    assert np.isfinite(bf16_to_f32(out)).all()


def test_linear_is_the_normalized_weighted_sum():
    out = _merge("linear", block=REDUCE_BLOCK).reshape(SHAPE)
    expect = (MODELS[0] * 1 + MODELS[1] * 2 + MODELS[2] * 3) / np.float32(6)
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)


def test_slerp_keeps_the_norm_on_the_great_circle():
    e1 = np.zeros(5, np.float32)
    e1[0] = 1
    e2 = np.zeros(5, np.float32)
    e2[1] = 1
    mid = merge_models("slerp", [{"x": e1}], base={"x": e2}, t=0.5)["x"]
    np.testing.assert_allclose(mid[:2], [math.sqrt(0.5)] * 2, rtol=1e-6)
    out = _merge("slerp", block=REDUCE_BLOCK, extra={"t": 0.0})
    assert out.tobytes() == BASE.tobytes()  # t = 0 is the base exactly


def test_ties_keeps_the_top_entries_elects_signs_and_averages_agreement():
    base = np.zeros(6, np.float32)
    m1 = np.array([3.0, -1.0, 0.1, 2.0, 0.0, 1.0], np.float32)
    m2 = np.array([1.0, 2.0, -0.2, -3.0, 0.0, -1.0], np.float32)
    out = merge_models("ties", [{"x": m1}, {"x": m2}], base={"x": base})["x"]
    # entry 5: the signed sum is exactly zero, so no sign is elected and the base stays
    np.testing.assert_allclose(out, [2.0, 2.0, -0.2, -3.0, 0.0, 0.0])
    ties = np.array([1.0, 1.0, 1.0, 0.5], np.float32)  # three entries tie for the top 2
    kept = merge_models("ties", [{"x": ties}], base={"x": np.zeros(4, np.float32)}, density=0.5)["x"]
    assert kept.tolist() == [1.0, 1.0, 1.0, 0.0]  # every tie is kept: no sort order decides


def test_breadcrumbs_drops_the_outliers_and_the_small_entries():
    d = np.arange(1, 101, dtype=np.float32)  # magnitudes 1..100
    out = merge_models("breadcrumbs", [{"x": d}], base={"x": np.zeros(100, np.float32)},
                       density=0.5, gamma=0.1)["x"]
    kept = np.flatnonzero(out) + 1
    assert kept.tolist() == list(range(41, 91))  # the top 10 and the bottom 40 are dropped


def test_dare_keeps_about_density_and_rescales_by_its_inverse():
    out = _merge("dare_linear", block=REDUCE_BLOCK, extra={"density": 0.25}).reshape(SHAPE)
    tau = sum(m - BASE for m in MODELS)
    assert abs(np.mean(out != BASE) - (1 - 0.75**3)) < 0.01
    assert abs(float(np.mean(out - BASE)) - float(np.mean(tau))) < 0.01  # unbiased
    other_seed = _merge("dare_linear", block=REDUCE_BLOCK, extra={"density": 0.25, "seed": 6})
    assert other_seed.tobytes() != out.tobytes()


def test_della_keeps_larger_magnitudes_more_often():
    base = np.zeros((400, 100), np.float32)
    row = np.tile(np.arange(1, 101, dtype=np.float32), (400, 1))
    out = merge_models("della", [{"x": row}], base={"x": base}, density=0.5, epsilon=0.4, rescale=False)["x"]
    kept = (out != 0).mean(axis=0)
    assert kept[:10].mean() < 0.2 and kept[-10:].mean() > 0.8  # p runs from 0.1 to 0.9 along the rank


def test_model_stock_interpolates_towards_the_average_by_the_angle():
    base = np.zeros(4, np.float32)
    a, b = np.array([1, 0, 0, 0], np.float32), np.array([0, 1, 0, 0], np.float32)
    out = merge_models("model_stock", [{"x": a}, {"x": b}], base={"x": base})["x"]
    np.testing.assert_allclose(out, [0, 0, 0, 0], atol=1e-7)  # orthogonal: t = 0, stay at the base
    same = merge_models("model_stock", [{"x": a}, {"x": a}], base={"x": base})["x"]
    np.testing.assert_allclose(same, a)  # cos 1: t = 1, the average


def test_nuslerp_weights_choose_t_and_it_is_slerp_of_task_vectors():
    a, b = np.array([1, 0], np.float32), np.array([0, 1], np.float32)
    out = merge_models("nuslerp", [{"x": a}, {"x": b}], weights=[1, 1])["x"]
    np.testing.assert_allclose(out, [math.sqrt(0.5)] * 2, rtol=1e-6)
    base = np.array([5, 5], np.float32)
    shifted = merge_models("nuslerp", [{"x": a + base}, {"x": b + base}], base={"x": base}, weights=[3, 1])["x"]
    np.testing.assert_allclose(shifted - base, [math.cos(math.pi / 8), math.sin(math.pi / 8)], rtol=1e-6)
    rows = merge_models("nuslerp", [{"x": np.stack([a, a])}, {"x": np.stack([b, 2 * b])}],
                        nuslerp_flatten=False)["x"]
    np.testing.assert_allclose(rows[0], [math.sqrt(0.5)] * 2, rtol=1e-6)


@pytest.mark.parametrize("bad,match", [
    ({"x": np.zeros(3, np.float32)}, "shape"),
    ({"x": np.zeros(4, np.float64)}, "dtype"),
    ({"x": np.array([0, np.nan, 0, 0], np.float32)}, "non-finite"),
    ({"y": np.zeros(4, np.float32)}, "missing"),
])
def test_a_failing_input_names_the_tensor(bad, match):
    good = {"x": np.zeros(4, np.float32)}
    with pytest.raises(MergeInputError, match=match) as e:
        merge_models("task_arithmetic", [good, bad], base=good)
    assert e.value.tensor in ("x", "y")


def test_integer_tensors_are_copied_when_equal_and_refused_when_not():
    ids = {"ids": np.arange(4), "w": np.ones(4, np.float32)}
    out = merge_models("linear", [ids, ids])
    assert out["ids"].tolist() == [0, 1, 2, 3]
    with pytest.raises(MergeInputError, match="'ids'"):
        merge_models("linear", [ids, {**ids, "ids": np.arange(4) + 1}])


def test_overflowing_results_are_refused_by_name():
    big = {"w": np.full(2, 60000, np.float16)}
    with pytest.raises(MergeInputError, match=r"'w'.*overflow"):
        merge_models("task_arithmetic", [big, big], base={"w": np.zeros(2, np.float16)})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("density", [0.01, 0.37, 0.9])
def test_magnitude_selection_equals_a_sort_when_magnitudes_are_distinct(dtype, density):
    rng = np.random.default_rng(int(density * 100))
    n = 3 * REDUCE_BLOCK + 123
    tau = rng.standard_normal(n).astype(dtype)
    base = np.zeros(n, dtype)
    out = merge_models("ties", [{"x": tau}], base={"x": base}, density=density)["x"]
    k = max(1, int(density * n))
    expect = np.zeros(n, dtype)
    top = np.argsort(-np.abs(tau), kind="stable")[:k]
    expect[top] = tau[top]
    assert out.tobytes() == expect.tobytes()
    crumbs = merge_models("breadcrumbs", [{"x": tau}], base={"x": base}, density=density * 0.9, gamma=0.05)["x"]
    order = np.argsort(np.abs(tau), kind="stable")
    target, drop_top = int(density * 0.9 * n), int(0.05 * n)
    bottom = max(0, n - target - drop_top)
    expect = np.zeros(n, dtype)
    keep = order[bottom:bottom + target]
    expect[keep] = tau[keep]
    assert crumbs.tobytes() == expect.tobytes()
