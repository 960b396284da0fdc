"""The ``merge`` job kind: models merged by id across the participants (issue 14).

Every participant reads the inputs' manifests (no tensor bytes), checks that they can
be merged (`merge_plan`: names, shapes, dtypes) and divides the output's tensors among
the roster by the bytes each reads (`lattice.core.mergeshares.plan_shares`: the same
plan on every daemon). For each tensor of its share it fetches only that tensor's
input pieces (from the models' producers, else their DHT providers), merges it off the
event loop on the jobs' compute (the daemon's governor) and stores the output pieces
(`ModelService.merge_share`), fetching the next
tensors' pieces meanwhile (`MergeConfig.prefetch_bytes` ahead). What it has merged it
publishes as a *share*: a
partial v2 manifest (proto/model-format.md) kept in its blob store, whose id its
participation entry carries (``share``, at most once per progress interval); its last
share is its contribution.

Reassignment. A participant with nothing left to do looks at the others. A member
that left, failed or is known dead is *behind*; so is one still merging, once we have
been idle `MergeConfig.straggler_min` seconds, if at the pace it has kept (bytes
merged since we first saw it) it needs ``straggler_factor`` times longer for its
remaining tensors than we would at ours (a member that stopped, dead or hung, falls
further behind every second). A behind member's tensors that no reachable share covers
are divided among the participants still merging by `mergeshares.reassign` (largest
first to the least loaded), the same way on every daemon that sees the same records.
A tensor's bytes are a function of the inputs and parameters, so two participants
merging the same tensor make the same pieces: daemons that see the records at
different moments only do some work twice, never make a different model.

The merger (the supervisor's: lowest rank with a published share) assembles the model
from every member's latest share, recomputes `check_tensors` tensors of each other
participant's share before using it, fetches the output pieces it lacks (so it serves
the whole model as its producer), merges whatever nobody covered and writes the
manifest. Its id is the model id, the same id as that merge done on one daemon
(`ModelService.merge`), and `lattice models verify` recomputes it.

Failures. An input that cannot be merged (a missing tensor, another shape or dtype,
non-finite values, a parameter out of range for a tensor) fails the participant that
finds it, naming the tensor (``failed_tensor`` in its entry, the message as its
``reason``). The others recompute that tensor before believing the claim and then fail
the same way, so the job fails with the tensor's name once every member has: no
single participant can fail a merge. A share that is malformed, is not this merge's
output or fails a check is not used (``shares_rejected``): its tensors are merged
again. Spec: `lattice.core.jobs.MergeJobSpec`, proto/jobs.md. Must not import libp2p.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from lattice.core.jobs import JobSpecError, MergeJobSpec, final_of, parse_merge_spec
from lattice.core.mergeshares import plan_shares, reassign
from lattice.jobs.kind import Contribution, Input, KindRefused, Result, RunContext, Services
from lattice.learn.merge import MergeInputError
from lattice.learn.mergeengine import ModelReader, merge_plan, merged_manifest, output_info
from lattice.learn.mergespec import MergeSpec, MergeSpecError
from lattice.learn.modelfile import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestTensor,
    ModelFormatError,
    TensorInfo,
    dumps_manifest,
    loads_manifest,
)
from lattice.net.blob import BlobNotFound, BlobStoreFull, is_blob_id
from lattice.net.modelstore import MAX_RECORD_SPEC_CHARS, ModelService, ModelUnavailable

if TYPE_CHECKING:
    from lattice.jobs.supervisor import Run

log = logging.getLogger("lattice.jobs.merge")

SHARE_JOB_KEY = "lattice.share.job"
SHARE_PEER_KEY = "lattice.share.peer"
"""A share's metadata: the job and the participant whose merged tensors it lists."""


