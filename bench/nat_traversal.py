"""NAT traversal benchmark over real `latticed` daemons in the natlab testbed (root).

    sudo .venv/bin/python bench/nat_traversal.py [--attempts 20] [--case nat_cone_x_cone ...]

Per case it builds the testbed (`lattice.testing.natlab`), starts a bootstrap and a
relay daemon on the public segment, and per attempt two fresh daemons, a and b (new
identities, new listen ports), behind their NAT routers, told only the bootstrap
peer's address. Once b holds a relay reservation (found through the bootstrap peer)
and a knows its own reachability, a connects to b *by peer id* (`peers.connect`).
It reports, per case:

- ready: spawning a and b until both are ready (verdicts and reservations);
- relayed: `peers.connect` until the relayed connection is up (its Noise and Yamux
  handshakes are the first bytes through the relay);
- first ping: until a has measured b's round-trip time over that connection;
- direct after: from the relayed connection until a's `peers.list` shows the
  connection to b as direct (polled every 10 ms), and b's own hole-punch session time;
- direct: attempts that ended direct; relayed: attempts that stayed relayed, each
  with the reason b's daemon gave.

Targets (issue 4): 20/20 direct where the NATs allow it, first byte through the relay
within 3 s, direct within 3 s after that (py-libp2p's DCUtR alone: ~10 s; the study
that led here is docs/natlab.md). Traffic stays inside 198.18.0.0/15 namespaces.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CASES = ["public_x_cone", "nat_cone_x_cone", "nat_cone_x_symmetric",
                 "nat_symmetric_x_symmetric"]
PUBLIC_PORT = 4001


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Daemon:
    def __init__(self, node: Any, root: Path, name: str, port: int, bootstrap: list[str]) -> None:
        self.node = node
        self.name = name
        self.state_dir = root / name
        self.socket = self.state_dir / "latticed.sock"
        self.log = root / f"{name}.log"
        self.port = port
        args = [sys.executable, "-m", "latticed", "--state-dir", str(self.state_dir),
                "--listen", f"/ip4/{node.addr}/tcp/{port}", "--no-mdns", "--log-level", "info"]
        for b in bootstrap:
            args += ["--bootstrap", b]
        from lattice.api.paths import child_env
        env = child_env()
        with open(self.log, "ab") as log:
            self.proc = node.popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL)
        self.peer_id = ""

    def call(self, method: str, **params: Any) -> Any:
        import lattice

        with lattice.connect(self.socket, timeout=30) as c:
            return c.call(method, **params)

    def reach(self) -> dict[str, Any]:
        return self.call("status").get("reachability") or {}

    def wait_running(self, timeout: float = 30.0) -> None:
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, timeout,
                   f"{self.name}'s socket", 0.02)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
        st = wait_until(lambda: (s := self.call("status"))["state"] == "running" and s,
                        timeout, f"{self.name} running", 0.02)
        self.peer_id = st["peer_id"]

    @property
    def addr(self) -> str:
        return f"/ip4/{self.node.addr}/tcp/{self.port}/p2p/{self.peer_id}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _ready(d: Daemon, *, reservations: int) -> bool:
    r = d.reach()
    if r.get("reachability") == "public":
        return True
    return r.get("reachability") == "private" and len(r.get("reservations") or ()) >= reservations


def _row(d: Daemon, peer_id: str) -> dict[str, Any] | None:
    return next((p for p in d.call("peers.list") if p["peer_id"] == peer_id), None)


def attempt(tb: Any, root: Path, n: int, boot: Daemon, wait: float) -> dict[str, Any]:
    a_node, b_node = tb.host("a"), tb.host("b")
    a_public = a_node.gateway is None
    t0 = time.monotonic()
    b = Daemon(b_node, root, f"b{n}", 30000 + n, [boot.addr])
    a = None
    try:
        if a_public:
            # a public a is a relay too: b would reserve on it and be connected to it
            # before we ask; with b's slots taken elsewhere first, a must be reached
            b.wait_running()
            wait_until(lambda: _ready(b, reservations=2), 30, "b's reservations", 0.05)
        a = Daemon(a_node, root, f"a{n}", 20000 + n, [boot.addr])
        a.wait_running()
        b.wait_running()
        wait_until(lambda: _ready(b, reservations=1), 30, "b ready", 0.05)
        wait_until(lambda: a.reach().get("reachability") in ("public", "private"), 30,
                   "a's reachability", 0.05)
        ready_s = time.monotonic() - t0

        t_connect = time.monotonic()
        res = a.call("peers.connect", addr=b.peer_id, timeout=10.0)
        t_relayed = time.monotonic()
        first_ping = wait_until(lambda: (r := _row(a, b.peer_id)) and r["rtt_ms"] is not None
                                and time.monotonic(), 10, "a's ping of b")
        direct_at = None
        outcome = None
        deadline = t_relayed + wait
        while time.monotonic() < deadline:
            row = _row(a, b.peer_id)
            if row is not None and row["connection"] == "direct":
                direct_at = time.monotonic()
                break
            recent = b.reach().get("holepunch", {}).get("recent", [])
            outcome = next((r for r in recent if r["peer"] == a.peer_id), None)
            if outcome is not None and outcome["outcome"] != "direct":
                break  # b decided (or failed): the connection stays relayed
            time.sleep(0.01)
        recent = b.reach().get("holepunch", {}).get("recent", [])
        outcome = next((r for r in recent if r["peer"] == a.peer_id), None)
        row = _row(a, b.peer_id)
        return {
            "ready_s": ready_s,
            "relayed_s": t_relayed - t_connect,
            "relayed_ms_daemon": res["elapsed_ms"],
            "first_ping_s": first_ping - t_connect,
            "direct_s": None if direct_at is None else direct_at - t_relayed,
            "punch_ms": None if outcome is None else outcome["elapsed_ms"],
            "outcome": None if outcome is None else outcome["outcome"],
            "plan": None if outcome is None else outcome["plan"],
            "reason": None if outcome is None else outcome["reason"],
            "connection": None if row is None else row["connection"],
            "rtt_ms": None if row is None else row["rtt_ms"],
        }
    finally:
        for d in (a, b):
            if d is not None:
                d.stop()


def run_case(case: str, attempts: int, wait: float, logroot: Path) -> list[dict[str, Any]]:
    from lattice.testing.natlab import Testbed

    results = []
    root = Path(tempfile.mkdtemp(prefix=f"natb-{case[:12]}-"))  # short: socket paths
    try:
        with Testbed.build(case) as tb:
            boot = Daemon(tb.host("bootstrap"), root, "bootstrap", PUBLIC_PORT, [])
            boot.wait_running()
            relay = Daemon(tb.host("relay"), root, "relay", PUBLIC_PORT, [boot.addr])
            relay.wait_running()
            # (the relay's own verdict needs a third daemon to dial it back: the first
            # attempt's a and b; so the first "ready" includes that warm-up)
            for n in range(attempts):
                try:
                    res = attempt(tb, root, n, boot, wait)
                except (TimeoutError, RuntimeError, OSError) as e:
                    res = {"error": str(e)}
                res["attempt"] = n
                results.append(res)
                print(f"  {case} #{n}: {json.dumps(res)}", file=sys.stderr, flush=True)
            boot.stop()
            relay.stop()
    finally:
        logroot.mkdir(parents=True, exist_ok=True)
        for log in root.glob("*.log"):
            shutil.copy(log, logroot / f"{case}-{log.name}")
        shutil.rmtree(root, ignore_errors=True)
    return results


def _ms(values: list[float], scale: float = 1000.0) -> str:
    if not values:
        return "-"
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return f"{scale * statistics.median(values):6.0f} / {scale * p90:6.0f}"


def report(case: str, results: list[dict[str, Any]]) -> str:
    ok = [r for r in results if "error" not in r]
    direct = [r for r in ok if r.get("direct_s") is not None]
    relayed = [r for r in ok if r.get("direct_s") is None]
    reasons = sorted({r.get("reason") or "?" for r in relayed})
    return (f"{case:<26} {_ms([r['ready_s'] for r in ok]):>15} "
            f"{_ms([r['relayed_s'] for r in ok]):>15} {_ms([r['first_ping_s'] for r in ok]):>15} "
            f"{_ms([r['direct_s'] for r in direct]):>15} "
            f"{_ms([r['punch_ms'] for r in direct if r.get('punch_ms') is not None], 1.0):>15}"
            f"   {len(direct):>2}/{len(results):<2}  errors={len(results) - len(ok)}"
            + (f"  relayed: {'; '.join(reasons)}" if relayed else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", help=f"default: {' '.join(DEFAULT_CASES)}")
    parser.add_argument("--attempts", type=int, default=20)
    parser.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for a direct connection after the relayed one")
    parser.add_argument("--logdir", default="/tmp/natbench", help="daemon logs end up here")
    parser.add_argument("--json", help="also write every attempt's result to this file")
    args = parser.parse_args()

    from lattice.testing.natlab import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"nat_traversal: {reason}", file=sys.stderr)
        return 2
    lines, everything = [], {}
    for case in args.case or DEFAULT_CASES:
        results = run_case(case, args.attempts, args.wait, Path(args.logdir))
        lines.append(report(case, results))
        everything[case] = results
    print(f"\nNAT traversal between latticed daemons, {args.attempts} attempts per case; "
          "ms, median / p90; logs in " + args.logdir)
    print(f"{'case':<26} {'ready':>15} {'relayed conn':>15} {'first ping':>15} "
          f"{'direct after':>15} {'b punch':>15}   direct")
    for line in lines:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
