"""Real `latticed` processes for tests (ours and users'): start, wait until running,
drive through the client, stop. Real time: every wait is on a condition with a deadline.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import lattice
from lattice.api.paths import child_env

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.01, detail=None):
    """Poll a condition we cannot subscribe to (a file appearing, a process exiting).
    On timeout the error names ``what`` and, when given, what ``detail()`` says about
    the state it was left in."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}{seen}")
        time.sleep(interval)


class DaemonProc:
    def __init__(self, state_dir: Path, *extra: str, env: dict | None = None) -> None:
        self.state_dir = state_dir
        self.socket = state_dir / "latticed.sock"
        self.log = state_dir.parent / f"{state_dir.name}.log"
        self.args = [sys.executable, "-m", "latticed", "--state-dir", str(state_dir),
                     "--listen", LOOPBACK, "--no-mdns", "--log-level", "debug", *extra]
        self.env = child_env()
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> DaemonProc:
        self.started_at = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, stdin=subprocess.DEVNULL)
        return self

    def wait_running(self, timeout: float = 20.0) -> dict:
        """Wait for the socket, then for the 'running' state event (not polling status)."""
        proc = self.proc
        assert proc is not None, "start() first"
        wait_for(lambda: self.socket.exists() or proc.poll() is not None, timeout,
                 f"socket {self.socket}")
        assert proc.poll() is None, f"latticed exited {proc.returncode}:\n{self.log_text()}"
        with lattice.connect(self.socket, timeout=timeout) as c:
            with c.subscribe(["daemon"], timeout=timeout) as events:
                for ev in events:
                    if ev.get("state") == "running":
                        break
            return c.status()

    def client(self) -> lattice.Client:
        return lattice.connect(self.socket, timeout=30)

    def addr(self) -> str:
        with self.client() as c:
            return c.status()["advertised_addrs"][0]

    def peer_id(self) -> str:
        with self.client() as c:
            return c.status()["peer_id"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"latticed did not stop within {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def run_cli(*args: str, socket: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lattice.cli"]
    if socket is not None:
        cmd += ["--socket", str(socket)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          env=child_env())


class DaemonFactory:
    """Starts `DaemonProc`s in numbered state dirs under ``base`` and kills whatever is
    still running on `close` (a test's teardown): ``factory(*extra_args, env=...)``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[DaemonProc] = []

    def __call__(self, *extra: str, start: bool = True, state_dir: Path | None = None,
                 env: dict | None = None) -> DaemonProc:
        d = DaemonProc(state_dir or self.base / f"d{len(self.started)}", *extra, env=env)
        self.started.append(d)
        if start:
            d.start()
        return d

    def close(self) -> None:
        for d in self.started:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
