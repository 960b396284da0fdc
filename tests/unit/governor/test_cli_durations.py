"""`lattice pause --for`: the durations a volunteer types."""

import argparse

import pytest

from lattice.cli import _duration_arg, build_parser


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400),
                                          ("1h30m", 5400), ("1.5h", 5400), ("2H", 7200)])
def test_durations(text, seconds):
    assert _duration_arg(text) == seconds


@pytest.mark.parametrize("text", ["2", "h", "2x", "0m", "1h 30m", "-1h", ""])
def test_bad_durations(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _duration_arg(text)


def test_pause_parses_for_and_reason():
    args = build_parser().parse_args(["pause", "--for", "2h", "--reason", "exam week"])
    assert (args.for_s, args.reason) == (7200, "exam week")
    args = build_parser().parse_args(["pause"])
    assert (args.for_s, args.reason) == (None, "")
