"""The job supervisor: runs jobs of every kind over a `PeerNetwork`, and the handle it
gives back (`JobSupervisor`: submit, join, list, get, cancel, watch, models,
statistics).

Owns what every kind shares: watching the job board in the replicated state, joining
jobs a kind volunteers for, sealing the roster of jobs this daemon submitted, one
participation per job (its entry in the replicated state, with the participant state
machine enforced where it is written, progress at a bounded rate, checkpoints), the
merge phase (who merges, takeovers, the model record), cancellation, and the
volunteer's limits (`Governance`): while the governor pauses compute our running
participations say ``paused`` with the reason (partners skip us, we go on where we
stopped when it lifts), and one that would exceed the memory cap, or finds the blob
store full, leaves its job with that reason. What a participant does and how the
result is produced are the kind's (`lattice.jobs.kind`).
The decisions are `lattice.core.jobs`' (pure). Must not import libp2p.

Failure policy. A peer that vanishes only costs the exchanges with it and, if it never
publishes its contribution, a wait of ``merge_timeout`` before the merge goes ahead
without it (it is listed as missing). A job this daemon cannot take part in after all
(`KindRefused`) fails *our* participation, with the reason, not the job; a kind that
leaves (`KindLeft`: an attached loop went away) says ``left`` and the others go on. A daemon
stopped mid-job keeps its entry ``running``; restarted with the same checkpoint dir it
resumes from the last checkpoint, and without one it leaves the job and says so. Local
state errors and bugs propagate.
"""

from __future__ import annotations

import builtins
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import trio

from lattice.core.governor import GovernorState, MemoryBudget
from lattice.core.jobs import (
    JOB_TRANSITIONS,
    PARTICIPANT_TRANSITIONS,
    TERMINAL,
    ClaimFailed,
    JobSpecError,
    JobSpecLike,
    Join,
    Policy,
    SealRoster,
    Start,
    Stop,
    Withdraw,
    check_transition,
    final_of,
    job_summary,
    job_token,
    join_entry,
    merge_decision,
    new_job_record,
    plan,
    read_job,
)
from lattice.core.jobs.train import BUILTIN_TASKS
from lattice.core.state import LocalStateError, Set, StateStore
from lattice.jobs.attach import AttachConfig
from lattice.jobs.checkpoints import CheckpointError, Checkpoints
from lattice.jobs.kind import Contribution, Input, JobKind, KindLeft, KindRefused, OverLimit, Services
from lattice.jobs.merge import MergeConfig
from lattice.net.blob import (
    BlobConfig,
    BlobService,
    BlobStore,
    BlobStoreFull,
    Providers,
    serve_blobs,
)
from lattice.net.gossip_avg import (
    Compute,
    GossipConfig,
    TensorTransport,
    serve_gossip_avg,
    thread_compute,
)
from lattice.net.modelstore import ModelsConfig, open_model_service
from lattice.net.streams import PeerNetwork

log = logging.getLogger("lattice.jobs")

_FINISHED = ("merging", "done", "left", "failed")
_NOT_PARTNERS = (*_FINISHED, "paused")  # a paused participant is busy: skipped, not dead


class Governance(Protocol):
    """What the supervisor asks of the volunteer's governor
    (`latticed.governor.Governor`): its decision, a change subscription, and the
    memory cap of job compute."""

    version: int
    state: GovernorState
    memory: MemoryBudget

    async def wait_change(self, after: int) -> GovernorState:
        """The state once `version` has moved past ``after``."""
        ...

    def check_memory(self) -> str | None:
        """Why job compute must give memory back now, or None."""
        ...


class JobNotFound(KeyError):
    """No job (or model) with this id in the replicated state."""


class NotSubmitter(PermissionError):
    """Only a job's submitter may cancel it."""