@dataclass(frozen=True)
class MergeConfig:
    """Settings of the merge kind (daemon config ``[jobs]``, ``merge_*``)."""

    max_bytes: int = 4 << 30
    """Largest merge this daemon volunteers for: the inputs' total bytes (0: never).
    The default is the default blob store's size, so a daemon that ends up merging
    alone has room for every input piece."""
    straggler_min: float = 10.0
    """How long we stay idle, waiting for the others, before judging who is behind."""
    straggler_factor: float = 2.0
    """A participant still merging is behind when, at the pace it has kept, it needs
    this many times longer for its remaining tensors than we would at ours."""
    prefetch_bytes: int = 256 << 20
    """Input bytes fetched ahead of the tensor being merged (disk, not memory)."""
    check_tensors: int = 1
    """Tensors of each other participant's share the merger recomputes before using it
    (0: none)."""


def merge_spec_of(spec: MergeJobSpec) -> MergeSpec:
    """The learning ring's merge spec of a job (its meaning checked); JobSpecError."""
    try:
        return MergeSpec.from_json(spec.merge_json())
    except MergeSpecError as e:
        raise JobSpecError("merge", str(e)) from None


def parse_merge_job(raw: Any) -> MergeJobSpec:
    """A merge job's spec from a plain mapping, its syntax (`parse_merge_spec`) and
    its meaning (`MergeSpec`) checked. Raises JobSpecError."""
    spec = parse_merge_spec(raw)
    merge_spec_of(spec)
    return spec


@dataclass(frozen=True)
class MergePlan:
    """A merge as every participant computes it from the inputs' manifests."""

    spec: MergeSpec
    readers: dict[str, ModelReader]
    output: dict[str, TensorInfo]
    """The output's tensors, in name order, with what the merge writes for each."""
    cost: dict[str, int]
    """Bytes read to merge each tensor (every input's)."""
    input_bytes: int

    @classmethod
    def of(cls, spec: MergeSpec, readers: dict[str, ModelReader]) -> MergePlan:
        """Raises MergeInputError naming a tensor the inputs disagree on, MergeSpecError
        naming one a parameter is out of range for."""
        names = merge_plan(spec, readers)
        layers = spec.layer_count(names)
        for name in names:
            spec.resolve(name, layers)
        first = readers[spec.base if spec.base is not None else spec.models[0]].infos()
        infos = {mid: r.infos() for mid, r in readers.items()}
        return cls(spec, readers, {n: output_info(spec, first[n]) for n in names},
                   {n: sum(i[n].nbytes for i in infos.values()) for n in names},
                   sum(i.nbytes for model in infos.values() for i in model.values()))


async def open_plan(models: ModelService, spec: MergeSpec) -> MergePlan:
    """The plan of ``spec`` from its inputs' manifests (fetched from providers as
    needed; no tensor bytes). Raises ModelUnavailable, ModelFormatError, MergeInputError,
    MergeSpecError."""
    return MergePlan.of(spec, await models.readers(spec))


async def prepare_merge_job(models: ModelService, request: Mapping[str, Any]) -> dict[str, Any]:
    """The spec to submit for a merge job requested as a client sends it (`jobs.submit`
    with ``kind: merge``): model names or ids; ``weights``, ``parameters`` and
    ``dtype``, or ``config`` (mergekit YAML text); the result's ``name``; the job fields
    (``min_peers``, ``max_peers``, ``join_window``, ``merge_timeout``). The inputs'
    manifests are read to check that they can be merged and to fill ``input_bytes`` and
    ``tensors``. Raises MergeSpecError (also naming a tensor a parameter is out of
    range for), ModelNotFound, ModelUnavailable, ModelFormatError, MergeInputError
    (naming the tensor)."""
    if not isinstance(request, Mapping):
        raise MergeSpecError("a merge job request is a map")
    job_fields = {"min_peers", "max_peers", "join_window", "merge_timeout", "name"}
    merge = {k: v for k, v in request.items() if k not in job_fields and k != "kind"}
    config = merge.pop("config", None)
    if config is not None:
        if merge:
            raise MergeSpecError(f"config replaces {', '.join(sorted(map(str, merge)))}")
        if not isinstance(config, str):
            raise MergeSpecError("config must be the text of a mergekit YAML file")
        spec = MergeSpec.from_yaml(config, models.resolve)
    else:
        spec = MergeSpec.from_request(merge).with_ids(models.resolve)
    plan = await open_plan(models, spec)
    doc = spec.to_json()
    return {"kind": "merge", "method": doc["method"], "models": doc["models"], "base": doc["base"],
            "parameters": doc["parameters"], "model_parameters": doc["model_parameters"],
            "dtype": doc["dtype"], "input_bytes": plan.input_bytes, "tensors": len(plan.output),
            **{k: request[k] for k in sorted(job_fields) if request.get(k) is not None}}


