"""proto/bulk.md stays in step with the code: its limits table, config defaults and
golden vector."""

import re
from pathlib import Path

from lattice.core import bulk_frames as bf

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
    assert table_row("default max array, bytes") == str(bf.BulkLimits().max_bytes)
    assert table_row("default max dims") == str(bf.BulkLimits().max_ndim)
    dtypes = table_row("allowed dtypes").strip("`").replace("\\|", "|").split()
    assert set(dtypes) == bf.DEFAULT_DTYPES


def test_golden_vector_in_the_spec_is_the_one_the_code_produces():
    # the values themselves are asserted against the code in test_bulk_frames.py
    for value in ("8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f",
                  "f34acd2b771b0d181fe7a3180b7e01b37c412fdf325def3ee45e57cc9de813ab",
                  "21da4382de7c230105238982c2786e1c9f4467c7d670d19445d6728cb102dca7",
                  "454b9cf462ca71c15c9f3ae05808539fd4c3f4cac4d0b8b70083710bc737b847",
                  "8e9eb8b0c611b6f8436d7c48c6c3d343504cc3bbfaedf7bc1095412608defa6f",
                  "efdb3e0719e7377c8adf2f32a9bb033c9412faba0631df2769c7a3178597cfa01e61447228f2a49e"):
        assert value in SPEC