@dataclass(frozen=True)
class JobsConfig:
    """The supervisor's and the built-in kinds' settings (daemon config ``[jobs]``)."""

    accept_tasks: tuple[str, ...] = BUILTIN_TASKS
    """Train tasks this daemon volunteers for."""
    allowed_plugins: tuple[str, ...] = ()
    """Plugin task names (entry points) this daemon may load."""
    max_jobs: int = 1
    """Jobs joined or running at once."""
    join_timeout: float = 600.0
    """A job joined but not sealed within this long is left (`Policy.join_timeout`)."""
    progress_interval: float = 1.0
    """Seconds between progress writes to our participation entry (plus every transition),
    at least; a large roster spaces them further (`progress_rate`)."""
    progress_rate: float = 4.0
    """Progress writes per second one whole job may cost the network, shared by its
    roster: each write is replicated to every daemon, so 256 participants writing every
    second would flood it; each waits ``roster / progress_rate`` seconds instead (`jobs
    watch` still sees the job's totals move about this often). Jobs of up to this many
    participants write every ``progress_interval`` as before. (8 cost a 12-daemon digits
    job on 2 cores 16 % of its time: a write costs each daemon ~6 frames in and out.)"""
    checkpoint_every: int = 20
    """Rounds between checkpoints (0: only when training ends)."""
    sync_patience: float = 2.0
    """How long one round keeps looking for a free partner before training on."""
    merge_takeover: float = 30.0
    """A later merge candidate takes over this long after the one before it."""
    reconcile_interval: float = 1.0
    """The job board is re-read at least this often (and on every change)."""
    fetch_timeout: float = 60.0
    """The merger waits this long for one participant's final contribution blob."""
    compute_threads: int = 1
    """Worker threads for training and averaging math."""
    max_params: int = 50_000_000
    """Largest model (parameters) we train: task options come from the network, and
    e.g. a huge hidden layer must not exhaust our memory."""
    gossip: GossipConfig = field(default_factory=GossipConfig)
    blob: BlobConfig = field(default_factory=BlobConfig)
    attach: AttachConfig = field(default_factory=AttachConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)


@dataclass
class Run:
    """One job this daemon takes part in: its participation, as the supervisor and the
    kind see it."""

    job_id: str
    kind: JobKind[Any]
    spec: Any
    roster: list[str]
    rank: int
    resume: bool
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stop_reason: str | None = None
    state: str = "running"
    published: str | None = None  # the participant state our entry last said
    job_state: str | None = None  # our claim about the job, once made (kept after)
    progress: dict[str, Any] = field(default_factory=dict)
    final: Contribution | None = None
    model: str | None = None
    missing: list[str] = field(default_factory=list)
    round: int = 0
    resumed: int = 0
    resumed_from: int | None = None  # the kind's step count when it last resumed
    next_publish: float = -math.inf
    dead: set[str] = field(default_factory=set)
    reason: str | None = None


class _Context:
    """`lattice.jobs.kind.RunContext`: the supervisor's side of one participation."""

    def __init__(self, supervisor: JobSupervisor, run: Run,
                 checkpoint: tuple[dict[str, np.ndarray], dict[str, Any]] | None) -> None:
        self._sup = supervisor
        self._run = run
        self.services = supervisor.services
        self.checkpoint = checkpoint
        self._closers: list[Callable[[], Any]] = []

    async def report(self, *, force: bool = False, **progress: Any) -> None:
        self._run.progress.update(progress)
        if "round" in progress:
            self._run.round = int(progress["round"])
        self._sup._publish_progress(self._run, force=force)

    def due(self) -> bool:
        return trio.current_time() >= self._run.next_publish

    async def save_checkpoint(self, arrays: Mapping[str, np.ndarray],
                              meta: Mapping[str, Any], *,
                              final: Contribution | None = None) -> None:
        await self._sup._save_checkpoint(self._run, arrays, meta, final)

    def on_close(self, callback: Callable[[], Any]) -> None:
        self._closers.append(callback)

    def candidates(self) -> list[str]:
        return self._sup.candidates(self._run)

    def reserve_memory(self, nbytes: int) -> None:
        governance = self._sup.governance
        if governance is None:
            return
        why = governance.memory.reserve(self._run.job_id, nbytes)
        if why is not None:
            raise OverLimit(why)
        self.on_close(lambda: governance.memory.release(self._run.job_id))

    def entries(self) -> dict[str, Mapping[str, Any]]:
        view = self._sup._job_view(self._run.job_id)
        found = view["participants"] if view is not None else {}
        return {p: found.get(p, {}) for p in self._run.roster}

    async def wait_changed(self) -> None:
        await self._sup._changed.wait()

    def close(self) -> None:
        for callback in reversed(self._closers):
            callback()
        self._closers.clear()


