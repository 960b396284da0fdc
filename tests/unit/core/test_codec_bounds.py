"""`codec.unpack` is the one decoder of peer and client bytes: it bounds size and depth
before any of our code walks a value (repr, ==, canonical and msgpack's packer all
recurse)."""

import pytest

from lattice.core.codec import DEFAULT_MAX_DEPTH, DecodeError, canonical, check_depth, pack, unpack


def nested(depth: int, inner=None):
    value = inner
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def raw_nested_lists(depth: int) -> bytes:
    # what an attacker sends: msgpack itself accepts 1,000+ levels of fixarrays
    return b"\x91" * depth + b"\xc0"


def test_values_up_to_the_depth_bound_round_trip():
    value = nested(DEFAULT_MAX_DEPTH)
    assert unpack(pack(value)) == value
    check_depth(value)


@pytest.mark.parametrize("depth", [DEFAULT_MAX_DEPTH + 1, 1000, 1023])
def test_deeper_values_are_a_decode_error_not_a_recursion_error(depth):
    with pytest.raises(DecodeError, match="nested deeper"):
        unpack(raw_nested_lists(depth))


def test_what_msgpack_itself_refuses_is_a_decode_error_too():
    with pytest.raises(DecodeError):
        unpack(raw_nested_lists(5000))


def test_the_depth_bound_is_per_call():
    assert unpack(raw_nested_lists(3), max_depth=3) == [[[None]]]
    with pytest.raises(DecodeError):
        unpack(raw_nested_lists(4), max_depth=3)


def test_wide_values_are_not_deep():
    value = {"a": [[1, 2]] * 10_000, "b": list(range(100_000))}
    assert unpack(pack(value)) == value


def test_anything_unpack_returns_can_be_walked_by_recursive_code():
    value = unpack(raw_nested_lists(DEFAULT_MAX_DEPTH))
    repr(value), canonical(value), pack(value)  # none of these may raise


@pytest.mark.parametrize("data", [b"\xd4\x01\x00", b"\x81\x01\x02", b"\x91", b"\xc0\xc0"])
def test_ext_types_int_keys_truncation_and_trailing_bytes_are_refused(data):
    with pytest.raises(DecodeError):
        unpack(data)


def test_integers_are_bounded_by_the_format():
    assert unpack(pack(2**64 - 1)) == 2**64 - 1
    with pytest.raises(OverflowError):
        pack(2**64)  # nobody can send us a bigger one
