"""Drive the compose testnet (docker/compose.yaml) from Python: bring it up under a
project name of its own, run `lattice` inside its containers, take it down.

Owns: finding a compose (the docker plugin or docker-compose), saying why the testnet
cannot run here (`unavailable_reason`, for pytest skips), and the `Testnet` handle.
Must not import libp2p or anything from `lattice.net`: it drives containers through
the docker CLI and reads what `lattice … --json` prints inside them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from lattice.testing.daemons import wait_for

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
LONE_COMPOSE_FILE = ROOT / "docker" / "compose.lone.yaml"  # the lone public bootstrap
BUILD_IMAGES = ROOT / "docker" / "build-images"
# the services of compose.yaml that run a daemon (the routers do not)
WORKERS = ("worker-a1", "worker-a2", "worker-b1", "worker-c1")
DAEMONS = ("bootstrap", "relay", *WORKERS)
# and of compose.lone.yaml
LONE_WORKERS = ("worker-x1", "worker-y1")
LONE_DAEMONS = ("bootstrap", *LONE_WORKERS)


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def unavailable_reason() -> str | None:
    """Why the testnet cannot be brought up here, or None if it can."""
    if not COMPOSE_FILE.exists():
        return f"no {COMPOSE_FILE} (the testnet ships with the source tree, not the wheel)"
    if shutil.which("docker") is None:
        return "needs the docker CLI (apt-get install docker.io)"
    if compose_command() is None:
        return "needs docker-compose or the docker compose plugin"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine answers (start dockerd; see README: Compose testnet)"
    return None


def build_images(timeout: float = 1200) -> None:
    """docker/build-images: the base image (once, by debootstrap) and lattice:dev."""
    out = subprocess.run([str(BUILD_IMAGES)], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"docker/build-images failed:\n{out.stderr[-4000:]}")


class Testnet:
    """The testnet as compose project ``project``: `up`, then `run`/`lattice` in its
    services, `logs`, `down` (with its volumes). ``compose_file`` and the services of it
    that run a daemon (``daemons``): compose.yaml by default."""

    def __init__(self, project: str, compose_file: Path = COMPOSE_FILE,
                 daemons: tuple[str, ...] = DAEMONS) -> None:
        compose = compose_command()
        if compose is None:
            raise RuntimeError(unavailable_reason() or "no compose")
        self.project = project
        self.daemons = daemons
        self.base = [*compose, "-p", project, "-f", str(compose_file)]

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*self.base, *args], capture_output=True, text=True,
                              timeout=timeout)

    def up(self) -> None:
        out = self.compose("up", "-d")
        if out.returncode != 0:
            raise RuntimeError(f"compose up failed:\n{out.stderr[-4000:]}")

    def wait_formed(self, timeout: float = 120) -> dict[str, str]:
        """Wait until every daemon runs and lists every other one as a live member (what
        `up` means to someone about to submit a job); returns service -> peer id.
        Polled: no event crosses `docker exec`."""
        try:
            return wait_for(self._formed, timeout, "the testnet to form", interval=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}:\n{self.logs(40)}") from None

    def _formed(self) -> dict[str, str] | None:
        ids = {}
        for service in self.daemons:
            try:
                status = self.lattice(service, "status")
            except (RuntimeError, ValueError):  # not up yet: no socket, no JSON
                return None
            if status["state"] != "running":
                return None
            ids[service] = status["peer_id"]
        for service in self.daemons:
            members = self.lattice(service, "members")
            if {p for p, m in members.items() if m["alive"]} != set(ids.values()):
                return None
        return ids

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "-t", "10")

    def run(self, service: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A command inside a running service's container."""
        return self.compose("exec", "-T", service, *args, timeout=timeout)

    def lattice(self, service: str, *args: str, timeout: float = 120) -> Any:
        """`lattice ARGS --json` inside ``service``, parsed."""
        out = self.run(service, "lattice", *args, "--json", timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{service}: lattice {' '.join(args)}: {out.stderr}")
        return json.loads(out.stdout)

    def peer_id(self, service: str) -> str:
        return self.lattice(service, "status")["peer_id"]

    def logs(self, tail: int = 200) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail)).stdout
