"""NAT testbed tests: skipped (with the reason, tests/conftest.py) unless root with
`ip netns` and iptables.

`natnet` runs real `latticed` processes inside a testbed's namespaces and talks to them
over their Unix sockets (files: they work across network namespaces). Every process
and namespace goes away at teardown, whatever the test did.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import lattice
from lattice.api.paths import child_env
from lattice.testing import natlab
from lattice.testing.daemons import wait_for

LISTEN_PORT = 4001


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05, detail: Callable[[], Any] | None = None) -> Any:
    """Poll a condition of another process (no event to subscribe to), with a deadline;
    on timeout the error adds what ``detail()`` says."""
    return wait_for(predicate, timeout, what, interval, detail)


class NatDaemon:
    """One `latticed` inside a testbed namespace. mDNS is off unless asked for (the NAT
    cases are about what crosses routers); ``listen`` defaults to the host's address."""

    def __init__(self, node: natlab.Node, state_dir: Path, bootstrap: list[str],
                 extra: tuple[str, ...], *, mdns: bool = False,
                 listen: str | None = None) -> None:
        self.node = node
        self.name = node.name
        self.state_dir = state_dir
        self.socket = state_dir / "latticed.sock"
        self.log = state_dir.parent / f"{node.name}.log"
        args = [sys.executable, "-m", "latticed", "--state-dir", str(state_dir),
                "--listen", listen or f"/ip4/{node.addr}/tcp/{LISTEN_PORT}",
                *(() if mdns else ("--no-mdns",)),
                "--log-level", "info", "--name", node.name, *extra]
        for b in bootstrap:
            args += ["--bootstrap", b]
        env = child_env()
        with open(self.log, "ab") as log:
            self.proc = node.popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL)
        self._peer_id: str | None = None

    def client(self) -> lattice.Client:
        return lattice.connect(self.socket, timeout=30)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def reach(self) -> dict[str, Any]:
        return self.status().get("reachability") or {}

    def peers(self) -> list[dict[str, Any]]:
        with self.client() as c:
            return c.peers()

    def peer_row(self, peer_id: str) -> dict[str, Any] | None:
        return next((p for p in self.peers() if p["peer_id"] == peer_id), None)

    def wait_running(self, timeout: float = 30.0) -> None:
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, timeout,
                   f"{self.name}'s socket")
        assert self.proc.poll() is None, f"{self.name} exited:\n{self.log_text()}"
        wait_until(lambda: self.status()["state"] == "running", timeout, f"{self.name} running")

    @property
    def peer_id(self) -> str:
        if self._peer_id is None:
            self._peer_id = self.status()["peer_id"]
        return self._peer_id

    @property
    def addr(self) -> str:
        return f"/ip4/{self.node.addr}/tcp/{LISTEN_PORT}/p2p/{self.peer_id}"

    def log_text(self, tail: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


class NatNet:
    """A testbed plus the daemons started in it."""

    wait_until = staticmethod(wait_until)

    def __init__(self, tb: natlab.Testbed, root: Path) -> None:
        self.tb = tb
        self.root = root
        self.daemons: dict[str, NatDaemon] = {}

    def start(self, name: str, *, bootstrap: list[str] = (), extra: tuple[str, ...] = (),
              mdns: bool = False, listen: str | None = None) -> NatDaemon:
        d = NatDaemon(self.tb.host(name), self.root / name, list(bootstrap), extra,
                      mdns=mdns, listen=listen)
        self.daemons[name] = d
        return d

    def start_case(self, *, later: tuple[str, ...] = ()) -> dict[str, NatDaemon]:
        """bootstrap first; relay, a and b bootstrap from it (none of them is told
        about the relay: they learn it from the bootstrap peer). Daemons in ``later``
        start only once the others hold their relay reservations."""
        boot = self.start("bootstrap")
        boot.wait_running()
        first = [n for n in ("relay", "a", "b") if n not in later]
        for name in first:
            self.start(name, bootstrap=[boot.addr])
        for name in first:
            self.daemons[name].wait_running()
        if later:
            for name in first:
                if self.tb.host(name).gateway is not None:
                    wait_until(lambda d=self.daemons[name]: len(d.reach().get("reservations") or ()) >= 2,
                               20, f"{name}'s relay reservations")
            for name in later:
                self.start(name, bootstrap=[boot.addr])
            for name in later:
                self.daemons[name].wait_running()
        return self.daemons


@pytest.fixture
def natnet():
    """``natnet(case) -> NatNet``: a testbed with daemons; all gone at teardown."""
    built: list[NatNet] = []
    stack = []

    def make(case: str | natlab.Spec) -> NatNet:
        cm = natlab.Testbed.build(case)
        tb = cm.__enter__()
        stack.append(cm)
        # short: a Unix socket path may have 107 bytes, pytest's tmp_path is long
        net = NatNet(tb, Path(tempfile.mkdtemp(prefix="natd-")))
        built.append(net)
        return net

    try:
        yield make
    finally:
        for net in built:
            for d in net.daemons.values():  # shown by pytest only when the test failed
                print(f"----- {d.name} ({d.node.netns}) log tail -----\n{d.log_text()}")
        errors = []
        for cm in reversed(stack):
            try:
                cm.__exit__(None, None, None)
            except natlab.TestbedError as e:
                errors.append(str(e))
        for net in built:
            shutil.rmtree(net.root, ignore_errors=True)
        assert not errors, errors
