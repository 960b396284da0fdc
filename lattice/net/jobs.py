"""Train jobs over a `PeerNetwork`: the runner (`serve_jobs`) and the handle it gives back
(`JobsService`: submit, list, get, cancel, watch, fetch models, statistics).

Owns the I/O of a train job: watching the job board in the replicated state, joining
jobs this daemon accepts, sealing the roster of jobs it submitted, running a
participant (local rounds off the event loop, a pairwise average with one random live
participant after each round over `/lattice/gossip-avg/1`, progress to its
participation entry at a bounded rate, checkpoints), publishing its final model as a
blob, and the final merge. The decisions are `lattice.core.jobs`' (pure); the math is
`lattice.learn`'s: `make_participant`, `participant_round` and the merge rule of
`simulate.final_merge` (the in-process reference this runner must match). Formats:
proto/jobs.md. Must not import libp2p.

Failure policy. A peer that vanishes only costs the exchanges with it (they abort and
the next round picks someone else) and, if it never publishes its final model, a wait
of ``merge_timeout`` before the merge goes ahead without it (it is listed as missing).
A job whose task this daemon cannot build fails *our* participation (state ``failed``,
with the reason), not the job. A daemon stopped mid-job keeps its entry ``running``;
restarted with the same checkpoint dir it resumes from the last checkpoint, and without
one it leaves the job and says so. Local state errors and bugs propagate.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from lattice.core.codec import canonical
from lattice.core.jobs import (
    BUILTIN_TASKS,
    TERMINAL,
    ClaimFailed,
    Join,
    JobSpecError,
    Policy,
    SealRoster,
    Start,
    Stop,
    TrainSpec,
    Withdraw,
    job_summary,
    merge_decision,
    new_job_record,
    parse_train_spec,
    plan,
    read_job,
)
from lattice.core.state import LocalStateError, Set, StateStore
from lattice.learn.simulate import JobSpec as LearnSpec
from lattice.learn.simulate import Participant, make_participant, participant_round
from lattice.learn.merge import (
    ModelFormatError,
    canonical_model_bytes,
    load_npz,
    loads_safetensors,
    save_npz,
    weighted_average,
)
from lattice.learn.tasks import DatasetsUnavailable, Task, TaskError, get_task
from lattice.learn.validate import NormBound
from lattice.net.blob import (
    BlobConfig,
    BlobNotFound,
    BlobService,
    BlobStore,
    Providers,
    blob_id,
    serve_blobs,
)
from lattice.net.gossip_avg import (
    AveragingParty,
    Compute,
    GossipAverager,
    GossipConfig,
    TensorTransport,
    serve_gossip_avg,
    thread_compute,
)
from lattice.net.streams import PeerNetwork

log = logging.getLogger("lattice.net.jobs")

FINAL_TENSOR = "params"
_FINISHED = ("merging", "done", "left", "failed")


class JobNotFound(KeyError):
    """No job (or model) with this id in the replicated state."""


class NotSubmitter(PermissionError):
    """Only a job's submitter may cancel it."""


@dataclass(frozen=True)
class JobsConfig:
    """The runner's settings (daemon config section ``[jobs]``)."""

    accept_tasks: tuple[str, ...] = BUILTIN_TASKS
    """Tasks this daemon volunteers for."""
    allowed_plugins: tuple[str, ...] = ()
    """Plugin task names (entry points) this daemon may load."""
    max_jobs: int = 1
    """Jobs joined or running at once."""
    progress_interval: float = 1.0
    """Seconds between progress writes to our participation entry (plus every transition)."""
    checkpoint_every: int = 20
    """Rounds between checkpoints (0: only when training ends)."""
    sync_patience: float = 2.0
    """How long one round keeps looking for a free partner before training on."""
    merge_takeover: float = 30.0
    """A later merge candidate takes over this long after the one before it."""
    reconcile_interval: float = 1.0
    """The job board is re-read at least this often (and on every change)."""
    fetch_timeout: float = 60.0
    """The merger waits this long for one participant's final model blob."""
    compute_threads: int = 1
    """Worker threads for training and averaging math."""
    max_params: int = 50_000_000
    """Largest model (parameters) we train: task options come from the network, and
    e.g. a huge hidden layer must not exhaust our memory."""
    gossip: GossipConfig = field(default_factory=GossipConfig)
    blob: BlobConfig = field(default_factory=BlobConfig)


