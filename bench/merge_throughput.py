"""Merging large BF16 models: time and peak memory, Lattice next to mergekit (issue 14).

Writes three synthetic Llama-like BF16 models of about --gib GiB each (a base and two
fine-tunes; Hugging Face layout with config.json), imports them into a Lattice model
store (a blob store on disk: content-addressed 16 MiB pieces), then in the same run:

  lattice    the streaming engine merges with `ties` from the store's pieces, writing
             output pieces to the store (a child process: its peak RSS is its own)
  mergekit   `mergekit-yaml` (bench/.venv-mergekit, mergekit 0.1.5) on the same files,
             dtype float32 for the math and out_dtype bfloat16, as Lattice computes

Peak RSS is each child's high-water mark (wait4's ru_maxrss). The bound checked is
issue 14's: peak RSS <= 2 x the largest tensor + 300 MiB. Run it niced: the machine is
shared and the load average is printed with the table.

    nice -n 19 .venv/bin/python bench/merge_throughput.py [--gib 1.0] [--density 0.5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
MERGEKIT = HERE / ".venv-mergekit" / "bin" / "mergekit-yaml"
MIB = 1 << 20


def llama_shapes(hidden: int, inter: int, vocab: int, layers: int, kv: int) -> dict[str, tuple[int, ...]]:
    from bench.merge_vs_mergekit import llama_shapes as shapes
    return shapes(hidden, inter, vocab, layers, kv)


def plan(gib: float, layers: int | None = None) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """TinyLlama-like widths (hidden 2048, intermediate 5632, vocab 32000, GQA 4:1); the
    layer count is chosen for about ``gib`` GiB of BF16 (at least one layer), unless
    given (quick runs: few tensors)."""
    hidden, inter, vocab, heads, kv_heads = 2048, 5632, 32000, 32, 8
    if gib < 0.5:  # quick runs (the smoke test): everything smaller
        scale = max(gib / 0.5, 1 / 64)
        hidden, inter, vocab = int(2048 * scale) // 64 * 64 or 64, int(5632 * scale) // 64 * 64 or 64, \
            int(32000 * scale) // 64 * 64 or 64
    kv = kv_heads * hidden // heads
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = layers or max(1, round((gib * (1 << 30) / 2 - fixed) / per_layer))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    return config, llama_shapes(hidden, inter, vocab, layers, kv)


def write_models(root: Path, config: dict, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Path]:
    """Three BF16 models written tensor by tensor (never a whole model in memory)."""
    import numpy as np

    from lattice.learn.modelfile import TensorInfo, canonical_header, f32_to_bf16

    infos = [TensorInfo(n, "BF16", s) for n, s in shapes.items()]
    dirs = {}
    for i, name in enumerate(["base", "ft1", "ft2"]):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "model.safetensors", "wb") as f:
            f.write(canonical_header(infos, {"format": "pt"}))
            for info in sorted(infos, key=lambda x: x.name):
                rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(info.name.encode()).digest()[:4],
                                                                  "little")])
                base = rng.standard_normal(info.shape, np.float32) * np.float32(0.02)
                if i:
                    noise = np.random.default_rng([seed, i, len(info.name), info.count]).standard_normal(
                        info.shape, np.float32)
                    base += noise * np.float32(0.002)
                f.write(f32_to_bf16(base).tobytes())
                del base
        (d / "config.json").write_text(json.dumps(config))
        dirs[name] = d
    return dirs


def child_merge(store_dir: str, ids_json: str, density: float) -> None:
    """In a child process: TIES over the store's pieces; prints seconds and the tensor count."""
    from lattice.learn.mergeengine import PiecesReader, merge_plan, merge_share, merged_manifest
    from lattice.learn.mergespec import MergeSpec
    from lattice.learn.modelfile import dumps_manifest, loads_manifest
    from lattice.net.blob import BlobStore

    store = BlobStore(store_dir, max_bytes=1 << 40)
    ids = json.loads(ids_json)
    readers = {mid: PiecesReader(loads_manifest(store.get(mid)), store.read) for mid in ids.values()}
    spec = MergeSpec.from_arguments("ties", [ids["ft1"], ids["ft2"]], base=ids["base"], weights=[1.0, 1.0],
                                    density=density)
    t0 = time.perf_counter()
    names = merge_plan(spec, readers)
    result = merge_share(spec, readers, names, store.put)
    mid = store.put(dumps_manifest(merged_manifest(spec, result)))
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"seconds": time.perf_counter() - t0, "tensors": len(names), "model": mid,
                      "vmhwm": hwm * 1024}))


