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

from lattice.testing.testnet import Testnet, build_images


@pytest.fixture(scope="module")
def testnet(request):
    build_images()
    net = Testnet(f"latticetest{os.getpid()}")
    try:
        net.up()
        net.wait_formed()
        yield net
    finally:
        if request.session.testsfailed:
            print(f"\n--- compose testnet logs ({net.project}) ---\n{net.logs()}")
        net.down()
