"""A cluster of job-running nodes on the in-memory network: replicated state, the job
runner, and math that takes *virtual* time (so `autojump_clock` drives whole jobs
deterministically and fast, and participants really are busy while they train)."""

from __future__ import annotations

import random

import pytest
import trio

from lattice.jobs import JobsConfig, serve_jobs
from lattice.net.crdt_sync import SyncConfig, open_state, serve_crdt_sync, serve_heartbeat
from lattice.net.gossip_avg import GossipConfig
from lattice.testing.memnet import MemoryNetwork

FAST = JobsConfig(progress_interval=1.0, checkpoint_every=5, sync_patience=1.0, merge_takeover=5.0,
                  reconcile_interval=0.5, fetch_timeout=10.0,
                  gossip=GossipConfig(accept_timeout=3.0, hold_timeout=2.0, step_timeout=5.0,
                                      resolve_timeout=3.0))


def virtual_compute(rng: random.Random, cost: float = 0.04):
    """Run math inline, after a jittered virtual delay standing for the time it takes.
    (Only training rounds and large models' math come here: a small model's averaging
    math runs on the event loop, so a round costs about one of these.)"""
    async def run(fn):
        await trio.sleep(cost * rng.uniform(0.5, 1.5))
        return fn()
    return run


class Node:
    def __init__(self, cluster: Cluster, peer, index: int) -> None:
        self.cluster = cluster
        self.peer = peer
        self.peer_id = peer.peer_id
        self.index = index
        self.store = None
        self.sync = None
        self.jobs = None
        self._scopes: list[tuple[trio.CancelScope, bool]] = []  # (scope, is the job runner)
        self.dir = cluster.tmp_path / f"node{index}"

    async def start_state(self) -> None:
        self.store, _ = open_state(self.peer.identity, None, now=trio.current_time())
        self.sync = await self._start(lambda task_status: serve_crdt_sync(
            self.peer, self.store, config=self.cluster.sync_config, clock=trio.current_time,
            rng=self.cluster.rng, history_is_new=True, task_status=task_status))
        # a member record with a heartbeat, as every daemon publishes: only live members
        # are sealed into rosters
        await self._start(lambda task_status: serve_heartbeat(
            self.store, {"name": f"node{self.index}"}, interval=5.0, clock=trio.current_time,
            sync=self.sync, task_status=task_status))

    async def start_jobs(self, config: JobsConfig | None = None, *, kinds_factory=None,
                         network=None, **kw) -> None:
        """Start the supervisor; ``kinds_factory(services)`` replaces the built-in kinds;
        ``network`` wraps this peer (e.g. a `GovernedNetwork`)."""
        options = dict(checkpoint_dir=self.dir / "checkpoints", blob_dir=self.dir / "blobs",
                       compute=virtual_compute(random.Random(self.cluster.seed + self.index)),
                       clock=trio.current_time,
                       rng=random.Random(self.cluster.seed + 100 + self.index))
        options.update(kw)
        self.jobs = await self._start(lambda task_status: serve_jobs(
            network or self.peer, self.store, self.sync, config=config or self.cluster.config,
            kinds=kinds_factory, task_status=task_status, **options), jobs=True)

    async def _start(self, fn, jobs: bool = False):
        scope = trio.CancelScope()

        async def run(task_status):
            with scope:
                await fn(task_status)

        self._scopes.append((scope, jobs))
        return await self.cluster.nursery.start(run)

    def stop_jobs(self) -> None:
        """Stop the job runner only (a daemon restart keeps the state store in memory
        here; the checkpoint and blob dirs survive as they would on disk)."""
        for scope, jobs in self._scopes:
            if jobs:
                scope.cancel()
        self._scopes = [(s, j) for s, j in self._scopes if not j]
        self.jobs = None

    def crash(self) -> None:
        """SIGKILL: off the network, every service stops."""
        self.cluster.net.disconnect(self.peer_id)
        for scope, _ in self._scopes:
            scope.cancel()
        self._scopes = []


class Cluster:
    def __init__(self, nursery, tmp_path, seed: int) -> None:
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.seed = seed
        self.net = MemoryNetwork(seed=seed)
        self.rng = random.Random(seed)
        self.sync_config = SyncConfig(anti_entropy_interval=2.0)
        self.config = FAST
        self.nodes: list[Node] = []

    async def add(self, n: int, *, jobs: bool = True, config: JobsConfig | None = None) -> list[Node]:
        out = []
        for _ in range(n):
            peer = self.net.add_peer()
            await self.nursery.start(peer.serve)
            node = Node(self, peer, len(self.nodes))
            await node.start_state()
            self.nodes.append(node)
            out.append(node)
        for node in out:  # a full mesh of sync sessions
            for other in self.nodes:
                if other is not node and other.peer_id > node.peer_id:
                    await node.sync.connect(other.peer_id)
        if jobs:
            for node in out:
                await node.start_jobs(config)
        return out

    async def wait_until(self, predicate, timeout: float = 600.0) -> None:
        """Wait (virtual time) until ``predicate()``, re-checking on every state change."""
        with trio.fail_after(timeout):
            while not predicate():
                changed = trio.Event()
                unsubs = [n.store.subscribe(lambda ev: changed.set()) for n in self.nodes]
                try:
                    with trio.move_on_after(1.0):
                        await changed.wait()
                finally:
                    for u in unsubs:
                        u()


@pytest.fixture
async def cluster(nursery, tmp_path, lattice_seed):
    c = Cluster(nursery, tmp_path, lattice_seed)
    yield c
    nursery.cancel_scope.cancel()


def _small_job(**kw) -> dict:
    spec = dict(task="digits-softmax", min_peers=4, steps=60, batch=32, sync_every=3, seed=3,
                merge_timeout=20.0)
    spec.update(kw)
    return spec


@pytest.fixture
def small_job():
    """``small_job(**overrides)``: a digits-softmax job spec small enough for a component test."""
    return _small_job


@pytest.fixture
def fast_config():
    return FAST
