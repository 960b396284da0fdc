"""The compose testnet (docker/compose.yaml) brought up for real: Lattice containers on a
public segment and behind cone and symmetric NAT routers. Skipped, with the reason,
where there is no Docker engine or no compose (tests/conftest.py); CI installs and
starts both.

`testnet` builds the images (docker/build-images: the base image by debootstrap, no
registry needed), brings the network up under a project name of its own and waits until
it has formed (every daemon running and seeing every other alive), and takes it down
with its volumes whatever the tests did; when a test failed, every container's log is
printed first.
"""

from __future__ import annotations

import os

import pytest

from lattice.testing.testnet import LONE_COMPOSE_FILE, LONE_DAEMONS, Testnet, build_images


@pytest.fixture(scope="module")
def testnet(request):
    yield from _testnet(request, Testnet(f"latticetest{os.getpid()}"))


@pytest.fixture(scope="module")
def lone_testnet(request):
    """docker/compose.lone.yaml: the bootstrap is the only public daemon."""
    yield from _testnet(request, Testnet(f"latticelone{os.getpid()}", LONE_COMPOSE_FILE,
                                         LONE_DAEMONS))


def _testnet(request, net: Testnet):
    build_images()
    try:
        net.up()
        net.wait_formed()
        yield net
    finally:
        if request.session.testsfailed:
            print(f"\n--- compose testnet logs ({net.project}) ---\n{net.logs()}")
        net.down()