def child_prepare(work: str, gib: float, seed: int, layers: int | None = None) -> None:
    """In a child process: write the inputs and import them (so the measuring parent stays
    small: Linux counts the parent's resident size at exec into a child's ru_maxrss)."""
    from lattice.learn.mergeengine import import_model, open_model_path
    from lattice.learn.modelfile import dumps_manifest
    from lattice.net.blob import BlobStore

    config, shapes = plan(gib, layers)
    t0 = time.perf_counter()
    dirs = write_models(Path(work) / "in", config, shapes, seed)
    written = time.perf_counter() - t0
    store = BlobStore(Path(work) / "store", max_bytes=1 << 40)
    t0 = time.perf_counter()
    ids = {name: store.put(dumps_manifest(import_model(open_model_path(d), store.put))) for name, d in dirs.items()}
    print(json.dumps({"ids": ids, "dirs": {k: str(v) for k, v in dirs.items()}, "written": written,
                      "imported": time.perf_counter() - t0}))


def run_measured(cmd: list[str]) -> tuple[float, int, str, int]:
    """(wall seconds, peak RSS bytes, output, returncode) of a child process (wait4's
    ru_maxrss: the child's high-water mark, or this process's resident size when it
    started it, whichever is larger, so this process stays small)."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return wall, usage.ru_maxrss * 1024, out.read(), proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="size of each model (default 1)")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="transformer layers (default: as many as --gib holds)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("STORE", "IDS", "DENSITY"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare", metavar="WORK", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help="work directory (default: a new temp dir, removed at the end)")
    args = ap.parse_args()
    if args.child:
        child_merge(args.child[0], args.child[1], float(args.child[2]))
        return 0
    if args.prepare:
        child_prepare(args.prepare, args.gib, args.seed, args.layers)
        return 0

    config, shapes = plan(args.gib, args.layers)
    largest = max(2 * _count(s) for s in shapes.values())
    total = sum(2 * _count(s) for s in shapes.values())
    with tempfile.TemporaryDirectory(prefix="merge-throughput-", dir=args.tmp) as tmp:
        work = Path(tmp)
        _, _, out, rc = run_measured([sys.executable, __file__, "--prepare", str(work), "--gib", str(args.gib),
                                      "--seed", str(args.seed), *(["--layers", str(args.layers)] if args.layers else [])])
        if rc:
            print(out)
            return 1
        prep = json.loads(out.strip().splitlines()[-1])
        ids, dirs = prep["ids"], {k: Path(v) for k, v in prep["dirs"].items()}
        print(f"inputs: 3 Llama-like BF16 models of {total / (1 << 30):.2f} GiB ({config['num_hidden_layers']} "
              f"layers, hidden {config['hidden_size']}, {len(shapes)} tensors; largest tensor "
              f"{largest / MIB:.0f} MiB), written in {prep['written']:.0f} s", flush=True)
        print(f"lattice import into the model store: {prep['imported']:.1f} s for 3 models "
              f"({3 * total / MIB / prep['imported']:.0f} MiB/s)", flush=True)
        bound = 2 * largest + 300 * MIB
        rows = []
        wall, peak, out, rc = run_measured([sys.executable, __file__, "--child", str(work / "store"),
                                            json.dumps(ids), str(args.density)])
        if rc:
            print(out)
            return 1
        result = json.loads(out.strip().splitlines()[-1])
        rows.append(("lattice", wall, result["seconds"], max(peak, result["vmhwm"])))
        if not args.no_mergekit and MERGEKIT.exists():
            cfg = work / "ties.yml"
            cfg.write_text(f"models:\n  - model: {dirs['base']}\n  - model: {dirs['ft1']}\n"
                           f"    parameters: {{weight: 1.0, density: {args.density}}}\n"
                           f"  - model: {dirs['ft2']}\n    parameters: {{weight: 1.0, density: {args.density}}}\n"
                           f"merge_method: ties\nbase_model: {dirs['base']}\ndtype: float32\nout_dtype: bfloat16\n")
            wall, peak, out, rc = run_measured([str(MERGEKIT), str(cfg), str(work / "out-mergekit"),
                                                "--no-copy-tokenizer", "--no-write-model-card", "--quiet"])
            rows.append(("mergekit", wall, None, peak) if rc == 0 else ("mergekit", None, None, out))
        elif not args.no_mergekit:
            rows.append(("mergekit", None, None, "not installed: run bench/anchors/setup.sh"))
        print(f"\nties, density {args.density}, 3 x {total / (1 << 30):.2f} GiB BF16; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'row':<10} {'wall s':>8} {'merge s':>8} {'peak RSS MiB':>13} {'bound MiB':>10}")
        for name, wall, merge_s, peak in rows:
            if wall is None:
                print(f"{name:<10} error: {str(peak).strip().splitlines()[-1][:120] if peak else '?'}")
                continue
            print(f"{name:<10} {wall:>8.1f} {merge_s if merge_s is not None else wall:>8.1f} "
                  f"{peak / MIB:>13.0f} {bound / MIB:>10.0f}")
        ours = rows[0]
        print(f"lattice peak RSS {'within' if ours[3] <= bound else 'ABOVE'} 2 x largest tensor + 300 MiB")
    return 0


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())