def progress_spacing(roster_size: int, config: JobsConfig) -> float:
    """Seconds between one participant's progress writes: the job as a whole writes at
    most ``config.progress_rate`` times a second."""
    return max(config.progress_interval, roster_size / max(config.progress_rate, 1e-9))


class JobSupervisor:
    """The running job service (what `serve_jobs` hands back)."""

    def __init__(self, network: PeerNetwork, store: StateStore, sync: Any,
                 kinds: Mapping[str, JobKind[Any]], services: Services,
                 checkpoints: Checkpoints, asked: set[str] | None = None,
                 governance: Governance | None = None) -> None:
        self.network = network
        self.store = store
        self.sync = sync
        self.kinds = dict(kinds)
        self.services = services
        self.config = services.config
        self.checkpoints = checkpoints
        self.governance = governance
        self.paused: str | None = None  # why the governor stops our compute now
        self.me = network.peer_id
        self._clock = services.clock
        self._rng = services.rng
        self._policy = Policy(self.config.max_jobs, self.config.join_timeout)
        self._parsers = {name: kind.parse_spec for name, kind in self.kinds.items()}
        self._specs: dict[str, tuple[Any, JobSpecLike | JobSpecError]] = {}
        self._runs: dict[str, Run] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        # jobs a local user asked to take part in (`join`), read by the kinds through
        # `Services.asked_to_join`; only ids of jobs we know, dropped once they end
        self._asked = asked if asked is not None else set()
        self.counts: Counter[str] = Counter()
        self._unsubscribe = store.subscribe(self._on_state_change)

    # -- public API ---------------------------------------------------------------------------
    @property
    def blobs(self) -> BlobService:
        return self.services.blobs

    @property
    def gossip(self) -> Any:
        return self.services.gossip

    def submit(self, raw: Mapping[str, Any], access: Mapping[str, Any] | None = None) -> str:
        """Validate ``raw`` with its kind's parser (``kind``, default ``train``) and
        publish the job (``access``: who may take part, `lattice.core.jobs.access`);
        returns its id. Raises JobSpecError."""
        name = raw.get("kind", "train") if isinstance(raw, Mapping) else "train"
        kind = self.kinds.get(name) if isinstance(name, str) else None
        if kind is None:
            raise JobSpecError("kind", f"unknown job kind {str(name)[:32]!r}; known: "
                               f"{', '.join(sorted(self.kinds))}")
        spec = kind.parse_spec(raw)
        nonce = f"{self._rng.getrandbits(128):032x}"
        job_id, record = new_job_record(spec, self.me, nonce, self._clock(), kind=kind.name,
                                        access=access)
        self._write([Set(f"jobs/{job_id}", record)])
        self.counts["submitted"] += 1
        log.info("job=%s submitted: kind=%s min_peers=%d", job_id, kind.name, spec.min_peers)
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

    def token(self, job_id: str) -> str:
        """The token joiners of our private job need (`lattice.core.jobs.job_token`)."""
        return job_token(self.store.identity, job_id)

    def join(self, job_id: str, token: str | None = None) -> bool:
        """This daemon's local user wants to take part in ``job_id`` (a private one: with
        the token its submitter handed out): we join it now, and its kind knows a local
        user asked (`Services.asked_to_join`: an attach job runs only where one did).
        False if we take part already. Raises JobNotFound, `lattice.core.jobs.JoinRefused`."""
        view = self._job_view(job_id)
        if view is None:
            raise JobNotFound(job_id)
        entry = join_entry(self.me, job_id, view, self._clock(), token)
        if job_id not in self._asked:
            self._asked.add(job_id)
            self.counts["asked_to_join"] += 1
            log.info("job=%s a local user asked to take part", job_id)
        if entry is not None:
            self._write_entry(job_id, None, entry)
        self._wake()
        return entry is not None

    def cancel(self, job_id: str) -> bool:
        """Cancel a job we submitted; False if it already ended. Raises JobNotFound, NotSubmitter."""
        view = self._job_view(job_id)
        if view is None:
            raise JobNotFound(job_id)
        if view["submitter"] != self.me:
            raise NotSubmitter(f"job {job_id} was submitted by {view['submitter']}")
        if view["status"] in TERMINAL:
            return False
        check_transition(JOB_TRANSITIONS, view["status"], "cancelled")
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
        blobs = self.services.blobs
        record = self.store.models().get(model_id)
        if record is None and not blobs.store.has(model_id):
            raise JobNotFound(model_id)
        hints = list(record.get("producers", [])) if record else []
        return await blobs.fetch(model_id, hints=hints,
                                 timeout=timeout if timeout is not None else self.config.fetch_timeout)

    def participation_states(self) -> dict[str, int]:
        """Our participations by the state our entries say (``paused`` while the
        governor pauses compute)."""
        return dict(Counter(r.published or r.state for r in self._runs.values()))

    def partners(self) -> set[str]:
        """The peers in the rosters of the jobs this daemon runs now (the connection
        manager keeps their connections)."""
        return {p for run in self._runs.values() for p in run.roster if p != self.me}

    def statistics(self) -> dict[str, Any]:
        kinds: Counter[str] = Counter()
        for kind in self.kinds.values():
            kinds.update(kind.counts)
        return {
            **self.counts,
            **kinds,
            "running": {jid: {"kind": r.kind.name, "round": r.round, "state": r.state,
                              "rank": r.rank, **r.progress}
                        for jid, r in self._runs.items()},
            "paused": self.paused,
            "asked_to_join": len(self._asked),
            "kinds": {name: kind.statistics() for name, kind in self.kinds.items()},
            "gossip": self.services.gossip.statistics(),
            "blobs": self.services.blobs.statistics(),
        }

    def _wake(self) -> None:
        """Wake everything waiting on a change of the board (`_changed`)."""
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    # -- the board ------------------------------------------------------------------------------
    def _on_state_change(self, event: Any) -> None:
        if not (event.path.startswith("jobs/") or event.path.startswith("members/")
                or event.path.startswith("models/")):
            return
        self._wake()
        if event.path.startswith("jobs/") and event.value is not None and self._listeners:
            note = {"job": event.path[5:], "summary": job_summary(event.value)}
            for listener in list(self._listeners):
                listener(note)

    def _write(self, changes: builtins.list[Any]) -> None:  # (`list` is a method here)
        if self.sync is not None:
            self.sync.write(changes)
        else:
            self.store.apply_local(changes, self._clock())

    def _job_view(self, job_id: str) -> dict[str, Any] | None:
        try:
            return self.store.get(f"jobs/{job_id}", self._clock())
        except KeyError:
            return None

    def _spec(self, job_id: str, view: Mapping[str, Any]) -> JobSpecLike | None:
        """The job's checked spec (None: the record is invalid or of a kind we do not
        know, and the job is ignored); checked again only when the roster, the one
        field that changes, does."""
        roster = view["spec"].get("roster")
        key = tuple(roster) if isinstance(roster, list) else roster
        cached = self._specs.get(job_id)
        if cached is None or cached[0] != key:
            try:
                result: JobSpecLike | JobSpecError = read_job(job_id, view["spec"], self._parsers)
            except JobSpecError as e:
                log.info("job=%s ignored: %s", job_id, e)
                self.counts["invalid_jobs"] += 1
                result = e
            cached = self._specs[job_id] = (key, result)
        return None if isinstance(cached[1], JobSpecError) else cached[1]

    def _alive(self, members: Mapping[str, Mapping[str, Any]]) -> Callable[[str], bool]:
        # no member record, no heartbeat: not alive (a Sybil volunteer needs none to join)
        return lambda peer: members.get(peer, {}).get("alive", False)

    async def _serve_board(self) -> None:
        if self.sync is not None:
            # our joins and progress are writes: after a restart, act only once our own
            # history is confirmed (`CrdtSync.write`), not on a view missing our records
            await self.sync.wait_writable()
        while True:
            live = self._reconcile()
            self._check_memory()
            # time moves a live job on (roster waits, dead partners, takeovers); with
            # none, only a change can: an idle daemon does not wake every second
            pending = live or bool(self._runs)
            with trio.move_on_after(self.config.reconcile_interval if pending else math.inf):
                await self._changed.wait()

    # -- the volunteer's limits ----------------------------------------------------------------
    async def _follow_governor(self, governance: Governance) -> None:
        """Mirror the governor's decision: our running participations say ``paused``
        with the reason while compute may not run (the governed compute itself blocks
        the math), and gossip takes part in no exchange while compute or transfers are
        paused."""
        seen = -1
        while True:
            state = await governance.wait_change(seen)
            seen = governance.version
            paused = None if state.compute else state.compute_reasons[0].text
            self.services.gossip.paused = paused or (
                None if state.network else state.network_reasons[0].text)
            if paused != self.paused:
                self.paused = paused
                log.info("jobs %s", f"paused: {paused}" if paused else "resumed")
                for run in list(self._runs.values()):
                    if run.state == "running" and run.published in ("running", "paused"):
                        self._publish_progress(run, force=True)

    def _check_memory(self) -> None:
        """Stop every participation holding memory when job compute is over the cap:
        each leaves its job with the reason."""
        why = self.governance.check_memory() if self.governance is not None else None
        if why is None:
            return
        for run in list(self._runs.values()):
            if run.stop_reason is None and run.state in ("running", "merging"):
                log.warning("job=%s leaving: %s", run.job_id, why)
                self.counts["left_over_limit"] += 1
                run.stop_reason = why
                run.scope.cancel()

    def _reconcile(self) -> bool:
        """Act on the board; whether any job on it is still live."""
        now = self._clock()
        alive = self._alive(self.store.members(now))
        jobs = self.store.jobs()
        live = {jid for jid, v in jobs.items() if v["status"] not in TERMINAL}
        reserved = len(self._runs) + sum(
            1 for jid in live
            if jid not in self._runs
            and jobs[jid]["participants"].get(self.me, {}).get("state") == "joined")
        self._asked.intersection_update(live)
        for job_id, view in jobs.items():
            spec = self._spec(job_id, view)
            if spec is None:
                continue
            kind = self.kinds[view["spec"]["kind"]]
            # paused by the volunteer's limits, we offer no room to other people's jobs
            # (a roster holding us would wait on us); a local user's own ask still counts
            volunteer = kind.volunteers(job_id, spec) and (
                self.paused is None or job_id in self._asked)
            actions = plan(self.me, job_id, view, spec, volunteer=volunteer,
                           policy=self._policy, active=set(self._runs), reserved=reserved,
                           alive=alive, now=now,
                           token=self.token(job_id) if view["submitter"] == self.me else None)
            for action in actions:
                reserved += isinstance(action, Join)
                self._do(action, view, kind, spec)
        return bool(live)

    def _do(self, action: Any, view: Mapping[str, Any], kind: JobKind[Any], spec: Any) -> None:
        job_id = action.job_id
        ours = view["participants"].get(self.me, {})
        if isinstance(action, SealRoster):
            log.info("job=%s roster sealed: %s", job_id, action.roster)
            self._write([Set(f"jobs/{job_id}", {**view["spec"], "roster": action.roster,
                                                 "roster_at": self._clock()})])
        elif isinstance(action, Join):
            log.info("job=%s joining (%s)", job_id, kind.name)
            self._write_entry(job_id, ours.get("state"), {
                "peer_id": self.me, "state": "joined", "updated": self._clock()})
            self.counts["joined"] += 1
        elif isinstance(action, Withdraw):
            self._write_entry(job_id, ours.get("state"), {
                **ours, "state": "left", "reason": action.reason, "updated": self._clock()})
        elif isinstance(action, Start):
            assert self._nursery is not None
            run = Run(job_id, kind, spec, action.roster, action.rank, action.resume,
                      published=ours.get("state"), job_state=ours.get("job_state"))
            self._runs[job_id] = run
            self._nursery.start_soon(self._run, run)
        elif isinstance(action, ClaimFailed):
            log.warning("job=%s every participant left or failed: the job failed", job_id)
            self._write_entry(job_id, ours.get("state"), {
                **ours, "job_state": "failed", "updated": self._clock()})
        elif isinstance(action, Stop):
            running = self._runs.get(job_id)
            if running is not None and running.stop_reason is None:
                log.info("job=%s stopping: %s", job_id, action.reason)
                running.stop_reason = action.reason
                running.scope.cancel()

    def _write_entry(self, job_id: str, old: str | None, entry: dict[str, Any], *,
                     also: Sequence[Any] = ()) -> None:
        """Write our participation entry (with ``also`` in the same update); its state
        change must be a legal transition."""
        check_transition(PARTICIPANT_TRANSITIONS, old, entry["state"])
        self._write([*also, Set(f"participation/{job_id}", entry)])

    # -- one participation ---------------------------------------------------------------------
    async def _run(self, run: Run) -> None:
        ctx: _Context | None = None
        try:
            with run.scope:
                ctx = await self._prepare(run)
                if ctx is not None:
                    await self._participate(run, ctx)
        finally:
            if ctx is not None:
                ctx.close()
            self._runs.pop(run.job_id, None)
            self._wake()
        if run.stop_reason is not None and run.scope.cancelled_caught:
            self._publish_bare(run, "left", reason=run.stop_reason)
            self.checkpoints.drop(run.job_id)

    async def _prepare(self, run: Run) -> _Context | None:
        """Our checkpoint, if any (None: we cannot go on and said so)."""
        try:
            loaded = await self.services.compute(lambda: self.checkpoints.load(run.job_id))
        except CheckpointError as e:
            log.warning("job=%s checkpoint unusable: %s", run.job_id, e)
            loaded = None
        kind_state = None
        if loaded is not None:
            arrays, meta = loaded
            if meta.get("job") == run.job_id and meta.get("roster") == run.roster:
                kind_state = self._restore(run, arrays, meta)
        if run.resume and kind_state is None:
            log.warning("job=%s restarted without a checkpoint: leaving the job", run.job_id)
            self._publish_bare(run, "left", reason="restarted without a checkpoint")
            return None
        return _Context(self, run, kind_state)

    def _restore(self, run: Run, arrays: dict[str, np.ndarray], meta: dict[str, Any]
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        run.round = int(meta.get("round", 0))
        final = meta.get("final")
        if isinstance(final, dict) and self.services.blobs.store.has(final.get("blob", "")):
            run.final = Contribution(final["blob"], int(final["weight"]))
        run.progress.update(meta.get("progress", {}))
        run.resumed = int(meta.get("resumed", 0)) + 1
        self.counts["resumed"] += 1
        log.info("job=%s resumed from checkpoint at round %d", run.job_id, run.round)
        return arrays, meta.get("kind", {})

    async def _participate(self, run: Run, ctx: _Context) -> None:
        if run.final is None:
            # resumed after our final was published and then lost: publish it again,
            # still merging (a participant's state never goes back)
            run.state = "merging" if run.published == "merging" else "running"
            run.job_state = run.job_state or "running"
            self._publish_progress(run, force=True)
            try:
                run.final = await run.kind.participate(run, ctx)
            except KindRefused as e:
                log.warning("job=%s cannot take part: %s", run.job_id, e)
                self._publish_bare(run, "failed", reason=str(e)[:200])
                self.counts["failed_kind"] += 1
                return
            except (KindLeft, BlobStoreFull) as e:
                # over the volunteer's limits (memory, a full blob store) we leave too:
                # the job goes on without us
                over = isinstance(e, (OverLimit, BlobStoreFull))
                log.info("job=%s leaving: %s", run.job_id, e)
                self._publish_bare(run, "left", reason=str(e)[:200])
                self.checkpoints.drop(run.job_id)
                self.counts["left_over_limit" if over else "left_kind"] += 1
                return
            if run.final is None:
                return
        try:
            await self._merge_phase(run, ctx)
        except BlobStoreFull as e:  # no room for the merged model: a later candidate merges
            log.warning("job=%s cannot merge: %s", run.job_id, e)
            self._publish_bare(run, "left", reason=str(e)[:200])
            self.counts["left_over_limit"] += 1

    async def _merge_phase(self, run: Run, ctx: _Context) -> None:
        run.state = run.job_state = "merging"
        self._publish_progress(run, force=True)
        deadline = trio.current_time() + run.spec.merge_timeout
        while True:
            view = self._job_view(run.job_id)
            if view is None:
                return
            model = self._published_model(run, view)
            if model is not None:
                run.model = model
                run.state = "done"
                self._publish_progress(run, force=True)
                self.checkpoints.drop(run.job_id)
                return
            now = trio.current_time()
            alive = self._alive(self.store.members(self._clock()))
            run.dead.update(p for p in run.roster if p != self.me and not alive(p))
            decision = merge_decision(run.roster, view["participants"], me=self.me, now=now,
                                      deadline=deadline, takeover=self.config.merge_takeover,
                                      dead=run.dead)
            if decision.merger == self.me:
                await self._merge(run, ctx, view, decision.inputs)
                self.checkpoints.drop(run.job_id)
                return
            changed = self._changed
            wake = now + self.config.reconcile_interval  # liveness and takeover are re-read
            if now < deadline:
                wake = min(wake, deadline)
            with trio.move_on_at(wake):
                await changed.wait()

    def _published_model(self, run: Run, view: Mapping[str, Any]) -> str | None:
        """The job's merged model, if a roster member published one. A bare ``done``
        claim is not enough: any author can write one, only a model record backs it."""
        models = self.store.models()
        found = sorted(
            e["model"] for p, e in view["participants"].items()
            if p in run.roster and e.get("job_state") == "done" and isinstance(e.get("model"), str)
            and models.get(e["model"], {}).get("job") == run.job_id
            and p in models.get(e["model"], {}).get("producers", []))
        return found[0] if found else None

    async def _merge(self, run: Run, ctx: _Context, view: Mapping[str, Any],
                     members: builtins.list[str]) -> None:
        participants = view["participants"]
        inputs = []
        for peer in members:
            final = final_of(participants[peer])
            assert final is not None  # merge_decision's inputs have one
            inputs.append(Input(peer, run.roster.index(peer), final["blob"], final["samples"]))
        why = "no final contribution could be read"
        try:
            result = await run.kind.produce(run, ctx, inputs)
        except KindRefused as e:  # the kind found the job cannot be done (a bad input...)
            result, why = None, str(e)[:200]
        if result is None:  # even our own is unreadable: nothing to merge, the job failed
            run.job_state = run.state = "failed"
            self._publish_progress(run, force=True, reason=why)
            return
        used_peers = {u.peer for u in result.used}
        run.missing = [p for p in run.roster if p not in used_peers]
        record = {
            "producer": self.me, "job": run.job_id, "kind": run.kind.name,
            "format": "safetensors", "size": result.size,
            "inputs": [{"peer": u.peer, "rank": u.rank, "blob": u.blob, "samples": u.weight}
                       for u in result.used],
            "missing": run.missing, "created": self._clock(), **result.fields,
        }
        run.model = result.model_id
        run.job_state = run.state = "done"
        # one signed update: whoever sees the done claim also holds the record backing it
        self._publish(run, "done", also=[Set(f"models/{result.model_id}", record)])
        log.info("job=%s merged %d contributions (missing %s): model %s", run.job_id,
                 len(result.used), run.missing, result.model_id)
        self.counts["merged"] += 1

    def candidates(self, run: Run) -> builtins.list[str]:
        """Roster members that may still exchange with us: not finished, not known dead."""
        view = self._job_view(run.job_id)
        entries = view["participants"] if view else {}
        alive = self._alive(self.store.members(self._clock()))
        return [p for p in run.roster
                if p != self.me and entries.get(p, {}).get("state") not in _NOT_PARTNERS
                and alive(p)]

    # -- progress ----------------------------------------------------------------------------------
    def _publish_progress(self, run: Run, *, force: bool = False, **extra: Any) -> None:
        now = trio.current_time()
        if not force and now < run.next_publish:
            return
        run.next_publish = now + progress_spacing(len(run.roster), self.config)
        self._publish(run, run.state, **extra)

    def _publish(self, run: Run, state: str, *, also: Sequence[Any] = (), **extra: Any) -> None:
        paused = state == "running" and self.paused is not None
        if paused:
            state = "paused"  # the kind's loop is held in the governed compute meanwhile
        entry: dict[str, Any] = {"peer_id": self.me, "state": state, "rank": run.rank,
                                 "round": run.round, "updated": self._clock()}
        if run.job_state is not None:  # a claim, once made, stays (the status is their max)
            entry["job_state"] = run.job_state
        for name, value in run.progress.items():
            if isinstance(value, float) and not math.isfinite(value):
                continue
            entry[name] = value
        if run.resumed:
            entry["resumed"] = run.resumed
            if run.resumed_from is not None:
                entry["resumed_from"] = run.resumed_from
        if run.final is not None:
            entry["final"] = {"blob": run.final.blob, "samples": run.final.weight}
        if run.model is not None:
            entry["model"] = run.model
        if run.missing:
            entry["missing"] = list(run.missing)
        reason = extra.get("reason", run.reason)
        if reason is not None:
            entry["reason"] = reason
            run.reason = reason
        if paused:
            entry["reason"] = self.paused
        try:
            self._write_entry(run.job_id, run.published, entry, also=also)
        except LocalStateError as e:
            # e.g. our identity was banned: we can no longer speak for ourselves
            log.error("job=%s progress not written: %s", run.job_id, e)
            return
        run.published = state

    def _publish_bare(self, run: Run, state: str, *, reason: str) -> None:
        run.state = state
        self._publish(run, state, reason=reason)

    # -- checkpoints -----------------------------------------------------------------------------
    async def _save_checkpoint(self, run: Run, arrays: Mapping[str, np.ndarray],
                               kind_meta: Mapping[str, Any],
                               final: Contribution | None = None) -> None:
        final = final or run.final
        meta = {"job": run.job_id, "roster": run.roster, "round": run.round,
                "resumed": run.resumed, "progress": dict(run.progress), "kind": dict(kind_meta),
                "final": {"blob": final.blob, "weight": final.weight} if final else None}
        await self.services.compute(lambda: self.checkpoints.save(run.job_id, arrays, meta))
        self.counts["checkpoints"] += 1


async def serve_jobs(network: PeerNetwork, store: StateStore, sync: Any = None, *,
                     config: JobsConfig = JobsConfig(),
                     kinds: Callable[[Services], Mapping[str, JobKind[Any]]] | None = None,
                     checkpoint_dir: Path | str | None = None,
                     blob_dir: Path | str | None = None,
                     providers: Providers | None = None,
                     transport: TensorTransport | None = None,
                     compute: Compute | None = None,
                     governance: Governance | None = None,
                     model_compute: Compute | None = None,
                     clock: Callable[[], float] = time.time,
                     rng: random.Random | None = None,
                     task_status: trio.TaskStatus[JobSupervisor] = trio.TASK_STATUS_IGNORED,
                     ) -> None:
    """Run jobs until cancelled; hands back the `JobSupervisor`.

    Starts `/lattice/gossip-avg/2` and `/lattice/blob/1` (blobs in ``blob_dir``, or in
    memory) and the model store over them (`Services.models`), watches ``store`` for
    jobs, and writes through ``sync`` (a `CrdtSync`; None: straight to ``store``).
    ``kinds(services)`` builds the job kinds it runs (default: every kind in
    `lattice.jobs.KINDS`). ``checkpoint_dir`` enables resuming after a restart.
    ``compute`` runs the jobs' math, merge jobs' merges included (default:
    ``config.compute_threads`` worker threads; the daemon passes its governor's);
    ``model_compute`` the model store's own work for local users (imports, exports,
    merges over the RPC; default: its ``config.models.compute_threads`` worker
    threads); ``governance`` the volunteer's governor (pauses, the memory cap; None: no
    limits). ``clock`` is the wall clock of records and member liveness (tests pass
    ``trio.current_time``); ``rng`` the randomness of nonces and partner choice (seed it
    to replay a test). Failure policy: see the module docstring."""
    from lattice.jobs import builtin_kinds

    if compute is None:
        compute = thread_compute(trio.CapacityLimiter(config.compute_threads))
    blob_store = BlobStore(blob_dir, max_bytes=config.blob.max_store_bytes,
                           keep_free_bytes=config.blob.keep_free_bytes)
    async with trio.open_nursery() as nursery:
        gossip = await nursery.start(lambda task_status: serve_gossip_avg(
            network, config=config.gossip, transport=transport, task_status=task_status))
        blobs = await nursery.start(lambda task_status: serve_blobs(
            network, blob_store, config=config.blob, providers=providers, compute=compute,
            task_status=task_status))
        models = open_model_service(blobs, store, sync, config.models, clock=clock,
                                    compute=model_compute)
        asked: set[str] = set()
        services = Services(network, gossip, blobs, models, compute, config,
                            rng or random.Random(), clock, asked_to_join=asked.__contains__)
        supervisor = JobSupervisor(
            network, store, sync, (kinds or builtin_kinds)(services),
            services, Checkpoints(Path(checkpoint_dir) if checkpoint_dir is not None else None),
            asked=asked, governance=governance)
        supervisor._nursery = nursery
        try:
            if governance is not None:
                nursery.start_soon(supervisor._follow_governor, governance)
            nursery.start_soon(supervisor._serve_board)
            task_status.started(supervisor)
            await trio.sleep_forever()
        finally:
            supervisor._unsubscribe()
