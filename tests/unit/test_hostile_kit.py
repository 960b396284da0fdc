"""The hostile-peer kit's public face: what `lattice.testing.hostile` exports is what
its modules declare, each documented; and its builders make what they say."""

import inspect

import pytest

import lattice.testing.hostile as hostile
from lattice.core import codec
from lattice.core.records import validate_record
from lattice.testing.hostile import net


def test_the_package_exports_what_its_modules_declare_and_each_is_documented():
    for name in net.__all__:
        assert getattr(hostile, name) is getattr(net, name), name
        assert inspect.getdoc(getattr(hostile, name)), f"{name} has no docstring"
    public = {n for n in dir(hostile) if not n.startswith("_")} - {"net", "state", "nat"}
    assert public >= set(net.__all__)


def test_nested_msgpack_is_as_deep_as_asked_and_our_decoder_refuses_it():
    assert codec.unpack(hostile.nested_msgpack(3)) == [[[None]]]
    with pytest.raises(codec.DecodeError):
        codec.unpack(hostile.nested_msgpack(1000))


def test_frames_can_lie_about_their_length():
    assert hostile.frame_bytes(b"abc") == b"\x00\x00\x00\x03abc"
    assert hostile.frame_bytes(b"abc", declared=9) == b"\x00\x00\x00\x09abc"


def test_sybil_records_are_valid_and_each_from_another_publisher():
    records = list(hostile.sybil_records(5, now=1000.0))
    assert len({r.publisher for r in records}) == 5
    for r in records:
        assert validate_record(r, 1000.0) == r


def test_local_socket_garbage_is_all_bytes():
    cases = list(hostile.local_socket_garbage())
    assert len(cases) >= 8 and all(isinstance(b, bytes) and b for _, b in cases)
