"""The streaming engine: whole models in and out, one tensor and one block at a time.

Owns reading models tensor by tensor wherever their bytes are (a `.safetensors` file, a
Hugging Face directory of shards with `model.safetensors.index.json`, an `.npz`, a v1
model blob, a v2 manifest's pieces), cutting tensors into v2 pieces as they stream
(`PieceWriter`), importing a model as pieces, exporting one as a canonical file or a
sharded directory, merging a whole model or any subset of its tensors (a participant's
share), and verifying a merged model by recomputing tensors. Pure: the only I/O is on
files and blobs passed in (``read(key, offset, length)`` / ``emit(piece) -> id``); must
not import trio, libp2p or sockets; reads no clock.

Memory: a tensor is never held whole. Readers return element ranges; the merge kernels
work in blocks (`lattice.learn.merge`); the piece writer holds at most one piece.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lattice.learn.merge import BLOCK_ELEMENTS, MergeInputError, Source, merge_tensor
from lattice.learn.mergespec import METADATA_KEY, MergeSpec, MergeSpecError
from lattice.learn.modelfile import (
    FLOAT_TAGS,
    MAX_HEADER_BYTES,
    PIECE_BYTES,
    TAGS,
    Layout,
    Manifest,
    ManifestTensor,
    ModelFormatError,
    TensorInfo,
    bounded_json,
    canonical_header,
    check_meta,
    check_name,
    dtype_tag,
    parse_header,
    piece_spans,
    read_layout,
)

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
MAX_INDEX_BYTES = 64 * 1024 * 1024
DEFAULT_SHARD_BYTES = 4 << 30
COPY_BYTES = 16 << 20

Read = Callable[[str, int, int], bytes]
"""read(key, offset, length) -> exactly ``length`` bytes of the file or blob ``key``."""


def read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ModelFormatError(f"{path} ended early (wanted {length} bytes at {offset})")
    return data


class ByteSource:
    """A `Source` whose bytes are consecutive segments of files or blobs."""

    def __init__(self, info: TensorInfo, segments: Sequence[tuple[str, int, int]], read: Read) -> None:
        self.info = info
        self.segments = list(segments)
        self._read = read
        self._itemsize = TAGS[info.dtype].itemsize
        if sum(s[2] for s in self.segments) != info.nbytes:
            raise ModelFormatError(f"tensor {info.name!r}: segments do not add up to {info.nbytes} bytes")

    def read_bytes(self, begin: int, end: int) -> bytes:
        out = bytearray()
        position = 0
        for key, offset, length in self.segments:
            lo, hi = max(begin, position), min(end, position + length)
            if lo < hi:
                out += self._read(key, offset + lo - position, hi - lo)
            position += length
            if position >= end:
                break
        return bytes(out)

    def read(self, start: int, stop: int) -> np.ndarray:
        data = self.read_bytes(start * self._itemsize, stop * self._itemsize)
        return np.frombuffer(data, TAGS[self.info.dtype])


class ArrayBackedSource:
    """A `Source` over one array (an `.npz` member)."""

    def __init__(self, info: TensorInfo, load: Callable[[], np.ndarray]) -> None:
        self.info = info
        self._load = load

    def read(self, start: int, stop: int) -> np.ndarray:
        arr = np.ascontiguousarray(self._load(), TAGS[self.info.dtype]).reshape(-1)
        return arr[start:stop]


class ModelReader(Protocol):
    """A model to read tensor by tensor."""

    @property
    def meta(self) -> dict[str, str]: ...

    def infos(self) -> dict[str, TensorInfo]: ...

    def source(self, name: str) -> Source: ...


@dataclass
class LayoutReader:
    """A model in safetensors files: one (a v1 blob, a `.safetensors`) or several
    (Hugging Face shards): name -> (key, layout of that file)."""

    files: dict[str, tuple[str, Layout]]
    meta: dict[str, str]
    read: Read = read_file

    def infos(self) -> dict[str, TensorInfo]:
        return {name: layout.tensors[name][0] for name, (_, layout) in self.files.items()}

    def source(self, name: str) -> ByteSource:
        key, layout = self.files[name]
        info, begin, end = layout.tensors[name]
        return ByteSource(info, [(key, layout.data_start + begin, end - begin)], self.read)


@dataclass
class PiecesReader:
    """A v2 model: its manifest, with pieces read through ``read`` by piece id."""

    manifest: Manifest
    read: Read

    @property
    def meta(self) -> dict[str, str]:
        return self.manifest.meta

    def infos(self) -> dict[str, TensorInfo]:
        return {name: t.info for name, t in self.manifest.tensors.items()}

    def source(self, name: str) -> ByteSource:
        t = self.manifest.tensors[name]
        spans = piece_spans(t.info.nbytes)
        return ByteSource(t.info, [(pid, 0, end - begin) for pid, (begin, end) in zip(t.pieces, spans)], self.read)


@dataclass
class NpzReader:
    path: str
    meta: dict[str, str]
    _infos: dict[str, TensorInfo]

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def source(self, name: str) -> ArrayBackedSource:
        def load() -> np.ndarray:
            with np.load(self.path, allow_pickle=False) as z:
                array: np.ndarray = z[name]
                return array
        return ArrayBackedSource(self._infos[name], load)


# -- opening model files -------------------------------------------------------------------------


def open_blob_model(key: str, size: int, read: Read, *, max_header_bytes: int = MAX_HEADER_BYTES) -> LayoutReader:
    """A v1 model (one canonical safetensors blob) read through ``read``."""
    layout = parse_header(read(key, 0, min(8, size)), lambda n: read(key, 8, n), size,
                          max_header_bytes=max_header_bytes)
    return LayoutReader({name: (key, layout) for name in layout.tensors}, layout.meta, read)


def open_safetensors(path: str | os.PathLike[str]) -> LayoutReader:
    with open(path, "rb") as f:
        layout = read_layout(f)
    return LayoutReader({name: (str(path), layout) for name in layout.tensors}, layout.meta)


def open_hf_dir(path: str | os.PathLike[str]) -> LayoutReader:
    """A Hugging Face model directory: `model.safetensors.index.json` and its shards,
    or a single `model.safetensors`. The shards' `__metadata__` are merged (a key with
    two different values is refused)."""
    root = Path(path)
    index = root / HF_INDEX
    if not index.exists():
        if (root / HF_SINGLE).exists():
            return open_safetensors(root / HF_SINGLE)
        raise ModelFormatError(f"{root}: no {HF_INDEX} or {HF_SINGLE}")
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise ModelFormatError(f"{index} is larger than {MAX_INDEX_BYTES} bytes")
    doc = bounded_json(index.read_bytes(), max_depth=3, what=HF_INDEX)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFormatError(f"{index}: weight_map must map tensor names to shard file names")
    files: dict[str, tuple[str, Layout]] = {}
    meta: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or "\\" in shard or shard in ("", ".", "..") or not shard.endswith(".safetensors"):
            raise ModelFormatError(f"{index}: shard {shard!r} is not a .safetensors file in the directory")
        with open(root / shard, "rb") as f:
            layout = read_layout(f)
        for key, value in layout.meta.items():
            if meta.setdefault(key, value) != value:
                raise ModelFormatError(f"shards disagree on metadata {key!r}")
        for name in layout.tensors:
            if weight_map.get(name) != shard:
                raise ModelFormatError(f"tensor {name!r} is in {shard} but the index puts it in "
                                       f"{weight_map.get(name)}")
            files[name] = (str(root / shard), layout)
    missing = sorted(set(weight_map) - set(files))
    if missing:
        raise ModelFormatError(f"tensor {missing[0]!r} is in the index but not in its shard")
    return LayoutReader(files, check_meta(meta))


def open_npz(path: str | os.PathLike[str]) -> NpzReader:
    """An `.npz` read one array at a time: only the members' .npy headers are read here
    (object arrays, which would need pickle, are refused)."""
    from lattice.learn.modelfile import NPZ_META_KEY

    infos = {}
    meta: dict[str, str] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                if name == NPZ_META_KEY:
                    continue
                with z.zip.open(name + ".npy") as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                if dtype.hasobject:
                    raise ModelFormatError(f"tensor {name!r}: object arrays are not allowed")
                infos[name] = TensorInfo(check_name(name), dtype_tag(dtype), tuple(int(d) for d in shape))
            has_meta = NPZ_META_KEY in z.files
    except (ValueError, KeyError, OSError) as e:
        if isinstance(e, ModelFormatError):
            raise
        raise ModelFormatError(f"{path}: not a plain-array .npz ({e})") from None
    if has_meta:
        meta = _npz_meta(path)
    return NpzReader(str(path), meta, infos)


def _npz_meta(path: str | os.PathLike[str]) -> dict[str, str]:
    from lattice.learn.modelfile import NPZ_META_KEY

    with np.load(path, allow_pickle=False) as z:
        raw = z[NPZ_META_KEY]
    try:
        return check_meta(json.loads(raw.astype(np.uint8).tobytes().decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFormatError(f"bad {NPZ_META_KEY}: {e}") from None


def open_model_path(path: str | os.PathLike[str]) -> ModelReader:
    """A model on disk: a `.safetensors` file, a Hugging Face directory, or an `.npz`."""
    p = Path(path)
    if p.is_dir():
        return open_hf_dir(p)
    if p.suffix == ".npz":
        return open_npz(p)
    if p.suffix == ".safetensors":
        return open_safetensors(p)
    raise ModelFormatError(f"{p}: expected a .safetensors file, an .npz, or a directory with {HF_INDEX}")


# -- pieces ---------------------------------------------------------------------------------------


class PieceWriter:
    """Cuts one tensor's bytes, written in order, into pieces of PIECE_BYTES and hands
    each to ``emit`` (which stores it and returns its id)."""

    def __init__(self, emit: Callable[[bytes], str]) -> None:
        self._emit = emit
        self._buf = bytearray()
        self.pieces: list[str] = []

    def write(self, data: bytes | np.ndarray) -> None:
        view = (np.ascontiguousarray(data).reshape(-1).view(np.uint8).data if isinstance(data, np.ndarray)
                else memoryview(data)).cast("B")
        while len(view):
            take = min(len(view), PIECE_BYTES - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == PIECE_BYTES:
                self._flush()

    def _flush(self) -> None:
        self.pieces.append(self._emit(bytes(self._buf)))
        self._buf = bytearray()

    def finish(self) -> tuple[str, ...]:
        if self._buf:
            self._flush()
        return tuple(self.pieces)


def hash_piece(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def copy_tensor(src: Source, writer: PieceWriter) -> None:
    """Stream a tensor's raw bytes into ``writer``, COPY_BYTES at a time."""
    step = max(1, COPY_BYTES // TAGS[src.info.dtype].itemsize)
    for start in range(0, src.info.count, step):
        writer.write(src.read(start, min(src.info.count, start + step)))


def import_model(reader: ModelReader, emit: Callable[[bytes], str], *, meta: Mapping[str, str] | None = None,
                 progress: Callable[[str, int], None] | None = None) -> Manifest:
    """The v2 manifest of ``reader``'s model, emitting every piece (tensors kept exactly
    as they are: dtype, shape, bytes)."""
    tensors = {}
    for name, info in sorted(reader.infos().items()):
        writer = PieceWriter(emit)
        copy_tensor(reader.source(name), writer)
        tensors[name] = ManifestTensor(info, writer.finish())
        if progress is not None:
            progress(name, info.nbytes)
    return Manifest(tensors, check_meta(reader.meta if meta is None else meta))


# -- export -----------------------------------------------------------------------------------------


def _write_file(path: Path, reader: ModelReader, names: Sequence[str], meta: Mapping[str, str]) -> int:
    infos = reader.infos()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(canonical_header([infos[n] for n in names], meta))
        for name in sorted(names):
            src = reader.source(name)
            step = max(1, COPY_BYTES // TAGS[src.info.dtype].itemsize)
            for start in range(0, src.info.count, step):
                f.write(np.ascontiguousarray(src.read(start, min(src.info.count, start + step))).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def export_file(reader: ModelReader, path: str | os.PathLike[str]) -> int:
    """Write the model as one canonical `.safetensors` file; returns its size."""
    return _write_file(Path(path), reader, sorted(reader.infos()), reader.meta)


def export_dir(reader: ModelReader, path: str | os.PathLike[str], *, shard_bytes: int = DEFAULT_SHARD_BYTES
               ) -> list[str]:
    """Write the model in the Hugging Face layout: `model.safetensors` when it fits one
    shard, else `model-0000i-of-0000N.safetensors` (tensors in name order, each shard up
    to ``shard_bytes`` of data) and `model.safetensors.index.json`. Returns the files."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    infos = reader.infos()
    names = sorted(infos)
    total = sum(i.nbytes for i in infos.values())
    if total <= shard_bytes:
        _write_file(root / HF_SINGLE, reader, names, reader.meta)
        return [HF_SINGLE]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + infos[name].nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += infos[name].nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, members in zip(files, shards):
        _write_file(root / file, reader, members, reader.meta)
        weight_map.update({n: file for n in members})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = root / f".{HF_INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / HF_INDEX)
    return [*files, HF_INDEX]


# -- merging ----------------------------------------------------------------------------------------


def _short(model: str) -> str:
    return model[:12]


def merge_plan(spec: MergeSpec, readers: Mapping[str, ModelReader]) -> list[str]:
    """The output tensor names (the base's, else the first model's), after checking
    from the headers alone that every input has exactly those tensors with the same
    shapes and dtypes (what `merge_tensor` would refuse, found before any tensor bytes
    are read); raises MergeInputError naming a tensor."""
    first = spec.base if spec.base is not None else spec.models[0]
    reference = readers[first].infos()
    names = sorted(reference)
    wanted = set(names)
    for mid in ([spec.base] if spec.base is not None else []) + list(spec.models):
        have = readers[mid].infos()
        for name in names:
            info, ref = have.get(name), reference[name]
            if info is None:
                raise MergeInputError(name, f"missing from input {_short(mid)}")
            if info.shape != ref.shape:
                raise MergeInputError(name, f"input {_short(mid)} has shape {list(info.shape)}, "
                                            f"expected {list(ref.shape)}")
            if info.dtype != ref.dtype:
                raise MergeInputError(name, f"input {_short(mid)} has dtype {info.dtype}, "
                                            f"expected {ref.dtype}")
        extra = sorted(set(have) - wanted)
        if extra:
            raise MergeInputError(extra[0], f"input {_short(mid)} has it but {_short(first)} does not")
    return names


def output_info(spec: MergeSpec, info: TensorInfo) -> TensorInfo:
    """What a merge of ``spec`` makes of an input tensor like ``info``: float tensors
    in the spec's dtype (or their own), others copied (`merge_tensor`)."""
    if info.dtype in FLOAT_TAGS and spec.dtype is not None:
        return TensorInfo(info.name, spec.dtype, info.shape)
    return info


def select_tensors(names: Iterable[str], patterns: Sequence[str] | None) -> list[str]:
    """The names matching any of the glob ``patterns`` (all when none)."""
    names = list(names)
    if not patterns:
        return names
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def merge_share(spec: MergeSpec, readers: Mapping[str, ModelReader], names: Iterable[str],
                emit: Callable[[bytes], str], *, block: int = BLOCK_ELEMENTS,
                progress: Callable[[str, int], None] | None = None) -> dict[str, ManifestTensor]:
    """Merge the tensors ``names`` (a participant's share, or all) and emit their output
    pieces; returns each tensor's output entry. Raises MergeInputError / MergeSpecError
    naming the tensor."""
    all_names = merge_plan(spec, readers)
    layers = spec.layer_count(all_names)
    base = readers[spec.base] if spec.base is not None else None
    labels = ([_short(spec.base)] if spec.base is not None else []) + [_short(m) for m in spec.models]
    out = {}
    for name in names:
        shared, per_model = spec.resolve(name, layers)
        writer = PieceWriter(emit)
        info = merge_tensor(spec.method, name, base.source(name) if base is not None else None,
                            [readers[m].source(name) for m in spec.models], shared, per_model, writer.write,
                            out_dtype=spec.dtype, labels=labels, block=block)
        out[name] = ManifestTensor(info, writer.finish())
        if progress is not None:
            progress(name, info.nbytes)
    return out


def merged_manifest(spec: MergeSpec, tensors: Mapping[str, ManifestTensor]) -> Manifest:
    """The result model of ``spec`` from its tensors (all shares put together); its
    metadata holds the spec, so the id commits to how it was made."""
    return Manifest(dict(tensors), {METADATA_KEY: spec.canonical()})


def spec_of(manifest: Manifest) -> MergeSpec:
    """The merge spec a merged model records; MergeSpecError if it records none."""
    raw = manifest.meta.get(METADATA_KEY)
    if raw is None:
        raise MergeSpecError("this model is not a merge result (no lattice.merge metadata)")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise MergeSpecError(f"malformed lattice.merge metadata: {e}") from None
    return MergeSpec.from_json(doc)


@dataclass(frozen=True)
class Verdict:
    tensor: str
    matches: bool
    reason: str = ""


def verify_share(manifest: Manifest, readers: Mapping[str, ModelReader], names: Iterable[str], *,
                 block: int = BLOCK_ELEMENTS) -> Iterator[Verdict]:
    """Recompute ``names`` of a merged model from its inputs (pieces are hashed, not
    stored) and compare them with the manifest, piece by piece."""
    spec = spec_of(manifest)
    for name in names:
        want = manifest.tensors.get(name)
        if want is None:
            yield Verdict(name, False, "not in the model")
            continue
        try:
            got = merge_share(spec, readers, [name], hash_piece, block=block)[name]
        except MergeInputError as e:
            yield Verdict(name, False, str(e))
            continue
        if got.info != want.info:
            yield Verdict(name, False, f"recomputed {got.info.dtype} {list(got.info.shape)}, "
                                       f"the model has {want.info.dtype} {list(want.info.shape)}")
        elif got.pieces != want.pieces:
            bad = next(i for i, (a, b) in enumerate(zip(got.pieces, want.pieces)) if a != b)
            yield Verdict(name, False, f"piece {bad} differs")
        else:
            yield Verdict(name, True)
