"""The ``attach`` job kind: the user's own training loop (numpy or PyTorch, in the
user's process) takes part in a job through its local daemon, which does discovery,
averaging, compression, churn and the final merge on its behalf.

Spec: `lattice.core.jobs.AttachSpec` (proto/jobs.md, "attach"); the hand-off between a
loop and its daemon: proto/attach.md. The loop's side is `lattice.attach` (numpy) and
`lattice.torch`; the local API (`attach.*`) reaches this kind through `AttachKind`.
Must not import libp2p, nor execute anything received: a loop hands over numbers only.

Theory of operation
-------------------
1. A loop attaches (`AttachKind.attach`, from `attach.open`): its manifest and its
   shared float32 slot become a `LoopSession`; the local API has the supervisor record
   that our user wants to take part (`JobSupervisor.join`).
2. Once the roster is sealed, `participate` takes that session (waiting at most
   ``attach_timeout``) and agrees the start weights. The reference is the job's
   ``init`` model, else the lowest-rank member's own weights, which it publishes as a
   blob named in its entry (``init``); a member whose entry ended without one is
   skipped. A loop whose manifest differs is refused, naming the first differing
   tensor; every other member loads the reference into its loop's slot, so all start
   equal. The reference is also the shared vector lossy codecs encode against.
3. Rounds. The loop trains ``sync_every`` steps on its own, then calls `attach.sync`.
   Without overlap, our averaging party is "training" while the loop trains (offers
   are held, as in train jobs), and at the sync it averages: a held offer is served,
   else a pairwise exchange with a random live member (AD-PSGD), then the outer
   Nesterov step for ``noloco``/``diloco``; the result is in the slot before the loop
   resumes. With ``overlap`` 1 a sync adds the previous round's averaged delta to the
   slot, snapshots it and returns at once: the snapshot is averaged while the loop
   trains the next round, and its delta is applied one round late (Streaming DiLoCo,
   Douillard et al. 2025), so the loop waits only when the network did not keep up.
4. `attach.finish`: the slot becomes our final contribution (a canonical .safetensors
   blob: the manifest's names and shapes, float32); the merger averages the finals
   weighted by samples into the job's model (the train kind's rule).
5. The loop going away before it finished (its connection closes, `attach.detach`):
   we leave the job (`KindLeft`) and the others go on.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import trio

from lattice.core.jobs import AttachSpec, parse_attach_spec
from lattice.core.jobs.attach import Manifest, ManifestError, manifest_from_json, manifest_of
from lattice.jobs.kind import (
    Contribution,
    Input,
    KindLeft,
    KindRefused,
    Result,
    RunContext,
    Services,
    math_compute,
)
from lattice.learn.gossip import ParamChannel
from lattice.learn.merge import ModelFormatError, canonical_model_bytes, loads_safetensors, weighted_average
from lattice.learn.optim import OuterNesterov
from lattice.learn.validate import NormBound
from lattice.net.blob import BlobNotFound, BlobStoreFull
from lattice.net.gossip_avg import AveragingParty

if TYPE_CHECKING:
    from lattice.jobs.supervisor import Run

log = logging.getLogger("lattice.jobs.attach")

T = TypeVar("T")
_HEX = frozenset("0123456789abcdef")
_NUMPY_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                 np.dtype(np.float64): "float64"}
_AVG_CHUNK = 1 << 18  # elements per chunk of in-place slot updates (1 MiB of float32)


@dataclass(frozen=True)
class AttachConfig:
    """Limits of attached loops (daemon config ``[jobs]``, ``attach_*``)."""

    attach_timeout: float = 600.0
    """How long a started participant waits for its local loop to attach, and for the
    reference weights to be published."""
    max_tensors: int = 4096
    """Tensors in one attached model's manifest."""
    max_sessions: int = 8
    """Loops attached to this daemon at once."""
    max_wait: float = 30.0
    """The longest one `attach.wait` call blocks (the client calls again)."""


class SessionError(Exception):
    """A loop asked for something its session cannot do now (e.g. sync before the job
    started, or after the job ended); the message says why."""


# -- one attached loop ------------------------------------------------------------------------


