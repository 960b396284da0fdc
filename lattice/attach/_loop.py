"""`AttachedLoop`: the loop's side of an attach job (proto/attach.md)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lattice.api.errors import ErrorCode, LatticeError, TimeoutError_
from lattice.attach.shm import create_region, slot_of
from lattice.client._session import DaemonNotRunningError
from lattice.client.sync_client import Client
from lattice.core.jobs.attach import Manifest, manifest_of
from lattice.demo import download_model
from lattice.learn.merge import loads_safetensors

WAIT_SLICE = 30.0  # one attach.wait call blocks at most this long (the daemon's max_wait)


class DaemonLost(LatticeError):
    """The daemon this loop was attached to went away (stopped, crashed, restarted, or
    the connection broke). The loop's parameters are intact. Choose: `reattach()` to
    take part again (a restarted daemon resumes the job from its checkpoint), or
    `continue_locally()` to train on without the job."""

    code = ErrorCode.NOT_READY


@dataclass(frozen=True)
class Result:
    """How the job ended for this loop: the merged model (content-addressed: its id is
    the SHA-256 of its .safetensors bytes) and this loop's own final contribution."""

    job_id: str
    model_id: str
    final: str
    steps: int
    samples: int


@dataclass(frozen=True)
class SyncReport:
    """What one sync did: the round, the averaging outcome (committed, served, skipped,
    alone) and whether the parameters changed."""

    round: int
    outcome: str
    changed: bool
    peers: int
    seconds: float
    """The whole sync as the loop saw it (staging, the call, the daemon's work)."""
    exchange_s: float = 0.0
    """Of which the daemon spent averaging with peers (the network exchange)."""
    copy_s: float = 0.0
    """Of which the daemon spent writing the result into the shared memory."""


def job_id_of(job: str | Mapping[str, Any]) -> str:
    """A job id from an id or what `submit_job`/`join_job` returned."""
    if isinstance(job, str):
        return job
    for key in ("job_id", "id"):
        if isinstance(job.get(key), str):
            return str(job[key])
    raise ValueError(f"not a job: {job!r:.80}")