@dataclass
class _Share:
    """A participant's published share: its blob and the tensors it lists."""

    blob: str
    tensors: dict[str, ManifestTensor]


@dataclass
class _Job:
    """This daemon's side of one merge job."""

    plan: MergePlan
    shares: dict[str, list[str]]
    """The first division of the output (every daemon computes the same)."""
    me: str
    mine: dict[str, ManifestTensor] = field(default_factory=dict)
    """Tensors we merged (pieces in our blob store)."""
    seen: dict[str, _Share | None] = field(default_factory=dict)
    """peer -> its latest share we read (None: it was not delivered or not usable)."""
    seen_blob: dict[str, str] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    """Members whose pieces we cannot get: their coverage does not count."""
    probed: set[str] = field(default_factory=set)
    first_seen: dict[str, float] = field(default_factory=dict)
    """When we first saw each member's entry (our clock): the start of its pace."""
    last_change: dict[str, tuple[Any, float]] = field(default_factory=dict)
    """Each member's last progress (steps, done_cost) and when we saw it change."""
    todo: list[str] = field(default_factory=list)
    """What we still mean to merge after the tensor in progress."""
    moved: trio.Event = field(default_factory=trio.Event)
    """Set (and replaced) when ``todo`` changes."""
    _assigned: tuple[Any, list[str]] | None = None
    refuted: set[str] = field(default_factory=set)
    """Tensors a member claimed unmergeable that merged fine here."""
    published: str | None = None
    published_count: int = -1
    superseded: list[str] = field(default_factory=list)
    """Our earlier shares (deleted when the job is over for us)."""
    bytes_fetched: int = 0
    merging_seconds: float = 0.0
    merged_cost: int = 0
    """Input bytes of the tensors we merged in ``merging_seconds`` (our pace)."""
    helped: int = 0

    def assigned(self, gone: set[str], done: set[str]) -> list[str]:
        """Our tensors (`mergeshares.reassign`), planned again only when who is gone or
        what the others covered changed: not after each tensor of our own."""
        key = (frozenset(gone), frozenset(done - set(self.mine)))
        if self._assigned is None or self._assigned[0] != key:
            self._assigned = (key, reassign(self.shares, self.plan.cost, gone, done)[self.me])
        return self._assigned[1]

    def plan_next(self, todo: list[str]) -> None:
        """What we mean to merge after the tensor in progress (the prefetcher follows)."""
        if todo != self.todo:
            self.todo = todo
            moved, self.moved = self.moved, trio.Event()
            moved.set()

    def covered(self) -> set[str]:
        """Tensors merged here or listed by a share whose pieces we can get."""
        done = set(self.mine)
        for peer, share in self.seen.items():
            if share is not None and peer not in self.unreachable:
                done.update(share.tensors)
        return done


