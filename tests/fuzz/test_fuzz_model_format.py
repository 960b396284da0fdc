"""Coverage of the model readers by hypothesis: whatever the bytes, a safetensors file
or a v2 manifest either parses or raises ModelFormatError (issue 11, item 4). Bounded
time: a fixed number of examples, no deadline surprises on a loaded machine."""

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattice.learn.modelfile import (
    MANIFEST_MAGIC,
    ModelFormatError,
    loads_manifest,
    loads_safetensors,
)

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30,
)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "I8", "BOOL", "X"]) | json_values,
    "shape": st.lists(st.integers(-2, 2**41), max_size=5) | json_values,
    "data_offsets": st.lists(st.integers(-2, 2**65), min_size=0, max_size=3) | json_values,
})
headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=4)


def _parse_or_format_error(parse, data):
    try:
        parse(data)
    except ModelFormatError:
        pass


@FAST
@given(st.binary(max_size=256))
def test_arbitrary_bytes(data):
    _parse_or_format_error(loads_safetensors, data)
    _parse_or_format_error(loads_manifest, MANIFEST_MAGIC + data)


@FAST
@given(headers, st.binary(max_size=64), st.integers(0, 3))
def test_structured_headers(header, body, nest):
    text = json.dumps(header).encode()
    text = b"[" * (nest * 4000) + text + b"]" * (nest * 4000)
    _parse_or_format_error(loads_safetensors, struct.pack("<Q", len(text)) + text + body)


@FAST
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5))
def test_structured_manifests(doc):
    _parse_or_format_error(loads_manifest, MANIFEST_MAGIC + json.dumps(doc).encode())