@dataclass
class _Request:
    """One `attach.sync` or `attach.finish` from the loop, answered by the kind."""

    steps: int
    samples: int
    loss: float | None
    finish: bool
    done: trio.Event = field(default_factory=trio.Event)
    reply: dict[str, Any] | None = None
    error: str | None = None


class LoopSession:
    """An attached loop as its daemon sees it: the manifest, the shared memory's two
    slots (``active``: the one holding the loop's parameters; the other is spare), and
    the requests the loop makes. States: ``attached`` -> ``ready`` (the job started and
    the start weights are in the slot) -> ``merging`` (final published) -> ``done`` |
    ``failed`` | ``left``; ``gone`` once the loop went away."""

    def __init__(self, session_id: str, job_id: str, manifest: Manifest, region: Any,
                 memory: np.ndarray, owner: object = None) -> None:
        if memory.shape != (2 * manifest.num_params,) or memory.dtype != np.float32:
            raise ValueError("an attached loop's memory is two float32 slots")
        self.id = session_id
        self.owner = owner  # the local connection that opened it: only it may use it
        self.job_id = job_id
        self.manifest = manifest
        self.region = region  # keeps the mapping alive as long as the session
        n = manifest.num_params
        self.slots = (memory[:n], memory[n:])
        self.active = 0
        self.overwritten = False  # an average landed in the active slot since `adopt`
        self.state = "attached"
        self.gone = False
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.model: str | None = None
        self._request: _Request | None = None
        self._changed = trio.Event()

    # the loop's side (local API) ----------------------------------------------------------
    async def request(self, steps: int, samples: int, loss: float | None, *, finish: bool
                      ) -> dict[str, Any]:
        """Hand the kind a sync (or the finish) and wait for its answer."""
        if self.state != "ready":
            raise SessionError(self._not_ready())
        if self._request is not None:
            raise SessionError("a sync is already in progress on this session")
        req = _Request(steps, samples, loss, finish)
        self._request = req
        self._notify()
        await req.done.wait()
        if req.error is not None:
            raise SessionError(req.error)
        assert req.reply is not None
        return req.reply

    async def wait(self, until: str, timeout: float) -> dict[str, Any]:
        """Wait until the session is ``ready`` (or, ``until="done"``, the job's model is
        known) or ``timeout`` passed; the session's state either way. Raises
        SessionError once the session failed."""
        targets = {"ready": ("ready", "merging", "done"), "done": ("done",)}[until]
        with trio.move_on_after(timeout):
            while self.state not in targets and self.error is None:
                await self._changed.wait()
        if self.error is not None:
            raise SessionError(self.error)
        return self.describe()

    def describe(self) -> dict[str, Any]:
        return {"session": self.id, "job_id": self.job_id, "state": self.state,
                "model_id": self.model, "slot": self.active, **self.info}

    @property
    def slot(self) -> np.ndarray:
        """The slot that holds the loop's parameters."""
        return self.slots[self.active]

    def average_into(self, params: np.ndarray) -> np.ndarray:
        """Where an exchange writes its average while the loop waits in a sync: the slot
        that does not hold ``params`` (the current parameters). Adopting it is then a
        switch of slots, not a copy. (A second exchange in one sync writes into the
        active slot again: the first one's result is the current parameters then.)"""
        into = self.slots[0] if params is self.slots[1] else self.slots[1]
        if into is self.slot:
            self.overwritten = True
        return into

    def adopt(self, params: np.ndarray) -> bool:
        """At the end of a sync: make ``params`` the loop's (switching slots when an
        average landed in the spare one, else copying); whether they changed."""
        changed, self.overwritten = params is not self.slot or self.overwritten, False
        if params is self.slots[1 - self.active]:
            self.active = 1 - self.active
        elif changed and params is not self.slot:
            np.copyto(self.slot, params)
        return changed

    def lose(self, reason: str) -> None:
        """The loop went away (its connection closed, or it detached)."""
        if not self.gone:
            self.gone = True
            self.info["gone"] = reason
            self._notify()

    # the kind's side ---------------------------------------------------------------------
    async def next_request(self) -> _Request:
        """The loop's next request; raises KindLeft once the loop is gone."""
        while self._request is None or self._request.done.is_set():
            if self.gone:
                raise KindLeft(f"the attached loop went away ({self.info.get('gone')})")
            await self._changed.wait()
        return self._request

    def answer(self, req: _Request, reply: dict[str, Any]) -> None:
        req.reply = reply
        req.done.set()
        self._request = None
        self._notify()

    def become(self, state: str, **info: Any) -> None:
        self.state = state
        self.info.update(info)
        self._notify()

    def fail(self, message: str) -> None:
        """The session cannot go on (refused, the job failed or was cancelled)."""
        self.error = message
        self.state = "failed"
        req, self._request = self._request, None
        if req is not None and not req.done.is_set():
            req.error = message
            req.done.set()
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _not_ready(self) -> str:
        if self.error is not None:
            return self.error
        if self.state == "attached":
            return "the job has not started yet: wait for the session to be ready"
        return f"the session is {self.state}: no more syncs"


