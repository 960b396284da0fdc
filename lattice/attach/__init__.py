"""Attach your own training loop to a job: the numpy twin (`lattice.torch` is a thin
layer over it).

    import lattice, lattice.attach
    with lattice.connect() as client:
        job = client.submit_job({"kind": "attach", "min_peers": 4, "sync_every": 50})
        with lattice.attach.attach(client, job, {"w": w0, "b": b0}) as loop:
            for x, y in batches:
                g = grad(loop.arrays, x, y)          # arrays live in shared memory
                for k in g: loop.arrays[k] -= lr * g[k]
                loop.step(samples=len(x))            # averages every sync_every steps
        print(loop.result.model_id)

The parameters cross to the daemon through a sealed memfd passed over the socket; the
RPC calls carry only names, dtypes, shapes and counters (proto/attach.md). Must not
import trio or the daemon.
"""

from lattice.attach._loop import AttachedLoop as AttachedLoop
from lattice.attach._loop import DaemonLost as DaemonLost
from lattice.attach._loop import Result as Result
from lattice.attach._loop import SyncReport as SyncReport
from lattice.attach._loop import attach as attach
from lattice.attach._loop import job_id_of as job_id_of

__all__ = ["AttachedLoop", "DaemonLost", "Result", "SyncReport", "attach", "job_id_of"]
