"""Models through real daemons, as a user drives them from the CLI: import a BF16
checkpoint and a sharded Hugging Face directory, export byte-identical tensors, merge
with a mergekit config, verify the result, and fetch a model's pieces from a peer."""

import json

import numpy as np
import pytest

from lattice.learn.modelfile import canonical_model_bytes, f32_to_bf16, load_safetensors
from lattice.testing.daemons import run_cli

pytestmark = pytest.mark.integration

RNG = np.random.default_rng(11)


def _checkpoint(scale: float):
    return {
        "model.embed_tokens.weight": f32_to_bf16(RNG.normal(0, 1, (64, 32)).astype(np.float32) * scale),
        "model.layers.0.mlp.up_proj.weight": f32_to_bf16(RNG.normal(0, 1, (48, 32)).astype(np.float32)),
        "model.layers.1.mlp.up_proj.weight": f32_to_bf16(RNG.normal(0, 1, (48, 32)).astype(np.float32)),
        "model.norm.weight": RNG.normal(0, 1, 32).astype(np.float16),
        "position_ids": np.arange(8, dtype=np.int64),
    }


def _cli_json(socket, *args):
    r = run_cli(*args, "--json", socket=socket, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_import_export_merge_verify_on_one_daemon(daemons, tmp_path):
    d = daemons()
    d.wait_running()
    files = {}
    for i, name in enumerate(["base", "one", "two"]):
        files[name] = tmp_path / f"{name}.safetensors"
        files[name].write_bytes(canonical_model_bytes(_checkpoint(1 + i / 10), {"format": "pt"}))
    ids = {name: _cli_json(d.socket, "models", "import", str(path), "--name", name)["id"]
           for name, path in files.items()}
    listed = _cli_json(d.socket, "models", "list")
    assert listed[ids["base"]]["name"] == "base" and listed[ids["base"]]["producer"] == d.peer_id()
    assert listed[ids["base"]]["dtypes"] == {"BF16": 3, "F16": 1, "I64": 1}

    out = tmp_path / "back.safetensors"
    r = run_cli("models", "export", "base", "-o", str(out), socket=d.socket)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == files["base"].read_bytes()  # byte for byte, BF16 included

    shards = tmp_path / "hf"
    exported = _cli_json(d.socket, "models", "export", ids["one"], "-o", str(shards), "--shard-bytes",
                         str(1 << 20))
    assert exported["files"] == ["model.safetensors"]  # fits one shard
    again = _cli_json(d.socket, "models", "import", str(shards))
    assert again["id"] == ids["one"]  # the same tensors are the same model, whatever the layout

    config = tmp_path / "ties.yml"
    config.write_text("models:\n  - model: base\n  - model: one\n    parameters: {weight: 1.0, density: [1, 0.3]}\n"
                      "  - model: two\n    parameters: {weight: 0.5, density: 0.5}\n"
                      "merge_method: ties\nbase_model: base\ndtype: bfloat16\n")
    merged = _cli_json(d.socket, "models", "merge", "--config", str(config), "--name", "soup")
    assert merged["method"] == "ties" and merged["inputs"] == [ids["one"], ids["two"]]
    verdict = run_cli("models", "verify", "soup", socket=d.socket, timeout=120)
    assert verdict.returncode == 0 and "every byte of 5 tensors matches" in verdict.stdout, verdict.stdout
    some = _cli_json(d.socket, "models", "verify", merged["id"], "--tensors", "model.layers.*")
    assert some["matches"] and some["checked"] == 2

    linear = _cli_json(d.socket, "models", "merge", "--method", "linear", "--models", "one", "two",
                       "--weights", "1", "3")
    merged_file = tmp_path / "linear.safetensors"
    run_cli("models", "export", linear["id"], "-o", str(merged_file), socket=d.socket)
    arrays, meta = load_safetensors(merged_file)
    assert json.loads(meta["lattice.merge"])["method"] == "linear"
    assert arrays["position_ids"].tolist() == list(range(8))


def test_bad_inputs_get_clear_errors_and_the_daemon_keeps_running(daemons, tmp_path):
    d = daemons()
    d.wait_running()
    r = run_cli("models", "import", str(tmp_path / "nothing.safetensors"), socket=d.socket)
    assert r.returncode == 1 and "the daemon found no" in r.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"[" * 16)
    r = run_cli("models", "import", str(bad), socket=d.socket)
    assert r.returncode == 1 and "nests deeper" in r.stderr
    good = tmp_path / "good.safetensors"
    good.write_bytes(canonical_model_bytes(_checkpoint(1.0)))
    short = tmp_path / "short.safetensors"
    arrays = _checkpoint(1.0)
    del arrays["model.norm.weight"]
    short.write_bytes(canonical_model_bytes(arrays))
    a = _cli_json(d.socket, "models", "import", str(good))["id"]
    b = _cli_json(d.socket, "models", "import", str(short))["id"]
    r = run_cli("models", "merge", "--method", "task_arithmetic", "--base", a, "--models", b, socket=d.socket)
    assert r.returncode == 1 and "'model.norm.weight'" in r.stderr and "missing" in r.stderr
    r = run_cli("models", "merge", "--method", "ties", "--models", a, b, socket=d.socket)
    assert r.returncode == 1 and "needs a base model" in r.stderr
    r = run_cli("models", "verify", a, socket=d.socket)
    assert r.returncode == 1 and "not a merge result" in r.stderr
    assert d.proc.poll() is None


def test_a_peer_merges_models_it_fetches_piece_by_piece(daemons, tmp_path):
    a, b = daemons(), daemons()
    a.wait_running()
    b.wait_running()
    with b.client() as c:
        c.connect_peer(a.addr())
    ids = []
    for i in range(3):
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(canonical_model_bytes(_checkpoint(1 + i)))
        ids.append(_cli_json(a.socket, "models", "import", str(path))["id"])
    merged = _cli_json(b.socket, "models", "merge", "--method", "dare_ties", "--base", ids[0], "--models",
                       *ids[1:], "--density", "0.5", "--seed", "7")
    assert _cli_json(a.socket, "models", "verify", merged["id"])["matches"]  # a fetches the result from b
    with b.client() as c:
        assert c.models_stats()["pieces_fetched"] >= 3 * 5  # every input's manifest and pieces


def test_models_get_of_a_pieced_model_writes_the_safetensors_file(daemons, tmp_path):
    d = daemons()
    d.wait_running()
    src = tmp_path / "m.safetensors"
    src.write_bytes(canonical_model_bytes(_checkpoint(1.0)))
    mid = _cli_json(d.socket, "models", "import", str(src))["id"]
    out = tmp_path / "got.safetensors"
    r = run_cli("models", "get", mid, "-o", str(out), socket=d.socket)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()
    r = run_cli("models", "get", mid, "-o", str(tmp_path / "got.npz"), socket=d.socket)
    assert r.returncode == 2 and "models export" in r.stderr
