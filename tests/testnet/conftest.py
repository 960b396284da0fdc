"""The compose testnet (docker/compose.yaml) brought up for real: Lattice containers on a
public segment and behind cone and symmetric NAT routers. Skipped, with the reason,
where there is no Docker engine or no compose; CI installs and starts both.

`testnet` builds the images (docker/build-images: the base image by debootstrap, no
registry needed), brings the network up under a project name of its own, and takes it
down with its volumes whatever the tests did; when a test failed, every container's log
is printed first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def unavailable_reason() -> str | None:
    if shutil.which("docker") is None:
        return "needs the docker CLI (apt-get install docker.io)"
    if compose_command() is None:
        return "needs docker-compose or the docker compose plugin"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine answers (start dockerd; see README: Compose testnet)"
    return None


UNAVAILABLE = unavailable_reason()


def pytest_collection_modifyitems(config, items):
    if UNAVAILABLE is None:
        return
    skip = pytest.mark.skip(reason=f"compose testnet unavailable: {UNAVAILABLE}")
    for item in items:
        if item.get_closest_marker("testnet") is not None:
            item.add_marker(skip)


class Testnet:
    def __init__(self, project: str) -> None:
        self.project = project
        self.base = [*compose_command(), "-p", project, "-f", str(COMPOSE_FILE)]

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*self.base, *args], capture_output=True, text=True,
                              timeout=timeout)

    def run(self, service: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A command inside a running service's container."""
        return self.compose("exec", "-T", service, *args, timeout=timeout)

    def lattice(self, service: str, *args: str, timeout: float = 120) -> Any:
        """`lattice ARGS --json` inside ``service``, parsed."""
        out = self.run(service, "lattice", *args, "--json", timeout=timeout)
        assert out.returncode == 0, f"{service}: lattice {' '.join(args)}: {out.stderr}"
        return json.loads(out.stdout)

    def peer_id(self, service: str) -> str:
        return self.lattice(service, "status")["peer_id"]

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "200").stdout


@pytest.fixture(scope="module")
def testnet(request):
    build = subprocess.run([str(ROOT / "docker" / "build-images")], capture_output=True,
                           text=True, timeout=1200)
    assert build.returncode == 0, f"docker/build-images failed:\n{build.stderr[-4000:]}"
    net = Testnet(f"latticetest{os.getpid()}")
    try:
        up = net.compose("up", "-d")
        assert up.returncode == 0, f"compose up failed:\n{up.stderr[-4000:]}"
        yield net
    finally:
        if request.session.testsfailed:
            print(f"\n--- compose testnet logs ({net.project}) ---\n{net.logs()}")
        net.compose("down", "-v", "--remove-orphans", "-t", "10")
