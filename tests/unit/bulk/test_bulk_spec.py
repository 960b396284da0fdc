"""proto/bulk.md stays in step with the code: its limits table, config defaults and
golden vector."""

import re
from pathlib import Path

from lattice.core import bulk_frames as bf
from lattice.core.arrays import WIRE_DTYPES, ArrayLimits

SPEC = (Path(__file__).resolve().parents[3] / "proto" / "bulk.md").read_text()


def table_row(name: str) -> str:
    match = re.search(rf"^\| {re.escape(name)} \| (.+?) \|$", SPEC, re.MULTILINE)
    assert match, f"no row {name!r} in proto/bulk.md"
    return match.group(1)


def test_limits_table_matches_the_code():
    assert table_row("control frame, bytes") == str(bf.CONTROL_MAX_BYTES)
    assert table_row("data frame overhead, bytes") == str(bf.FRAME_OVERHEAD)
    assert table_row("direct chunk, bytes") == f"{bf.DIRECT_CHUNK_MIN} .. {bf.DIRECT_CHUNK_MAX}"
    assert table_row("stream chunk, bytes") == f"{bf.STREAM_CHUNK_MIN} .. {bf.STREAM_CHUNK_MAX}"
    assert table_row("side-channel addresses") == str(bf.MAX_ADDRS)
    assert table_row("reason, chars") == str(bf.MAX_REASON_CHARS)
    assert table_row("channel hello, bytes") == str(bf.CHANNEL_HELLO_BYTES)
    assert table_row("arrays per session, each way") == str(bf.MAX_ARRAYS)
    assert table_row("default max arrays, bytes") == str(ArrayLimits().max_bytes)
    assert table_row("default max dims") == str(ArrayLimits().max_ndim)
    dtypes = table_row("allowed dtypes").strip("`").replace("\\|", "|").split()
    assert set(dtypes) == WIRE_DTYPES


def test_golden_vector_in_the_spec_is_the_one_the_code_produces():
    # the values themselves are asserted against the code in test_bulk_frames.py
    for value in ("8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f",
                  "31abbf533b871cd6fe04a30b8c036a40abf2e4e0cc10f221a28663c9b0ed8d13",
                  "f847793ebd830c8248a9e046f031a4bc172638d6f88506a5fd6cda620b7dc876",
                  "c74b1cb7e633bacf2fa69332c7a806da840e6f783e6ffe6a21d2284f73bdef6f",
                  "5edc044d8b143757ee96a0f57ccac3f1e1cf2c673cc779f395d4e6e99f63e58a",
                  "f1bdf93d47de257dd534708c16aa70cc302caa38957cf3d6d5653ebf78acf999b0eb9780245bf430",
                  "1a8b272c79948e892ad58d163fdc113b5462b69bf54e31fd"):
        assert value in SPEC
