"""Partitions are disjoint, complete, non-empty, deterministic; Dirichlet skews labels."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattice.learn.partition import PartitionScheme, PartitionSchemeError, parse_scheme, partition


def _check_exact_cover(parts, n, n_parts):
    assert len(parts) == n_parts
    assert all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    everything = np.concatenate(parts)
    assert len(everything) == n  # disjoint (no index twice) ...
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))  # ... and complete


@settings(max_examples=60, deadline=None)
@given(
    n_classes=st.integers(1, 6),
    n=st.integers(1, 300),
    n_parts=st.integers(1, 12),
    alpha=st.sampled_from([0.01, 0.1, 1.0, 100.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_scheme_covers_exactly_with_non_empty_parts(n_classes, n, n_parts, alpha, seed):
    if n < n_parts:
        with pytest.raises(ValueError):
            partition(n, n_parts, "iid", seed)
        return
    labels = np.random.default_rng(seed).integers(0, n_classes, n)
    for scheme in ("iid", f"dirichlet:{alpha}"):
        parts = partition(labels, n_parts, scheme, seed)
        _check_exact_cover(parts, n, n_parts)
        again = partition(labels, n_parts, scheme, seed)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_iid_accepts_a_count_and_balances_sizes():
    parts = partition(1347, 8, "iid", 0)
    _check_exact_cover(parts, 1347, 8)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition(1347, 8, "iid", 1)))


def _mean_label_skew(labels, parts):
    """Mean total-variation distance between a part's label histogram and the global one."""
    k = labels.max() + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - overall).sum() for p in parts])


def test_dirichlet_small_alpha_skews_labels_and_large_alpha_does_not():
    labels = np.repeat(np.arange(10), 130)
    skewed = partition(labels, 8, "dirichlet:0.1", 0)
    near_iid = partition(labels, 8, "dirichlet:1000", 0)
    iid = partition(labels, 8, "iid", 0)
    assert _mean_label_skew(labels, skewed) > 0.5
    assert _mean_label_skew(labels, near_iid) < 0.15
    assert _mean_label_skew(labels, iid) < 0.15
    # skewed parts also differ in size
    assert max(map(len, skewed)) > 2 * min(map(len, skewed))


def test_dirichlet_needs_labels():
    with pytest.raises(PartitionSchemeError, match="labels"):
        partition(100, 4, "dirichlet:0.5", 0)


@pytest.mark.parametrize("spec", ["", "iid:3", "dirichlet", "dirichlet:", "dirichlet:abc", "dirichlet:0",
                                  "dirichlet:-1", "dirichlet:nan", "dirichlet:inf", "shards:2", 3])
def test_bad_scheme_strings_are_typed_errors(spec):
    with pytest.raises(PartitionSchemeError):
        parse_scheme(spec)


def test_scheme_parses_and_prints_back():
    assert parse_scheme("iid") == PartitionScheme("iid")
    s = parse_scheme(" dirichlet:0.1 ")
    assert s == PartitionScheme("dirichlet", 0.1) and str(s) == "dirichlet:0.1"
    assert parse_scheme(str(s)) == s