@dataclass
class _Run:
    """One job we take part in."""

    job_id: str
    spec: TrainSpec
    roster: list[str]
    rank: int
    resume: bool
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stop_reason: str | None = None
    party: AveragingParty | None = None
    state: str = "running"
    job_state: str | None = None
    round: int = 0
    loss: float | None = None
    accuracy: float | None = None
    final_blob: str | None = None
    model: str | None = None
    missing: list[str] = field(default_factory=list)
    resumed: int = 0
    resumed_from: int | None = None  # our step count when we last resumed from a checkpoint
    next_publish: float = -math.inf
    dead: set[str] = field(default_factory=set)
    reason: str | None = None


def merge_finals(task: Task, job_id: str, finals: list[tuple[int, np.ndarray, int]]
                 ) -> tuple[np.ndarray, str, bytes]:
    """(merged params, model id, canonical model bytes) from (rank, params, weight),
    weight = `Participant.merge_weight` (dataset size under weighting "data", else samples).

    Exactly `lattice.learn.simulate.final_merge`'s rule (weighted, inputs in
    rank order, id over the task's named blocks) with the job id in the metadata, so
    two jobs never share a model id by accident."""
    ordered = sorted(finals, key=lambda f: f[0])
    merged = weighted_average([f[1] for f in ordered], [f[2] for f in ordered])
    data = canonical_model_bytes(task.unflatten(merged), {"task": task.name, "job": job_id})
    return merged, blob_id(data), data