# -- what AveragingParty sees -----------------------------------------------------------------


@dataclass
class _LoopParams:
    """The loop's parameters as `AveragingParty` reads them (``participant.trainer``):
    the shared slot between rounds, or the result of an exchange until it is copied
    back; and the loop's own counters."""

    params: np.ndarray
    step: int = 0
    samples_seen: int = 0


@dataclass
class _LoopParticipant:
    trainer: _LoopParams
    channel: ParamChannel
    outer: OuterNesterov | None

    @property
    def averaging_samples(self) -> int:
        """What an exchange states as our ``samples`` (`pair_weights`): the samples the
        loop trained on (attach jobs weigh ``uniform`` or by ``samples``)."""
        return self.trainer.samples_seen


# -- the kind ---------------------------------------------------------------------------------


class AttachKind:
    """The attach kind (see the module docstring)."""

    name = "attach"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.config = services.config.attach
        self.max_params = services.config.max_params
        self._sessions: dict[str, LoopSession] = {}  # job id -> the loop attached for it
        self._by_id: dict[str, LoopSession] = {}
        self._added = trio.Event()
        self.counts: Counter[str] = Counter()

    # -- the local API's side ----------------------------------------------------------------
    def attach(self, job_id: str, manifest: Manifest, region: Any, memory: np.ndarray, *,
               owner: object = None) -> LoopSession:
        """A loop attaches to ``job_id`` (the caller checked the job and joined it).
        Raises SessionError when one is attached already or too many are."""
        old = self._sessions.get(job_id)
        if old is not None and not old.gone and old.state not in ("failed", "done"):
            raise SessionError(f"a loop is already attached to job {job_id} on this daemon")
        live = sum(1 for s in self._by_id.values() if not s.gone)
        if live >= self.config.max_sessions:
            raise SessionError(f"{live} loops are attached already (limit "
                               f"{self.config.max_sessions})")
        session = LoopSession(secrets.token_hex(8), job_id, manifest, region, memory, owner)
        self._sessions[job_id] = session
        self._by_id[session.id] = session
        self.counts["attached"] += 1
        log.info("job=%s session=%s loop attached: %d tensors, %d parameters", job_id,
                 session.id, len(manifest.tensors), manifest.num_params)
        added, self._added = self._added, trio.Event()
        added.set()
        return session

    def session(self, session_id: str) -> LoopSession | None:
        return self._by_id.get(session_id)

    def release(self, session: LoopSession, reason: str) -> None:
        """The loop's connection closed or it detached: it is gone for good."""
        session.lose(reason)
        self._by_id.pop(session.id, None)
        if session.state not in ("merging", "done"):
            self.counts["lost"] += 1

    # -- JobKind -----------------------------------------------------------------------------
    def parse_spec(self, raw: Any) -> AttachSpec:
        return parse_attach_spec(raw)

    def volunteers(self, job_id: str, spec: AttachSpec) -> bool:
        # only for a loop of our own user: nothing of an attach job runs without one
        return self.services.asked_to_join(job_id)

    def statistics(self) -> dict[str, Any]:
        return {**self.counts, "sessions": len(self._by_id),
                "max_sessions": self.config.max_sessions,
                "attach_timeout": self.config.attach_timeout,
                "max_tensors": self.config.max_tensors, "max_wait": self.config.max_wait}

    async def participate(self, run: Run, ctx: RunContext) -> Contribution | None:
        spec: AttachSpec = run.spec
        session = await self._wait_for_loop(run)
        ctx.on_close(lambda: self._closed(run, session))
        try:
            init, init_blob, loaded = await self._start_weights(run, ctx, session)
        except KindRefused as e:
            session.fail(str(e))
            self.counts["refused"] += 1
            raise
        compute = self.services.compute
        participant = _LoopParticipant(
            _LoopParams(session.slot),
            ParamChannel(spec.compression, reference=init),
            OuterNesterov(init, spec.outer_lr, spec.outer_momentum) if spec.outer else None)
        # without overlap the loop waits while we average: the average lands in the
        # spare slot, and the sync switches slots instead of copying 4 bytes a parameter.
        # With overlap the loop trains in its slot meanwhile: a new array, applied later.
        into = None if spec.overlap else (lambda: session.average_into(participant.trainer.params))
        party = AveragingParty(run.job_id, self.services.network.peer_id, run.roster,
                               participant, weighting=spec.weighting,
                               bound=NormBound(factor=spec.norm_factor), compute=compute,
                               math=math_compute(compute, session.slot.size), average_into=into)
        resumed = ctx.checkpoint is not None
        if ctx.checkpoint is not None:
            arrays, meta = ctx.checkpoint
            await compute(lambda: _restore(participant, arrays, meta))
            run.resumed_from = participant.trainer.step
            party.bytes_sent = int(meta.get("bytes_sent", 0))
            party.bytes_received = int(meta.get("bytes_received", 0))
            party.stats["exchanges"] = int(meta.get("exchanges", 0))
        gossip = self.services.gossip
        # From "ready" on the loop runs in its slot: until its first sync (the first
        # training round of `_rounds`/`_overlapped`) offers are held, as during any
        # round, or an exchange landing now would write into the slot under the loop
        # (two would reach the active one) before it even read its start weights.
        party.training = True
        gossip.register(party)
        ctx.on_close(lambda: gossip.unregister(run.job_id))
        if not resumed:
            await self._checkpoint(ctx, party, init_blob)  # a restart resumes, not leaves
        session.become("ready", rank=run.rank, roster=list(run.roster), loaded=loaded,
                       resumed=resumed, spec=spec.to_dict())
        log.info("job=%s rank=%d/%d loop ready (%s, overlap=%d)", run.job_id, run.rank,
                 len(run.roster), spec.algorithm, spec.overlap)
        await self._report(run, ctx, party, force=True)
        rounds = self._overlapped if spec.overlap else self._rounds
        finish = await rounds(run, ctx, session, party, init_blob)
        await party.wait_idle()  # an exchange accepted before we closed commits first
        final = await self._publish_final(run, session, participant)
        await self._checkpoint(ctx, party, init_blob, final=final)
        session.become("merging", final=final.blob)
        session.answer(finish, {"final": final.blob, "round": run.round})
        await self._report(run, ctx, party, force=True)
        return final

    async def _wait_for_loop(self, run: Run) -> LoopSession:
        with trio.move_on_after(self.config.attach_timeout):
            while True:
                session = self._sessions.get(run.job_id)
                if session is not None and session.state == "attached":
                    if session.gone:
                        raise KindLeft("the attached loop went away before the job started")
                    return session
                await self._added.wait()
        raise KindRefused(f"no local loop attached within {self.config.attach_timeout:g} s")

    def _closed(self, run: Run, session: LoopSession) -> None:
        """The participation ended: tell the loop how."""
        if run.model is not None:
            session.model = run.model
            session.become("done", model_id=run.model)
        elif session.state != "failed":
            session.fail(f"the job ended without a model here ({run.stop_reason or run.state})")
        if self._sessions.get(run.job_id) is session:
            del self._sessions[run.job_id]

    # -- start weights -------------------------------------------------------------------------
    async def _start_weights(self, run: Run, ctx: RunContext, session: LoopSession
                             ) -> tuple[np.ndarray, str, bool]:
        """(the job's initial parameters in the loop's slot order, the blob they came
        from, whether they were loaded into the loop's slot). Raises KindRefused."""
        spec: AttachSpec = run.spec
        me = self.services.network.peer_id
        if ctx.checkpoint is not None:  # resumed: the loop keeps what it trained
            blob, hints = str(ctx.checkpoint[1].get("init", "")), [me]
        elif spec.init:
            blob, hints = spec.init, []
        else:
            ref, blob_or_none = await self._reference(run, ctx)
            if ref == me:
                return await self._publish_init(run, ctx, session)
            assert blob_or_none is not None
            blob, hints = blob_or_none, [ref]
        manifest = session.manifest
        # a float64 init model is twice our slot; its header grows with the tensor count
        limit = 8 * manifest.num_params + 65536 + 512 * len(manifest.tensors)
        try:
            data = await self.services.blobs.fetch(
                blob, hints=hints, timeout=self.config.attach_timeout, max_bytes=limit)
        except BlobNotFound:
            raise KindRefused(f"the job's initial model {blob[:16]} could not be fetched") from None
        init = await self.services.compute(lambda: self._read_init(data, manifest))
        if ctx.checkpoint is not None:
            return init, blob, False
        slot = session.slot
        await self.services.compute(lambda: np.copyto(slot, init))
        return init, blob, True

    async def _reference(self, run: Run, ctx: RunContext) -> tuple[str, str | None]:
        """(the member whose weights every participant starts from, its init blob; None
        when it is us): the lowest-rank member that published one or still may."""
        me = self.services.network.peer_id
        with trio.move_on_after(self.config.attach_timeout):
            while True:
                entries = ctx.entries()
                for peer in run.roster:
                    entry = entries.get(peer, {})
                    blob = entry.get("init")
                    if isinstance(blob, str) and len(blob) == 64 and set(blob) <= _HEX:
                        return peer, blob
                    if peer == me:
                        return me, None
                    if entry.get("state") in ("left", "failed"):
                        continue  # ended without publishing: the next one is the reference
                    break  # a lower-rank member may still publish
                await ctx.wait_changed()
        raise KindRefused("no member published the start weights within "
                          f"{self.config.attach_timeout:g} s")

    async def _publish_init(self, run: Run, ctx: RunContext, session: LoopSession
                            ) -> tuple[np.ndarray, str, bool]:
        manifest, slot = session.manifest, session.slot

        def encode() -> tuple[np.ndarray, bytes]:
            init = slot.copy()
            if not np.isfinite(init).all():
                raise KindRefused("the loop's initial parameters are not all finite")
            return init, canonical_model_bytes(
                _named(manifest, init), {"job": run.job_id, "role": "init",
                                         "manifest": manifest.to_json()})

        init, data = await self.services.compute(encode)
        try:
            blob = await self.services.blobs.put(data)
        except BlobStoreFull as e:
            raise KindRefused(f"cannot store the start weights: {e}") from None
        await ctx.report(force=True, init=blob)
        log.info("job=%s published the start weights %s", run.job_id, blob[:16])
        return init, blob, False

    def _read_init(self, data: bytes, manifest: Manifest) -> np.ndarray:
        """The job's initial model in our slot order, after checking its manifest
        against the loop's. Raises KindRefused."""
        try:
            arrays, meta = loads_safetensors(data)
            job_manifest = _manifest_of_model(arrays, meta, self.config.max_tensors,
                                              self.max_params)
        except (ModelFormatError, ManifestError) as e:
            raise KindRefused(f"the job's initial model is unusable: {e}") from None
        difference = manifest.first_difference(job_manifest)
        if difference is not None:
            raise KindRefused(f"this loop's model does not match the job's: {difference}")
        init = np.empty(manifest.num_params, dtype=np.float32)
        for t, offset in zip(manifest.tensors, manifest.offsets, strict=True):
            init[offset:offset + t.size] = np.asarray(arrays[t.name], np.float32).reshape(-1)
        if not np.isfinite(init).all():
            raise KindRefused("the job's initial model has non-finite values")
        return init

    # -- rounds ---------------------------------------------------------------------------------
    async def _rounds(self, run: Run, ctx: RunContext, session: LoopSession,
                      party: AveragingParty, init_blob: str) -> _Request:
        """Averaging between the loop's rounds; returns the finish request."""
        p: _LoopParticipant = party.participant
        averaging = len(run.roster) > 1
        answer: tuple[_Request, dict[str, Any]] | None = None
        while True:
            async with party.training_round():  # no exchange commits while the loop trains
                started = trio.current_time()
                changed = await self._take_result(p, session)
                if answer is not None:
                    session.answer(answer[0], {**answer[1], "changed": changed,
                                               "slot": session.active,
                                               "copy_s": trio.current_time() - started})
                req = await session.next_request()
                _count(p, req)
                if req.finish:
                    party.close()  # offers held meanwhile are refused: the slot is final
                    return req
            run.round += 1
            outcome = "alone"
            started = trio.current_time()
            if averaging:
                outcome = await self.services.gossip.average_once(
                    party, ctx.candidates, patience=self.services.config.sync_patience,
                    rng=self.services.rng)
            answer = req, {"round": run.round, "outcome": outcome,
                           "peers": len(ctx.candidates()),
                           "exchange_s": trio.current_time() - started}
            await self._after_round(run, ctx, party, init_blob, req)

    async def _take_result(self, p: _LoopParticipant, session: LoopSession) -> bool:
        """Give the loop an exchange's result (a switch of slots when it is in the spare
        one, else a copy: an outer step's result); whether there was one."""
        result = p.trainer.params
        if result is session.slot or result is session.slots[1 - session.active]:
            changed = session.adopt(result)
        else:
            changed = await self._sync_work(session, lambda: session.adopt(result))
        p.trainer.params = session.slot
        return changed

    async def _sync_work(self, session: LoopSession, fn: Callable[[], T]) -> T:
        """Work the loop waits on in a sync: inline when the model is small (see
        `INLINE_MATH_PARAMS`), else on a compute thread."""
        return await math_compute(self.services.compute, session.slot.size)(fn)

    async def _overlapped(self, run: Run, ctx: RunContext, session: LoopSession,
                          party: AveragingParty, init_blob: str) -> _Request:
        """Rounds with ``overlap`` 1: each sync applies the previous round's averaged
        delta and returns; the averaging runs while the loop trains."""
        p: _LoopParticipant = party.participant
        averaging = len(run.roster) > 1
        base: np.ndarray | None = None  # the snapshot the running round averages
        outcome = ["alone"]
        averaged = trio.Event()
        averaged.set()
        first = True
        async with trio.open_nursery() as nursery:
            while True:
                if first:  # until the first sync the slot is the loop's alone: hold offers
                    async with party.training_round():
                        req = await session.next_request()
                        changed, base = await self._sync_work(
                            session, lambda: _apply_delta(session.slot, p.trainer, None))
                        _count(p, req)
                        if req.finish:
                            party.close()
                            return req
                    first = False
                else:
                    req = await session.next_request()
                    await averaged.wait()  # the loop waits only if the network did not keep up
                    async with party.exclusive("sync"):
                        changed, base = await self._sync_work(
                            session,
                            functools.partial(_apply_delta, session.slot, p.trainer, base))
                        _count(p, req)
                        if req.finish:
                            party.close()
                            return req
                session.answer(req, {"round": run.round, "outcome": outcome[0],
                                     "changed": changed, "slot": session.active,
                                     "peers": len(ctx.candidates())})
                run.round += 1
                party.new_round()
                outcome = ["alone"]
                if averaging:
                    averaged = trio.Event()
                    nursery.start_soon(self._average, party, ctx, outcome, averaged)
                await self._after_round(run, ctx, party, init_blob, req)

    async def _average(self, party: AveragingParty, ctx: RunContext, outcome: list[str],
                       done: trio.Event) -> None:
        try:
            outcome[0] = await self.services.gossip.average_once(
                party, ctx.candidates, patience=self.services.config.sync_patience,
                rng=self.services.rng)
        finally:
            done.set()

    async def _after_round(self, run: Run, ctx: RunContext, party: AveragingParty,
                           init_blob: str, req: _Request) -> None:
        await self._report(run, ctx, party, loss=req.loss)
        every = self.services.config.checkpoint_every
        if every and run.round % every == 0:
            await self._checkpoint(ctx, party, init_blob)

    # -- progress, checkpoints, the final --------------------------------------------------
    async def _report(self, run: Run, ctx: RunContext, party: AveragingParty, *,
                      force: bool = False, loss: float | None = None) -> None:
        trainer = party.participant.trainer
        progress: dict[str, Any] = {
            "round": run.round, "steps": trainer.step, "samples": trainer.samples_seen,
            "bytes_sent": party.bytes_sent, "bytes_received": party.bytes_received,
            "exchanges": int(party.stats["exchanges"]), "peers": len(party.partners),
            "skipped": int(party.stats["skipped"])}
        if loss is not None:
            progress["loss"] = loss
        await ctx.report(force=force, **progress)

    async def _checkpoint(self, ctx: RunContext, party: AveragingParty, init_blob: str, *,
                          final: Contribution | None = None) -> None:
        p: _LoopParticipant = party.participant
        meta = {"init": init_blob, "step": p.trainer.step, "samples": p.trainer.samples_seen,
                "bytes_sent": party.bytes_sent, "bytes_received": party.bytes_received,
                "exchanges": int(party.stats["exchanges"])}
        async with party.exclusive("checkpoint"):
            arrays = await self.services.compute(lambda: _snapshot(p))
        await ctx.save_checkpoint(arrays, meta, final=final)

    async def _publish_final(self, run: Run, session: LoopSession,
                             p: _LoopParticipant) -> Contribution:
        manifest, slot = session.manifest, session.slot
        samples = p.trainer.samples_seen

        def encode() -> bytes:
            final = slot.copy()
            if not np.isfinite(final).all():
                raise KindRefused("the loop's final parameters are not all finite")
            return canonical_model_bytes(_named(manifest, final), {
                "job": run.job_id, "peer": self.services.network.peer_id,
                "rank": str(run.rank), "samples": str(samples), "kind": self.name,
                "manifest": manifest.to_json()})

        data = await self.services.compute(encode)
        return Contribution(await self.services.blobs.put(data), samples)

    # -- the merger ---------------------------------------------------------------------------
    async def produce(self, run: Run, ctx: RunContext, inputs: list[Input]) -> Result | None:
        spec: AttachSpec = run.spec
        finals: list[tuple[int, np.ndarray, int]] = []
        used: list[Input] = []
        reference: Manifest | None = None
        for inp in inputs:
            got = await self._final(run, inp, reference)
            if got is not None:
                reference, params = got
                finals.append((inp.rank, params, inp.weight))
                used.append(inp)
        if reference is None:
            return None
        job_manifest = reference

        def merge() -> bytes:
            ordered = sorted(finals, key=lambda f: f[0])
            weights = [f[2] for f in ordered]
            if not any(weights):  # loops that reported no samples weigh the same
                weights = [1] * len(ordered)
            merged = weighted_average([f[1] for f in ordered], weights)
            meta = {"job": run.job_id, "kind": self.name, "manifest": job_manifest.to_json()}
            if spec.name:
                meta["name"] = spec.name
            return canonical_model_bytes(_named(job_manifest, merged), meta)

        data = await self.services.compute(merge)
        model_id = await self.services.blobs.put(data)
        return Result(model_id, len(data), used, {
            "name": spec.name, "tensors": len(job_manifest.tensors),
            "metrics": {"participants": len(used), "missing": len(run.roster) - len(used),
                        "samples": sum(u.weight for u in used),
                        "parameters": job_manifest.num_params}})

    async def _final(self, run: Run, inp: Input, reference: Manifest | None
                     ) -> tuple[Manifest, np.ndarray] | None:
        """A participant's final parameters (flat, in its manifest's order) and that
        manifest; None when unavailable or not matching the others'."""
        limit = 4 * self.max_params + 65536 + 512 * self.config.max_tensors
        try:
            data = await self.services.blobs.fetch(
                inp.blob, hints=[inp.peer], timeout=self.services.config.fetch_timeout,
                max_bytes=limit)
        except BlobNotFound:
            log.warning("job=%s peer=%s final model %s not delivered: merging without it",
                        run.job_id, inp.peer, inp.blob[:12])
            run.dead.add(inp.peer)
            return None

        def check() -> tuple[Manifest, np.ndarray]:
            arrays, meta = loads_safetensors(data)
            manifest = manifest_from_json(meta.get("manifest", ""), max_tensors=self.config.max_tensors,
                                          max_params=self.max_params)
            if reference is not None and manifest != reference:
                raise ModelFormatError("its manifest differs from the other finals'")
            if meta.get("job") != run.job_id or meta.get("samples") != str(inp.weight) \
                    or set(arrays) != {t.name for t in manifest.tensors}:
                raise ModelFormatError("not this job's final model")
            flat = np.empty(manifest.num_params, dtype=np.float32)
            for t, offset in zip(manifest.tensors, manifest.offsets, strict=True):
                a = arrays[t.name]
                if a.dtype != np.float32 or a.shape != t.shape:
                    raise ModelFormatError(f"tensor {t.name!r} is not float32{list(t.shape)}")
                flat[offset:offset + t.size] = a.reshape(-1)
            if not np.isfinite(flat).all():
                raise ModelFormatError("non-finite values")
            return manifest, flat

        try:
            return await self.services.compute(check)
        except (ModelFormatError, ManifestError) as e:
            log.warning("job=%s peer=%s final model rejected: %s", run.job_id, inp.peer, e)
            return None


