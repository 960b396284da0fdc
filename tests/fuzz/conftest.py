"""Fuzzing every decoder of peer and client input, with hypothesis, in bounded time.

Profiles (``FUZZ_PROFILE=NAME`` in the environment):
- ``lattice-fuzz`` (what CI runs, applied to the tests here by ``@FUZZ``): derandomized
  (a fixed seed, so a failure reproduces), no example database, no deadline, a few
  hundred examples per decoder - a few seconds each on a loaded 2-core machine;
- ``lattice-fuzz-long``: random seeds and 50x the examples, to run by hand.

Other teams add their decoders here in their own files, decorated with ``FUZZ`` (from
``.conftest``) and using the strategies below.

Each test states the contract of one decoder: for *any* input it returns a value or
raises its own typed error - never anything else, never a crash - and what it accepts
is safe to use (allocatable, walkable, within its limits).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("lattice-fuzz", derandomize=True, max_examples=300, **_COMMON)
settings.register_profile("lattice-fuzz-long", derandomize=False, max_examples=15_000,
                          **_COMMON)
FUZZ = settings.get_profile(os.environ.get("FUZZ_PROFILE", "lattice-fuzz"))
"""Decorate each fuzz test with it (so the profile does not leak into other suites)."""

# -- values a decoded msgpack frame can hold --------------------------------------------

def _values(floats: st.SearchStrategy) -> st.SearchStrategy:
    scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | floats
               | st.text(max_size=40) | st.binary(max_size=40))
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=12) | st.binary(max_size=12), inner, max_size=6),
        max_leaves=16)


msgpack_values = _values(st.floats())
"""Anything a peer's frame can decode to (before any schema), NaN and infinities too."""
comparable_values = _values(st.floats(allow_nan=False))
"""The same without NaN, which equals nothing: for round trips."""


def with_field(base: dict, key: str, value) -> dict:
    """``base`` with one field replaced by ``value`` (or added)."""
    return {**base, key: value}


def mutated(valid: dict, keys) -> st.SearchStrategy:
    """Messages that differ from ``valid`` in one field (replaced by anything, or
    dropped) or by one extra field: near-misses reach deeper into a parser than
    random values do."""
    keys = sorted(keys)
    replace = st.builds(with_field, st.just(valid), st.sampled_from(keys), msgpack_values)
    drop = st.sampled_from(keys).map(lambda k: {x: v for x, v in valid.items() if x != k})
    extra = st.builds(with_field, st.just(valid), st.text(max_size=8), msgpack_values)
    return replace | drop | extra
