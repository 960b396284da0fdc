"""Whole models through the streaming engine: import keeps every tensor byte, export
writes canonical files and the Hugging Face layout, a merge split into shares equals
the whole merge, and verify recomputes and catches a changed piece."""

import hashlib
import json

import numpy as np
import pytest

from lattice.learn.merge import MergeInputError
from lattice.learn.mergeengine import (
    HF_INDEX,
    PiecesReader,
    export_dir,
    export_file,
    import_model,
    merge_plan,
    merge_share,
    merged_manifest,
    open_blob_model,
    open_model_path,
    output_info,
    select_tensors,
    spec_of,
    verify_share,
)
from lattice.learn.mergespec import MergeSpec
from lattice.learn.modelfile import (
    BFLOAT16,
    PIECE_BYTES,
    ModelFormatError,
    canonical_model_bytes,
    dumps_manifest,
    f32_to_bf16,
    loads_manifest,
    manifest_id,
    save_npz,
)

RNG = np.random.default_rng(3)


class Blobs:
    """A content-addressed store in a dict: what the model store does with the blob store."""

    def __init__(self):
        self.data = {}

    def put(self, piece: bytes) -> str:
        pid = hashlib.sha256(piece).hexdigest()
        self.data[pid] = piece
        return pid

    def read(self, key: str, offset: int, length: int) -> bytes:
        return self.data[key][offset:offset + length]


def _model(scale=0.0, big=False):
    rows = (PIECE_BYTES // 2 // 1024) + 3 if big else 8  # big: a BF16 tensor of more than one piece
    arrays = {
        "model.embed_tokens.weight": f32_to_bf16(RNG.normal(0, 1, (rows, 1024)).astype(np.float32) + scale),
        "model.layers.0.mlp.up_proj.weight": f32_to_bf16(RNG.normal(0, 1, (16, 32)).astype(np.float32)),
        "model.layers.1.mlp.up_proj.weight": f32_to_bf16(RNG.normal(0, 1, (16, 32)).astype(np.float32)),
        "model.norm.weight": RNG.normal(0, 1, 32).astype(np.float16),
        "lm_head.scale": np.array([scale], np.float64),
        "position_ids": np.arange(10, dtype=np.int64),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 4), np.float32),
    }
    return arrays


def _write(path, arrays, meta=None):
    path.write_bytes(canonical_model_bytes(arrays, meta or {"format": "pt"}))
    return path


def test_import_then_export_is_byte_identical_and_big_tensors_become_pieces(tmp_path):
    arrays = _model(big=True)
    src = _write(tmp_path / "in.safetensors", arrays)
    blobs = Blobs()
    manifest = import_model(open_model_path(src), blobs.put)
    emb = manifest.tensors["model.embed_tokens.weight"]
    assert emb.info.dtype == "BF16" and len(emb.pieces) == 2
    assert all(len(blobs.data[p]) <= PIECE_BYTES for p in emb.pieces)
    assert loads_manifest(dumps_manifest(manifest)) == manifest
    out = tmp_path / "out.safetensors"
    export_file(PiecesReader(manifest, blobs.read), out)
    assert out.read_bytes() == src.read_bytes()  # a canonical file comes back byte for byte


def test_a_sharded_hugging_face_directory_imports_to_the_same_model(tmp_path):
    arrays = _model()
    blobs = Blobs()
    single = import_model(open_model_path(_write(tmp_path / "one.safetensors", arrays)), blobs.put)
    shards = tmp_path / "hf"
    files = export_dir(PiecesReader(single, blobs.read), shards, shard_bytes=4096)
    assert HF_INDEX in files and len(files) > 2
    index = json.loads((shards / HF_INDEX).read_text())
    assert set(index["weight_map"]) == set(arrays)
    again = import_model(open_model_path(shards), blobs.put)
    assert manifest_id(again) == manifest_id(single)
    small = tmp_path / "hf-small"
    assert export_dir(PiecesReader(single, blobs.read), small) == ["model.safetensors"]


def test_an_npz_imports_with_its_dtypes(tmp_path):
    arrays = {"w": RNG.normal(0, 1, (3, 4)).astype(np.float32), "bf": f32_to_bf16(np.ones(3, np.float32))}
    save_npz(tmp_path / "m.npz", arrays, {"task": "x"})
    blobs = Blobs()
    manifest = import_model(open_model_path(tmp_path / "m.npz"), blobs.put)
    assert manifest.meta == {"task": "x"}
    assert manifest.tensors["bf"].info.dtype == "BF16"
    assert blobs.data[manifest.tensors["w"].pieces[0]] == arrays["w"].tobytes()


def test_broken_directories_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ModelFormatError, match=r"no model.safetensors.index.json"):
        open_model_path(tmp_path)
    (tmp_path / HF_INDEX).write_text(json.dumps({"weight_map": {"w": "../evil.safetensors"}}))
    with pytest.raises(ModelFormatError, match=r"not a .safetensors file in the directory"):
        open_model_path(tmp_path)
    _write(tmp_path / "a.safetensors", {"w": np.zeros(2, np.float32), "v": np.zeros(1, np.float32)})
    (tmp_path / HF_INDEX).write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    with pytest.raises(ModelFormatError, match="'v'"):
        open_model_path(tmp_path)


