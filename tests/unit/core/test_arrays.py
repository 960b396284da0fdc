"""One array spec for every protocol that carries tensors: what a receiver accepts
before allocating, and how we put our own arrays on the wire."""

import numpy as np
import pytest

from lattice.core.arrays import (
    WIRE_DTYPES,
    ArrayFormatError,
    ArrayLimits,
    ArraySpec,
    empty_like_spec,
    parse_array_spec,
    prepare_array,
)

LIMITS = ArrayLimits(max_bytes=1 << 20)


def wire(dtype="<f4", shape=(2, 3), nbytes=24):
    return {"dtype": dtype, "shape": list(shape), "nbytes": nbytes}


def test_a_consistent_spec_is_accepted():
    assert parse_array_spec(wire(), LIMITS) == ArraySpec("<f4", (2, 3), 24)
    assert parse_array_spec(wire("|u1", (), 1), LIMITS).shape == ()
    assert parse_array_spec(wire("<f8", (0, 7), 0), LIMITS).nbytes == 0


@pytest.mark.parametrize("bad, why", [
    (wire(dtype="|O8"), "not allowed"),
    (wire(dtype=">f4"), "not allowed"),
    (wire(dtype="float32"), "not allowed"),
    (wire(dtype="|b1", shape=(24,)), "not allowed"),
    (wire(dtype=["<f4"]), "not allowed"),
    (wire(shape=(2, 3), nbytes=25), "does not match"),
    (wire(shape=(-2, -3)), "non-negative"),
    (wire(shape=(True, 24)), "non-negative"),
    (wire(shape=(1,) * 9, nbytes=4), "at most 8"),
    (wire(shape=(1 << 20,), nbytes=4 << 20), "exceeds limit"),
    (wire(shape=(1 << 40, 1 << 40, 0), nbytes=0), "exceeds limit"),  # no overflow games
    (wire(shape=(0, 1 << 19, 1 << 19), nbytes=0), "exceeds limit"),  # zeros count as 1
    ({**wire(), "extra": 1}, "exactly"),
    ([1, 2, 3], "exactly"),
])
def test_specs_outside_the_limits_are_refused(bad, why):
    with pytest.raises(ArrayFormatError, match=why):
        parse_array_spec(bad, LIMITS)


@pytest.mark.parametrize("shape", [(0,), (0, 1 << 18), (1 << 18, 0), (1,) * 8, (512, 512)])
def test_every_accepted_spec_allocates(shape):
    spec = parse_array_spec(wire("<f4", shape, 4 * int(np.prod(shape))), LIMITS)
    assert empty_like_spec(spec).nbytes == spec.nbytes


@pytest.mark.parametrize("array", [np.arange(6, dtype=">f4").reshape(2, 3),
                                   np.arange(12, dtype=np.int64)[::2],
                                   np.float16(3.5) * np.ones(())])
def test_our_arrays_go_out_little_endian_and_contiguous(array):
    spec, view = prepare_array(array)
    assert spec.dtype in WIRE_DTYPES and spec.shape == array.shape
    assert np.array_equal(np.frombuffer(view, dtype=spec.dtype).reshape(spec.shape), array)


@pytest.mark.parametrize("array", [np.array([1 + 2j]), np.array([True]), np.array(["x"])])
def test_dtypes_peers_refuse_are_our_error(array):
    with pytest.raises(ValueError, match="cannot send"):
        prepare_array(array)
