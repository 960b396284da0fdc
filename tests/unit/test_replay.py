"""A failing test says its seed, and the same seed replays the same network: the
identities an in-memory network derives, and what the test's rng draws."""

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAILING = '''
from lattice.testing.memnet import MemoryNetwork

def test_fails(lattice_seed):
    net = MemoryNetwork(seed=lattice_seed)
    print("PEER", net.add_peer().peer_id, net.rng.random())
    assert False
'''


def run(pytester, *args):
    shutil.copy(ROOT / "tests" / "conftest.py", pytester.path / "conftest.py")
    pytester.makepyfile(test_x=FAILING)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args)
    peer = [line for line in result.outlines if line.startswith("PEER")]
    return result, peer


def test_a_failing_test_prints_its_seed_and_the_seed_replays_it(pytester):
    result, first = run(pytester, "--lattice-seed", "random")
    seed_lines = [line for line in result.outlines if "replay with --lattice-seed" in line]
    assert result.ret == 1 and seed_lines and first
    seed = seed_lines[0].split("--lattice-seed ")[1].split()[0]
    again, replayed = run(pytester, "--lattice-seed", seed)
    assert replayed == first
    _, other = run(pytester, "--lattice-seed", str(int(seed) + 1))
    assert other != first
