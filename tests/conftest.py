from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["pytester"]  # tests/unit/test_replay.py runs pytest on a failing test


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


# -- replayable tests -------------------------------------------------------------------------
# Every test gets a seed (`lattice_seed`): stable per test by default, so CI runs are
# reproducible; `--lattice-seed=random` explores, `--lattice-seed=N` replays. The fixtures
# that build in-memory networks derive identities, rngs and nonces from it, trio's
# scheduler is seeded with it, and a failing test prints it.


def pytest_addoption(parser):
    parser.addoption("--lattice-seed", default=None, metavar="N|random",
                     help="seed of the replayable tests (default: a stable seed per test)")


@pytest.fixture(autouse=True)
def lattice_seed(request) -> int:
    import random
    import zlib

    import trio

    option = request.config.getoption("--lattice-seed")
    if option is None:
        seed = zlib.crc32(request.node.nodeid.encode())
    elif option == "random":
        seed = random.SystemRandom().getrandbits(32)
    else:
        seed = int(option)
    request.node.lattice_seed = seed
    trio._core._run._r.seed(seed)  # the scheduler's tie-breaks (deterministic under pytest-trio)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "lattice_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("lattice seed", f"seed {seed}: replay with "
                                f"--lattice-seed {seed} {item.nodeid}"))