# -- pure helpers -------------------------------------------------------------------------------


def _count(p: _LoopParticipant, req: _Request) -> None:
    p.trainer.step = max(p.trainer.step, req.steps)
    p.trainer.samples_seen = max(p.trainer.samples_seen, req.samples)


def _apply_delta(slot: np.ndarray, trainer: _LoopParams, base: np.ndarray | None
                 ) -> tuple[bool, np.ndarray]:
    """Overlap: add what averaging did to the last snapshot (``trainer.params - base``)
    to the loop's slot, in place and in chunks; then snapshot the slot as the next
    round's parameters. (changed, the new snapshot)."""
    result = trainer.params
    changed = base is not None and result is not base
    if changed:
        assert base is not None
        tmp = np.empty(min(_AVG_CHUNK, slot.size), np.float32)
        for start in range(0, slot.size, _AVG_CHUNK):
            end = min(start + _AVG_CHUNK, slot.size)
            n = end - start
            np.subtract(result[start:end], base[start:end], out=tmp[:n])
            slot[start:end] += tmp[:n]
    snapshot = slot.copy()
    trainer.params = snapshot
    return changed, snapshot


def _named(manifest: Manifest, flat: np.ndarray) -> dict[str, np.ndarray]:
    return {t.name: flat[offset:offset + t.size].reshape(t.shape)
            for t, offset in zip(manifest.tensors, manifest.offsets, strict=True)}


