"""Model file formats: safetensors (read hardened, write canonical), `.npz`, BF16 words,
and the v2 piece manifest. Spec: proto/model-format.md.

Owns the dtype table (every safetensors dtype, BF16 included), `TensorInfo`, the
canonical bytes and v1 model ids, the bounded safetensors header parser shared by the
in-memory reader and the file reader, and the v2 manifest (a model as content-addressed
pieces). Pure: reads only files passed in; must not import trio, libp2p or sockets, and
reads no clock. Never pickle: `.npz` is read with allow_pickle=False.

Hostile input. Model bytes arrive from peers (a train job's final models, fetched
pieces), so every reader here bounds structure *before* the JSON parser runs: header
length, nesting depth, integer literal lengths (Python refuses > 4300 digits with
ValueError), then tensor count, dimension count and values, offsets; and it raises only
`ModelFormatError` for any malformed input (issue 11, item 4).

BF16. numpy has no bfloat16, so a BF16 tensor is carried as its raw 2-byte words in an
array of the marker dtype `BFLOAT16` (a one-field structured dtype over ``<u2``): the
words survive every copy and file untouched, arithmetic on them is impossible by
accident, and `to_float` / `from_float` convert for math (float32, round-to-nearest-even
back, as torch and every BF16 accelerator do).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

# -- limits (proto/model-format.md, "Reading") ----------------------------------------------
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors reference limit on the JSON header."""
MAX_HEADER_DEPTH = 3
"""A valid header nests three deep ({name: {shape: [..]}}); anything deeper is refused
before json.loads, which recurses."""
MAX_INT_DIGITS = 20
"""u64 offsets have at most 20 decimal digits."""
MAX_TENSORS = 1 << 20
MAX_DIMS = 32
MAX_DIM = 1 << 48
MAX_NAME_CHARS = 4096
MAX_META_ENTRIES = 4096
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_DEPTH = 4
PIECE_BYTES = 16 * 1024 * 1024
"""A v2 model's tensors are cut into pieces of this many bytes (the last one shorter).
A protocol constant: it is part of every v2 model id."""
MANIFEST_MAGIC = b"lattice-model/2\n"
"""A v2 manifest starts with these bytes; read as a safetensors header length they are
far above MAX_HEADER_BYTES, so no valid safetensors file starts this way."""
NPZ_META_KEY = "__lattice_meta__"

BFLOAT16 = np.dtype([("bfloat16", "<u2")])
"""Marker dtype of BF16 tensors: raw little-endian words (see the module docstring)."""

_DTYPES: dict[np.dtype, str] = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    BFLOAT16: "BF16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint16"): "U16",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}
TAGS: dict[str, np.dtype] = {tag: (dt if dt is BFLOAT16 else dt.newbyteorder("<")) for dt, tag in _DTYPES.items()}
"""safetensors dtype tag -> numpy dtype of its little-endian data."""
FLOAT_TAGS = ("F64", "F32", "F16", "BF16")


class ModelFormatError(ValueError):
    """Bytes or arguments that are not a valid model file / model."""


def dtype_tag(dtype: np.dtype) -> str:
    """The safetensors tag of a numpy dtype (either byte order); ModelFormatError if none."""
    dt = np.dtype(dtype)
    tag = _DTYPES.get(dt) if dt.fields else _DTYPES.get(dt.newbyteorder("="))
    if tag is None:
        raise ModelFormatError(f"unsupported dtype {dt}")
    return tag


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, safetensors dtype tag and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * TAGS[self.dtype].itemsize


# -- BF16 and float conversion ----------------------------------------------------------------


