"""Issue 11, item 4: a participant of a train job publishes a final model whose blob hash
is right but whose safetensors header is hostile (deeply nested JSON, an integer of
thousands of digits, a zero dimension). The honest merger must reject it with a typed
error, keep running, and finish the job without that participant.

Two real daemons (subprocesses) and one hostile participant in this process: a real
libp2p host, state sync and job runner (so it speaks every protocol correctly), except
that the canonical bytes of its final model are replaced. Its peer id is chosen to sort
last, so it is never the expected merger: an honest daemon merges.
"""

from __future__ import annotations

import functools
import struct
import time

import pytest
import trio

import lattice.jobs.train as jobs_mod
from lattice.core.identity import Identity
from lattice.jobs import JobsConfig, serve_jobs
from lattice.net import crdt_sync
from lattice.net.host import open_libp2p_node
from lattice.testing.daemons import DaemonProc, wait_for

pytestmark = pytest.mark.integration


def _raw(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


# each small enough to pass the merger's size bound for the task (4 bytes per parameter
# plus 64 KiB), so it reaches the parser
HOSTILE_FINALS = {
    "deep_json": _raw(b'{"params":' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
    "long_integer": _raw(b'{"params":{"dtype":"F32","shape":[' + b"7" * 6000 + b'],"data_offsets":[0,0]}}'),
    "zero_dimension": _raw(b'{"params":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'),
}


def _identity_sorting_after(peers: list[str]) -> Identity:
    while True:
        identity = Identity.generate()
        if identity.peer_id > max(peers):
            return identity


async def _hostile_participant(identity: Identity, peers: list[str], final: bytes, *, task_status) -> None:
    """A participant whose final model is ``final`` (it is what its runner publishes)."""
    real = jobs_mod.canonical_model_bytes

    def canonical(arrays, meta=None):
        # only the participant's own final model (its metadata names the peer) is replaced
        return final if meta is not None and "peer" in meta else real(arrays, meta)

    store, _ = crdt_sync.open_state(identity, None, now=time.time())
    async with open_libp2p_node(identity, ["/ip4/127.0.0.1/tcp/0"]) as node:
        async with trio.open_nursery() as nursery:
            sync = await nursery.start(functools.partial(crdt_sync.serve_crdt_sync, node, store,
                                                         history_is_new=True))
            nursery.start_soon(functools.partial(
                crdt_sync.serve_heartbeat, store,
                {"name": "hostile", "version": "0", "capabilities": {"cpus": 1, "tasks": ["digits-softmax"]}},
                interval=1.0, sync=sync))
            jobs_mod.canonical_model_bytes = canonical
            try:
                await nursery.start(functools.partial(serve_jobs, node, store, sync,
                                                      config=JobsConfig(accept_tasks=("digits-softmax",))))
                for addr in peers:  # whichever daemon merges must reach us to fetch the final
                    await node.connect(addr)
                task_status.started(node.peer_id)
                await trio.sleep_forever()
            finally:
                jobs_mod.canonical_model_bytes = real


def _blocking(fn, *args):
    return trio.to_thread.run_sync(functools.partial(fn, *args))


@pytest.mark.parametrize("variant", sorted(HOSTILE_FINALS))
async def test_a_hostile_final_model_is_skipped_and_the_job_finishes(tmp_path, variant):
    honest = [DaemonProc(tmp_path / f"d{i}") for i in range(2)]
    try:
        for d in honest:
            d.start()
        for d in honest:
            await _blocking(d.wait_running)
        peers = [await _blocking(d.peer_id) for d in honest]
        addrs = [await _blocking(d.addr) for d in honest]

        def connect_1_to_0() -> None:
            with honest[1].client() as c:
                c.connect_peer(addrs[0])

        await _blocking(connect_1_to_0)
        identity = _identity_sorting_after(peers)
        async with trio.open_nursery() as nursery:
            hostile = await nursery.start(_hostile_participant, identity, addrs, HOSTILE_FINALS[variant])

            def run_job() -> tuple[dict, dict, dict[str, dict]]:
                with honest[0].client() as c:
                    wait_for(lambda: sum(1 for m in c.members().values() if m.get("alive")) >= 3, 60,
                             "three live members", interval=0.1)
                    job_id = c.submit_job({"task": "digits-softmax", "min_peers": 3, "steps": 20,
                                           "algorithm": "none", "seed": 3})["job_id"]
                    job = wait_for(lambda: (j := c.job(job_id))["status"] in ("done", "failed") and j, 240,
                                   "the job to end", interval=0.2)
                    models = c.models()
                stats = {}
                for d, peer in zip(honest, peers):
                    with d.client() as other:
                        stats[peer] = other.jobs_stats()
                return job, models, stats

            job, models, stats = await trio.to_thread.run_sync(run_job)
            nursery.cancel_scope.cancel()
        assert hostile in job["roster"]
        assert job["status"] == "done", job
        record = models[job["model"]]
        assert record["missing"] == [hostile]  # merged without it
        assert {u["peer"] for u in record["inputs"]} == set(peers)
        for d in honest:
            assert d.proc.poll() is None, d.log_text()  # nobody crashed
        assert stats[record["producer"]].get("final_rejected", 0) >= 1  # by the parser
    finally:
        for d in honest:
            d.stop()
