"""Merge jobs end to end on the in-memory network, in virtual time: the tensors are
divided among the participants, each fetches only the input pieces it merges, the
merger assembles the very model one daemon would have made, a killed participant's
share is merged by the others, a cancel stops everyone, and an input that cannot be
merged fails the job with the tensor's name."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import trio

from lattice.core.jobs import JobSpecError
from lattice.core.mergeshares import plan_shares
from lattice.jobs import MergeConfig
from lattice.jobs.merge import prepare_merge_job
from lattice.learn.merge import MergeInputError
from lattice.learn.mergeengine import PiecesReader, hash_piece, merge_plan, merge_share, merged_manifest
from lattice.learn.mergespec import MergeSpec, MergeSpecError
from lattice.learn.modelfile import canonical_model_bytes, f32_to_bf16, loads_manifest, manifest_id
from lattice.net.modelstore import ModelNotFound

from .conftest import virtual_compute

LAYERS = 6


def _float_model(rng) -> dict:
    """A small Llama-like model: 24 tensors, float32 for now."""
    shapes = {"model.embed_tokens.weight": (96, 32), "lm_head.weight": (96, 32), "model.norm.weight": (32,)}
    for i in range(LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (32, 32)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (64, 32)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (32,)
    return {name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in shapes.items()}


def _stored(arrays: dict) -> dict:
    """As checkpoints are: matrices in BF16, vectors in float32."""
    return {n: (f32_to_bf16(v) if v.ndim == 2 else v) for n, v in arrays.items()}


async def _import(node, tmp_path, arrays, name):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(canonical_model_bytes(arrays, {"format": "pt"}))
    return (await node.jobs.services.models.import_path(str(path), name))["id"]


async def _inputs(node, tmp_path, *, poison: str | None = None, drop: str | None = None):
    """A base and two fine-tunes of it imported on ``node`` (the second with a NaN in
    tensor ``poison`` or without tensor ``drop``); returns their ids."""
    rng = np.random.default_rng(7)
    base = _float_model(rng)
    tunes = [{n: v + np.float32(0.1) * rng.normal(0, 1, v.shape).astype(np.float32) for n, v in base.items()}
             for _ in range(2)]
    if poison is not None:
        tunes[1][poison].reshape(-1)[3] = np.nan
    if drop is not None:
        del tunes[1][drop]
    return [await _import(node, tmp_path, _stored(m), name)
            for m, name in ((base, "base"), (tunes[0], "ft1"), (tunes[1], "ft2"))]


def _readers(node, ids) -> dict:
    store = node.jobs.services.blobs.store
    return {mid: PiecesReader(loads_manifest(store.get(mid)), store.read)
            for mid in dict.fromkeys(ids) if mid is not None}


def _costs(node, spec: dict) -> dict:
    """Bytes read per output tensor: what the participants divide the merge by."""
    readers = list(_readers(node, [spec["base"], *spec["models"]]).values())
    return {n: sum(r.infos()[n].nbytes for r in readers) for n in readers[0].infos()}


def _expected_id(node, spec: MergeSpec) -> str:
    """The model id of the same merge done whole, by the engine, hashing only."""
    readers = _readers(node, [spec.base, *spec.models])
    tensors = merge_share(spec, readers, merge_plan(spec, readers), hash_piece)
    return manifest_id(merged_manifest(spec, tensors))


async def merge_nodes(cluster, n, *, cost=0.5, costs=None, merge=None, merges=None):
    """``n`` daemons (added at once: a full mesh) running merge jobs whose math takes
    ``cost`` virtual seconds a step; ``costs``, ``merges``: one per daemon."""
    merges = merges or [merge or MergeConfig(straggler_min=3.0)] * n
    nodes = await cluster.add(n, jobs=False)
    for node, c, m in zip(nodes, costs or [cost] * n, merges, strict=True):
        compute = virtual_compute(random.Random(cluster.seed + node.index), c)
        await node.start_jobs(dataclasses.replace(cluster.config, merge=m), compute=compute,
                              model_compute=compute)
    return nodes


def _entry(node, job_id, peer):
    return node.jobs.get(job_id)["participants"].get(peer, {})


async def test_four_daemons_divide_a_merge_and_make_the_model_one_daemon_would(
        cluster, autojump_clock, tmp_path):
    *nodes, outsider = await merge_nodes(cluster, 5, merges=[MergeConfig(straggler_min=300.0)] * 4 + [
        MergeConfig(max_bytes=0)])  # nobody is behind; the fifth takes no part
    base, ft1, ft2 = await _inputs(nodes[0], tmp_path)
    request = {"method": "ties", "models": ["ft1", ft2], "base": "base", "parameters": {"density": 0.5},
               "dtype": "bfloat16", "name": "soup", "min_peers": 4}
    spec = await prepare_merge_job(nodes[0].jobs.services.models, request)
    assert spec["models"] == [ft1, ft2] and spec["tensors"] == 3 + 3 * LAYERS
    job_id = nodes[0].jobs.submit(spec)
    with trio.fail_after(600):
        summary = await nodes[0].jobs.wait_job(job_id)
    assert summary["status"] == "done" and summary["kind"] == "merge" and len(summary["roster"]) == 4
    model_id = summary["model"]
    merge = MergeSpec.from_arguments("ties", [ft1, ft2], base=base, density=0.5, dtype="bfloat16")
    assert model_id == _expected_id(nodes[0], merge)
    await cluster.wait_until(lambda: nodes[3].jobs.models().get(model_id, {}).get("job") == job_id)
    record = nodes[3].jobs.models()[model_id]
    assert record["method"] == "ties" and record["inputs"] == [ft1, ft2] and record["base"] == base
    assert record["name"] == "soup" and record["tensors"] == 3 + 3 * LAYERS and record["missing"] == []
    assert set(record["shares"]) == set(summary["roster"])  # every participant merged a part

    # each participant that did not import the models fetched the input pieces of its
    # own tensors and nothing else
    job = nodes[0].jobs.get(job_id)
    merger = record["producer"]
    readers = await nodes[0].jobs.services.models.readers(merge)
    for node in nodes[1:]:
        if node.peer_id == merger:
            continue
        entry = job["participants"][node.peer_id]
        share = await nodes[0].jobs.services.models.manifest(entry["final"]["blob"])
        own = {p for mid, r in readers.items() for n in share.tensors for p in r.manifest.tensors[n].pieces}
        others = {p for mid, r in readers.items() for n in r.manifest.tensors if n not in share.tensors
                  for p in r.manifest.tensors[n].pieces}
        held = set(node.jobs.services.blobs.store.ids())
        assert own <= held and not others & held, node.index
        assert entry["bytes_received"] == sum(node.jobs.services.blobs.store.size(p) for p in own)

    # anyone can recompute it: a daemon that took no part verifies every byte
    await cluster.wait_until(lambda: model_id in outsider.jobs.models())  # its producer: the merger
    verdict = await outsider.jobs.services.models.verify(model_id)
    assert verdict["matches"] and verdict["checked"] == 3 + 3 * LAYERS


async def test_a_killed_participants_share_is_merged_by_the_others(cluster, autojump_clock, tmp_path):
    nodes = await merge_nodes(cluster, 4, cost=1.0)
    base, ft1, ft2 = await _inputs(nodes[0], tmp_path)
    spec = await prepare_merge_job(nodes[0].jobs.services.models, {
        "method": "dare_ties", "models": [ft1, ft2], "base": base,
        "parameters": {"density": 0.5, "seed": 3}, "min_peers": 4})
    job_id = nodes[0].jobs.submit(spec)
    await cluster.wait_until(lambda: len(nodes[0].jobs.get(job_id)["roster"]) == 4)
    roster = nodes[0].jobs.get(job_id)["roster"]
    victim = next(n for n in nodes if n.peer_id in roster[1:] and n is not nodes[0])
    killed = trio.Event()

    def kill_after_two_tensors(event):
        if not killed.is_set() and _entry(nodes[0], job_id, victim.peer_id).get("steps", 0) >= 2:
            killed.set()
            victim.crash()

    nodes[0].store.subscribe(kill_after_two_tensors)
    with trio.fail_after(900):
        summary = await nodes[0].jobs.wait_job(job_id)
    assert killed.is_set() and summary["status"] == "done"
    merge = MergeSpec.from_arguments("dare_ties", [ft1, ft2], base=base, density=0.5, seed=3)
    assert summary["model"] == _expected_id(nodes[0], merge)
    record = nodes[0].jobs.models()[summary["model"]]
    assert victim.peer_id not in record["shares"] and victim.peer_id in record["missing"]
    survivors = [p for p in roster if p != victim.peer_id]
    entries = nodes[0].jobs.get(job_id)["participants"]
    assert sum(entries[p].get("helped", 0) for p in survivors) >= 4  # the victim's share: ~6 tensors
    assert sum(record["shares"].values()) == 3 + 3 * LAYERS


async def test_a_slow_participant_does_not_hold_the_job_up(cluster, autojump_clock, tmp_path):
    # one daemon holds the models and takes no part; of the three that merge, one is alive
    # and answering but its math is four times slower
    holder, *nodes = await merge_nodes(cluster, 4, costs=[1.0, 1.0, 1.0, 4.0], merges=[
        MergeConfig(max_bytes=0)] + [MergeConfig(straggler_min=3.0)] * 3)
    slow = nodes[2]
    base, ft1, ft2 = await _inputs(holder, tmp_path)
    spec = await prepare_merge_job(holder.jobs.services.models, {
        "method": "task_arithmetic", "models": [ft1, ft2], "base": base, "min_peers": 3})
    job_id = holder.jobs.submit(spec)
    with trio.fail_after(900):
        summary = await holder.jobs.wait_job(job_id)
    assert summary["status"] == "done" and slow.peer_id in summary["roster"]
    assert summary["model"] == _expected_id(holder, MergeSpec.from_arguments(
        "task_arithmetic", [ft1, ft2], base=base))
    entries = holder.jobs.get(job_id)["participants"]
    assert sum(entries[n.peer_id].get("helped", 0) for n in nodes[:2]) >= 1
    # the model was made while the slow one was still at its own share
    share = plan_shares(_costs(holder, spec), summary["roster"])[slow.peer_id]
    assert 1 <= entries[slow.peer_id]["steps"] < len(share) and "final" not in entries[slow.peer_id]
    record = holder.jobs.models()[summary["model"]]
    assert sum(record["shares"].values()) == 3 + 3 * LAYERS


async def test_a_restarted_participant_goes_on_from_its_last_share(cluster, autojump_clock, tmp_path):
    nodes = await merge_nodes(cluster, 3, cost=1.0, merge=MergeConfig(straggler_min=300.0))
    base, ft1, ft2 = await _inputs(nodes[0], tmp_path)
    spec = await prepare_merge_job(nodes[0].jobs.services.models, {
        "method": "ties", "models": [ft1, ft2], "base": base, "min_peers": 3})
    job_id = nodes[0].jobs.submit(spec)
    node = nodes[2]
    await cluster.wait_until(lambda: _entry(nodes[0], job_id, node.peer_id).get("steps", 0) >= 3)
    before = _entry(node, job_id, node.peer_id)["steps"]
    node.stop_jobs()
    await trio.sleep(1.0)
    compute = virtual_compute(random.Random(9), 1.0)
    await node.start_jobs(dataclasses.replace(cluster.config, merge=MergeConfig(straggler_min=300.0)),
                          compute=compute, model_compute=compute)
    with trio.fail_after(600):
        summary = await nodes[0].jobs.wait_job(job_id)
    assert summary["status"] == "done"
    assert summary["model"] == _expected_id(nodes[0], MergeSpec.from_arguments("ties", [ft1, ft2], base=base))
    entry = _entry(nodes[0], job_id, node.peer_id)
    assert entry["resumed"] == 1 and entry["final"]["samples"] == len(
        plan_shares(_costs(nodes[0], spec), summary["roster"])[node.peer_id])
    # what it had merged and said before the restart was kept, not merged again
    assert node.jobs.statistics()["kinds"]["merge"]["tensors_merged"] == entry["final"]["samples"] - before


async def test_cancel_stops_every_participant(cluster, autojump_clock, tmp_path):
    nodes = await merge_nodes(cluster, 3, cost=1.0)
    base, ft1, ft2 = await _inputs(nodes[0], tmp_path)
    spec = await prepare_merge_job(nodes[0].jobs.services.models, {
        "method": "ties", "models": [ft1, ft2], "base": base, "min_peers": 3})
    job_id = nodes[0].jobs.submit(spec)
    await cluster.wait_until(lambda: any(e.get("steps", 0) >= 1 for e in nodes[0].jobs.get(job_id)[
        "participants"].values()))
    assert nodes[0].jobs.cancel(job_id)
    await cluster.wait_until(lambda: all(
        {e.get("state") for e in n.jobs.get(job_id)["participants"].values()} == {"left"} for n in nodes))
    for n in nodes:
        job = n.jobs.get(job_id)
        assert job["status"] == "cancelled" and job["model"] is None
        assert all(e["reason"] == "cancelled" for e in job["participants"].values())
        assert n.jobs.statistics()["running"] == {}


@pytest.mark.parametrize("trouble,tensor,why", [
    ("poison", "model.layers.3.mlp.up_proj.weight", "non-finite"),
    ("drop", "model.layers.2.input_layernorm.weight", "missing"),
])
async def test_an_input_that_cannot_be_merged_fails_the_job_with_the_tensors_name(
        cluster, autojump_clock, tmp_path, trouble, tensor, why):
    nodes = await merge_nodes(cluster, 3)
    base, ft1, ft2 = await _inputs(nodes[0], tmp_path, **{trouble: tensor})
    request = {"method": "ties", "models": [ft1, ft2], "base": base, "min_peers": 3}
    models = nodes[0].jobs.services.models
    if trouble == "drop":  # found from the manifests: the submitting daemon refuses it at once...
        with pytest.raises(MergeInputError, match=f"'{tensor}': missing"):
            await prepare_merge_job(models, request)
        # ... and a job made elsewhere without that check fails on every participant
        spec = {**await prepare_merge_job(models, {**request, "models": [ft1, ft1]}), "models": [ft1, ft2]}
    else:  # found only while merging
        spec = await prepare_merge_job(models, request)
    job_id = nodes[0].jobs.submit(spec)
    with trio.fail_after(600):
        summary = await nodes[0].jobs.wait_job(job_id)
    assert summary["status"] == "failed" and summary["model"] is None
    assert tensor in summary["reason"] and why in summary["reason"]
    entries = nodes[0].jobs.get(job_id)["participants"]
    assert {e["state"] for e in entries.values()} == {"failed"}
    assert all(tensor in e["reason"] for e in entries.values())
    # each found it, or checked the claim of one that did before giving up
    assert [n.jobs.statistics()["kinds"]["merge"]["inputs_failed"] for n in nodes] == [1, 1, 1]


async def test_one_volunteer_merges_alone_and_a_daemon_over_its_limit_stays_out(
        cluster, autojump_clock, tmp_path):
    alone, small = await merge_nodes(cluster, 2, merges=[MergeConfig(), MergeConfig(max_bytes=1024)])
    _base, ft1, ft2 = await _inputs(alone, tmp_path)
    spec = await prepare_merge_job(alone.jobs.services.models, {
        "method": "linear", "models": [ft1, ft2], "parameters": {"weight": 0.5}, "join_window": 2.0})
    job_id = alone.jobs.submit(spec)
    with trio.fail_after(300):
        summary = await alone.jobs.wait_job(job_id)
    assert summary["status"] == "done" and summary["roster"] == [alone.peer_id]
    assert small.peer_id not in summary["peers"]
    assert summary["model"] == _expected_id(alone, MergeSpec.from_arguments("linear", [ft1, ft2], weight=0.5))
    assert small.jobs.statistics()["kinds"]["merge"]["max_bytes"] == 1024


async def test_bad_merge_specs_are_refused_by_name(cluster, autojump_clock, tmp_path):
    (node,) = await merge_nodes(cluster, 1)
    base, ft1, _ft2 = await _inputs(node, tmp_path)
    spec = await prepare_merge_job(node.jobs.services.models,
                                   {"method": "ties", "models": [ft1], "base": base})
    with pytest.raises(JobSpecError, match=r"merge: .*needs a base model"):
        node.jobs.submit({**spec, "base": None})
    with pytest.raises(JobSpecError, match=r"merge: parameter 'gamma' is not a parameter of ties"):
        node.jobs.submit({**spec, "parameters": {"gamma": 0.1}})
    with pytest.raises(JobSpecError, match="wibble: unknown field"):
        node.jobs.submit({**spec, "wibble": 1})
    # a range is checked for every tensor before the job exists (gradients differ by layer)
    with pytest.raises(MergeSpecError, match=r"tensor 'model.layers.5.*density = 0.0 must be in \(0, 1\]"):
        await prepare_merge_job(node.jobs.services.models, {
            "method": "ties", "models": [ft1], "base": base, "parameters": {"density": [1.0, 0.0]}})


async def test_a_mergekit_config_with_names_asks_for_the_same_job_as_ids(
        cluster, autojump_clock, tmp_path):
    (node,) = await merge_nodes(cluster, 1)
    base, ft1, ft2 = await _inputs(node, tmp_path)
    models = node.jobs.services.models
    config = ("models:\n  - model: base\n  - model: ft1\n    parameters: {weight: 1.0}\n"
              "  - model: ft2\n    parameters: {weight: 0.5}\n"
              "merge_method: ties\nbase_model: base\nparameters: {density: 0.5}\ndtype: bfloat16\n")
    from_config = await prepare_merge_job(models, {"kind": "merge", "config": config, "min_peers": 2})
    from_ids = await prepare_merge_job(models, {"kind": "merge", "method": "ties", "base": base,
                                                "models": [ft1, ft2], "weights": [1, 0.5],
                                                "parameters": {"density": 0.5}, "dtype": "bf16",
                                                "min_peers": 2})
    assert from_config == from_ids and from_config["min_peers"] == 2
    for bad, match in [({"config": config, "method": "ties"}, "config replaces method"),
                       ({"config": 3}, "config must be the text"),
                       ({"method": "ties", "models": ["ft1", "nope"], "base": "base"},
                        "no model named 'nope'")]:
        with pytest.raises((MergeSpecError, ModelNotFound), match=match):
            await prepare_merge_job(models, {"kind": "merge", **bad})