def bf16_to_f32(words: np.ndarray) -> np.ndarray:
    """float32 values of BF16 words (exact: BF16 is the top half of float32)."""
    w = np.asarray(words).view("<u2") if np.asarray(words).dtype == BFLOAT16 else np.asarray(words, "<u2")
    return (w.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """BF16 words (dtype BFLOAT16) nearest to float32 ``values``, ties to even; NaN stays
    a (quiet) NaN, overflow rounds to infinity, as IEEE rounding does."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded = np.where(nan, ((u >> 16) | 0x0040).astype(np.uint16), rounded)
    return rounded.view(BFLOAT16)


def math_dtype(tag: str) -> np.dtype:
    """What the merge math runs in for a float tensor of ``tag``: float64 for F64,
    else float32 (mergekit's rule too)."""
    return np.dtype(np.float64) if tag == "F64" else np.dtype(np.float32)


def to_float(raw: np.ndarray, tag: str) -> np.ndarray:
    """Float values of a raw tensor for math (`math_dtype`)."""
    if tag == "BF16":
        return bf16_to_f32(raw)
    if tag not in FLOAT_TAGS:
        raise ModelFormatError(f"{tag} is not a float dtype")
    return np.asarray(raw).astype(math_dtype(tag), copy=False)


def from_float(values: np.ndarray, tag: str) -> np.ndarray:
    """Raw little-endian tensor of dtype ``tag`` from float math results, rounding to
    nearest even (BF16 via float32, like torch; the others by numpy's IEEE casts)."""
    with np.errstate(over="ignore"):  # an overflow becomes inf, which the caller refuses
        if tag == "BF16":
            return f32_to_bf16(np.asarray(values, np.float32))
        return np.asarray(values).astype(TAGS[tag], copy=False)


# -- canonical bytes (v1 ids) ---------------------------------------------------------------


def check_meta(meta: object) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise ModelFormatError(f"model metadata must be a mapping, got {type(meta).__name__}")
    meta = dict(meta)
    if len(meta) > MAX_META_ENTRIES:
        raise ModelFormatError(f"more than {MAX_META_ENTRIES} metadata entries")
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ModelFormatError(f"model metadata must map str to str, got {k!r}: {type(v).__name__}")
    return meta


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name or name == "__metadata__" or len(name) > MAX_NAME_CHARS:
        raise ModelFormatError(f"invalid tensor name {str(name)[:80]!r}")
    return name


def canonical_header(infos: Iterable[TensorInfo], meta: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length and padded JSON header of the canonical safetensors file of
    tensors ``infos`` (data in name order, back to back)."""
    meta = check_meta(meta)
    header: dict[str, Any] = {}
    offset = 0
    for info in sorted(infos, key=lambda i: i.name):
        check_name(info.name)
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape),
                             "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    if meta:
        header["__metadata__"] = meta
    hjson = canonical_json(header)
    hjson += b" " * (-len(hjson) % 8)
    return struct.pack("<Q", len(hjson)) + hjson


def info_of(name: str, arr: np.ndarray) -> TensorInfo:
    a = np.asarray(arr)
    try:
        tag = dtype_tag(a.dtype)
    except ModelFormatError:
        raise ModelFormatError(f"tensor {name!r}: unsupported dtype {a.dtype}") from None
    return TensorInfo(check_name(name), tag, tuple(int(s) for s in a.shape))


def tensor_bytes(arr: np.ndarray) -> bytes:
    """The tensor's data as the format stores it: C order, little-endian."""
    a = np.asarray(arr)
    return np.ascontiguousarray(a, dtype=TAGS[dtype_tag(a.dtype)]).tobytes()


def canonical_model_bytes(arrays: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> bytes:
    """The one byte form of a (v1) model: a canonical safetensors file.

    Tensors sorted by name (code point order), data little-endian C-order packed in
    that order, header JSON with sorted keys and no whitespace, `__metadata__`
    (str -> str) present iff `meta` is non-empty, header padded with spaces to a
    multiple of 8. See proto/model-format.md."""
    infos = [info_of(name, arr) for name, arr in arrays.items()]
    head = canonical_header(infos, meta)
    return head + b"".join(tensor_bytes(arrays[i.name]) for i in sorted(infos, key=lambda i: i.name))


def model_id(arrays: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None) -> str:
    """SHA-256 hex of `canonical_model_bytes(arrays, meta)` (a v1 model id)."""
    return hashlib.sha256(canonical_model_bytes(arrays, meta)).hexdigest()


# -- bounded JSON -----------------------------------------------------------------------------

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_LONG_INT = re.compile(rb"[0-9]{%d,}" % (MAX_INT_DIGITS + 1))
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ModelFormatError("duplicate key in JSON header")
    return dict(pairs)


def bounded_json(raw: bytes, *, max_depth: int, what: str) -> Any:
    """json.loads of ``raw`` after checking, without recursion, that it nests at most
    ``max_depth`` deep and has no integer literal longer than MAX_INT_DIGITS. Raises
    only ModelFormatError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{what} is not UTF-8: {e}") from None
    skeleton = _STRING.sub(b'""', raw)  # brackets and digits inside strings do not count
    if _LONG_INT.search(skeleton):
        raise ModelFormatError(f"{what} has an integer longer than {MAX_INT_DIGITS} digits")
    chars = np.frombuffer(skeleton, np.uint8)
    steps = np.isin(chars, _OPEN).astype(np.int64) - np.isin(chars, _CLOSE).astype(np.int64)
    if steps.size and int(np.cumsum(steps).max()) > max_depth:
        raise ModelFormatError(f"{what} nests deeper than {max_depth}")
    try:
        return json.loads(text, object_pairs_hook=_strict_object)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:  # ValueError: int digits limit
        if isinstance(e, ModelFormatError):
            raise
        raise ModelFormatError(f"{what} is not valid JSON: {str(e)[:120]}") from None


def _int(value: Any, lo: int, hi: int, where: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ModelFormatError(f"{where}: expected an integer in [{lo}, {hi}], got {str(value)[:40]}")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise ModelFormatError(f"{where}: shape must be a list of at most {MAX_DIMS} dimensions")
    shape = tuple(_int(d, 0, MAX_DIM, f"{where}: dimension") for d in value)
    if math.prod(shape) > MAX_DIM:
        raise ModelFormatError(f"{where}: more than {MAX_DIM} elements")
    return shape


# -- reading safetensors ----------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A safetensors file's parsed header: where each tensor's bytes are."""

    tensors: dict[str, tuple[TensorInfo, int, int]]
    """name -> (info, begin, end); offsets relative to the data section."""
    meta: dict[str, str]
    data_start: int
    data_bytes: int


def parse_header(head8: bytes, read_header: Any, total: int, *, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_tensors: int = MAX_TENSORS) -> Layout:
    """The `Layout` of a safetensors file of ``total`` bytes whose first 8 bytes are
    ``head8``; ``read_header(n)`` returns the n header bytes after them."""
    if len(head8) < 8:
        raise ModelFormatError("file shorter than the 8-byte header length")
    (hlen,) = struct.unpack("<Q", head8[:8])
    if hlen > min(max_header_bytes, MAX_HEADER_BYTES) or hlen > total - 8:
        raise ModelFormatError(f"header length {hlen} exceeds the limit or the file")
    header = bounded_json(bytes(read_header(hlen)), max_depth=MAX_HEADER_DEPTH, what="safetensors header")
    if not isinstance(header, dict):
        raise ModelFormatError("header is not a JSON object")
    meta = check_meta(header.pop("__metadata__", None))
    if len(header) > max_tensors:
        raise ModelFormatError(f"more than {max_tensors} tensors")
    body = total - 8 - hlen
    tensors: dict[str, tuple[TensorInfo, int, int]] = {}
    for name, entry in header.items():
        check_name(name)
        where = f"tensor {name[:200]!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelFormatError(f"{where}: entry must have exactly dtype, shape, data_offsets")
        dtype, offs = entry["dtype"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in TAGS:
            raise ModelFormatError(f"{where}: unsupported dtype {str(dtype)[:20]!r}")
        shape = _shape(entry["shape"], where)
        if not (isinstance(offs, list) and len(offs) == 2):
            raise ModelFormatError(f"{where}: bad data_offsets")
        begin, end = (_int(o, 0, body, f"{where}: data offset") for o in offs)
        info = TensorInfo(name, dtype, shape)
        if begin > end or end - begin != info.nbytes:
            raise ModelFormatError(f"{where}: data_offsets {offs} do not fit shape {list(shape)} {dtype}")
        tensors[name] = (info, begin, end)
    position = 0  # the data must be covered exactly: no holes, overlaps or trailing bytes
    for _, begin, end in sorted(tensors.values(), key=lambda t: (t[1], t[2])):
        if begin != position:
            raise ModelFormatError("tensor data has holes or overlaps")
        position = end
    if position != body:
        raise ModelFormatError(f"{body - position} trailing bytes after the tensor data")
    return Layout(tensors, meta, 8 + hlen, body)


def loads_safetensors(data: bytes | bytearray | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES
                      ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into (arrays, metadata). Accepts any valid file (not only
    canonical ones); anything malformed raises ModelFormatError and nothing else. Arrays
    are fresh, writable copies in native byte order (BF16 as `BFLOAT16` words)."""
    buf = memoryview(data).cast("B")
    layout = parse_header(bytes(buf[:8]), lambda n: buf[8:8 + n], len(buf), max_header_bytes=max_header_bytes)
    body = buf[layout.data_start:]
    arrays = {}
    for name, (info, begin, end) in layout.tensors.items():
        dt = TAGS[info.dtype]
        arr = np.frombuffer(body[begin:end], dtype=dt, count=info.count).reshape(info.shape)
        arrays[name] = arr.astype(dt if info.dtype == "BF16" else dt.newbyteorder("="))
    return arrays, layout.meta


def read_layout(f: IO[bytes], *, max_header_bytes: int = MAX_HEADER_BYTES) -> Layout:
    """The layout of an open safetensors file (only the header is read)."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head8 = f.read(8)

    def read_header(n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise ModelFormatError("file shrank while reading its header")
        return data

    return parse_header(head8, read_header, size, max_header_bytes=max_header_bytes)


def save_safetensors(path: str | os.PathLike[str] | IO[bytes], arrays: Mapping[str, np.ndarray],
                     meta: Mapping[str, str] | None = None) -> str:
    """Write the canonical bytes; returns the v1 model id (the file's SHA-256)."""
    data = canonical_model_bytes(arrays, meta)
    if hasattr(path, "write"):
        path.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return hashlib.sha256(data).hexdigest()


def load_safetensors(path: str | os.PathLike[str] | IO[bytes]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if hasattr(path, "read"):
        return loads_safetensors(path.read())
    with open(path, "rb") as f:
        return loads_safetensors(f.read())


# -- .npz ---------------------------------------------------------------------------------------


def save_npz(path: str | os.PathLike[str] | IO[bytes], arrays: Mapping[str, np.ndarray],
             meta: Mapping[str, str] | None = None) -> None:
    """numpy .npz (uncompressed); metadata is canonical JSON in a uint8 array named
    `__lattice_meta__`. Not canonical bytes (zip headers): ids come from safetensors."""
    meta = check_meta(meta)
    # numpy.savez reads a keyword named allow_pickle as its own option, dropping the tensor
    for reserved in (NPZ_META_KEY, "allow_pickle"):
        if reserved in arrays:
            raise ModelFormatError(f"tensor name {reserved!r} is reserved in .npz")
    for name, arr in arrays.items():
        if np.asarray(arr).dtype.hasobject:
            raise ModelFormatError(f"tensor {name!r}: object arrays are not allowed")
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload[NPZ_META_KEY] = np.frombuffer(canonical_json(meta), dtype=np.uint8)
    np.savez(path, allow_pickle=False, **payload)


def load_npz(path: str | os.PathLike[str] | IO[bytes]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:  # numpy's message when an entry would need pickle
        raise ModelFormatError(f"not a plain-array .npz: {exc}") from None
    raw = arrays.pop(NPZ_META_KEY, None)
    meta: dict[str, str] = {}
    if raw is not None:
        try:
            meta = check_meta(json.loads(raw.astype(np.uint8).tobytes().decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
            raise ModelFormatError(f"bad {NPZ_META_KEY}: {exc}") from None
    return arrays, meta


# -- v2: a model as content-addressed pieces -----------------------------------------------------


def piece_spans(nbytes: int) -> list[tuple[int, int]]:
    """[begin, end) of each piece of a tensor of ``nbytes`` bytes."""
    return [(b, min(b + PIECE_BYTES, nbytes)) for b in range(0, nbytes, PIECE_BYTES)]


@dataclass(frozen=True)
class ManifestTensor:
    info: TensorInfo
    pieces: tuple[str, ...]
    """SHA-256 hex of each piece of the tensor's bytes, in order."""


@dataclass(frozen=True)
class Manifest:
    """A v2 model: tensors (each as its pieces) and metadata. Its id is the SHA-256 of
    `dumps_manifest` of it."""

    tensors: dict[str, ManifestTensor]
    meta: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors.values())

    def infos(self) -> list[TensorInfo]:
        return [self.tensors[n].info for n in sorted(self.tensors)]


_HEX64 = re.compile(r"[0-9a-f]{64}")


def dumps_manifest(manifest: Manifest) -> bytes:
    """The canonical manifest bytes (MANIFEST_MAGIC + canonical JSON)."""
    meta = check_meta(manifest.meta)
    tensors = {}
    for name, t in manifest.tensors.items():
        check_name(name)
        if len(t.pieces) != len(piece_spans(t.info.nbytes)):
            raise ModelFormatError(f"tensor {name!r}: {len(t.pieces)} pieces for {t.info.nbytes} bytes")
        tensors[name] = {"dtype": t.info.dtype, "shape": list(t.info.shape), "pieces": list(t.pieces)}
    body = {"format": 2, "piece_bytes": PIECE_BYTES, "tensors": tensors, "metadata": meta}
    return MANIFEST_MAGIC + canonical_json(body)


def manifest_id(manifest: Manifest) -> str:
    return hashlib.sha256(dumps_manifest(manifest)).hexdigest()


def is_manifest(data: bytes | bytearray | memoryview) -> bool:
    return bytes(memoryview(data)[:len(MANIFEST_MAGIC)]) == MANIFEST_MAGIC


def loads_manifest(data: bytes | bytearray | memoryview) -> Manifest:
    """Parse manifest bytes; anything malformed raises ModelFormatError and nothing else.
    Only canonical manifests are accepted (so one model has one id)."""
    data = bytes(data)
    if not is_manifest(data):
        raise ModelFormatError("not a lattice-model/2 manifest")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ModelFormatError(f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
    doc = bounded_json(data[len(MANIFEST_MAGIC):], max_depth=MAX_MANIFEST_DEPTH, what="manifest")
    if not isinstance(doc, dict) or set(doc) != {"format", "piece_bytes", "tensors", "metadata"}:
        raise ModelFormatError("manifest must have exactly format, piece_bytes, tensors, metadata")
    if doc["format"] != 2 or doc["piece_bytes"] != PIECE_BYTES:
        raise ModelFormatError(f"unsupported manifest format {str(doc['format'])[:8]} / piece size")
    tensors_doc = doc["tensors"]
    if not isinstance(tensors_doc, dict) or len(tensors_doc) > MAX_TENSORS:
        raise ModelFormatError("manifest tensors must be a map of at most MAX_TENSORS entries")
    tensors = {}
    for name, entry in tensors_doc.items():
        check_name(name)
        where = f"tensor {name[:200]!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "pieces"}:
            raise ModelFormatError(f"{where}: entry must have exactly dtype, shape, pieces")
        if entry["dtype"] not in TAGS:
            raise ModelFormatError(f"{where}: unsupported dtype {str(entry['dtype'])[:20]!r}")
        info = TensorInfo(name, entry["dtype"], _shape(entry["shape"], where))
        pieces = entry["pieces"]
        if (not isinstance(pieces, list) or len(pieces) != len(piece_spans(info.nbytes))
                or not all(isinstance(p, str) and _HEX64.fullmatch(p) for p in pieces)):
            raise ModelFormatError(f"{where}: pieces must be {len(piece_spans(info.nbytes))} sha256 ids")
        tensors[name] = ManifestTensor(info, tuple(pieces))
    manifest = Manifest(tensors, check_meta(doc["metadata"]))
    if dumps_manifest(manifest) != data:
        raise ModelFormatError("manifest is not in canonical form")
    return manifest