class JobsService:
    """The running job service (what `serve_jobs` hands back)."""

    def __init__(self, network: PeerNetwork, store: StateStore, sync: Any, config: JobsConfig, *,
                 gossip: GossipAverager, blobs: BlobService, compute: Compute,
                 checkpoint_dir: Path | None, clock: Callable[[], float], rng: random.Random) -> None:
        self.network = network
        self.store = store
        self.sync = sync
        self.config = config
        self.gossip = gossip
        self.blobs = blobs
        self.compute = compute
        self.checkpoint_dir = checkpoint_dir
        self.me = network.peer_id
        self._clock = clock
        self._rng = rng
        self._policy = Policy(frozenset(config.accept_tasks), config.max_jobs)
        self._specs: dict[str, tuple[Any, TrainSpec | JobSpecError]] = {}
        self._runs: dict[str, _Run] = {}
        self._tasks: dict[bytes, Task] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self.counts: Counter[str] = Counter()
        self._unsubscribe = store.subscribe(self._on_state_change)

    # -- public API ---------------------------------------------------------------------------
    def submit(self, spec: Mapping[str, Any]) -> str:
        """Validate ``spec`` (`lattice.core.jobs.parse_train_spec`) and publish the job;
        returns its id. Raises JobSpecError."""
        parsed = parse_train_spec(spec)
        job_id, record = new_job_record(parsed, self.me, secrets.token_hex(16), self._clock())
        self._write([Set(f"jobs/{job_id}", record)])
        self.counts["submitted"] += 1
        log.info("job=%s submitted: task=%s min_peers=%d steps=%d", job_id, parsed.task,
                 parsed.min_peers, parsed.steps)
        return job_id

    def list(self) -> list[dict[str, Any]]:
        """A summary of every job in the replicated state, newest first."""
        out = [job_summary(v) for v in self.store.jobs().values()]
        return sorted(out, key=lambda s: (-(s.get("created") or 0), s["id"]))

    def get(self, job_id: str) -> dict[str, Any]:
        """Summary, spec, every participant's entry and the job's models. Raises JobNotFound."""
        view = self._job_view(job_id)
        if view is None:
            raise JobNotFound(job_id)
        models = {mid: rec for mid, rec in self.store.models().items() if rec.get("job") == job_id}
        return {**job_summary(view), "spec": view["spec"].get("spec"), "record": view["spec"],
                "participants": view["participants"], "totals": view["totals"], "models": models}

    def cancel(self, job_id: str) -> bool:
        """Cancel a job we submitted; False if it already ended. Raises JobNotFound, NotSubmitter."""
        view = self._job_view(job_id)
        if view is None:
            raise JobNotFound(job_id)
        if view["submitter"] != self.me:
            raise NotSubmitter(f"job {job_id} was submitted by {view['submitter']}")
        if view["status"] in TERMINAL:
            return False
        self._write([Set(f"jobs/{job_id}", {**view["spec"], "state": "cancelled"})])
        log.info("job=%s cancelled by its submitter", job_id)
        return True

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``callback({"job": id, "summary": ...})`` on every change of a job (progress,
        status); returns an unsubscribe function. Callbacks must not block."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    async def wait_job(self, job_id: str, statuses: frozenset[str] | set[str] = TERMINAL) -> dict[str, Any]:
        """Wait until the job's status is one of ``statuses``; returns its summary."""
        while True:
            view = self._job_view(job_id)
            if view is not None and view["status"] in statuses:
                return job_summary(view)
            await self._changed.wait()

    def models(self) -> dict[str, dict[str, Any]]:
        return self.store.models()

    async def fetch_model(self, model_id: str, *, timeout: float | None = None) -> bytes:
        """The model's canonical bytes (a .safetensors file), from us or any provider.
        Raises JobNotFound for an unknown id, BlobNotFound when nobody delivers it."""
        record = self.store.models().get(model_id)
        if record is None and not self.blobs.store.has(model_id):
            raise JobNotFound(model_id)
        hints = list(record.get("producers", [])) if record else []
        return await self.blobs.fetch(model_id, hints=hints,
                                      timeout=timeout if timeout is not None else self.config.fetch_timeout)

    def statistics(self) -> dict[str, Any]:
        return {
            **self.counts,
            "running": {jid: {"round": r.round, "state": r.state, "rank": r.rank,
                              **(r.party.statistics() if r.party else {})}
                        for jid, r in self._runs.items()},
            "gossip": self.gossip.statistics(),
            "blobs": self.blobs.statistics(),
        }

    # -- the board ------------------------------------------------------------------------------
    def _on_state_change(self, event: Any) -> None:
        if not (event.path.startswith("jobs/") or event.path.startswith("members/")
                or event.path.startswith("models/")):
            return
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        if event.path.startswith("jobs/") and event.value is not None and self._listeners:
            note = {"job": event.path[5:], "summary": job_summary(event.value)}
            for listener in list(self._listeners):
                listener(note)

    def _write(self, changes: list[Any]) -> None:
        if self.sync is not None:
            self.sync.write(changes)
        else:
            self.store.apply_local(changes, self._clock())

    def _job_view(self, job_id: str) -> dict[str, Any] | None:
        try:
            return self.store.get(f"jobs/{job_id}", self._clock())
        except KeyError:
            return None

    def _spec(self, job_id: str, view: Mapping[str, Any]) -> TrainSpec | None:
        """The job's checked spec (None: the record is invalid and the job ignored);
        checked again only when the roster, the one field that changes, does."""
        roster = view["spec"].get("roster")
        key = tuple(roster) if isinstance(roster, list) else roster
        cached = self._specs.get(job_id)
        if cached is None or cached[0] != key:
            try:
                result: TrainSpec | JobSpecError = read_job(job_id, view["spec"])
            except JobSpecError as e:
                log.info("job=%s ignored: %s", job_id, e)
                self.counts["invalid_jobs"] += 1
                result = e
            cached = self._specs[job_id] = (key, result)
        return None if isinstance(cached[1], JobSpecError) else cached[1]

    def _alive(self, members: Mapping[str, Mapping[str, Any]]) -> Callable[[str], bool]:
        # a peer without a member record is presumed alive (state may lag the job board)
        return lambda peer: members.get(peer, {}).get("alive", True)

    async def _serve_board(self) -> None:
        if self.sync is not None:
            # our joins and progress are writes: after a restart, act only once our own
            # history is confirmed (`CrdtSync.write`), not on a view missing our records
            await self.sync.wait_writable()
        while True:
            self._reconcile()
            with trio.move_on_after(self.config.reconcile_interval):
                await self._changed.wait()

    def _reconcile(self) -> None:
        now = self._clock()
        alive = self._alive(self.store.members(now))
        jobs = self.store.jobs()
        reserved = len(self._runs) + sum(
            1 for jid, v in jobs.items()
            if jid not in self._runs and v["status"] not in TERMINAL
            and v["participants"].get(self.me, {}).get("state") == "joined")
        for job_id, view in jobs.items():
            spec = self._spec(job_id, view)
            if spec is None:
                continue
            actions = plan(self.me, job_id, view, spec, policy=self._policy,
                           active=set(self._runs), reserved=reserved, alive=alive)
            for action in actions:
                reserved += isinstance(action, Join)
                self._do(action, view, spec)

    def _do(self, action: Any, view: Mapping[str, Any], spec: TrainSpec) -> None:
        job_id = action.job_id
        if isinstance(action, SealRoster):
            log.info("job=%s roster sealed: %s", job_id, action.roster)
            self._write([Set(f"jobs/{job_id}", {**view["spec"], "roster": action.roster,
                                                 "roster_at": self._clock()})])
        elif isinstance(action, Join):
            log.info("job=%s joining (task %s)", job_id, spec.task)
            self._write([Set(f"participation/{job_id}", {"peer_id": self.me, "state": "joined",
                                                          "updated": self._clock()})])
            self.counts["joined"] += 1
        elif isinstance(action, Withdraw):
            old = view["participants"].get(self.me, {})
            self._write([Set(f"participation/{job_id}", {**old, "state": "left", "reason": action.reason,
                                                          "updated": self._clock()})])
        elif isinstance(action, Start):
            assert self._nursery is not None
            run = _Run(job_id, spec, action.roster, action.rank, action.resume)
            self._runs[job_id] = run
            self._nursery.start_soon(self._run, run)
        elif isinstance(action, ClaimFailed):
            old = view["participants"].get(self.me, {})
            log.warning("job=%s every participant left or failed: the job failed", job_id)
            self._write([Set(f"participation/{job_id}", {**old, "job_state": "failed",
                                                          "updated": self._clock()})])
        elif isinstance(action, Stop):
            run = self._runs.get(job_id)
            if run is not None and run.stop_reason is None:
                log.info("job=%s stopping: %s", job_id, action.reason)
                run.stop_reason = action.reason
                run.scope.cancel()

    # -- one participant --------------------------------------------------------------------------
    async def _run(self, run: _Run) -> None:
        try:
            with run.scope:
                await self._participate(run)
        finally:
            self.gossip.unregister(run.job_id)
            self._runs.pop(run.job_id, None)
            changed, self._changed = self._changed, trio.Event()
            changed.set()
        if run.stop_reason is not None and run.scope.cancelled_caught:
            self._publish(run, "left", force=True, reason=run.stop_reason)
            self._drop_checkpoint(run.job_id)

    async def _participate(self, run: _Run) -> None:
        spec = run.spec
        try:
            lspec = LearnSpec(
                task=spec.task, task_options=dict(spec.task_options), participants=len(run.roster),
                steps=spec.steps, batch=spec.batch, lr=spec.lr, momentum=spec.momentum,
                sync_every=spec.sync_every, schedule=spec.schedule, algorithm=spec.algorithm,
                partition=spec.partition, compression=spec.compression, weighting=spec.weighting,
                correction=spec.correction, outer_lr=spec.outer_lr,
                outer_momentum=spec.outer_momentum, seed=spec.seed, norm_factor=spec.norm_factor)
            task = await self._task(spec)
            if task.num_params > self.config.max_params:
                raise TaskError(f"{task.num_params} parameters exceed this daemon's limit of "
                                f"{self.config.max_params}")
            participant = await self.compute(lambda: make_participant(lspec, task, run.rank))
        except (TaskError, DatasetsUnavailable, ValueError) as e:
            log.warning("job=%s cannot take part: %s", run.job_id, e)
            self._publish_bare(run, "failed", reason=f"task: {e}"[:200])
            self.counts["failed_task"] += 1
            return
        checkpoint = await self._load_checkpoint(run, participant)
        if run.resume and checkpoint is None:
            log.warning("job=%s restarted without a checkpoint: leaving the job", run.job_id)
            self._publish_bare(run, "left", reason="restarted without a checkpoint")
            return
        party = AveragingParty(run.job_id, self.me, run.roster, participant, weighting=spec.weighting,
                               bound=NormBound(factor=spec.norm_factor), compute=self.compute)
        run.party = party
        if checkpoint is not None:
            party.bytes_sent = int(checkpoint.get("bytes_sent", 0))
            party.bytes_received = int(checkpoint.get("bytes_received", 0))
            party.stats["exchanges"] = int(checkpoint.get("exchanges", 0))
        self.gossip.register(party)
        if run.final_blob is None:
            await self._train(run, party, lspec, task)
        party.close()
        await self._finish(run, party, task)

    async def _task(self, spec: TrainSpec) -> Task:
        key = canonical([spec.task, dict(spec.task_options)])
        task = self._tasks.get(key)
        if task is None:
            allowed = self.config.allowed_plugins
            task = await self.compute(lambda: _loaded(get_task(spec.task, allowed, **dict(spec.task_options))))
            self._tasks[key] = task
        return task

    async def _train(self, run: _Run, party: AveragingParty, lspec: LearnSpec, task: Task) -> None:
        trainer = party.participant.trainer
        run.job_state = "running"
        await self._publish_progress(run, task, force=True)
        log.info("job=%s rank=%d/%d training from step %d", run.job_id, run.rank, len(run.roster),
                 trainer.step)
        averaging = lspec.algorithm != "none" and len(run.roster) > 1
        while trainer.step < lspec.steps:
            losses = await party.train(lambda: participant_round(party.participant, lspec))
            run.round += 1
            if losses:
                run.loss = float(np.mean(losses))
            if averaging:
                await self.gossip.average_once(party, lambda: self._candidates(run),
                                               patience=self.config.sync_patience, rng=self._rng)
            every = self.config.checkpoint_every
            if every and run.round % every == 0:
                await self._save_checkpoint(run, party)
            await self._publish_progress(run, task)

    async def _finish(self, run: _Run, party: AveragingParty, task: Task) -> None:
        trainer = party.participant.trainer
        await party.wait_idle()  # an exchange accepted before we closed commits first
        if run.final_blob is None:
            data = await self.compute(lambda: canonical_model_bytes(
                {FINAL_TENSOR: trainer.params},
                {"job": run.job_id, "peer": self.me, "rank": str(run.rank),
                 "samples": str(trainer.samples_seen), "task": task.name}))
            run.final_blob = await self.blobs.put(data)
            await self._save_checkpoint(run, party)
        run.state = run.job_state = "merging"
        await self._publish_progress(run, task, force=True)
        deadline = trio.current_time() + run.spec.merge_timeout
        while True:
            view = self._job_view(run.job_id)
            if view is None:
                return
            model = self._published_model(run, view)
            if model is not None:
                run.model = model
                run.state = "done"
                await self._publish_progress(run, task, force=True)
                self._drop_checkpoint(run.job_id)
                return
            now = trio.current_time()
            members = self.store.members(self._clock())
            alive = self._alive(members)
            run.dead.update(p for p in run.roster if p != self.me and not alive(p))
            decision = merge_decision(run.roster, view["participants"], me=self.me, now=now,
                                      deadline=deadline, takeover=self.config.merge_takeover,
                                      dead=run.dead)
            if decision.merger == self.me:
                await self._merge(run, view, decision.inputs, task)
                self._drop_checkpoint(run.job_id)
                return
            changed = self._changed
            wake = now + self.config.reconcile_interval  # liveness and takeover are re-read
            if now < deadline:
                wake = min(wake, deadline)
            with trio.move_on_at(wake):
                await changed.wait()

    def _published_model(self, run: _Run, view: Mapping[str, Any]) -> str | None:
        """The job's merged model, if a roster member published one. A bare ``done``
        claim is not enough: any author can write one, only a model record backs it."""
        models = self.store.models()
        found = sorted(
            e["model"] for p, e in view["participants"].items()
            if p in run.roster and e.get("job_state") == "done" and isinstance(e.get("model"), str)
            and models.get(e["model"], {}).get("job") == run.job_id
            and p in models.get(e["model"], {}).get("producers", []))
        return found[0] if found else None

    async def _merge(self, run: _Run, view: Mapping[str, Any], inputs: list[str], task: Task) -> None:
        participants = view["participants"]
        finals: list[tuple[int, np.ndarray, int]] = []
        used: list[dict[str, Any]] = []
        for peer in inputs:
            final = participants[peer]["final"]
            rank = run.roster.index(peer)
            params = await self._final_params(run, peer, final, task)
            if params is None:
                continue
            finals.append((rank, params, run.party.participant.merge_weight(rank, final["samples"])))
            used.append({"peer": peer, "rank": rank, "blob": final["blob"], "samples": final["samples"]})
        if not finals:  # even our own is unreadable: nothing to merge, the job failed
            run.job_state = run.state = "failed"
            await self._publish_progress(run, task, force=True, reason="no final model could be read")
            return
        merged, mid, data = await self.compute(lambda: merge_finals(task, run.job_id, finals))
        metrics = await self.compute(lambda: task.evaluate(merged, *task.test_data()))
        stored = await self.blobs.put(data)
        assert stored == mid, "the model id is the SHA-256 of its canonical bytes"
        used_peers = {u["peer"] for u in used}
        run.missing = [p for p in run.roster if p not in used_peers]
        samples = sum(u["samples"] for u in used)
        record = {
            "producer": self.me, "job": run.job_id, "task": task.name, "format": "safetensors",
            "size": len(data), "inputs": used, "missing": run.missing, "created": self._clock(),
            "metrics": {"accuracy": metrics["accuracy"], "loss": metrics["loss"], "participants": len(used),
                        "missing": len(run.missing), "samples": samples},
        }
        run.model = mid
        run.job_state = run.state = "done"
        self._write([Set(f"models/{mid}", record)])
        await self._publish_progress(run, task, force=True)
        log.info("job=%s merged %d models (missing %s): model %s accuracy %.4f", run.job_id, len(used),
                 run.missing, mid, metrics["accuracy"])
        self.counts["merged"] += 1

    async def _final_params(self, run: _Run, peer: str, final: Mapping[str, Any], task: Task
                            ) -> np.ndarray | None:
        """A participant's final parameters from its blob, checked; None if unavailable."""
        try:
            data = await self.blobs.fetch(final["blob"], hints=[peer], timeout=self.config.fetch_timeout,
                                          max_bytes=4 * task.num_params + (64 << 10))
        except BlobNotFound:
            log.warning("job=%s peer=%s final model %s not delivered: merging without it",
                        run.job_id, peer, final["blob"][:12])
            run.dead.add(peer)
            return None
        try:
            arrays, meta = loads_safetensors(data)
            params = arrays.get(FINAL_TENSOR)
            if (set(arrays) != {FINAL_TENSOR} or params is None or params.dtype != np.float32
                    or params.shape != (task.num_params,) or not np.isfinite(params).all()
                    or meta.get("job") != run.job_id or meta.get("samples") != str(final["samples"])):
                raise ModelFormatError("not this job's final model")
        except ModelFormatError as e:
            log.warning("job=%s peer=%s final model rejected: %s", run.job_id, peer, e)
            self.counts["final_rejected"] += 1
            return None
        return params

    def _candidates(self, run: _Run) -> list[str]:
        """Roster members that may still average: not finished, not known dead."""
        view = self._job_view(run.job_id)
        entries = view["participants"] if view else {}
        alive = self._alive(self.store.members(self._clock()))
        return [p for p in run.roster
                if p != self.me and entries.get(p, {}).get("state") not in _FINISHED and alive(p)]

    # -- progress ----------------------------------------------------------------------------------
    async def _publish_progress(self, run: _Run, task: Task, *, force: bool = False, **extra: Any) -> None:
        now = trio.current_time()
        if not force and now < run.next_publish:
            return
        run.next_publish = now + self.config.progress_interval
        party = run.party
        if party is not None:
            params = party.participant.trainer.params
            metrics = await self.compute(lambda: task.evaluate(params, *task.test_data()))
            run.accuracy = metrics["accuracy"]
        self._publish(run, run.state, force=True, **extra)

    def _publish(self, run: _Run, state: str, *, force: bool, **extra: Any) -> None:
        party = run.party
        entry: dict[str, Any] = {"peer_id": self.me, "state": state, "rank": run.rank,
                                 "round": run.round, "updated": self._clock()}
        if run.job_state is not None:  # a claim, once made, stays (the status is their max)
            entry["job_state"] = run.job_state
        if party is not None:
            trainer = party.participant.trainer
            entry.update(steps=int(trainer.step), samples=int(trainer.samples_seen),
                         bytes_sent=party.bytes_sent, bytes_received=party.bytes_received,
                         exchanges=int(party.stats["exchanges"]), peers=len(party.partners),
                         skipped=int(party.stats["skipped"]))
        for name in ("loss", "accuracy"):
            value = getattr(run, name)
            if value is not None and math.isfinite(value):
                entry[name] = float(value)
        if run.resumed:
            entry["resumed"] = run.resumed
            if run.resumed_from is not None:
                entry["resumed_from"] = run.resumed_from
        if run.final_blob is not None and party is not None:
            entry["final"] = {"blob": run.final_blob, "samples": int(party.participant.trainer.samples_seen)}
        if run.model is not None:
            entry["model"] = run.model
        if run.missing:
            entry["missing"] = list(run.missing)
        reason = extra.get("reason", run.reason)
        if reason is not None:
            entry["reason"] = reason
            run.reason = reason
        try:
            self._write([Set(f"participation/{run.job_id}", entry)])
        except LocalStateError as e:
            # e.g. our identity was banned: we can no longer speak for ourselves
            log.error("job=%s progress not written: %s", run.job_id, e)

    def _publish_bare(self, run: _Run, state: str, *, reason: str) -> None:
        run.state = state
        self._publish(run, state, force=True, reason=reason)

    # -- checkpoints -----------------------------------------------------------------------------
    def _checkpoint_path(self, job_id: str) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / f"{job_id}.npz"

    async def _save_checkpoint(self, run: _Run, party: AveragingParty) -> None:
        path = self._checkpoint_path(run.job_id)
        if path is None:
            return
        p = party.participant
        meta = {"job": run.job_id, "round": str(run.round), "rank": str(run.rank),
                "roster": json.dumps(run.roster), "bytes_sent": str(party.bytes_sent),
                "bytes_received": str(party.bytes_received), "exchanges": str(party.stats["exchanges"]),
                "final_blob": run.final_blob or "", "resumed": str(run.resumed),
                "loss": repr(run.loss) if run.loss is not None else ""}

        def save() -> None:
            arrays, tmeta = p.trainer.state()
            out = {f"trainer.{k}": v for k, v in arrays.items()}
            out.update({f"channel.{k}": v for k, v in p.channel.state().items()})
            if p.outer is not None:
                out.update({f"outer.{k}": v for k, v in p.outer.state().items()})
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                save_npz(f, out, {**meta, **{f"trainer.{k}": v for k, v in tmeta.items()}})
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        # hold the exchange slot: no average may swap the parameters while they are saved
        await party.wait_idle()
        party.begin("checkpoint")
        try:
            await self.compute(save)
        finally:
            party.end()
        self.counts["checkpoints"] += 1

    async def _load_checkpoint(self, run: _Run, participant: Participant) -> dict[str, str] | None:
        path = self._checkpoint_path(run.job_id)
        if path is None or not path.exists():
            return None

        def load() -> dict[str, str] | None:
            arrays, meta = load_npz(path)
            if meta.get("job") != run.job_id or meta.get("roster") != json.dumps(run.roster):
                return None
            pick = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}  # noqa: E731
            participant.trainer.load_state(pick("trainer."), {k[8:]: v for k, v in meta.items()
                                                               if k.startswith("trainer.")})
            participant.channel.load_state(pick("channel."))
            if participant.outer is not None:
                participant.outer.load_state(pick("outer."))
            return meta

        try:
            meta = await self.compute(load)
        except (ModelFormatError, ValueError, KeyError, OSError) as e:
            log.warning("job=%s checkpoint %s unusable: %s", run.job_id, path, e)
            return None
        if meta is None:
            return None
        run.round = int(meta["round"])
        run.final_blob = meta["final_blob"] or None
        if run.final_blob is not None and not self.blobs.store.has(run.final_blob):
            run.final_blob = None  # the blob is gone: publish the final model again
        run.loss = float(meta["loss"]) if meta.get("loss") else None
        run.resumed = int(meta.get("resumed", "0")) + 1
        run.resumed_from = int(participant.trainer.step)
        self.counts["resumed"] += 1
        log.info("job=%s resumed from checkpoint at round %d", run.job_id, run.round)
        return meta

    def _drop_checkpoint(self, job_id: str) -> None:
        path = self._checkpoint_path(job_id)
        if path is not None:
            path.unlink(missing_ok=True)


