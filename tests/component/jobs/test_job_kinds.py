"""The supervisor runs any kind through one interface: a toy kind registered for these
nodes only goes through volunteering, the roster, participation, the merge phase and
the model record exactly as `train` does, and the supervisor enforces the participant
state machine where it writes."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pytest
import trio

from lattice.core.jobs import IllegalTransition, JobSpecError
from lattice.core.jobs.spec import Fields, FloatBound, parse_fields
from lattice.jobs import Contribution, Input, KindRefused, Result
from lattice.learn.merge import canonical_model_bytes, loads_safetensors
from lattice.net.blob import blob_id


@dataclass(frozen=True)
class CountSpec:
    """Each participant counts to ``target`` and contributes its count; the result is
    the sum."""

    target: int = 3
    min_peers: int = 1
    max_peers: int = 3
    merge_timeout: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS = Fields(ints={"target": (0, 1000), "min_peers": (1, 8), "max_peers": (1, 8)},
                floats={"merge_timeout": FloatBound(1.0, 100.0)})


class CountKind:
    name = "count"

    def __init__(self, services, *, refuse: bool = False) -> None:
        self.services = services
        self.refuse = refuse
        self.counts = Counter()

    def parse_spec(self, raw: Any) -> CountSpec:
        spec = CountSpec(**parse_fields(raw, self.name, FIELDS))
        if spec.min_peers > spec.max_peers:
            raise JobSpecError("min_peers", "must not exceed max_peers")
        return spec

    def volunteers(self, job_id: str, spec: CountSpec) -> bool:
        return True

    def statistics(self) -> dict[str, Any]:
        return {}

    async def participate(self, run, ctx) -> Contribution | None:
        if self.refuse:
            raise KindRefused("not on this machine")
        for i in range(run.spec.target):
            await trio.sleep(0.1)
            await ctx.report(steps=i + 1)
        data = canonical_model_bytes({"count": np.array([run.spec.target], np.int64)},
                                     {"peer": self.services.network.peer_id})
        return Contribution(await self.services.blobs.put(data), run.spec.target)

    async def produce(self, run, ctx, inputs: list[Input]) -> Result | None:
        total = 0
        for inp in inputs:
            arrays, _ = loads_safetensors(await self.services.blobs.fetch(inp.blob, hints=[inp.peer]))
            total += int(arrays["count"][0])
        data = canonical_model_bytes({"sum": np.array([total], np.int64)}, {"job": run.job_id})
        assert await self.services.blobs.put(data) == blob_id(data)
        return Result(blob_id(data), len(data), inputs, {"sum": total})


async def count_nodes(cluster, n, **kind_kw):
    nodes = await cluster.add(n, jobs=False)
    for node in nodes:
        await node.start_jobs(kinds_factory=lambda services: {
            "count": CountKind(services, **kind_kw)})
    return nodes


async def test_a_new_kind_runs_end_to_end_through_the_supervisor(cluster, autojump_clock):
    nodes = await count_nodes(cluster, 3)
    job_id = nodes[0].jobs.submit({"kind": "count", "target": 4, "min_peers": 3})
    with trio.fail_after(120):
        summary = await nodes[0].jobs.wait_job(job_id)
    assert summary["status"] == "done" and summary["kind"] == "count"
    await cluster.wait_until(lambda: nodes[2].store.jobs()[job_id]["status"] == "done")
    (record,) = [r for r in nodes[2].jobs.models().values() if r.get("job") == job_id]
    assert record["kind"] == "count" and record["sum"] == 12 and record["missing"] == []
    # the others see the model and finish too
    await cluster.wait_until(lambda: {e["state"] for e in nodes[1].jobs.get(job_id)[
        "participants"].values()} == {"done"})
    entries = nodes[1].jobs.get(job_id)["participants"]
    assert all(e["steps"] == 4 for e in entries.values())


async def test_unknown_kinds_and_bad_specs_are_refused_by_name(cluster, autojump_clock):
    (node,) = await count_nodes(cluster, 1)
    with pytest.raises(JobSpecError, match="unknown job kind 'nope'"):
        node.jobs.submit({"kind": "nope"})
    with pytest.raises(JobSpecError, match="target"):
        node.jobs.submit({"kind": "count", "target": -1})
    with pytest.raises(JobSpecError, match="wibble: unknown field"):
        node.jobs.submit({"kind": "count", "wibble": 1})


async def test_a_kind_that_refuses_fails_our_participation_not_the_job(cluster, autojump_clock):
    nodes = await count_nodes(cluster, 1, refuse=True)
    job_id = nodes[0].jobs.submit({"kind": "count", "min_peers": 1, "max_peers": 1})
    await cluster.wait_until(lambda: nodes[0].jobs.get(job_id)["participants"].get(
        nodes[0].peer_id, {}).get("state") == "failed")
    entry = nodes[0].jobs.get(job_id)["participants"][nodes[0].peer_id]
    assert entry["reason"] == "not on this machine"


async def test_the_supervisor_refuses_an_illegal_participant_transition(cluster, autojump_clock):
    (node,) = await count_nodes(cluster, 1)
    job_id = node.jobs.submit({"kind": "count", "min_peers": 1, "max_peers": 1, "target": 1})
    with trio.fail_after(60):
        await node.jobs.wait_job(job_id)
    with pytest.raises(IllegalTransition):  # our own bug, caught where it is written
        node.jobs._write_entry(job_id, "done", {"peer_id": node.peer_id, "state": "running"})