class MergeKind:
    """The merge kind (see the module docstring)."""

    name = "merge"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.config: MergeConfig = services.config.merge
        self.counts: Counter[str] = Counter()
        self._jobs: dict[str, _Job] = {}

    def parse_spec(self, raw: Any) -> MergeJobSpec:
        return parse_merge_job(raw)

    def volunteers(self, job_id: str, spec: MergeJobSpec) -> bool:
        return 0 < spec.input_bytes <= self.config.max_bytes

    def statistics(self) -> dict[str, Any]:
        return {**self.counts, "jobs": len(self._jobs), "max_bytes": self.config.max_bytes,
                "straggler_min": self.config.straggler_min,
                "straggler_factor": self.config.straggler_factor,
                "prefetch_bytes": self.config.prefetch_bytes,
                "check_tensors": self.config.check_tensors}

    # -- a participant ---------------------------------------------------------------------
    async def participate(self, run: Run, ctx: RunContext) -> Contribution | None:
        job = await self._job(run, ctx)
        try:
            await self._work(run, ctx, job)
            blob = await self._publish_share(run, ctx, job, force=True)
        except (ModelUnavailable, BlobNotFound) as e:
            raise KindRefused(f"inputs not delivered: {e}") from None
        except BlobStoreFull as e:
            raise KindRefused(f"the blob store is full: {e}") from None
        log.info("job=%s share published: %d tensors (%d taken over), %d bytes fetched",
                 run.job_id, len(job.mine), job.helped, job.bytes_fetched)
        return Contribution(blob, len(job.mine))

    async def _job(self, run: Run, ctx: RunContext) -> _Job:
        """Our side of the job, planned from the manifests (and resumed from our last
        share after a restart); KindRefused when it cannot be done here."""
        job = self._jobs.get(run.job_id)
        if job is not None:
            return job
        spec: MergeJobSpec = run.spec
        models = self.services.models
        try:
            plan = await open_plan(models, merge_spec_of(spec))
        except (ModelUnavailable, BlobNotFound) as e:
            raise KindRefused(f"inputs not delivered: {e}") from None
        except (ModelFormatError, MergeInputError, MergeSpecError) as e:
            await self._claim(ctx, e)
            raise KindRefused(str(e)[:200]) from None
        if plan.input_bytes != spec.input_bytes or len(plan.output) != spec.tensors:
            raise KindRefused(f"the spec says {spec.input_bytes} input bytes and {spec.tensors} "
                              f"tensors; the inputs have {plan.input_bytes} and {len(plan.output)}")
        if plan.input_bytes > self.config.max_bytes:
            raise KindRefused(f"the inputs hold {plan.input_bytes} bytes, more than this daemon's "
                              f"limit of {self.config.max_bytes}")
        job = _Job(plan, plan_shares(plan.cost, run.roster), self.services.network.peer_id)
        resumed = ctx.checkpoint[1].get("share") if ctx.checkpoint is not None else None
        for blob in (resumed, run.final.blob if run.final is not None else None):
            if isinstance(blob, str) and blob != job.published:
                share = await self._read_share(run, job, job.me, blob)
                if share is not None:
                    job.mine = {n: t for n, t in share.tensors.items()
                                if all(models.blobs.store.has(p) for p in t.pieces)}
                    job.published = blob
        self._jobs[run.job_id] = job
        ctx.on_close(lambda: self._close(run.job_id))
        return job

    def _close(self, job_id: str) -> None:
        """The job is over for us: only our last share stays (the model's record may
        name it), and our copies of the others' shares go."""
        job = self._jobs.pop(job_id, None)
        if job is not None:
            store = self.services.blobs.store
            for blob in [*job.superseded, *job.seen_blob.values()]:
                if blob != job.published:
                    store.delete(blob)

    async def _work(self, run: Run, ctx: RunContext, job: _Job) -> None:
        """Merge our share, then what others left behind, until every other member
        has nothing left to do (idle, or published its final share) or is behind."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._prefetch, job)
            try:
                await self._work_loop(run, ctx, job)
            except (KindRefused, ModelUnavailable, BlobNotFound, BlobStoreFull) as e:
                failure: Exception | None = e  # raised below, not as a group
            else:
                failure = None
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _work_loop(self, run: Run, ctx: RunContext, job: _Job) -> None:
        idle_since: float | None = None
        while True:
            await self._refresh(run, ctx, job)
            behind = self._behind(run, ctx, job, idle_since)
            await self._probe(job, behind)
            finished = {p for p, e in ctx.entries().items() if final_of(e) is not None and p != job.me}
            done = job.covered()
            todo = [n for n in job.assigned(behind | finished, done) if n not in done]
            if todo:
                idle_since = None
                job.plan_next(todo[1:])
                await self._merge_next(run, ctx, job, todo)
                continue
            job.plan_next([])
            entries = ctx.entries()
            if all(entries[p].get("idle") is True for p in run.roster
                   if p != job.me and p not in behind | finished):
                run.dead.update(behind)  # the merge phase does not wait for them
                return
            now = trio.current_time()
            if idle_since is None:  # say what we have: the others plan with it
                idle_since = now
                await self._publish_share(run, ctx, job, force=True, idle=True)
            wake = idle_since + self.config.straggler_min
            if now >= wake:  # the others' pace changes as time passes: look again soon
                wake = now + max(1.0, self.services.config.progress_interval)
            with trio.move_on_at(wake + 1e-6):
                await ctx.wait_changed()

    def _behind(self, run: Run, ctx: RunContext, job: _Job, idle_since: float | None) -> set[str]:
        """Members (without a published final share) that will not finish in time:
        left, failed, known dead, or — once we have waited ``straggler_min`` idle —
        too slow at the pace they have kept."""
        entries = ctx.entries()
        live = set(ctx.candidates())
        now = trio.current_time()
        judge = idle_since is not None and now >= idle_since + self.config.straggler_min
        out = set()
        for peer in run.roster:
            entry = entries.get(peer, {})
            if peer == job.me or final_of(entry) is not None:
                continue
            if entry.get("state") in ("left", "failed") or peer not in live \
                    or (judge and self._too_slow(job, peer, entry, now)):
                out.add(peer)
        return out

    def _too_slow(self, job: _Job, peer: str, entry: Mapping[str, Any], now: float) -> bool:
        done, share = _count(entry.get("done_cost")), _count(entry.get("share_cost"))
        remaining = max(0, share - done) if "share_cost" in entry else sum(
            job.plan.cost[n] for n in job.shares[peer])
        if remaining == 0:  # it should be saying so any moment; unless it stopped there
            quiet = now - job.last_change.get(peer, (None, now))[1]
            return quiet > self.config.straggler_factor * self.config.straggler_min
        elapsed = now - job.first_seen.get(peer, now)
        theirs = remaining * elapsed / done if done else float("inf")
        ours = (remaining * job.merging_seconds / job.merged_cost if job.merged_cost
                else self.config.straggler_min)
        return theirs > self.config.straggler_factor * ours

    async def _probe(self, job: _Job, behind: set[str]) -> None:
        """A member that fell behind may be gone with the pieces it merged: ask it for
        its share once; if it does not answer, its share does not count."""
        for peer in sorted(behind - job.probed - job.unreachable):
            share = job.seen.get(peer)
            if share is None:
                continue
            job.probed.add(peer)
            if await self.services.blobs.ask_have(peer, share.blob) is None:
                log.info("peer=%s fell behind and does not answer: its share is merged again", peer)
                job.unreachable.add(peer)
                self.counts["shares_unreachable"] += 1

    async def _merge_next(self, run: Run, ctx: RunContext, job: _Job, todo: list[str]) -> None:
        name = todo[0]
        models = self.services.models
        started = trio.current_time()
        try:
            merged, fetched = await models.merge_share(job.plan.spec, job.plan.readers, [name],
                                                       compute=self.services.compute)
        except (MergeInputError, MergeSpecError) as e:
            await self._claim(ctx, e, name)
            raise KindRefused(str(e)[:200]) from None
        job.merging_seconds += trio.current_time() - started
        job.merged_cost += job.plan.cost[name]
        job.bytes_fetched += fetched
        job.mine.update(merged)
        if name not in job.shares[job.me]:
            job.helped += 1
            self.counts["tensors_taken_over"] += 1
        self.counts["tensors_merged"] += 1
        if ctx.due():
            await self._publish_share(run, ctx, job)
        else:
            await ctx.report(**self._progress(job))

    async def _prefetch(self, job: _Job) -> None:
        """Fetch the input pieces of the tensors we mean to merge next, up to
        `MergeConfig.prefetch_bytes` of them ahead of the merge, so the network and the
        math overlap (best effort: the merge fetches whatever is still missing, and
        reports what does not come). Runs until cancelled."""
        models = self.services.models
        fetched: set[str] = set()
        while True:
            moved = job.moved
            ahead, target = 0, None
            for name in job.todo:
                if name in job.mine:
                    continue
                if name not in fetched:
                    target = name
                    break
                ahead += job.plan.cost[name]
            if target is None or ahead >= self.config.prefetch_bytes:
                await moved.wait()
                continue
            try:
                got = await models.fetch_inputs(job.plan.readers, [target])
            except (ModelUnavailable, BlobNotFound, BlobStoreFull):
                got = 0
            job.bytes_fetched += got  # (not `+= await`: the merge adds to it meanwhile)
            fetched.add(target)

    def _progress(self, job: _Job, *, idle: bool = False) -> dict[str, Any]:
        done_cost = sum(job.plan.cost[n] for n in job.mine)
        todo = [n for n in job.todo if n not in job.mine]
        return {"steps": len(job.mine), "assigned": len(job.mine) + len(todo),
                "done_cost": done_cost,
                "share_cost": done_cost + sum(job.plan.cost[n] for n in todo),
                "bytes_received": job.bytes_fetched,
                "bytes_merged": sum(t.info.nbytes for t in job.mine.values()),
                "helped": job.helped, "idle": idle}

    async def _publish_share(self, run: Run, ctx: RunContext, job: _Job, *, force: bool = False,
                             idle: bool = False) -> str:
        """Store what we merged so far as our share (our entry names it), and make it
        our checkpoint; returns its blob id."""
        if job.published is None or job.published_count != len(job.mine):
            manifest = Manifest(dict(job.mine), {SHARE_JOB_KEY: run.job_id, SHARE_PEER_KEY: job.me})
            data = await self.services.compute(lambda: dumps_manifest(manifest))
            if job.published is not None:
                job.superseded.append(job.published)  # others may still be reading it
            job.published = await self.services.blobs.put(data, announce=False)
            job.published_count = len(job.mine)
            await ctx.save_checkpoint({}, {"share": job.published})
        await ctx.report(force=force, share=job.published, **self._progress(job, idle=idle))
        return job.published

    # -- what the others did ------------------------------------------------------------
    async def _refresh(self, run: Run, ctx: RunContext, job: _Job) -> None:
        """Read the others' new shares, and check any claim that a tensor cannot be
        merged (raising KindRefused when it holds here too)."""
        now = trio.current_time()
        for peer, entry in ctx.entries().items():
            if peer == job.me:
                continue
            if entry.get("state") is not None:
                job.first_seen.setdefault(peer, now)
                progress = (entry.get("steps"), entry.get("done_cost"))
                if job.last_change.get(peer, (None, 0.0))[0] != progress:
                    job.last_change[peer] = (progress, now)
            final = final_of(entry)
            blob = final["blob"] if final is not None else entry.get("share")
            if is_blob_id(blob) and job.seen_blob.get(peer) != blob:
                old = job.seen_blob.get(peer)
                if old is not None:  # our copy of its last share: superseded
                    self.services.blobs.store.delete(old)
                job.seen_blob[peer] = blob
                job.seen[peer] = await self._read_share(run, job, peer, blob)
                if job.seen[peer] is None:
                    job.unreachable.add(peer)
            claim = entry.get("failed_tensor")
            if entry.get("state") == "failed" and isinstance(claim, str) and claim in job.plan.output \
                    and claim not in job.refuted:
                await self._check_claim(run, ctx, job, peer, claim)

    async def _read_share(self, run: Run, job: _Job, peer: str, blob: str) -> _Share | None:
        """A member's share, if delivered and well formed: this job's, from that
        member, listing only output tensors with the infos the merge writes."""
        blobs = self.services.blobs
        try:
            data = await blobs.fetch(blob, hints=[peer], timeout=self.services.config.fetch_timeout,
                                     max_bytes=MAX_MANIFEST_BYTES)
            manifest = await self.services.compute(lambda: loads_manifest(data))
        except BlobNotFound:
            self.counts["shares_not_delivered"] += 1
            return None
        except ModelFormatError as e:
            log.warning("job=%s peer=%s share %s malformed: %s", run.job_id, peer, blob[:12], e)
            self.counts["shares_rejected"] += 1
            return None
        output = job.plan.output
        if manifest.meta != {SHARE_JOB_KEY: run.job_id, SHARE_PEER_KEY: peer} or any(
                output.get(n) != t.info for n, t in manifest.tensors.items()):
            log.warning("job=%s peer=%s share %s is not this merge's output", run.job_id, peer,
                        blob[:12])
            self.counts["shares_rejected"] += 1
            return None
        return _Share(blob, dict(manifest.tensors))

    async def _check_claim(self, run: Run, ctx: RunContext, job: _Job, peer: str, name: str) -> None:
        """``peer`` failed saying tensor ``name`` cannot be merged: recompute it (hashing
        the output, storing nothing); the claim stands only if it fails here too."""
        try:
            _, fetched = await self.services.models.merge_share(
                job.plan.spec, job.plan.readers, [name], keep=False, compute=self.services.compute)
        except (MergeInputError, MergeSpecError) as e:
            log.warning("job=%s tensor %r cannot be merged (found by %s, confirmed here): %s",
                        run.job_id, name, peer, e)
            await self._claim(ctx, e, name)
            raise KindRefused(str(e)[:200]) from None
        job.bytes_fetched += fetched
        job.refuted.add(name)
        self.counts["claims_refuted"] += 1
        log.warning("job=%s peer=%s claimed tensor %r cannot be merged; it merges fine here",
                    run.job_id, peer, name)

    async def _claim(self, ctx: RunContext, error: Exception, name: str | None = None) -> None:
        tensor = getattr(error, "tensor", None) or name
        if tensor is not None:
            await ctx.report(force=True, failed_tensor=tensor)
        self.counts["inputs_failed"] += 1

    # -- the merger --------------------------------------------------------------------------
    async def produce(self, run: Run, ctx: RunContext, inputs: list[Input]) -> Result | None:
        job = await self._job(run, ctx)
        spec = job.plan.spec
        try:
            await self._refresh(run, ctx, job)
            await self._check_shares(run, job)
            tensors, sources = await self._assemble(run, ctx, job)
        except (ModelUnavailable, BlobNotFound) as e:
            raise KindRefused(f"inputs not delivered: {e}") from None
        except BlobStoreFull as e:
            raise KindRefused(f"the blob store is full: {e}") from None
        manifest = merged_manifest(spec, tensors)
        data = await self.services.compute(lambda: dumps_manifest(manifest))
        model_id = await self.services.blobs.put(data)
        finals = {inp.peer: inp for inp in inputs}
        used = []  # whose shares made the model: finals, or the last share of one behind
        for rank, peer in enumerate(run.roster):
            if sources.get(peer):
                share = job.seen.get(peer)
                blob = share.blob if share is not None else job.published
                used.append(finals.get(peer) or Input(peer, rank, blob or "", sources[peer]))
        canonical = spec.canonical()
        fields: dict[str, Any] = {
            "format": "lattice-model/2", "method": spec.method, "base": spec.base,
            "inputs": list(spec.models), "tensors": len(tensors), "bytes": manifest.nbytes,
            "dtypes": dict(sorted(Counter(t.info.dtype for t in tensors.values()).items())),
            "shares": {peer: n for peer, n in sorted(sources.items()) if n},
        }
        if run.spec.name is not None:
            fields["name"] = run.spec.name
        if len(canonical) <= MAX_RECORD_SPEC_CHARS:
            fields["spec"] = canonical
        await ctx.report(force=True, **self._progress(job))
        log.info("job=%s model %s assembled from %s", run.job_id, model_id[:12], fields["shares"])
        return Result(model_id, len(data), used, fields)

    async def _check_shares(self, run: Run, job: _Job) -> None:
        """Recompute `check_tensors` tensors of each other member's share (chosen by a
        seed only we know); a share that differs is not used."""
        if self.config.check_tensors <= 0:
            return
        models = self.services.models
        rng = random.Random(self.services.rng.getrandbits(64))
        for peer, share in sorted(job.seen.items()):
            if share is None or peer in job.unreachable:
                continue
            names = sorted(n for n in share.tensors if n not in job.mine)
            for name in rng.sample(names, min(self.config.check_tensors, len(names))):
                try:
                    merged, fetched = await models.merge_share(job.plan.spec, job.plan.readers,
                                                               [name], keep=False,
                                                               compute=self.services.compute)
                except (MergeInputError, MergeSpecError) as e:
                    raise KindRefused(str(e)[:200]) from None
                job.bytes_fetched += fetched
                if merged[name] != share.tensors[name]:
                    log.warning("job=%s peer=%s share %s: tensor %r differs from ours; not used",
                                run.job_id, peer, share.blob[:12], name)
                    self.counts["shares_rejected"] += 1
                    job.seen[peer] = None
                    break
                self.counts["tensors_checked"] += 1

    async def _assemble(self, run: Run, ctx: RunContext, job: _Job
                        ) -> tuple[dict[str, ManifestTensor], dict[str, int]]:
        """Every output tensor's entry with its pieces in our store: from our own
        merges, else a share (pieces fetched from whoever listed them), else merged
        here. Returns the entries and how many tensors each member's share gave."""
        models = self.services.models
        sources: Counter[str] = Counter()
        tensors: dict[str, ManifestTensor] = {}
        wanted: dict[str, list[str]] = {}  # tensor -> members listing it, in rank order
        for name in job.plan.output:
            if name in job.mine:
                tensors[name] = job.mine[name]
                sources[job.me] += 1
                continue
            holders = [p for p in run.roster if p not in job.unreachable
                       and (s := job.seen.get(p)) is not None and name in s.tensors]
            if holders:
                wanted[name] = holders
        by_holder: dict[str, list[str]] = {}
        for name, holders in wanted.items():
            by_holder.setdefault(holders[0], []).append(name)
        batch_pieces = models.config.fetch_parallel
        for holder, names in sorted(by_holder.items()):
            share = job.seen[holder]
            assert share is not None
            batch: list[str] = []
            for i, name in enumerate(names):
                batch.append(name)
                pieces = sum(len(share.tensors[n].pieces) for n in batch)
                if pieces < batch_pieces and i + 1 < len(names):
                    continue  # small tensors travel together: one wait for several
                for got in await self._fetch_outputs(job, share, batch, wanted):
                    tensors[got] = share.tensors[got]
                    sources[holder] += 1
                batch = []
                await ctx.report(**self._progress(job))
        missing = [n for n in job.plan.output if n not in tensors]
        if missing:
            log.info("job=%s merging %d tensors nobody delivered", run.job_id, len(missing))
        for i, name in enumerate(missing):
            job.plan_next(missing[i + 1:])
            await self._merge_next(run, ctx, job, missing[i:])
            tensors[name] = job.mine[name]
            sources[job.me] += 1
        return tensors, dict(sources)

    async def _fetch_outputs(self, job: _Job, share: _Share, names: list[str],
                             holders: Mapping[str, list[str]]) -> list[str]:
        """Bring the output pieces of ``names`` (from ``share``) here; returns the
        tensors whose pieces all came (together, else one by one)."""
        models = self.services.models
        hints = list(dict.fromkeys(p for n in names for p in holders[n]))
        try:
            got = await models.fetch_blobs([p for n in names for p in share.tensors[n].pieces], hints)
            job.bytes_fetched += got
        except ModelUnavailable as e:
            job.bytes_fetched += e.fetched
            if len(names) == 1:
                self.counts["pieces_not_delivered"] += 1
                return []
        else:
            return names
        delivered = []
        for name in names:
            delivered += await self._fetch_outputs(job, share, [name], holders)
        return delivered


def _count(value: Any) -> int:
    """A non-negative int from a peer's entry (anything else: 0)."""
    return value if type(value) is int and value >= 0 else 0
