"""Convergence time of one write across N peers, and sync bytes per update.

    .venv/bin/python bench/crdt_convergence.py [--sizes 8 24] [--writes 20] [--degree 3]

Every run builds N peers running `/lattice/crdt-sync/2`, links them in a ring plus
``degree - 2`` random chords each (so messages need several hops, as in a real mesh),
lets them settle, then repeatedly: a random peer writes (a heartbeat-sized change to
its member record), and we time until *every other* peer's store shows it. Bytes are
everything the sync sessions wrote (frames, hellos, anti-entropy), divided by writes.

The transport is pluggable: a `Transport` builds the peers and returns `BenchNode`s.
`MemnetTransport` (in-memory streams, one process, real clock) is the default; a
transport over real daemons implements the same three methods with the local RPC
(write -> ``state.set``, wait -> ``state.watch``, bytes -> ``state.stats``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Protocol

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lattice.core.state import Set, StateStore
from lattice.net.crdt_sync import SyncConfig, serve_crdt_sync
from lattice.testing.memnet import MemoryNetwork


class BenchNode(Protocol):
    peer_id: str

    async def write(self, name: str) -> int:
        """Write our member name; returns the encoded envelope size in bytes."""
        ...

    async def wait_name(self, author: str, name: str) -> None:
        """Return once this node shows ``author``'s member name as ``name``."""
        ...

    def sync_bytes_sent(self) -> int: ...


class Transport(Protocol):
    async def start(self, nursery: trio.Nursery, n: int, degree: int,
                    rng: random.Random) -> list[BenchNode]: ...


class MemnetNode:
    def __init__(self, peer, store: StateStore, sync) -> None:
        self.peer_id = peer.peer_id
        self.store = store
        self.sync = sync

    async def write(self, name: str) -> int:
        env = self.store.apply_local([Set("member/peer_id", self.peer_id),
                                      Set("member/name", name)], time.time())
        return len(env.raw)

    async def wait_name(self, author: str, name: str) -> None:
        path = f"members/{author}/name"
        arrived = trio.Event()

        def on_change(event) -> None:
            if event.path == f"members/{author}" and event.value and \
                    event.value.get("name") == name:
                arrived.set()

        unsubscribe = self.store.subscribe(on_change)
        try:
            try:
                if self.store.get(path, time.time()) == name:
                    return
            except KeyError:
                pass
            await arrived.wait()
        finally:
            unsubscribe()

    def sync_bytes_sent(self) -> int:
        return self.sync.hub.statistics()["bytes_sent"]


class MemnetTransport:
    async def start(self, nursery, n, degree, rng):
        net = MemoryNetwork()
        nodes = []
        config = SyncConfig(anti_entropy_interval=30.0)
        for _ in range(n):
            peer = net.add_peer()
            await nursery.start(peer.serve)
            store = StateStore(peer.identity)
            sync = await nursery.start(lambda **kw: serve_crdt_sync(
                peer, store, config=config, rng=rng, **kw))
            nodes.append(MemnetNode(peer, store, sync))
        for i, node in enumerate(nodes):
            await node.sync.connect(nodes[(i + 1) % n].peer_id)
            for _ in range(max(0, degree - 2)):
                other = nodes[rng.randrange(n)]
                if other is not node:
                    await node.sync.connect(other.peer_id)
        return nodes


