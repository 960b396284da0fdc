"""DHT put/get latency on loopback: Lattice vs hivemind vs Lattica, same run, same machine.

    .venv/bin/python bench/dht_latency.py [--nodes 2 8] [--ops 40] [--only lattice]

Each system runs in its own subprocess: N nodes, all bootstrapped off the first one;
then for each op a random writer puts a fresh key (a small msgpack-able dict) and a
random *other* node gets it; put and get are timed separately from the caller's side
(wall clock, ms) after a few warm-up ops. The table reports median and p90.

- lattice: our DHT (`lattice.net.dht`) over real py-libp2p hosts (TCP + Noise + Yamux,
  `lattice.net.host`), one process per node as daemons run, driven over a loopback
  control socket. `put` returns when the 20 closest (here: all others) stored it.
  `get` is what users get: a replica (here: every node) answers from its own store,
  as hivemind and rust-libp2p do. `net` is the same get forced onto the network
  (`fresh=True`): every publisher's record once the 3 closest live peers answered.
  The anchors have no such column: their gets are the default ones.
- lattice-1proc: the same, all N hosts in one trio process (no inter-process wake-ups,
  but one core for every node's work).
- hivemind (`bench/.venv-hivemind`): `hivemind.DHT`, one background process + p2pd per
  node; `store` then `get(key)` (default: returns the first value found).
- Lattica (`bench/.venv-lattica`): `Lattica.store` / `get` (rust-libp2p Kademlia), all
  N nodes in one process (each with its own tokio runtime).

An anchor whose venv is missing prints "not installed (run bench/anchors/setup.sh)".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HIVEMIND_PY = HERE / ".venv-hivemind" / "bin" / "python"
LATTICA_PY = HERE / ".venv-lattica" / "bin" / "python"
WARMUP = 10
SYSTEMS = ("lattice", "lattice-1proc", "hivemind", "lattica")

# --- workers: each prints one JSON line {"put_ms": [...], "get_ms": [...], ...} -------

HIVEMIND_WORKER = r"""
import json, random, sys, time, logging
n, ops, warmup, seed = map(int, sys.argv[1:5])
import hivemind
from hivemind.utils.timed_storage import get_dht_time
first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
maddrs = [str(m) for m in first.get_visible_maddrs()]
nodes = [first] + [hivemind.DHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                start=True) for _ in range(n - 1)]
rnd = random.Random(seed)
put_ms, get_ms, failures = [], [], 0
for i in range(warmup + ops):
    writer, reader = rnd.sample(nodes, 2)
    key = f"bench-{seed}-{i}"
    t0 = time.perf_counter()
    ok = writer.store(key, {"i": i, "pad": "x" * 64}, expiration_time=get_dht_time() + 600)
    t1 = time.perf_counter()
    got = reader.get(key)
    t2 = time.perf_counter()
    if not ok or got is None or got.value.get("i") != i:
        failures += 1
    if i >= warmup:
        put_ms.append((t1 - t0) * 1e3)
        get_ms.append((t2 - t1) * 1e3)
for d in nodes:
    d.shutdown()
print(json.dumps({"put_ms": put_ms, "get_ms": get_ms, "failures": failures,
                  "version": hivemind.__version__}))
"""

LATTICA_WORKER = r"""
import json, random, socket, sys, tempfile, time
from importlib.metadata import version
n, ops, warmup, seed = map(int, sys.argv[1:5])
from lattica import Lattica

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def make(tmp, boot):
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}"
    # loopback is not a "visible" address for Lattica: announce it explicitly, and keep
    # mDNS/UPnP/AutoNAT/DCUtR off so only the DHT runs
    b = (Lattica.builder().with_listen_addrs([addr]).with_external_addrs([addr])
         .with_mdns(False).with_upnp(False).with_autonat(False).with_dcutr(False)
         .with_storage_path(tmp + "/store").with_dht_db_path(tmp + "/dht")
         .with_key_path(tmp))
    if boot:
        b = b.with_bootstraps(boot)
    node = b.build()
    return node, addr + "/p2p/" + node.peer_id()

with tempfile.TemporaryDirectory() as tmp:
    first, boot = make(tmp + "/0", None)
    nodes = [first] + [make(f"{tmp}/{i}", [boot])[0] for i in range(1, n)]
    deadline = time.time() + 10
    while time.time() < deadline and any(len(x.get_all_peers()) < 1 for x in nodes):
        time.sleep(0.05)
    rnd = random.Random(seed)
    put_ms, get_ms, failures = [], [], 0
    for i in range(warmup + ops):
        writer, reader = rnd.sample(nodes, 2)
        key = f"bench-{seed}-{i}"
        t0 = time.perf_counter()
        ok = writer.store(key, {"i": i, "pad": "x" * 64}, time.time() + 600)
        t1 = time.perf_counter()
        got = reader.get(key)
        t2 = time.perf_counter()
        if not ok or got is None or got.value.get("i") != i:
            failures += 1
        if i >= warmup:
            put_ms.append((t1 - t0) * 1e3)
            get_ms.append((t2 - t1) * 1e3)
    for x in nodes:
        x.close()
