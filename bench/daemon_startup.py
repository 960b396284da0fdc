"""Startup time to "running" and idle resident memory of one latticed, on loopback.

    .venv/bin/python bench/daemon_startup.py [--runs 5]

Startup is measured from process spawn to the daemon's "running" state event (what a
client waits for); RSS is read from /proc after the daemon has idled for --idle seconds.
Targets (issue 2): ready in under 1.5 s, idle RSS under 120 MiB.

The default config has mDNS on, and mDNS multicasts on every interface: that row runs
the daemon in a network namespace of its own holding only loopback (root only), so
nothing leaves the machine. Without root it is skipped, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lattice
from lattice.testing.daemons import wait_for


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def mdns_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (its multicast is kept inside a private network namespace)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip (for a private network namespace)"
    return None


@contextlib.contextmanager
def private_netns():
    """A network namespace with only loopback up; yields the command prefix into it."""
    name = f"lattice-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def one_run(mdns: bool, idle: float) -> tuple[float, float, float]:
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lattice-bench-"))
        prefix = stack.enter_context(private_netns()) if mdns else []
        state = Path(tmp) / "state"
        args = [*prefix, sys.executable, "-m", "latticed", "--state-dir", str(state),
                "--listen", "/ip4/127.0.0.1/tcp/0", "--log-level", "warning"]
        if not mdns:
            args.append("--no-mdns")
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sock = state / "latticed.sock"
        wait_for(lambda: sock.exists(), 30, "socket", interval=0.002)
        t_socket = time.perf_counter() - t0
        with lattice.connect(sock) as c, c.subscribe(["daemon"]) as events:
            for ev in events:
                if ev.get("state") == "running":
                    break
        t_ready = time.perf_counter() - t0
        time.sleep(idle)  # idle on purpose: the figure is memory at rest
        rss = rss_mib(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        return t_socket, t_ready, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=float, default=3.0)
    args = ap.parse_args()
    print(f"latticed startup and idle memory, {args.runs} runs each, {os.cpu_count()} cores")
    print(f"{'config':<14} {'socket up s':>12} {'running s':>10} {'(p90)':>7} {'idle RSS MiB':>13}")
    for mdns in (False, True):
        if mdns and (reason := mdns_unavailable_reason()):
            print(f"{'mdns on':<14} skipped: {reason}")
            continue
        runs = [one_run(mdns, args.idle) for _ in range(args.runs)]
        sock = statistics.median(r[0] for r in runs)
        ready = sorted(r[1] for r in runs)
        rss = statistics.median(r[2] for r in runs)
        p90 = ready[min(len(ready) - 1, int(0.9 * len(ready)))]
        print(f"{'mdns on' if mdns else 'mdns off':<14} {sock:>12.3f} {statistics.median(ready):>10.3f}"
              f" {p90:>7.3f} {rss:>13.1f}")
    print("targets: running < 1.5 s, idle RSS < 120 MiB")


if __name__ == "__main__":
    main()