def _inputs(tmp_path, blobs):
    ids = {}
    for i, scale in enumerate([0.0, 0.1, -0.2]):
        arrays = _model(scale)
        arrays["lm_head.scale"] = np.array([0.0], np.float64)
        m = import_model(open_model_path(_write(tmp_path / f"{i}.safetensors", arrays)), blobs.put)
        ids[manifest_id(m)] = PiecesReader(m, blobs.read)
    return ids


def test_shares_merged_apart_equal_the_whole_merge_and_verify_recomputes(tmp_path):
    blobs = Blobs()
    readers = _inputs(tmp_path, blobs)
    base, *models = list(readers)
    spec = MergeSpec.from_arguments("ties", models, base=base, density=0.5, dtype="F32")
    names = merge_plan(spec, readers)
    whole = merge_share(spec, readers, names, blobs.put)
    half = len(names) // 2
    apart = {**merge_share(spec, readers, names[:half], blobs.put),
             **merge_share(spec, readers, names[half:], blobs.put)}
    assert apart == whole
    manifest = merged_manifest(spec, whole)
    assert spec_of(manifest) == spec
    assert all(v.matches for v in verify_share(manifest, readers, names))
    # a changed piece is found, and only checking other tensors does not look at it
    target = "model.layers.0.mlp.up_proj.weight"
    tampered = dict(manifest.tensors)
    tampered[target] = type(tampered[target])(tampered[target].info, ("0" * 64,))
    bad = type(manifest)(tampered, manifest.meta)
    verdicts = {v.tensor: v for v in verify_share(bad, readers, names)}
    assert not verdicts[target].matches and "piece 0" in verdicts[target].reason
    assert sum(not v.matches for v in verdicts.values()) == 1
    assert select_tensors(names, ["model.layers.*"]) == [n for n in names if n.startswith("model.layers.")]


def test_a_missing_tensor_fails_the_merge_with_its_name(tmp_path):
    blobs = Blobs()
    readers = _inputs(tmp_path, blobs)
    base, one, _ = list(readers)
    arrays = _model()
    del arrays["model.norm.weight"]
    m = import_model(open_model_path(_write(tmp_path / "x.safetensors", arrays)), blobs.put)
    readers[manifest_id(m)] = PiecesReader(m, blobs.read)
    spec = MergeSpec.from_arguments("task_arithmetic", [one, manifest_id(m)], base=base)
    with pytest.raises(MergeInputError, match=r"'model.norm.weight'.*missing"):
        merge_plan(spec, readers)


@pytest.mark.parametrize("change,problem", [
    (lambda a: a.update({"model.norm.weight": a["model.norm.weight"][:16]}),
     "has shape \\[16\\], expected \\[32\\]"),
    (lambda a: a.update({"model.norm.weight": a["model.norm.weight"].astype(np.float32)}),
     "has dtype F32, expected F16"),
])
def test_a_tensor_of_another_shape_or_dtype_fails_the_plan_before_any_bytes_are_read(tmp_path, change,
                                                                                      problem):
    blobs = Blobs()
    readers = _inputs(tmp_path, blobs)
    base, one, _ = list(readers)
    arrays = _model()
    change(arrays)
    m = import_model(open_model_path(_write(tmp_path / "x.safetensors", arrays)), blobs.put)
    readers[manifest_id(m)] = PiecesReader(m, blobs.read)
    spec = MergeSpec.from_arguments("ties", [one, manifest_id(m)], base=base)
    blobs.data.clear()  # the plan reads headers only: no piece is there to read
    with pytest.raises(MergeInputError, match=f"'model.norm.weight': input {manifest_id(m)[:12]} {problem}"):
        merge_plan(spec, readers)


def test_output_info_is_what_the_merge_writes(tmp_path):
    blobs = Blobs()
    readers = _inputs(tmp_path, blobs)
    base, *models = list(readers)
    for dtype in (None, "BF16"):
        spec = MergeSpec.from_arguments("ties", models, base=base, dtype=dtype)
        merged = merge_share(spec, readers, merge_plan(spec, readers), blobs.put)
        assert {n: output_info(spec, readers[base].infos()[n]) for n in merged} == \
            {n: t.info for n, t in merged.items()}


def test_a_v1_model_blob_reads_tensor_by_tensor():
    data = canonical_model_bytes({"params": np.arange(6, dtype=np.float32)}, {"task": "t"})
    blobs = Blobs()
    key = blobs.put(data)
    reader = open_blob_model(key, len(data), blobs.read)
    assert reader.meta == {"task": "t"}
    assert reader.source("params").read(2, 5).tolist() == [2.0, 3.0, 4.0]
    assert reader.infos()["params"].dtype == "F32"
    assert BFLOAT16.itemsize == 2


def test_an_npz_with_object_arrays_is_refused_without_unpickling(tmp_path):
    evil = tmp_path / "evil.npz"
    np.savez(evil, w=np.zeros(2, np.float32), obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ModelFormatError, match="'obj'"):
        open_model_path(evil)