def _manifest_of_model(arrays: dict[str, np.ndarray], meta: dict[str, str], max_tensors: int,
                       max_params: int) -> Manifest:
    """The manifest of a start model: the one its metadata names (published start
    weights keep the loop's own dtypes there), else its tensors as they are (an
    imported model)."""
    if "manifest" in meta:
        manifest = manifest_from_json(meta["manifest"], max_tensors=max_tensors,
                                      max_params=max_params)
        if {t.name for t in manifest.tensors} != set(arrays) or any(
                arrays[t.name].shape != t.shape for t in manifest.tensors):
            raise ManifestError("the model's tensors differ from its manifest")
        return manifest
    items = []
    for name in sorted(arrays):
        dtype = _NUMPY_DTYPES.get(arrays[name].dtype)
        if dtype is None:
            raise ManifestError(f"tensor {name!r} has dtype {arrays[name].dtype}; an attach "
                                "job's model is floating point")
        items.append((name, dtype, arrays[name].shape))
    return manifest_of(items)


def _snapshot(p: _LoopParticipant) -> dict[str, np.ndarray]:
    out = {f"channel.{k}": v.copy() for k, v in p.channel.state().items()}
    if p.outer is not None:
        out.update({f"outer.{k}": v.copy() for k, v in p.outer.state().items()})
    return out


def _restore(p: _LoopParticipant, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    def pick(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    p.channel.load_state(pick("channel."))
    if p.outer is not None and pick("outer."):
        p.outer.load_state(pick("outer."))
    p.trainer.step = int(meta.get("step", 0))
    p.trainer.samples_seen = int(meta.get("samples", 0))