def _loaded(task: Task) -> Task:
    task.train_data()  # load (and cache) the dataset here, off the event loop
    return task


async def serve_jobs(network: PeerNetwork, store: StateStore, sync: Any = None, *,
                     config: JobsConfig = JobsConfig(),
                     checkpoint_dir: Path | str | None = None,
                     blob_dir: Path | str | None = None,
                     providers: Providers | None = None,
                     transport: TensorTransport | None = None,
                     compute: Compute | None = None,
                     clock: Callable[[], float] = time.time,
                     rng: random.Random | None = None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run train jobs until cancelled; hands back the `JobsService`.

    Starts `/lattice/gossip-avg/1` and `/lattice/blob/1` (blobs in ``blob_dir``, or in
    memory), watches ``store`` for jobs, and writes through ``sync`` (a `CrdtSync`; None:
    straight to ``store``). ``checkpoint_dir`` enables resuming after a restart.
    ``compute`` runs the math (default: ``config.compute_threads`` worker threads);
    ``clock`` is the wall clock of records and member liveness (tests pass
    ``trio.current_time``). Failure policy: see the module docstring."""
    if compute is None:
        compute = thread_compute(trio.CapacityLimiter(config.compute_threads))
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    blob_store = BlobStore(blob_dir, max_bytes=config.blob.max_store_bytes)
    async with trio.open_nursery() as nursery:
        gossip = await nursery.start(lambda task_status: serve_gossip_avg(
            network, config=config.gossip, transport=transport, task_status=task_status))
        blobs = await nursery.start(lambda task_status: serve_blobs(
            network, blob_store, config=config.blob, providers=providers, compute=compute,
            task_status=task_status))
        service = JobsService(network, store, sync, config, gossip=gossip, blobs=blobs, compute=compute,
                              checkpoint_dir=ckpt, clock=clock, rng=rng or random.Random())
        service._nursery = nursery
        try:
            nursery.start_soon(service._serve_board)
            task_status.started(service)
            await trio.sleep_forever()
        finally:
            service._unsubscribe()


__all__ = ["JobNotFound", "JobsConfig", "JobsService", "NotSubmitter", "merge_finals", "serve_jobs"]