print(json.dumps({"put_ms": put_ms, "get_ms": get_ms, "failures": failures,
                  "version": version("lattica")}))
"""


class PeerstoreAddressBook:
    """Addresses the DHT learns go to the host's peerstore, so new_stream can dial them.
    (A stand-in until lattice.net.host offers one.)"""

    def __init__(self, host) -> None:
        self._ps = host.get_peerstore()

    def add_addrs(self, peer_id: str, addrs) -> None:
        from libp2p.peer.id import ID
        from multiaddr import Multiaddr
        good = []
        for a in addrs:
            try:
                good.append(Multiaddr(a))
            except Exception:  # noqa: BLE001 - a peer's junk address is skipped
                continue
        if good:
            self._ps.add_addrs(ID.from_base58(peer_id), good, 0)

    def get_addrs(self, peer_id: str) -> list[str]:
        from libp2p.peer.id import ID
        try:
            return [str(a) for a in self._ps.addrs(ID.from_base58(peer_id))]
        except Exception:  # noqa: BLE001 - unknown peer: no addresses
            return []


_CTRL_LEN = 4


async def _ctrl_recv(stream, buf: bytearray):
    from lattice.core import codec
    while True:
        if len(buf) >= _CTRL_LEN:
            n = int.from_bytes(buf[:_CTRL_LEN], "big")
            if len(buf) >= _CTRL_LEN + n:
                msg = codec.unpack(bytes(buf[_CTRL_LEN:_CTRL_LEN + n]))
                del buf[:_CTRL_LEN + n]
                return msg
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk


def _ctrl_frame(msg) -> bytes:
    from lattice.core import codec
    body = codec.pack(msg)
    return len(body).to_bytes(_CTRL_LEN, "big") + body


async def _node_main() -> None:
    """One Lattice DHT node (a stand-in for a daemon): a py-libp2p host, the DHT, and a
    loopback control socket the bench driver sends put/get/bootstrap to. Exits when its
    stdin closes (the driver went away)."""
    import logging
    import os
    from functools import partial

    import trio

    from lattice.core.identity import Identity
    from lattice.net.dht import serve_dht
    from lattice.net.host import open_libp2p_node, quiet_libp2p_logging

    quiet_libp2p_logging(logging.CRITICAL)
    ident = Identity.generate()
    async with open_libp2p_node(ident, ["/ip4/127.0.0.1/tcp/0"]) as node:
        async with trio.open_nursery() as nursery:
            dht = await nursery.start(partial(
                serve_dht, node, ident, address_book=PeerstoreAddressBook(node.host),
                self_addrs=node.listen_addrs))

            async def control(stream) -> None:
                buf = bytearray()
                while (cmd := await _ctrl_recv(stream, buf)) is not None:
                    op = cmd["op"]
                    if op == "bootstrap":
                        out = {"table": await dht.bootstrap([(cmd["peer_id"], cmd["addrs"])])}
                    elif op == "put":
                        put = await dht.put(cmd["key"], cmd["value"], cmd["ttl"])
                        out = {"stored": len(put.stored_at), "hops": put.hops}
                    elif op == "get":
                        got = await dht.get_result(cmd["key"], fresh=cmd.get("fresh", False))
                        out = {"values": [r.unpack_value() for r in got.records],
                               "hops": got.hops}
                    else:
                        out = dht.statistics()
                    await stream.send_all(_ctrl_frame(out))

            listeners = await nursery.start(partial(trio.serve_tcp, control, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            print(json.dumps({"peer_id": dht.peer_id, "addrs": node.listen_addrs(),
                              "control_port": port}), flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(0))
            while await stdin.receive_some(1024):
                pass
            nursery.cancel_scope.cancel()


async def _one_process_worker(n: int, ops: int, warmup: int, seed: int) -> dict:
    """All N hosts in one trio process: no process wake-ups, but one core for all."""
    import logging
    import random
    from contextlib import AsyncExitStack
    from functools import partial
    from importlib.metadata import version

    import trio

    from lattice.core.identity import Identity
    from lattice.net.dht import serve_dht
    from lattice.net.host import open_libp2p_node, quiet_libp2p_logging

    quiet_libp2p_logging(logging.CRITICAL)
    put_ms, get_ms, net_get_ms, failures, hops, net_hops = [], [], [], 0, [], []
    async with AsyncExitStack() as stack:
        hosts = []
        for _ in range(n):
            ident = Identity.generate()
            node = await stack.enter_async_context(
                open_libp2p_node(ident, ["/ip4/127.0.0.1/tcp/0"]))
            hosts.append((ident, node))
        async with trio.open_nursery() as nursery:
            dhts = [await nursery.start(partial(
                serve_dht, node, ident, address_book=PeerstoreAddressBook(node.host),
                self_addrs=node.listen_addrs)) for ident, node in hosts]
            for dht in dhts[1:]:
                await dht.bootstrap([(dhts[0].peer_id, hosts[0][1].listen_addrs())])
            rnd = random.Random(seed)
            for i in range(warmup + ops):
                writer, reader = rnd.sample(dhts, 2)
                key = f"/v/bench-{seed}-{i}"
                t0 = time.perf_counter()
                put = await writer.put(key, {"i": i, "pad": "x" * 64}, ttl=600)
                t1 = time.perf_counter()
                # the network path first: it leaves nothing running in the background
                net = await reader.get_result(key, fresh=True)
                t2 = time.perf_counter()
                got = await reader.get_result(key)
                t3 = time.perf_counter()
                if not put.stored_at or [r.unpack_value()["i"] for r in got.records] != [i]:
                    failures += 1
                if [r.unpack_value()["i"] for r in net.records] != [i]:
                    failures += 1
                if i >= warmup:
                    put_ms.append((t1 - t0) * 1e3)
                    net_get_ms.append((t2 - t1) * 1e3)
                    get_ms.append((t3 - t2) * 1e3)
                    hops.append(got.hops)
                    net_hops.append(net.hops)
            nursery.cancel_scope.cancel()
    return {"put_ms": put_ms, "get_ms": get_ms, "net_get_ms": net_get_ms,
            "failures": failures, "version": f"py-libp2p {version('libp2p')}",
            "max_hops": max(hops + net_hops, default=0)}


def _lattice_driver(n: int, ops: int, warmup: int, seed: int, timeout: float) -> dict:
    """N node processes (one per daemon, as deployed), driven over loopback sockets;
    latency is measured here, around the control call (like hivemind's RPC to its
    DHT process)."""
    import random
    import socket
    import tempfile
    from importlib.metadata import version

    def call(sock, msg):
        sock.sendall(_ctrl_frame(msg))
        buf = bytearray()
        while True:
            if len(buf) >= _CTRL_LEN:
                k = int.from_bytes(buf[:_CTRL_LEN], "big")
                if len(buf) >= _CTRL_LEN + k:
                    from lattice.core import codec
                    return codec.unpack(bytes(buf[_CTRL_LEN:_CTRL_LEN + k]))
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("node closed its control socket")
            buf += chunk

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs, socks = [], []
    with tempfile.TemporaryFile("w+") as errlog:
        try:
            for _ in range(n):
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--node"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=errlog, text=True, env=env, cwd=ROOT))
            infos = []
            for p in procs:
                line = p.stdout.readline()
                if not line:
                    errlog.seek(0)
                    tail = errlog.read().strip().splitlines()[-3:]
                    return {"error": "node did not start: " + " | ".join(tail)[:300]}
                infos.append(json.loads(line))
            for info in infos:
                s = socket.create_connection(("127.0.0.1", info["control_port"]), timeout=timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks.append(s)
            for s in socks[1:]:
                call(s, {"op": "bootstrap", "peer_id": infos[0]["peer_id"],
                         "addrs": infos[0]["addrs"]})
            rnd = random.Random(seed)
            put_ms, get_ms, net_get_ms, failures, hops = [], [], [], 0, []
            for i in range(warmup + ops):
                w, r = rnd.sample(range(n), 2)
                key = f"/v/bench-{seed}-{i}"
                t0 = time.perf_counter()
                put = call(socks[w], {"op": "put", "key": key, "ttl": 600,
                                      "value": {"i": i, "pad": "x" * 64}})
                t1 = time.perf_counter()
                # the network path first: it leaves nothing running in the background
                net = call(socks[r], {"op": "get", "key": key, "fresh": True})
                t2 = time.perf_counter()
                got = call(socks[r], {"op": "get", "key": key})
                t3 = time.perf_counter()
                if not put["stored"] or [v["i"] for v in got["values"]] != [i]:
                    failures += 1
                if [v["i"] for v in net["values"]] != [i]:
                    failures += 1
                if i >= warmup:
                    put_ms.append((t1 - t0) * 1e3)
                    net_get_ms.append((t2 - t1) * 1e3)
                    get_ms.append((t3 - t2) * 1e3)
                    hops += [got["hops"], net["hops"]]
            stats = [call(s, {"op": "stats"}) for s in socks]
        finally:
            for s in socks:
                s.close()
            for p in procs:
                p.stdin.close()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return {"put_ms": put_ms, "get_ms": get_ms, "net_get_ms": net_get_ms,
            "failures": failures, "version": f"py-libp2p {version('libp2p')}",
            "max_hops": max(hops, default=0), "streams_opened": sum(st["streams_opened"] for st in stats),
            "requests": sum(sum(st["requests_out"].values()) for st in stats)}


def _run_worker(python: Path, args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([str(python), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)[:300]}"}
    return json.loads(lines[-1])


def measure(system: str, n: int, ops: int, seed: int, timeout: float) -> dict:
    argv = [str(n), str(ops), str(WARMUP), str(seed)]
    if system == "lattice-1proc":
        return _run_worker(Path(sys.executable), [__file__, "--worker", *argv], timeout)
    if system == "lattice":
        try:
            return _lattice_driver(n, ops, WARMUP, seed, timeout)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            return {"error": str(e)[:300]}
    python, code = {"hivemind": (HIVEMIND_PY, HIVEMIND_WORKER),
                    "lattica": (LATTICA_PY, LATTICA_WORKER)}[system]
    if not python.exists():
        return {"missing": True}
    return _run_worker(python, ["-c", code, *argv], timeout)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def render(results: dict) -> str:
    head = (f"{'system':<34}{'nodes':>6}{'put med':>10}{'put p90':>10}"
            f"{'get med':>10}{'get p90':>10}{'net med':>10}{'net p90':>10}{'fail':>6}")
    lines = ["DHT latency on loopback, ms (caller's wall clock)", head, "-" * len(head)]
    for (system, n), r in results.items():
        if r.get("missing"):
            lines.append(f"{system:<34}{n:>6}  not installed (run bench/anchors/setup.sh)")
            continue
        if "error" in r:
            lines.append(f"{system:<34}{n:>6}  failed: {r['error']}")
            continue
        label = f"{system} ({r.get('version', '?')})"
        lines.append(
            f"{label:<34}{n:>6}{statistics.median(r['put_ms']):>10.2f}{_pct(r['put_ms'], .9):>10.2f}"
            f"{statistics.median(r['get_ms']):>10.2f}{_pct(r['get_ms'], .9):>10.2f}"
            + (f"{statistics.median(r['net_get_ms']):>10.2f}{_pct(r['net_get_ms'], .9):>10.2f}"
               if r.get("net_get_ms") else f"{'-':>10}{'-':>10}")
            + f"{r['failures']:>6}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--ops", type=int, default=60, help="measured ops per system and size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleave the systems this many times (ops split evenly)")
    parser.add_argument("--only", choices=SYSTEMS, nargs="+")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="also print raw results")
    parser.add_argument("--node", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import trio
        print(json.dumps(trio.run(_one_process_worker, *args.worker)))
        return
    if args.node:
        import trio
        trio.run(_node_main)
        return
    systems = args.only or list(SYSTEMS)
    # The machine is shared: interleave the systems in rounds so that load spikes
    # hit all of them alike, and pool the rounds.
    load = os.getloadavg()
    results: dict = {}
    per_round = max(1, args.ops // args.rounds)
    for rnd in range(args.rounds):
        for n in args.nodes:
            for system in systems:
                r = measure(system, n, per_round, args.seed + rnd, args.timeout)
                acc = results.setdefault((system, n), {"put_ms": [], "get_ms": [], "failures": 0})
                if "put_ms" not in r:
                    results[(system, n)] = r  # missing or failed: report that
                    continue
                if "put_ms" not in acc:
                    continue
                acc["put_ms"] += r["put_ms"]
                acc["get_ms"] += r["get_ms"]
                if "net_get_ms" in r:
                    acc.setdefault("net_get_ms", []).extend(r["net_get_ms"])
                acc["failures"] += r["failures"]
                acc["version"] = r.get("version")
                if "max_hops" in r:
                    acc["max_hops"] = max(acc.get("max_hops", 0), r["max_hops"])
    print(render(results))
    print(f"{per_round * args.rounds} measured ops per row in {args.rounds} interleaved rounds; "
          f"load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    hops = {f"{s}/{n}": r["max_hops"] for (s, n), r in results.items() if "max_hops" in r}
    if hops:
        print(f"lattice: max hops behind a get: {hops}")
    if args.json:
        print(json.dumps({f"{s}/{n}": r for (s, n), r in results.items()}))


if __name__ == "__main__":
    main()
