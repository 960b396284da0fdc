from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Suites that need what a machine may lack (root and network namespaces, a Docker
    engine) skip with the reason where it is missing; the check runs only when such a
    suite was collected."""
    from lattice.testing import natlab, testnet

    needs = {"nat": ("NAT testbed", natlab.unavailable_reason),
             "testnet": ("compose testnet", testnet.unavailable_reason)}
    for marker, (what, why_not) in needs.items():
        marked = [item for item in items if item.get_closest_marker(marker) is not None]
        reason = why_not() if marked else None
        if reason:
            skip = pytest.mark.skip(reason=f"{what} unavailable: {reason}")
            for item in marked:
                item.add_marker(skip)
