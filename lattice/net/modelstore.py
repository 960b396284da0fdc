"""Models as content-addressed pieces over the blob store: import, export, fetch, merge,
verify (issue 14). Formats: proto/model-format.md; merges: proto/merge.md.

Owns `ModelService`, which the job supervisor builds over its `BlobService`
(`lattice.jobs.serve_jobs`; the merge kind uses it, and its RPC face is
`latticed.localapi.models`). Must not import libp2p: blobs move through
`lattice.net.blob`.

A v2 model is a manifest blob (its id is the model id) naming one blob per 16 MiB piece
of each tensor. Importing streams a file into pieces; fetching gets the manifest, then
only the pieces of the tensors wanted, each from any provider (the manifest's providers
first), resumed and verified by `BlobService.fetch`; nothing here holds a whole model.
v1 models (one canonical safetensors blob, a train job's result) are read in place.

Failure policy. Blocking work (hashing, merging, file I/O) runs through ``compute``
(worker threads under a limiter of `compute_threads` unless one is given). A malformed
model from a peer is a ModelFormatError for that request only; a provider that sends
bad pieces is penalized by the blob service. Local bugs propagate.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from lattice.core.state import Set
from lattice.learn.mergeengine import (
    DEFAULT_SHARD_BYTES,
    ModelReader,
    PiecesReader,
    export_dir,
    export_file,
    hash_piece,
    import_model,
    merge_plan,
    merge_share,
    merged_manifest,
    open_blob_model,
    open_model_path,
    select_tensors,
    spec_of,
    verify_share,
)
from lattice.learn.mergespec import MergeSpec, MergeSpecError
from lattice.learn.modelfile import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestTensor,
    dumps_manifest,
    is_manifest,
    loads_manifest,
)
from lattice.net.blob import BlobNotFound, BlobService, BlobStoreFull, Compute, is_blob_id

log = logging.getLogger("lattice.net.modelstore")

MAX_NAME_CHARS = 128
MAX_RECORD_SPEC_CHARS = 16 * 1024
"""A merge record carries its spec when it is this short (the manifest always does)."""


class ModelNotFound(LookupError):
    """No model with this id or name here or in the registry."""


class ModelUnavailable(Exception):
    """No provider delivered a piece of the model in time; ``fetched``: the bytes of
    the other pieces that did come (they stay in the store)."""

    def __init__(self, message: str, *, fetched: int = 0) -> None:
        super().__init__(message)
        self.fetched = fetched


@dataclass(frozen=True)
class ModelsConfig:
    """Settings of the model store (daemon config section ``[models]``)."""

    compute_threads: int = 1
    """Worker threads for hashing, merging and file I/O."""
    fetch_timeout: float = 120.0
    """One piece (or manifest) from the network, at most this long."""
    fetch_parallel: int = 4
    """Pieces fetched at once."""
    shard_bytes: int = DEFAULT_SHARD_BYTES
    """`models export DIR` starts a new shard after this many bytes."""
    max_v1_bytes: int = 1 << 30
    """Largest single-blob (v1) model read."""


def open_model_service(blobs: BlobService, store: Any, sync: Any, config: ModelsConfig, *,
                       clock: Callable[[], float], compute: Compute | None = None) -> ModelService:
    """The daemon's model store over the job runner's blobs; records go through ``sync``
    (a `CrdtSync`; None: straight to ``store``)."""
    me = blobs.network.peer_id
    write = sync.write if sync is not None else (lambda changes: store.apply_local(changes, clock()))
    return ModelService(blobs, store, write, me, config, clock=clock, compute=compute)


class ModelService:
    """Models over a `BlobService`; records written with ``write`` (a `CrdtSync.write`);
    blocking work through ``compute`` (default: `compute_threads` worker threads)."""

    def __init__(self, blobs: BlobService, store: Any, write: Callable[[list[Any]], Any], me: str,
                 config: ModelsConfig = ModelsConfig(), *, clock: Callable[[], float],
                 compute: Compute | None = None) -> None:
        self.blobs = blobs
        self.state = store
        self.write = write
        self.me = me
        self.config = config
        self.clock = clock
        self._compute = compute or _threads(config.compute_threads)
        self._fetching = trio.CapacityLimiter(config.fetch_parallel)
        """Pieces fetched at once, over every fetch of this service (each holds up to a
        piece in memory while the blob service reads it back)."""
        self._pending: dict[str, trio.Event] = {}
        """Pieces being fetched now (a second fetch of one waits for the first)."""
        self.counts: Counter[str] = Counter()
        self.bytes_imported = 0
        self.bytes_merged = 0
        self.bytes_fetched = 0
        self.pieces_fetched = 0

    async def _work(self, fn: Callable[[], Any]) -> Any:
        return await self._compute(fn)

    def _put_piece(self, piece: bytes) -> str:
        return self.blobs.store.put(piece)  # pieces are not announced: the manifest is

    # -- the registry ---------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """A model id from an id or a registry name (unique). Raises ModelNotFound."""
        if is_blob_id(ref):
            return ref
        found = sorted(mid for mid, rec in self.state.models().items() if rec.get("name") == ref)
        if len(found) == 1:
            return found[0]
        if found:
            raise ModelNotFound(f"the name {ref!r} is ambiguous: {', '.join(f[:12] for f in found)}")
        raise ModelNotFound(f"no model named {ref!r}")

    def _record(self, mid: str, manifest: Manifest, **extra: Any) -> dict[str, Any]:
        dtypes = Counter(t.info.dtype for t in manifest.tensors.values())
        record = {"producer": self.me, "format": "lattice-model/2", "tensors": len(manifest.tensors),
                  "bytes": manifest.nbytes, "dtypes": dict(sorted(dtypes.items())), "created": self.clock(),
                  **{k: v for k, v in extra.items() if v is not None}}
        self.write([Set(f"models/{mid}", record)])
        return {**record, "id": mid}

    # -- import / export ----------------------------------------------------------------------------
    async def import_path(self, path: str, name: str | None = None) -> dict[str, Any]:
        """Import a .safetensors file, a Hugging Face directory or an .npz as a v2 model;
        announce it and record it. Raises OSError, ModelFormatError."""
        def run() -> tuple[str, Manifest, bytes]:
            manifest = import_model(open_model_path(path), self._put_piece)
            data = dumps_manifest(manifest)
            return self.blobs.store.put(data), manifest, data

        mid, manifest, _ = await self._work(run)
        await self.blobs.providers.provide(mid)
        self.counts["imported"] += 1
        self.bytes_imported += manifest.nbytes
        log.info("model=%s imported from %s: %d tensors, %d bytes", mid[:12], path, len(manifest.tensors),
                 manifest.nbytes)
        known = self.state.models().get(mid) or {}
        if name is None and self.me in known.get("producers", []):
            name = known.get("name")  # importing a model again keeps the name it has
        return self._record(mid, manifest, name=name or Path(path).name[:MAX_NAME_CHARS])

    async def export(self, ref: str, out: str, *, shard_bytes: int | None = None) -> dict[str, Any]:
        """Write the model as one .safetensors file (``out`` ends in .safetensors) or a
        Hugging Face directory. Raises ModelNotFound, ModelUnavailable, OSError."""
        mid = self.resolve(ref)
        reader = await self.open(mid)
        target = Path(out)
        if target.suffix == ".safetensors":
            if target.exists():
                raise FileExistsError(f"{target} exists")
            size = await self._work(lambda: export_file(reader, target))
            files = [target.name]
        else:
            if target.exists() and any(target.iterdir()):
                raise FileExistsError(f"{target} is not empty")
            files = await self._work(lambda: export_dir(reader, target, shard_bytes=shard_bytes or
                                                        self.config.shard_bytes))
            size = sum((target / f).stat().st_size for f in files)
        self.counts["exported"] += 1
        return {"model_id": mid, "path": str(target), "files": files, "bytes": size}

    # -- reading and fetching -------------------------------------------------------------------------
    async def open(self, mid: str, tensors: Sequence[str] | None = None) -> ModelReader:
        """A reader of model ``mid`` with (at least) the pieces of ``tensors`` (all when
        None) in the local store, fetched from providers as needed."""
        record = self.state.models().get(mid) or {}
        hints = list(record.get("producers", []))
        head = await self._fetch(mid, hints, max_bytes=max(MAX_MANIFEST_BYTES, self.config.max_v1_bytes))
        size = self.blobs.store.size(mid) or 0
        if not is_manifest(head):
            return await self._work(lambda: open_blob_model(mid, size, self.blobs.store.read))
        manifest = await self._work(lambda: loads_manifest(self.blobs.store.get(mid)))
        await self._fetch_tensors(mid, manifest, sorted(manifest.tensors) if tensors is None else tensors)
        return PiecesReader(manifest, self.blobs.store.read)

    async def fetch_tensors(self, mid: str, reader: ModelReader, names: Sequence[str]) -> int:
        """Bring the pieces of tensors ``names`` of model ``mid``, opened as ``reader``,
        into the local store (nothing to do for a v1 model: `open` fetched it whole);
        returns the bytes fetched."""
        if not isinstance(reader, PiecesReader):
            return 0
        return await self._fetch_tensors(mid, reader.manifest, names)

    async def _fetch_tensors(self, mid: str, manifest: Manifest, names: Sequence[str]) -> int:
        wanted = list(dict.fromkeys(p for n in names for p in manifest.tensors[n].pieces
                                    if not self.blobs.store.has(p)))
        if not wanted:
            return 0
        record = self.state.models().get(mid) or {}
        producers = list(record.get("producers", []))
        try:
            return await self.fetch_blobs(wanted, producers or await self._providers(mid))
        except ModelUnavailable:
            if not producers:
                raise
        # the producers are gone or pruned the pieces: whoever announced the model
        return await self.fetch_blobs(wanted, await self._providers(mid))

    async def manifest(self, mid: str) -> Manifest | None:
        """The manifest of a v2 model (fetched if needed); None for a v1 model."""
        record = self.state.models().get(mid) or {}
        head = await self._fetch(mid, list(record.get("producers", [])),
                                 max_bytes=max(MAX_MANIFEST_BYTES, self.config.max_v1_bytes))
        if not is_manifest(head):
            return None
        return await self._work(lambda: loads_manifest(self.blobs.store.get(mid)))

    async def _providers(self, mid: str) -> list[str]:
        with trio.move_on_after(self.blobs.config.find_timeout):
            return await self.blobs.providers.find_providers(mid)
        return []

    async def _fetch(self, bid: str, hints: list[str], *, max_bytes: int) -> bytes:
        """The first bytes of a blob (fetching it if needed)."""
        if not self.blobs.store.has(bid):
            try:
                await self.blobs.fetch(bid, hints=hints, timeout=self.config.fetch_timeout, max_bytes=max_bytes)
            except BlobNotFound:
                raise ModelUnavailable(f"no provider delivered {bid}") from None
            self.pieces_fetched += 1
            self.bytes_fetched += self.blobs.store.size(bid) or 0
        return self.blobs.store.read(bid, 0, 64)

    async def fetch_inputs(self, readers: dict[str, ModelReader], names: Sequence[str]) -> int:
        """The pieces of tensors ``names`` of every model in ``readers`` (model id ->
        opened reader), all models at once; returns the bytes fetched. Raises
        ModelUnavailable."""
        fetched = 0
        failed: list[Exception] = []  # raised after the nursery, not as a group

        async def one(mid: str, reader: ModelReader) -> None:
            nonlocal fetched
            try:
                got = await self.fetch_tensors(mid, reader, names)
            except (ModelUnavailable, BlobStoreFull) as e:
                failed.append(e)
                return
            fetched += got

        async with trio.open_nursery() as nursery:
            for mid, reader in readers.items():
                nursery.start_soon(one, mid, reader)
        if failed:
            raise failed[0]
        return fetched

    async def fetch_blobs(self, pieces: Sequence[str], hints: Sequence[str]) -> int:
        """Bring blobs (pieces) into the local store, at most ``fetch_parallel`` at a
        time over the whole service, each from ``hints`` first, then any provider;
        returns the bytes fetched. Raises ModelUnavailable naming one that no provider
        delivered."""
        failed: list[str] = []
        full: list[BlobStoreFull] = []  # raised after the nursery, not as a group
        fetched = 0

        async def one(pid: str) -> None:
            nonlocal fetched
            if self.blobs.store.has(pid):
                return
            pending = self._pending.get(pid)
            if pending is not None:  # another fetch of ours brings it: counted there
                await pending.wait()
                if not self.blobs.store.has(pid):
                    failed.append(pid)
                return
            self._pending[pid] = done = trio.Event()
            try:
                async with self._fetching:
                    await self._fetch(pid, list(hints), max_bytes=self.blobs.config.max_blob_bytes)
            except ModelUnavailable:
                failed.append(pid)
                return
            except BlobStoreFull as e:
                full.append(e)
                return
            finally:
                del self._pending[pid]
                done.set()
            fetched += self.blobs.store.size(pid) or 0

        async with trio.open_nursery() as nursery:
            for pid in dict.fromkeys(pieces):
                nursery.start_soon(one, pid)
        if full:
            raise full[0]
        if failed:
            raise ModelUnavailable(f"{len(failed)} pieces were not delivered (first: {sorted(failed)[0]})",
                                   fetched=fetched)
        return fetched

    # -- merge and verify ------------------------------------------------------------------------------
    async def readers(self, spec: MergeSpec, tensors: Sequence[str] | None = ()) -> dict[str, ModelReader]:
        """A reader of every input of ``spec`` with the pieces of ``tensors`` fetched
        (none by default: only the manifests; all when None)."""
        ids = list(dict.fromkeys(([spec.base] if spec.base else []) + list(spec.models)))
        return {mid: await self.open(mid, tensors) for mid in ids}

    async def merge(self, spec: MergeSpec, *, name: str | None = None,
                    tensors: Sequence[str] | None = None) -> dict[str, Any]:
        """Merge locally (the whole model, one participant) and record the result; the
        entry point the merge job kind calls per share is `merge_share`. Raises
        ModelNotFound, ModelUnavailable, MergeInputError, MergeSpecError."""
        readers = await self.readers(spec, None)

        def run() -> tuple[str, Manifest]:
            names = merge_plan(spec, readers)
            result = merge_share(spec, readers, names, self._put_piece)
            manifest = merged_manifest(spec, result)
            return self.blobs.store.put(dumps_manifest(manifest)), manifest

        mid, manifest = await self._work(run)
        await self.blobs.providers.provide(mid)
        self.counts["merged"] += 1
        self.bytes_merged += manifest.nbytes
        canonical = spec.canonical()
        log.info("model=%s merged by %s from %s", mid[:12], spec.method, [m[:12] for m in spec.models])
        return self._record(mid, manifest, name=name, method=spec.method, base=spec.base,
                            inputs=list(spec.models),
                            spec=canonical if len(canonical) <= MAX_RECORD_SPEC_CHARS else None)

    async def merge_share(self, spec: MergeSpec, readers: dict[str, ModelReader], names: Sequence[str], *,
                          keep: bool = True, compute: Compute | None = None
                          ) -> tuple[dict[str, ManifestTensor], int]:
        """Part of a merge (a merge job participant's share): fetch the input pieces of
        ``names`` only, merge them (through ``compute``: a job's, else ours), and store
        the output pieces (``keep`` False: only hash them, to recompute a tensor someone
        else merged). Returns each tensor's output entry and the bytes fetched. Raises
        MergeInputError naming a tensor, ModelUnavailable."""
        fetched = await self.fetch_inputs(readers, names)
        emit = self._put_piece if keep else hash_piece
        result = await (compute or self._compute)(lambda: merge_share(spec, readers, names, emit))
        if keep:
            self.bytes_merged += sum(t.info.nbytes for t in result.values())
        return result, fetched

    async def verify(self, ref: str, patterns: Sequence[str] | None = None) -> dict[str, Any]:
        """Recompute the tensors of a merged model matching ``patterns`` from its inputs
        and compare every byte (piece ids). Raises ModelNotFound, ModelUnavailable,
        MergeSpecError (not a merge result)."""
        mid = self.resolve(ref)
        manifest = await self.manifest(mid)
        if manifest is None:
            raise MergeSpecError("a v1 (single-file) model records no merge to recompute")
        spec = spec_of(manifest)
        names = select_tensors(sorted(manifest.tensors), patterns)
        readers = await self.readers(spec, names)
        verdicts = await self._work(lambda: list(verify_share(manifest, readers, names)))
        self.counts["verified"] += 1
        bad = {v.tensor: v.reason for v in verdicts if not v.matches}
        return {"model_id": mid, "method": spec.method, "checked": len(verdicts), "matches": not bad and
                bool(verdicts), "mismatches": bad}

    async def info(self, ref: str) -> dict[str, Any]:
        mid = self.resolve(ref)
        manifest = await self.manifest(mid)
        record = self.state.models().get(mid)
        if manifest is None:
            reader = await self.open(mid)
            tensors = reader.infos()
            meta = reader.meta
        else:
            tensors = {n: t.info for n, t in manifest.tensors.items()}
            meta = manifest.meta
        return {"model_id": mid, "format": "lattice-model/2" if manifest else "safetensors",
                "record": record, "metadata": meta,
                "tensors": {n: {"dtype": i.dtype, "shape": list(i.shape)} for n, i in sorted(tensors.items())}}

    def statistics(self) -> dict[str, Any]:
        return {**self.counts, "bytes_imported": self.bytes_imported, "bytes_merged": self.bytes_merged,
                "pieces_fetched": self.pieces_fetched, "bytes_fetched": self.bytes_fetched,
                "compute_threads": self.config.compute_threads,
                "fetch_parallel": self.config.fetch_parallel, "fetch_timeout": self.config.fetch_timeout,
                "export_shard_bytes": self.config.shard_bytes, "max_v1_bytes": self.config.max_v1_bytes}


def _threads(n: int) -> Compute:
    limiter = trio.CapacityLimiter(n)

    async def run(fn: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(fn, limiter=limiter)
    return run