class DaemonNode:
    """One real latticed driven over its local RPC socket."""

    def __init__(self, socket: Path, peer_id: str) -> None:
        self.socket = socket
        self.peer_id = peer_id
        self.names: dict[str, str] = {}
        self.changed = trio.Condition()

    async def follow(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        import lattice
        async with lattice.open_client(self.socket) as c:
            async with c.subscribe(["state"]) as events:
                async for ev in events:
                    if ev["event"] == "snapshot":
                        async with self.changed:
                            for pid, m in (ev["state"] or {}).get("members", {}).items():
                                self.names[pid] = m.get("name")
                            self.changed.notify_all()
                        task_status.started()
                        continue
                    path = ev.get("path", "")
                    if path.startswith("members/") and isinstance(ev.get("value"), dict):
                        async with self.changed:
                            self.names[path.split("/", 1)[1]] = ev["value"].get("name")
                            self.changed.notify_all()

    async def write(self, name: str) -> int:
        import lattice
        async with lattice.open_client(self.socket) as c:
            await c.state_set("member/name", name)
        return 0  # the RPC does not report envelope sizes; memnet does

    async def wait_name(self, author: str, name: str) -> None:
        async with self.changed:
            while self.names.get(author) != name:
                await self.changed.wait()

    def sync_bytes_sent(self) -> int:
        import lattice
        with lattice.connect(self.socket) as c:
            return c.state_stats()["sync"]["sync"]["bytes_sent"]


class DaemonTransport:
    """N real daemons on loopback (`lattice localnet`: all bootstrapped off node 0)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.nets = []

    async def start(self, nursery, n, degree, rng):
        from lattice.client.localnet import LocalNet
        net = LocalNet(n, self.base / f"net-{n}", log_level="warning", ready_timeout=120)
        self.nets.append(net)
        net.start()  # on this thread: the daemons die with the thread that spawned them
        nodes = [DaemonNode(node.socket, node.peer_id) for node in net.nodes]
        for node in nodes:
            await nursery.start(node.follow)
        # A daemon's first heartbeat writes its whole member record (name included) and
        # may wait up to 10 s to sync its own history first: writing a name before that
        # would be overwritten. So start once every node shows every member.
        for node in nodes:
            async with node.changed:
                while len(node.names) < n:
                    await node.changed.wait()
        return nodes

    def stop(self) -> None:
        for net in self.nets:
            net.stop()


async def measure(transport: Transport, n: int, writes: int, degree: int, seed: int):
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery:
        nodes = await transport.start(nursery, n, degree, rng)
        # settle: everyone announces itself once and all sessions finish their hellos
        for node in nodes:
            await node.write("hello")
        async with trio.open_nursery() as waits:
            for node in nodes:
                for other in nodes:
                    if other is not node:
                        waits.start_soon(node.wait_name, other.peer_id, "hello")
        times, env_sizes = [], []
        bytes_before = sum(node.sync_bytes_sent() for node in nodes)
        for i in range(writes):
            writer = nodes[rng.randrange(n)]
            name = f"w{i}"
            start = time.perf_counter()
            env_sizes.append(await writer.write(name))
            async with trio.open_nursery() as waits:
                for node in nodes:
                    if node is not writer:
                        waits.start_soon(node.wait_name, writer.peer_id, name)
            times.append(time.perf_counter() - start)
        sent = sum(node.sync_bytes_sent() for node in nodes) - bytes_before
        nursery.cancel_scope.cancel()
    return times, env_sizes, sent


def cpu_costs(n: int = 300) -> tuple[float, float]:
    """Microseconds to write one heartbeat locally and to receive it on another peer
    (signature, pycrdt apply on a copy, schema check), single-threaded."""
    from lattice.core.identity import Identity

    me = Identity.generate()
    writer, reader = StateStore(me), StateStore(Identity.generate())
    writer.apply_local([Set("member/peer_id", me.peer_id), Set("member/name", "bench"),
                        Set("member/capabilities", {"cpus": 8, "tasks": ["digits-mlp"]})], 0.0)
    reader.receive(writer.missing_for({})[0].raw, 0.0)
    start = time.perf_counter()
    envs = [writer.apply_local([Set("member/heartbeat", float(i))], 0.0) for i in range(n)]
    mid = time.perf_counter()
    for env in envs:
        reader.receive(env.raw, 0.0)
    end = time.perf_counter()
    return (mid - start) / n * 1e6, (end - mid) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 24])
    parser.add_argument("--writes", type=int, default=20)
    parser.add_argument("--degree", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--transport", choices=["memnet", "daemons"], default="daemons",
                        help="daemons: real latticed processes on loopback (default)")
    args = parser.parse_args()
    import tempfile
    tmp = tempfile.TemporaryDirectory(prefix="lattice-crdt-bench-")
    if args.transport == "daemons":
        print("transport: real latticed daemons on 127.0.0.1, all bootstrapped off node 0 "
              "(--degree ignored), timed through the local RPC")
    else:
        print("transport: memnet (in-memory streams, one process, real clock)")
    print(f"{'peers':>5} {'writes':>6} {'median ms':>9} {'p90 ms':>7} {'max ms':>7} "
          f"{'envelope B':>10} {'sync B/update':>13} {'B/update/peer':>13}")
    for n in args.sizes:
        transport = DaemonTransport(Path(tmp.name)) if args.transport == "daemons" else MemnetTransport()
        try:
            times, sizes, sent = trio.run(measure, transport, n, args.writes,
                                          args.degree, args.seed)
        finally:
            if args.transport == "daemons":
                transport.stop()
        times_ms = sorted(t * 1000 for t in times)
        p90 = times_ms[min(len(times_ms) - 1, int(0.9 * len(times_ms)))]
        per_update = sent / args.writes
        print(f"{n:>5} {args.writes:>6} {statistics.median(times_ms):>9.2f} {p90:>7.2f} "
              f"{times_ms[-1]:>7.2f} {statistics.median(sizes):>10.0f} {per_update:>13.0f} "
              f"{per_update / (n - 1):>13.0f}")
    write_us, receive_us = cpu_costs()
    print(f"cpu: local write {write_us:.0f} us, receive {receive_us:.0f} us per heartbeat "
          "envelope")


if __name__ == "__main__":
    main()
