"""PyTorch adapter for attach jobs: `DecentralizedTraining`, a thin layer over the numpy
twin `lattice.attach` (install with ``pip install lattice-p2p[torch]``).

    with lattice.connect() as client:
        job = client.submit_job({"kind": "attach", "min_peers": 4, "sync_every": 50})
        with DecentralizedTraining(client, job, model, opt) as dt:
            for x, y in loader:
                loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
                dt.step(samples=len(x))        # averages with peers every sync_every steps
        print(dt.result.model_id)

The job's manifest is the model's floating-point parameters and buffers, in
``state_dict`` order (a tied tensor once, under its first name). CPU float32 tensors
are moved into the shared memory itself (``tensor.data`` re-pointed), so a sync copies
nothing on this side; any other model (on a GPU, or in half precision) is staged: once
per sync its tensors are copied into pinned CPU memory and on into the shared memory,
and back when the average changed them. The optimizer is left as it is (DiLoCo keeps
the inner optimizer's state across outer steps). Must not import trio or the daemon.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lattice.attach import AttachedLoop, DaemonLost, Result, SyncReport
from lattice.client.sync_client import Client

__all__ = ["DaemonLost", "DecentralizedTraining", "Result", "SyncReport", "model_tensors"]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16",
                torch.bfloat16: "bfloat16", torch.float64: "float64"}


def model_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors an attach job averages: floating-point parameters and buffers (the
    live objects), a tensor shared by several names once."""
    seen: set[int] = set()
    out = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.dtype in _DTYPE_NAMES and id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


class DecentralizedTraining:
    """Trains ``model`` together with the job's other loops (see the module docstring).
    ``job`` is a job id or what `submit_job`/`join_job` returned."""

    def __init__(self, client: Client, job: str | Mapping[str, Any], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, *,
                 timeout: float | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.timeout = timeout
        self.tensors = model_tensors(model)
        if not self.tensors:
            raise ValueError("the model has no floating-point parameters to train together")
        self.resident = all(t.device.type == "cpu" and t.dtype == torch.float32
                            for _, t in self.tensors)
        self.on_gpu = any(t.device.type == "cuda" for _, t in self.tensors)
        self.loop = AttachedLoop(
            client, job, [(n, _DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in self.tensors],
            stage_in=None if self.resident else self._stage_in,
            stage_out=None if self.resident else self._stage_out,
            on_rebind=self._rebind if self.resident else None)
        self._offsets = list(zip(self.loop.manifest.offsets,
                                 (t.size for t in self.loop.manifest.tensors), strict=True))
        self._staging: torch.Tensor | None = None
        # the copies of the last stage_out, still reading the staging buffer on the GPU
        self._copied: torch.cuda.Event | None = None
        if self.resident:
            for name, t in self.tensors:
                self.loop.arrays[name][...] = t.detach().numpy()
            self._rebind(self.loop.arrays)
        else:
            self._staging = torch.empty(self.loop.manifest.num_params, dtype=torch.float32,
                                        pin_memory=self.on_gpu)
            self._stage_in()

    # -- the loop -----------------------------------------------------------------------------
    def __enter__(self) -> DecentralizedTraining:
        self.loop.start(timeout=self.timeout)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.loop.__exit__(exc_type, exc, tb)

    def step(self, samples: int = 0, loss: float | None = None) -> SyncReport | None:
        """Count one optimizer step (after ``opt.step()``); every ``sync_every`` steps
        the model is averaged with the job's other loops. Raises `DaemonLost`."""
        return self.loop.step(samples, loss)

    def sync(self) -> SyncReport:
        return self.loop.sync()

    def finish(self) -> Result | None:
        return self.loop.finish(timeout=self.timeout)

    @property
    def result(self) -> Result | None:
        """The job's outcome once the ``with`` block ended: ``result.model_id``."""
        return self.loop.result

    def load_result(self) -> None:
        """Load the job's merged model into ``model``."""
        merged = self.loop.fetch_result()
        with torch.no_grad():
            for name, t in self.tensors:
                t.copy_(torch.from_numpy(merged[name]).to(t.dtype))

    def continue_locally(self) -> None:
        self.loop.continue_locally()

    def reattach(self, client: Client | None = None) -> DecentralizedTraining:
        self.loop.reattach(client, timeout=self.timeout)
        return self

    # -- moving tensors -----------------------------------------------------------------------
    def _rebind(self, arrays: dict[str, np.ndarray]) -> None:
        """CPU float32: the model's tensors become views of the shared memory."""
        for name, t in self.tensors:
            t.data = torch.from_numpy(arrays[name])

    def _stage_in(self) -> None:
        """Model -> pinned staging -> shared memory, one device sync per call."""
        assert self._staging is not None
        with torch.no_grad():
            for (_, t), (offset, size) in zip(self.tensors, self._offsets, strict=True):
                self._staging[offset:offset + size].copy_(t.reshape(-1), non_blocking=True)
            if self.on_gpu:
                torch.cuda.synchronize()  # the parameters are final, and stage_out's copies done
                self._copied = None
        np.copyto(self.loop.slot, self._staging.numpy())

    def _stage_out(self) -> None:
        """Shared memory -> pinned staging -> model. Returns once the copies are queued:
        they run in stream order before the loop's next kernels, so the loop's queued
        work is not drained here (a synchronize cost ~4 ms a sync on an H200 with four
        loops). Only the staging buffer must outlive them: the next write to it waits."""
        assert self._staging is not None
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        np.copyto(self._staging.numpy(), self.loop.slot)
        with torch.no_grad():
            for (_, t), (offset, size) in zip(self.tensors, self._offsets, strict=True):
                t.copy_(self._staging[offset:offset + size].view(t.shape), non_blocking=True)
        if self.on_gpu:
            self._copied = torch.cuda.Event()
            self._copied.record()
