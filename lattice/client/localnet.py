"""`lattice localnet`: run N daemons on 127.0.0.1 as child processes.

Each node gets its own state dir and socket under ``base_dir`` and listens on an
ephemeral loopback port; node 0 starts first and every other node bootstraps off it.
Stopping (Ctrl-C, SIGTERM, or leaving the context) sends SIGTERM to every daemon,
waits for them (they stop within 5 s), and kills any straggler. If the process running
the network dies anyway, the kernel sends each daemon SIGTERM (PR_SET_PDEATHSIG) — which
fires when the *thread* that started them exits, so call `start()` from a thread that
lives as long as the network (not a worker thread).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lattice.api.paths import child_env
from lattice.client._session import DaemonNotRunningError
from lattice.client.sync_client import Client

STOP_TIMEOUT_S = 6.0


@dataclass
class LocalNode:
    index: int
    state_dir: Path
    socket: Path
    process: subprocess.Popen
    log_path: Path
    peer_id: str = ""
    addr: str = ""

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)


class LocalNetError(RuntimeError):
    pass


def latticed_command() -> list[str]:
    return [sys.executable, "-m", "latticed"]


class LocalNet:
    def __init__(self, n: int, base_dir: Path, *, extra_args: list[str] | None = None,
                 log_level: str = "info", ready_timeout: float = 30.0) -> None:
        if n < 1:
            raise ValueError("--nodes must be at least 1")
        self.n = n
        self.base_dir = base_dir
        self.extra_args = extra_args or []
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.nodes: list[LocalNode] = []

    def start(self, on_ready=None) -> list[LocalNode]:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        first = self._spawn(0, bootstrap=None)
        self._wait_ready(first)
        if on_ready:
            on_ready(first)
        rest = [self._spawn(i, bootstrap=first.addr) for i in range(1, self.n)]
        for node in rest:
            self._wait_ready(node)
            if on_ready:
                on_ready(node)
        return self.nodes

    def _spawn(self, i: int, bootstrap: str | None) -> LocalNode:
        state_dir = self.base_dir / f"node-{i}"
        state_dir.mkdir(parents=True, exist_ok=True)
        sock = state_dir / "latticed.sock"
        log_path = state_dir / "latticed.log"
        args = latticed_command() + [
            "--state-dir", str(state_dir), "--socket", str(sock),
            "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--name", f"node-{i}",
            "--log-level", self.log_level, *self.extra_args]
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        log_file = open(log_path, "ab")
        env = child_env()
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
        log_file.close()
        node = LocalNode(i, state_dir, sock, proc, log_path)
        self.nodes.append(node)
        return node

    def _wait_ready(self, node: LocalNode) -> None:
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.02
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise LocalNetError(f"node {node.index} exited with code {node.process.returncode};"
                                    f" log: {node.log_path}\n{_tail(node.log_path)}")
            try:
                with node.client(timeout=5) as c:
                    st = c.status()
                if st["state"] == "running":
                    node.peer_id = st["peer_id"]
                    node.addr = st["advertised_addrs"][0]
                    return
            except DaemonNotRunningError:
                pass
            time.sleep(delay)  # polling a child process we do not control: no event to wait on
            delay = min(delay * 2, 0.25)
        raise LocalNetError(f"node {node.index} not running after {self.ready_timeout:g} s; "
                            f"log: {node.log_path}")

    def stop(self) -> dict[int, int]:
        """SIGTERM every node, wait, kill stragglers; returns {index: exit code}."""
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        codes = {}
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for node in self.nodes:
            try:
                codes[node.index] = node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                codes[node.index] = node.process.wait()
        return codes

    def __enter__(self) -> LocalNet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the localnet process dies, however it dies (a
    killed `lattice localnet` must not leave daemons behind). Linux only; elsewhere a
    no-op."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
