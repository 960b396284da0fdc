"""The ``train`` job kind: decentralized SGD on a built-in or plugin task.

A participant (`lattice.learn.participant`) trains on its own partition in rounds (off
the event loop): the local steps up to the next average of the spec's communication
schedule, which the learning ring computes. After each round it averages pairwise and
atomically with a random live participant over `/lattice/gossip-avg/2`. At the end it
publishes its final parameters; the merger averages the finals, weighted by
`lattice.learn.participant.merge_weights` (exactly `lattice.learn.simulate.final_merge`'s
rule, the in-process reference), evaluates the result on the task's test split and
records it. Spec: `lattice.core.jobs.TrainSpec`, proto/jobs.md.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

import numpy as np
import trio

from lattice.core.codec import canonical
from lattice.core.jobs import TrainSpec, parse_train_spec
from lattice.jobs.kind import (
    INLINE_EVAL_WORK,
    Contribution,
    Input,
    KindRefused,
    Result,
    RunContext,
    Services,
    math_compute,
)
from lattice.jobs.supervisor import Run
from lattice.learn.merge import ModelFormatError, canonical_model_bytes, loads_safetensors, weighted_average
from lattice.learn.participant import (
    Participant,
    job_partition,
    make_participant,
    merge_weights,
    participant_round,
)
from lattice.learn.tasks import DatasetsUnavailable, Task, TaskError, get_task
from lattice.learn.validate import NormBound
from lattice.net.blob import BlobNotFound, blob_id
from lattice.net.gossip_avg import AveragingParty, compute_inline

log = logging.getLogger("lattice.jobs.train")

FINAL_TENSOR = "params"
FETCH_CONCURRENCY = 8  # participants' final models the merger fetches at once
# float32 copies of the parameters one participant holds at most: the parameters, the
# momentum, a gradient, the channel's estimate and error feedback, the outer
# optimizer's anchor and momentum, and one averaging payload (the peer's)
PARAM_COPIES = 8


def memory_estimate(task: Task) -> int:
    """Bytes one participant of ``task`` needs: its parameter copies and its data."""
    x, y = task.train_data()
    return 4 * task.num_params * PARAM_COPIES + int(x.nbytes) + int(y.nbytes)


def merge_finals(task: Task, job_id: str, finals: list[tuple[int, np.ndarray, int]]
                 ) -> tuple[np.ndarray, str, bytes]:
    """(merged params, model id, canonical model bytes) from (rank, params, weight),
    weight from `lattice.learn.participant.merge_weights`.

    Exactly `lattice.learn.simulate.final_merge`'s rule (weighted, inputs in rank
    order, id over the task's named blocks) with the job id in the metadata, so two
    jobs never share a model id by accident."""
    ordered = sorted(finals, key=lambda f: f[0])
    merged = weighted_average([f[1] for f in ordered], [f[2] for f in ordered])
    data = canonical_model_bytes(task.unflatten(merged), {"task": task.name, "job": job_id})
    return merged, blob_id(data), data


class TrainKind:
    """The train kind (see the module docstring)."""

    name = "train"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.config = services.config
        self._tasks: dict[bytes, Task] = {}
        self.counts: Counter[str] = Counter()

    def parse_spec(self, raw: Any) -> TrainSpec:
        return parse_train_spec(raw)

    def volunteers(self, job_id: str, spec: TrainSpec) -> bool:
        return spec.task in self.config.accept_tasks

    def statistics(self) -> dict[str, Any]:
        return {"accept_tasks": list(self.config.accept_tasks), "tasks_loaded": len(self._tasks)}

    # -- a participant ---------------------------------------------------------------------
    async def participate(self, run: Run, ctx: RunContext) -> Contribution | None:
        spec: TrainSpec = run.spec
        compute = self.services.compute
        lspec = _for_roster(spec, run.roster)
        try:
            task = await self._task(spec)
            if task.num_params > self.config.max_params:
                raise TaskError(f"{task.num_params} parameters exceed this daemon's limit of "
                                f"{self.config.max_params}")
            ctx.reserve_memory(memory_estimate(task))  # OverLimit over the volunteer's cap
            participant: Participant = await compute(
                lambda: make_participant(lspec, task, run.rank))
        except (TaskError, DatasetsUnavailable, ValueError) as e:
            raise KindRefused(f"task: {e}") from None
        party = AveragingParty(run.job_id, self.services.network.peer_id, run.roster,
                               participant, weighting=spec.weighting,
                               bound=NormBound(factor=spec.norm_factor), compute=compute,
                               math=math_compute(compute, task.num_params))
        if ctx.checkpoint is not None:
            arrays, meta = ctx.checkpoint
            await compute(lambda: _restore(participant, arrays, meta))
            run.resumed_from = int(participant.trainer.step)
            party.bytes_sent = int(meta.get("bytes_sent", 0))
            party.bytes_received = int(meta.get("bytes_received", 0))
            party.stats["exchanges"] = int(meta.get("exchanges", 0))
        gossip = self.services.gossip
        gossip.register(party)
        ctx.on_close(lambda: gossip.unregister(run.job_id))
        await self._train(run, ctx, party, lspec, task)
        party.close()
        await party.wait_idle()  # an exchange accepted before we closed commits first
        trainer = participant.trainer
        data = await compute(lambda: canonical_model_bytes(
            {FINAL_TENSOR: trainer.params},
            {"job": run.job_id, "peer": self.services.network.peer_id, "rank": str(run.rank),
             "samples": str(trainer.samples_seen), "task": task.name}))
        final = Contribution(await self.services.blobs.put(data), int(trainer.samples_seen))
        await self._checkpoint(ctx, party, final=final)
        await self._report(run, ctx, party, task, force=True)
        return final

    async def _task(self, spec: TrainSpec) -> Task:
        key = canonical([spec.task, dict(spec.task_options)])
        task = self._tasks.get(key)
        if task is None:
            allowed = self.config.allowed_plugins
            task = await self.services.compute(
                lambda: _loaded(get_task(spec.task, allowed, **dict(spec.task_options))))
            self._tasks[key] = task
        return task

    async def _train(self, run: Run, ctx: RunContext, party: AveragingParty, lspec: TrainSpec,
                     task: Task) -> None:
        trainer = party.participant.trainer
        await self._report(run, ctx, party, task, force=True)
        log.info("job=%s rank=%d/%d training from step %d", run.job_id, run.rank,
                 len(run.roster), trainer.step)
        averaging = lspec.algorithm != "none" and len(run.roster) > 1
        loss = run.progress.get("loss")
        while trainer.step < lspec.steps:  # a round: up to the schedule's next average
            losses = await party.train(lambda: participant_round(party.participant, lspec))
            run.round += 1
            if losses:
                loss = float(np.mean(losses))
            if averaging:
                await self.services.gossip.average_once(
                    party, ctx.candidates, patience=self.config.sync_patience,
                    rng=self.services.rng)
            await self._report(run, ctx, party, task, loss=loss)
            every = self.config.checkpoint_every
            if every and run.round % every == 0:
                await self._checkpoint(ctx, party)

    async def _report(self, run: Run, ctx: RunContext, party: AveragingParty, task: Task, *,
                      force: bool = False, **extra: Any) -> None:
        trainer = party.participant.trainer
        progress: dict[str, Any] = {
            "round": run.round, "steps": int(trainer.step), "samples": int(trainer.samples_seen),
            "bytes_sent": party.bytes_sent, "bytes_received": party.bytes_received,
            "exchanges": int(party.stats["exchanges"]), "peers": len(party.partners),
            "skipped": int(party.stats["skipped"]), **extra}
        if force or ctx.due():
            params = trainer.params
            X, y = task.test_data()
            evaluate = compute_inline if task.num_params * len(y) <= INLINE_EVAL_WORK \
                else self.services.compute
            metrics = await evaluate(lambda: task.evaluate(params, X, y))
            progress["accuracy"] = float(metrics["accuracy"])
        await ctx.report(force=force, **progress)

    async def _checkpoint(self, ctx: RunContext, party: AveragingParty, *,
                          final: Contribution | None = None) -> None:
        p = party.participant
        meta = {"bytes_sent": party.bytes_sent, "bytes_received": party.bytes_received,
                "exchanges": int(party.stats["exchanges"])}
        async with party.exclusive("checkpoint"):
            arrays, trainer_meta = await self.services.compute(lambda: _snapshot(p))
        await ctx.save_checkpoint(arrays, {**meta, "trainer": trainer_meta}, final=final)

    # -- the merger --------------------------------------------------------------------------
    async def produce(self, run: Run, ctx: RunContext, inputs: list[Input]) -> Result | None:
        spec: TrainSpec = run.spec
        task = await self._task(spec)
        # fetched a few at once: one after another, a 48-participant merge waited out
        # 48 round trips to as many peers
        fetched: list[np.ndarray | None] = [None] * len(inputs)
        limit = trio.CapacityLimiter(FETCH_CONCURRENCY)

        async def fetch(i: int, inp: Input) -> None:
            async with limit:
                fetched[i] = await self._final_params(run, inp, task)

        async with trio.open_nursery() as nursery:
            for i, inp in enumerate(inputs):
                nursery.start_soon(fetch, i, inp)
        found: list[tuple[int, np.ndarray, int]] = []
        used: list[Input] = []
        for inp, params in zip(inputs, fetched):
            if params is not None:
                found.append((inp.rank, params, inp.weight))
                used.append(inp)
        if not found:
            return None
        compute = self.services.compute
        lspec = _for_roster(spec, run.roster)
        sizes = await compute(lambda: [len(p) for p in job_partition(lspec, task)]
                              ) if spec.weighting == "data" else []
        weights = merge_weights(spec.weighting, [(rank, samples) for rank, _, samples in found], sizes)
        finals = [(rank, params, w) for (rank, params, _), w in zip(found, weights)]
        merged, mid, data = await compute(lambda: merge_finals(task, run.job_id, finals))
        metrics = await compute(lambda: task.evaluate(merged, *task.test_data()))
        stored = await self.services.blobs.put(data)
        assert stored == mid, "the model id is the SHA-256 of its canonical bytes"
        missing = len(run.roster) - len(used)
        return Result(mid, len(data), used, {
            "task": task.name,
            "metrics": {"accuracy": metrics["accuracy"], "loss": metrics["loss"],
                        "participants": len(used), "missing": missing,
                        "samples": sum(u.weight for u in used)}})

    async def _final_params(self, run: Run, inp: Input, task: Task) -> np.ndarray | None:
        """A participant's final parameters from its blob, checked; None if unavailable."""
        try:
            data = await self.services.blobs.fetch(
                inp.blob, hints=[inp.peer], timeout=self.config.fetch_timeout,
                max_bytes=4 * task.num_params + (64 << 10))
        except BlobNotFound:
            log.warning("job=%s peer=%s final model %s not delivered: merging without it",
                        run.job_id, inp.peer, inp.blob[:12])
            run.dead.add(inp.peer)
            return None
        try:
            arrays, meta = loads_safetensors(data)
            params = arrays.get(FINAL_TENSOR)
            if (set(arrays) != {FINAL_TENSOR} or params is None or params.dtype != np.float32
                    or params.shape != (task.num_params,) or not np.isfinite(params).all()
                    or meta.get("job") != run.job_id or meta.get("samples") != str(inp.weight)):
                raise ModelFormatError("not this job's final model")
        except ModelFormatError as e:
            log.warning("job=%s peer=%s final model rejected: %s", run.job_id, inp.peer, e)
            self.counts["final_rejected"] += 1
            return None
        return params


def _for_roster(spec: TrainSpec, roster: list[str]) -> TrainSpec:
    """The spec as the learning ring sees it: the sealed roster's size is the number of
    participants the partition splits the data into (a roster may be shorter than
    ``min_peers``; `lattice.core.jobs.read_job` bounds it)."""
    if len(roster) == spec.participants:
        return spec
    return dataclasses.replace(spec, min_peers=len(roster))


def _snapshot(p: Participant) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, tmeta = p.trainer.state()
    out = {f"trainer.{k}": v for k, v in arrays.items()}
    out.update({f"channel.{k}": v for k, v in p.channel.state().items()})
    if p.outer is not None:
        out.update({f"outer.{k}": v for k, v in p.outer.state().items()})
    return out, dict(tmeta)


def _restore(p: Participant, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    def pick(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    p.trainer.load_state(pick("trainer."), meta.get("trainer", {}))
    p.channel.load_state(pick("channel."))
    if p.outer is not None:
        p.outer.load_state(pick("outer."))


def _loaded(task: Task) -> Task:
    task.train_data()  # load (and cache) the dataset here, off the event loop
    return task
