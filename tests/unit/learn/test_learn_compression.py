"""Codecs round-trip within their error bounds, reject malformed payloads, and error
feedback loses nothing: sum(sent) + residual == sum(inputs)."""

import numpy as np
import pytest

from lattice.learn.compression import (
    CompressionSpecError,
    ErrorFeedback,
    Fp16,
    Int8,
    NoCompression,
    TopK,
    get_codec,
)
from lattice.learn.validate import InvalidTensor


@pytest.fixture
def x():
    rng = np.random.default_rng(0)
    return (rng.normal(0, 1, 5000) * rng.exponential(1, 5000)).astype(np.float32)


def test_none_is_exact_and_counts_four_bytes_per_value(x):
    payload, nbytes = NoCompression().encode(x)
    np.testing.assert_array_equal(NoCompression().decode(payload, x.shape), x)
    assert nbytes == 4 * x.size + 8  # + the shape field


def test_fp16_relative_error_and_clipping(x):
    codec = Fp16()
    payload, nbytes = codec.encode(x)
    y = codec.decode(payload, x.shape)
    assert y.dtype == np.float32 and nbytes == 2 * x.size + 8
    assert np.all(np.abs(y - x) <= np.abs(x) * 2**-11 + 2**-24)
    big = np.array([1e6, -1e6, 3.0], np.float32)
    out = codec.decode(codec.encode(big)[0])
    assert np.isfinite(out).all() and out[0] == 65504 and out[1] == -65504


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_int8_error_is_at_most_half_a_step_per_chunk(x, chunk):
    codec = Int8(chunk)
    payload, nbytes = codec.encode(x)
    y = codec.decode(payload, x.shape)
    n_chunks = -(-x.size // chunk)
    assert nbytes == x.size + 4 * n_chunks + 8
    pad = np.zeros(n_chunks * chunk, np.float32)
    pad[: x.size] = x
    step = np.abs(pad.reshape(n_chunks, chunk)).max(axis=1) / 127
    bound = np.repeat(step / 2, chunk)[: x.size]
    assert np.all(np.abs(y - x) <= bound * (1 + 1e-6) + 1e-12)


def test_int8_handles_all_zero_chunks_and_odd_shapes():
    codec = get_codec("int8:4")
    z = np.zeros((3, 5), np.float32)
    z[2, 4] = -2.5
    out = codec.decode(codec.encode(z)[0], (3, 5))
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out, z, atol=2.5 / 254)


def test_topk_keeps_exactly_the_largest_magnitudes(x):
    codec = TopK(0.1)
    payload, nbytes = codec.encode(x)
    y = codec.decode(payload, x.shape)
    k = 500
    assert nbytes == 8 * k + 8 and np.count_nonzero(y) == k
    kept = np.flatnonzero(y)
    np.testing.assert_array_equal(y[kept], x[kept])  # values sent exactly
    assert np.abs(x[kept]).min() >= np.abs(np.delete(x, kept)).max()
    # error is the dropped mass
    assert np.linalg.norm(y - x) <= np.linalg.norm(x)


def test_topk_small_and_full_ratios():
    assert get_codec("topk:0.0001").k_for(10) == 1
    v = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(get_codec("topk:1").decode(get_codec("topk:1").encode(v)[0]), v)
    empty = np.zeros(0, np.float32)
    assert get_codec("topk:0.5").decode(get_codec("topk:0.5").encode(empty)[0]).size == 0


@pytest.mark.parametrize("spec,cls", [("none", NoCompression), ("fp16", Fp16), ("int8", Int8), ("int8:64", Int8),
                                      ("topk:0.1", TopK), (" topk:0.25 ", TopK)])
def test_specs_parse_and_round_trip(spec, cls):
    codec = get_codec(spec)
    assert isinstance(codec, cls)
    assert get_codec(codec.spec) == codec


@pytest.mark.parametrize("spec", ["", "gzip", "none:1", "fp16:2", "int8:x", "int8:0", "topk", "topk:",
                                  "topk:0", "topk:1.5", "topk:nan", "topk:abc", None])
def test_bad_specs_are_typed_errors(spec):
    with pytest.raises(CompressionSpecError):
        get_codec(spec)


def _tampered(payload, **changes):
    p = dict(payload)
    p.update(changes)
    return {k: v for k, v in p.items() if v is not None}


@pytest.mark.parametrize(
    "spec,tamper",
    [
        ("none", dict(data=np.zeros(3, np.float32))),  # wrong length
        ("none", dict(data=np.zeros(10, np.float64))),  # wrong dtype
        ("none", dict(data=[0.0] * 10)),  # not an array
        ("none", dict(extra=np.zeros(1, np.float32))),  # unknown key
        ("none", dict(shape=None)),  # missing key
        ("none", dict(shape=np.array([5, 2], np.int64))),  # shape we did not expect
        ("none", dict(shape=np.array([-10], np.int64))),
        ("fp16", dict(data=np.zeros(10, np.float32))),
        ("int8", dict(scale=np.zeros(2, np.float32))),
        ("int8", dict(scale=np.array([np.nan], np.float32))),
        ("int8", dict(scale=np.array([-1.0], np.float32))),
        ("int8", dict(q=np.zeros(9, np.int8))),
        ("topk:0.2", dict(idx=np.array([0, 10], np.uint32))),  # out of range
        ("topk:0.2", dict(idx=np.array([3, 3], np.uint32))),  # duplicate
        ("topk:0.2", dict(idx=np.array([4, 3], np.uint32))),  # unsorted
        ("topk:0.2", dict(idx=np.array([1, 2, 3], np.uint32), val=np.zeros(3, np.float32))),  # wrong k
    ],
)
def test_malformed_payloads_are_rejected(spec, tamper):
    codec = get_codec(spec)
    payload, _ = codec.encode(np.arange(10, dtype=np.float32))
    with pytest.raises(InvalidTensor) as err:
        codec.decode(_tampered(payload, **tamper), (10,))
    assert err.value.reason == "payload"


def test_decode_rejects_a_non_mapping():
    with pytest.raises(InvalidTensor):
        NoCompression().decode([1, 2, 3])


@pytest.mark.parametrize("spec", ["none", "fp16", "int8:16", "topk:0.05"])
def test_error_feedback_conserves_the_sum_of_inputs(spec):
    rng = np.random.default_rng(1)
    ef = ErrorFeedback(spec, 400)
    total_in = np.zeros(400, np.float64)
    total_sent = np.zeros(400, np.float64)
    for _ in range(50):
        g = rng.normal(0, 1, 400).astype(np.float32)
        total_in += g
        total_sent += ef.compress(g).sent
    np.testing.assert_allclose(total_sent + ef.residual, total_in, atol=1e-3)
    if spec.startswith("topk"):
        # the residual stays bounded: everything dropped is eventually sent
        assert np.abs(ef.residual).max() < np.abs(total_in).max()


def test_error_feedback_prepare_does_not_touch_memory_until_commit():
    ef = ErrorFeedback("topk:0.1", 100)
    v = np.arange(100, dtype=np.float32)
    first = ef.prepare(v)
    assert not ef.residual.any()
    ef.commit(first)
    assert ef.residual.any()
    with pytest.raises(RuntimeError, match="stale"):
        ef.commit(first)  # an old send committed twice would double-count
    abandoned = ef.prepare(v)
    before = ef.residual.copy()
    del abandoned  # an aborted exchange: never committed
    np.testing.assert_array_equal(ef.residual, before)
