"""Received tensors are rejected with stable reasons before they touch a model."""

import numpy as np
import pytest

from lattice.learn.validate import REASONS, InvalidTensor, NormBound, tensor_norm, validate_tensor

OURS = np.full(100, 0.5, np.float32)  # norm 5


def test_a_good_tensor_is_returned_as_is():
    good = OURS * 3
    assert validate_tensor(good, OURS) is good


@pytest.mark.parametrize(
    "received,reason",
    [
        ([0.5] * 100, "type"),
        (OURS.astype(np.float64), "dtype"),
        (OURS.astype(np.float16), "dtype"),
        (OURS[:99], "shape"),
        (OURS.reshape(10, 10), "shape"),
        (np.where(np.arange(100) == 7, np.nan, OURS).astype(np.float32), "non_finite"),
        (np.where(np.arange(100) == 7, np.inf, OURS).astype(np.float32), "non_finite"),
        (np.where(np.arange(100) == 7, -np.inf, OURS).astype(np.float32), "non_finite"),
        (OURS * 11, "norm"),  # above 10x our norm
        (np.full(100, 3e38, np.float32), "norm"),  # finite, but its float32 norm would overflow
    ],
)
def test_rejections_carry_stable_reasons(received, reason):
    with pytest.raises(InvalidTensor) as err:
        validate_tensor(received, OURS)
    assert err.value.reason == reason and reason in REASONS
    assert str(err.value).startswith(reason)


def test_norm_bound_is_configurable_and_has_a_floor():
    with pytest.raises(InvalidTensor):
        validate_tensor(OURS * 3, OURS, NormBound(factor=2))
    validate_tensor(OURS * 100, OURS, None)  # disabled
    zeros = np.zeros(100, np.float32)
    validate_tensor(np.full(100, 0.09, np.float32), zeros)  # norm 0.9 <= 10 * floor 1.0
    with pytest.raises(InvalidTensor, match="norm"):
        validate_tensor(np.full(100, 1.1, np.float32), zeros)


def test_norm_is_accurate_for_large_vectors():
    v = np.full(3_000_000, 1e20, np.float32)
    assert tensor_norm(v) == pytest.approx(1e20 * np.sqrt(3_000_000), rel=1e-6)


def test_unknown_reason_is_our_bug():
    with pytest.raises(AssertionError):
        InvalidTensor("weird")