class AttachedLoop:
    """A training loop attached to a job through its local daemon.

    The loop's parameters live in shared memory (``arrays``: float32 views, in the
    manifest's order); train them in place and call `step` after every optimizer step.
    Every ``sync_every`` steps `step` hands them to the daemon, which averages with
    the job's other loops and has the result in place before returning (with the job's
    ``overlap`` 1, it returns at once and the average arrives one round late).

    The memory holds two slots; an average lands in the spare one and a sync switches
    to it, copying nothing. ``arrays`` (the same dict) then holds views of the new slot:
    index it after a sync (``loop.arrays["w"] -= ...``) rather than keeping the arrays
    themselves, which become read-only so that a stale one fails loudly.

    ``stage_in``/``stage_out`` are for adapters whose parameters live elsewhere (a GPU):
    called before a sync to copy the parameters into ``arrays``, and after one that
    changed ``arrays`` to copy them back. Raises `DaemonLost` when the daemon goes away.
    """

    def __init__(self, client: Client, job: str | Mapping[str, Any],
                 tensors: Sequence[tuple[str, str, Sequence[int]]], *,
                 stage_in: Callable[[], None] | None = None,
                 stage_out: Callable[[], None] | None = None,
                 on_rebind: Callable[[dict[str, np.ndarray]], None] | None = None) -> None:
        self.client = client
        self.job_id = job_id_of(job)
        self.manifest: Manifest = manifest_of(tensors)
        self.stage_in = stage_in
        self.stage_out = stage_out
        self.on_rebind = on_rebind
        self.steps = 0
        self.samples = 0
        self.round = 0
        self.session: str | None = None
        self.spec: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        self.result: Result | None = None
        self.local = False  # continue_locally() was chosen: no more syncs
        self.last: SyncReport | None = None
        self._since_sync = 0
        self._losses: list[float] = []
        self._region, self._memory = self._new_region()
        self.active = 0  # which slot holds the parameters (the daemon says, per sync)
        self.arrays: dict[str, np.ndarray] = self._views(self.slot)

    @property
    def slot(self) -> np.ndarray:
        """The slot holding the parameters: ``arrays`` are views of it."""
        n = self.manifest.num_params
        return self._memory[self.active * n:(self.active + 1) * n]

    # -- life ---------------------------------------------------------------------------------
    def start(self, *, timeout: float | None = None) -> AttachedLoop:
        """Attach (`attach.open`, passing the shared memory) and wait until the job
        started: with ``loaded``, ``arrays`` now hold the job's start weights. Raises
        the daemon's error (e.g. ConflictError naming the first tensor that differs
        from the job's model) or `DaemonLost`."""
        fd = self._region_fd
        try:
            opened = self._call_with_fd("attach.open", fd, job_id=self.job_id,
                                        tensors=self.manifest.to_wire())
        finally:
            os.close(fd)
        self.session = opened["session"]
        self.spec = opened["spec"]
        self.info = self._wait("ready", timeout)
        if self.info.get("loaded") and self.stage_out is not None:
            self.stage_out()
        return self

    @property
    def sync_every(self) -> int:
        return int(self.spec.get("sync_every", 1))

    def step(self, samples: int = 0, loss: float | None = None) -> SyncReport | None:
        """Count one optimizer step over ``samples`` samples; sync when a round is
        complete (the report), else None."""
        self.steps += 1
        self.samples += int(samples)
        self._since_sync += 1
        if loss is not None and math.isfinite(loss):
            self._losses.append(float(loss))
        if self.local or self._since_sync < self.sync_every:
            return None
        return self.sync()

    def sync(self) -> SyncReport:
        """Hand the parameters to the daemon now and take back the average."""
        started = time.perf_counter()
        if self.stage_in is not None:
            self.stage_in()
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        reply = self._call("attach.sync", session=self.session, steps=self.steps,
                           samples=self.samples, loss=loss)
        if reply.get("slot", self.active) != self.active:
            self._switch(int(reply["slot"]))
        if reply["changed"] and self.stage_out is not None:
            self.stage_out()
        self._since_sync = 0
        self._losses.clear()
        self.round = int(reply["round"])
        self.last = SyncReport(self.round, reply["outcome"], bool(reply["changed"]),
                               int(reply.get("peers", 0)), time.perf_counter() - started,
                               float(reply.get("exchange_s", 0.0)),
                               float(reply.get("copy_s", 0.0)))
        return self.last

    def finish(self, *, timeout: float | None = None) -> Result | None:
        """This loop is done: its parameters become its final contribution; wait for
        the job's merged model. None after `continue_locally`."""
        if self.local:
            return None
        if self.stage_in is not None:
            self.stage_in()
        reply = self._call("attach.finish", session=self.session, steps=self.steps,
                           samples=self.samples)
        done = self._wait("done", timeout)
        self.result = Result(self.job_id, done["model_id"], reply["final"], self.steps,
                             self.samples)
        return self.result

    def detach(self) -> None:
        """Leave the job without a final (the daemon says ``left``; the others go on)."""
        if self.session is not None and not self.local:
            try:
                self._call("attach.detach", session=self.session)
            except DaemonLost:
                pass  # gone already: it left the job with its connection
        self.session = None

    # -- after DaemonLost -----------------------------------------------------------------------
    def continue_locally(self) -> None:
        """Train on without the job: `step` only counts, `finish` returns None."""
        self.local = True

    def reattach(self, client: Client | None = None, *, timeout: float | None = None
                 ) -> AttachedLoop:
        """Attach again (to a restarted daemon, or through ``client``), keeping what the
        loop trained: new shared memory holding the current parameters."""
        if self.stage_in is not None:
            self.stage_in()
        old = self.slot
        self.client = client or Client(self.client.socket_path, timeout=self.client.timeout)
        self._region, self._memory = self._new_region()
        self._rebind(0)
        np.copyto(self.slot, old)
        self.local = False
        return self.start(timeout=timeout)

    # -- model ------------------------------------------------------------------------------------
    def fetch_result(self) -> dict[str, np.ndarray]:
        """The merged model's tensors (float32), by name."""
        if self.result is None:
            raise RuntimeError("the job has no result yet: call finish() first")
        arrays, _meta = loads_safetensors(download_model(self.client, self.result.model_id))
        return arrays

    def __enter__(self) -> AttachedLoop:
        if self.session is None:
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if self.result is None:
                self.finish()
        elif not isinstance(exc, DaemonLost):
            self.detach()

    # -- plumbing ---------------------------------------------------------------------------------
    def _new_region(self) -> tuple[Any, np.ndarray]:
        fd, region = create_region(self.manifest.region_bytes)
        self._region_fd = fd
        return region, slot_of(region)

    def _switch(self, slot: int) -> None:
        """The daemon put the parameters in the other slot: follow it."""
        if slot not in (0, 1):
            raise LatticeError(f"the daemon named slot {slot!r}; there are two")
        for a in self.arrays.values():
            a.flags.writeable = False  # a stale view fails loudly instead of training nothing
        self._rebind(slot)

    def _rebind(self, slot: int) -> None:
        self.active = slot
        self.arrays.clear()
        self.arrays.update(self._views(self.slot))
        if self.on_rebind is not None:
            self.on_rebind(self.arrays)

    def _views(self, slot: np.ndarray) -> dict[str, np.ndarray]:
        return {t.name: slot[o:o + t.size].reshape(t.shape)
                for t, o in zip(self.manifest.tensors, self.manifest.offsets, strict=True)}

    def _wait(self, until: str, timeout: float | None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        target = ("ready", "merging", "done") if until == "ready" else ("done",)
        while True:
            left = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError_(f"the job did not get {until} within {timeout:g} s")
            info = self._call("attach.wait", session=self.session, until=until, timeout=left)
            if info["state"] in target:
                return info

    def _call(self, method: str, **params: Any) -> Any:
        return self._call_with_fd(method, None, **params)

    def _call_with_fd(self, method: str, fd: int | None, **params: Any) -> Any:
        try:
            if fd is None:
                return self.client.call(method, **params)
            return self.client.call_passing_fds(method, [fd], **params)
        except (DaemonNotRunningError, ConnectionError) as e:
            raise DaemonLost(f"the daemon went away ({e}); call reattach() to take part "
                             "again or continue_locally() to train on alone") from None


def attach(client: Client, job: str | Mapping[str, Any], params: Mapping[str, np.ndarray], *,
           timeout: float | None = None) -> AttachedLoop:
    """Attach a numpy loop whose parameters are ``params`` (floating-point arrays) to
    ``job``; returns once the job started. Train ``loop.arrays`` (float32 views of the
    shared memory, holding the job's start weights) in place and call ``loop.step``."""
    tensors = []
    for name, a in params.items():
        dtype = np.dtype(a.dtype).name
        tensors.append((name, dtype, np.shape(a)))
    loop = AttachedLoop(client, job, tensors)
    for name, a in params.items():
        loop.arrays[name][...] = a
    return loop.start(timeout=timeout)
