"""A participant's checkpoints on disk: arrays and typed metadata, one file per job.

Format: a NumPy ``.npz`` (read with ``allow_pickle=False``: never unpickled) whose
``__meta__`` member is the canonical msgpack of the metadata, so ints, floats, lists
and strings come back as what they were (no ``str``/``repr``/``json`` round trips).
Written to a temp file, fsynced, then renamed: a crash leaves the old one or the new.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lattice.core.codec import DecodeError, canonical, unpack

META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back (corrupt, foreign, truncated)."""


class Checkpoints:
    """The checkpoint files of one daemon (``root`` None: checkpoints are off)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path | None:
        return None if self.root is None else self.root / f"{job_id}.ckpt.npz"

    def save(self, job_id: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        path = self.path(job_id)
        if path is None:
            return
        if META in arrays:
            raise ValueError(f"{META} is reserved")
        body = {**arrays, META: np.frombuffer(canonical(dict(meta)), dtype=np.uint8)}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, allow_pickle=False, **body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, job_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(arrays, meta), or None when there is no checkpoint; raises CheckpointError."""
        path = self.path(job_id)
        if path is None or not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = unpack(arrays.pop(META).tobytes())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, DecodeError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: metadata is not a map")
        return arrays, meta

    def drop(self, job_id: str) -> None:
        path = self.path(job_id)
        if path is not None:
            path.unlink(missing_ok=True)
