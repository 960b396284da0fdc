"""NAT testbed tests: skipped (with the reason) unless root with `ip netns` and iptables."""

import pytest

from lattice.testing import natlab

UNAVAILABLE = natlab.unavailable_reason()


def pytest_collection_modifyitems(config, items):
    if UNAVAILABLE is None:
        return
    skip = pytest.mark.skip(reason=f"NAT testbed unavailable: {UNAVAILABLE}")
    for item in items:
        if item.get_closest_marker("nat") is not None:
            item.add_marker(skip)
