"""A small cluster of sync nodes on the in-memory network, restartable one by one."""

import random
import secrets

import pytest
import trio

from lattice.core.jobs import TrainSpec, new_job_record
from lattice.core.state import Set, StateLimits
from lattice.net.crdt_sync import SyncConfig, open_state, serve_crdt_sync
from lattice.testing.memnet import MemoryNetwork


class Node:
    def __init__(self, cluster, peer, log_path=None, history_is_new=False):
        self.cluster = cluster
        self.history_is_new = history_is_new
        self.peer = peer
        self.peer_id = peer.peer_id
        self.log_path = log_path
        self.store = self.sync = self.log = None
        self._scope = None

    async def start(self):
        """Load state (from the log, if any) and start the sync service."""
        self.store, self.log = open_state(self.peer.identity, self.log_path,
                                          now=trio.current_time(), limits=self.cluster.limits)
        self.sync = await self.cluster.nursery.start(self._run)
        return self

    async def _run(self, task_status):
        with trio.CancelScope() as scope:
            self._scope = scope
            await serve_crdt_sync(self.peer, self.store, config=self.cluster.config,
                                  clock=trio.current_time, rng=self.cluster.rng,
                                  history_is_new=self.history_is_new, task_status=task_status)

    def stop(self):
        self._scope.cancel()
        if self.log is not None:
            self.log.close()

    def write(self, *changes):
        return self.store.apply_local(list(changes), trio.current_time())

    def submit(self, task="digits-softmax"):
        """Publish a job record of ours; returns its id."""
        job_id, record = new_job_record(TrainSpec(task=task), self.peer_id,
                                        secrets.token_hex(16), trio.current_time())
        self.write(Set(f"jobs/{job_id}", record))
        return job_id

    def announce(self, name):
        return self.write(Set("member/peer_id", self.peer_id), Set("member/name", name),
                          Set("member/heartbeat", trio.current_time()))


class Cluster:
    def __init__(self, nursery, seed: int):
        self.nursery = nursery
        self.net = MemoryNetwork(seed=seed)
        self.rng = random.Random(seed)
        self.config = SyncConfig(anti_entropy_interval=5.0)
        self.nodes: list[Node] = []
        self.limits = StateLimits()

    async def add(self, n=1, log_dir=None, history_is_new=False):
        out = []
        for _ in range(n):
            peer = self.net.add_peer()
            await self.nursery.start(peer.serve)
            path = None if log_dir is None else log_dir / f"{peer.peer_id[-8:]}.log"
            node = await Node(self, peer, path, history_is_new).start()
            self.nodes.append(node)
            out.append(node)
        return out

    async def link(self, a: Node, b: Node):
        assert await a.sync.connect(b.peer_id)

    async def wait_until(self, predicate, timeout=5.0):
        """Wait (virtual time) until ``predicate()`` holds, re-checking on every change
        of any node's state and every second (sessions re-forming after a heal)."""
        with trio.fail_after(timeout):
            while not predicate():
                changed = trio.Event()
                unsubscribe = [n.store.subscribe(lambda ev: changed.set())
                               for n in self.nodes if n.store is not None]
                try:
                    with trio.move_on_after(1.0):
                        await changed.wait()
                finally:
                    for u in unsubscribe:
                        u()

    def converged(self, nodes=None):
        nodes = nodes or self.nodes
        first = nodes[0].store
        return all(n.store.summary() == first.summary() for n in nodes[1:]) and all(
            n.store.get("", 0.0) == first.get("", 0.0) for n in nodes[1:])


@pytest.fixture
async def cluster(nursery, lattice_seed):
    c = Cluster(nursery, lattice_seed)
    yield c
    nursery.cancel_scope.cancel()
