"""Lattice's merge methods next to mergekit's (issue 14, "correctness against the anchor").

Builds small synthetic Llama-like float32 models (Hugging Face layout with config.json),
merges them with every method both with `mergekit-yaml` (bench/.venv-mergekit, mergekit
0.1.5) and with Lattice's streaming engine, and prints per method the largest absolute
difference and the largest difference relative to the output's scale. Where the two
definitions agree it is at float32 rounding level; proto/merge.md lists where they
deliberately differ (DARE and DELLA masks come from different random generators, so
those rows use density 1, where both are deterministic).

    .venv/bin/python bench/merge_vs_mergekit.py [--hidden 64] [--layers 3]
    .venv/bin/python bench/merge_vs_mergekit.py --golden tests/fixtures/merge   # CI fixtures

Without the anchor venv (bench/anchors/setup.sh builds it) the mergekit column says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lattice.learn.mergeengine import PiecesReader, merge_plan, merge_share, open_model_path  # noqa: E402
from lattice.learn.mergespec import MergeSpec  # noqa: E402
from lattice.learn.modelfile import save_safetensors, to_float  # noqa: E402

MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-yaml"

# method -> (base?, models, global parameters, per-model parameters); inputs: base, m1, m2, m3
CASES: dict[str, tuple[bool, list[str], dict, list[dict]]] = {
    "linear": (False, ["m1", "m2", "m3"], {}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}]),
    "slerp": (True, ["m1"], {"t": 0.3}, [{}]),
    "task_arithmetic": (True, ["m1", "m2"], {"lambda": 0.9}, [{"weight": 0.7}, {"weight": 0.5}]),
    "ties": (True, ["m1", "m2", "m3"], {"lambda": 1.0},
             [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.7}, {"weight": 0.4, "density": 0.3}]),
    "dare_linear": (True, ["m1", "m2"], {}, [{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}]),
    "dare_ties": (True, ["m1", "m2"], {}, [{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}]),
    "breadcrumbs": (True, ["m1", "m2"], {},
                    [{"weight": 0.6, "density": 0.8, "gamma": 0.05}, {"weight": 0.4, "density": 0.7, "gamma": 0.02}]),
    "della": (True, ["m1", "m2"], {}, [{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}]),
    "model_stock": (True, ["m1", "m2", "m3"], {}, [{}, {}, {}]),
    "nuslerp": (True, ["m1", "m2"], {}, [{"weight": 0.4}, {"weight": 0.6}]),
}


def llama_names(layers: int) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
    return names


def llama_shapes(hidden: int, inter: int, vocab: int, layers: int, kv: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for n in llama_names(layers):
        if "embed" in n or "lm_head" in n:
            shapes[n] = (vocab, hidden)
        elif "norm" in n:
            shapes[n] = (hidden,)
        elif "k_proj" in n or "v_proj" in n:
            shapes[n] = (kv, hidden)
        elif "q_proj" in n or "o_proj" in n:
            shapes[n] = (hidden, hidden)
        elif "down_proj" in n:
            shapes[n] = (hidden, inter)
        else:
            shapes[n] = (inter, hidden)
    return shapes


def llama_config(hidden: int, inter: int, vocab: int, layers: int, heads: int, kv_heads: int, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 256, "tie_word_embeddings": False, "torch_dtype": dtype}


def write_inputs(root: Path, hidden: int, layers: int, seed: int) -> dict[str, Path]:
    heads, kv_heads = 4, 2
    inter, vocab = hidden * 5 // 2, hidden * 3
    shapes = llama_shapes(hidden, inter, vocab, layers, kv_heads * hidden // heads)
    rng = np.random.default_rng(seed)
    base = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in shapes.items()}
    dirs = {}
    for i, name in enumerate(["base", "m1", "m2", "m3"]):
        arrays = base if i == 0 else {n: (a + rng.normal(0, 0.01, a.shape)).astype(np.float32)
                                      for n, a in base.items()}
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        save_safetensors(d / "model.safetensors", arrays, {"format": "pt"})
        (d / "config.json").write_text(json.dumps(llama_config(hidden, inter, vocab, layers, heads, kv_heads,
                                                               "float32")))
        dirs[name] = d
    return dirs


def yaml_config(method: str, dirs: dict[str, Path]) -> str:
    has_base, models, params, per_model = CASES[method]
    lines = ["models:"]
    for m, p in zip(models, per_model):
        lines.append(f"  - model: {dirs[m]}")
        if p:
            lines.append("    parameters: " + json.dumps(p))
    if has_base:
        lines.append(f"  - model: {dirs['base']}")
        lines.append(f"base_model: {dirs['base']}")
    lines.append(f"merge_method: {method}")
    if params:
        lines.append("parameters: " + json.dumps(params))
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def lattice_merge(method: str, dirs: dict[str, Path]) -> dict[str, np.ndarray]:
    has_base, models, params, per_model = CASES[method]
    readers = {name: open_model_path(d / "model.safetensors") for name, d in dirs.items()}
    spec = MergeSpec(method, tuple(models), "base" if has_base else None, params, tuple(per_model), "F32")
    pieces: dict[str, bytes] = {}

    def emit(piece: bytes) -> str:
        pid = hashlib.sha256(piece).hexdigest()
        pieces[pid] = piece
        return pid

    result = merge_share(spec, readers, merge_plan(spec, readers), emit)
    from lattice.learn.modelfile import Manifest
    reader = PiecesReader(Manifest(result, {}), lambda k, o, n: pieces[k][o:o + n])
    return {n: to_float(reader.source(n).read(0, i.count), i.dtype).reshape(i.shape)
            for n, i in reader.infos().items()}


def mergekit_merge(method: str, dirs: dict[str, Path], work: Path) -> dict[str, np.ndarray]:
    cfg = work / f"{method}.yml"
    cfg.write_text(yaml_config(method, dirs))
    out = work / f"out-{method}"
    r = subprocess.run([str(MERGEKIT), str(cfg), str(out), "--no-copy-tokenizer", "--no-write-model-card",
                        "--quiet", "--random-seed", "0"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-1500:])
    reader = open_model_path(out)
    return {n: to_float(reader.source(n).read(0, i.count), i.dtype).reshape(i.shape)
            for n, i in reader.infos().items()}


def compare(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> tuple[float, float]:
    if set(ours) != set(theirs):
        raise RuntimeError(f"tensor sets differ: {sorted(set(ours) ^ set(theirs))[:5]}")
    worst = rel = 0.0
    for n in ours:
        d = float(np.max(np.abs(ours[n].astype(np.float64) - theirs[n]))) if ours[n].size else 0.0
        scale = float(np.max(np.abs(theirs[n]))) if theirs[n].size else 1.0
        worst = max(worst, d)
        rel = max(rel, d / scale if scale else d)
    return worst, rel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(CASES))
    ap.add_argument("--golden", type=Path, help="write CI fixtures (inputs, mergekit's outputs) here")
    args = ap.parse_args()
    methods = args.methods.split(",")
    have_mk = MERGEKIT.exists()
    if args.golden and not have_mk:
        print("--golden needs mergekit: run bench/anchors/setup.sh", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="merge-vs-mergekit-") as tmp:
        work = Path(tmp)
        dirs = write_inputs(work / "in", args.hidden, args.layers, args.seed)
        print(f"inputs: Llama-like float32, hidden {args.hidden}, {args.layers} layers; "
              f"mergekit {'0.1.5 at ' + str(MERGEKIT.parent.parent) if have_mk else 'not installed'}")
        print(f"{'method':<16} {'max |diff|':>12} {'max rel diff':>13} {'lattice s':>10} {'mergekit s':>11}")
        golden: dict[str, dict[str, np.ndarray]] = {}
        for method in methods:
            t0 = time.perf_counter()
            ours = lattice_merge(method, dirs)
            t_ours = time.perf_counter() - t0
            if not have_mk:
                print(f"{method:<16} {'-':>12} {'-':>13} {t_ours:>10.2f} {'not installed':>11}")
                continue
            try:
                t0 = time.perf_counter()
                theirs = mergekit_merge(method, dirs, work)
                t_mk = time.perf_counter() - t0
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"{method:<16} error: {str(e).strip().splitlines()[-1][:100]}")
                continue
            worst, rel = compare(ours, theirs)
            print(f"{method:<16} {worst:>12.3g} {rel:>13.3g} {t_ours:>10.2f} {t_mk:>11.2f}")
            golden[method] = theirs
        if args.golden:
            write_golden(args.golden, dirs, golden)
    return 0


def write_golden(root: Path, dirs: dict[str, Path], outputs: dict[str, dict[str, np.ndarray]]) -> None:
    """Inputs as .safetensors, mergekit's outputs as .safetensors, and cases.json."""
    root.mkdir(parents=True, exist_ok=True)
    for name, d in dirs.items():
        shutil.copy(d / "model.safetensors", root / f"input-{name}.safetensors")
    for method, arrays in outputs.items():
        save_safetensors(root / f"mergekit-{method}.safetensors", {n: a.astype(np.float32) for n, a in arrays.items()})
    cases = {m: {"base": CASES[m][0], "models": CASES[m][1], "parameters": CASES[m][2],
                 "model_parameters": CASES[m][3]} for m in outputs}
    (root / "cases.json").write_text(json.dumps(cases, indent=1, sort_keys=True) + "\n")
    print(f"golden fixtures written to {root}")


if __name__ == "__main__":
    sys.exit(main())
