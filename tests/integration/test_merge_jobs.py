"""Merge jobs across real daemons, driven from the CLI as a user would: import
checkpoints on one daemon, submit a merge job, watch it, and verify the merged model
from another daemon; it is the very model one daemon makes of the same merge."""

import json

import numpy as np
import pytest

import lattice
from lattice.client.localnet import LocalNet
from lattice.learn.modelfile import canonical_model_bytes, f32_to_bf16
from lattice.testing.daemons import run_cli, wait_for

pytestmark = pytest.mark.integration

RNG = np.random.default_rng(5)
LAYERS = 4


def _checkpoints(tmp_path, *, drop=None):
    """A base and two fine-tunes (BF16 matrices, F32 norms, an int tensor), on disk."""
    base = {"model.embed_tokens.weight": RNG.normal(0, 1, (128, 64)).astype(np.float32),
            "model.norm.weight": np.ones(64, np.float32)}
    for i in range(LAYERS):
        base[f"model.layers.{i}.mlp.up_proj.weight"] = RNG.normal(0, 1, (96, 64)).astype(np.float32)
        base[f"model.layers.{i}.input_layernorm.weight"] = RNG.normal(1, 0.1, 64).astype(np.float32)
    paths = {}
    for name in ("base", "ft1", "ft2"):
        arrays = {n: v + (np.float32(0) if name == "base" else
                          np.float32(0.05) * RNG.normal(0, 1, v.shape).astype(np.float32))
                  for n, v in base.items()}
        stored = {n: (f32_to_bf16(v) if v.ndim == 2 else v) for n, v in arrays.items()}
        stored["position_ids"] = np.arange(16, dtype=np.int64)
        if name == "ft2" and drop:
            del stored[drop]
        paths[name] = tmp_path / f"{name}.safetensors"
        paths[name].write_bytes(canonical_model_bytes(stored, {"format": "pt"}))
    return paths


def _cli_json(socket, *args, timeout=120):
    r = run_cli(*args, "--json", socket=socket, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_three_daemons_merge_imported_models_and_another_verifies_the_result(tmp_path):
    paths = _checkpoints(tmp_path)
    with LocalNet(3, tmp_path / "net", log_level="warning") as net:
        net.start()
        s0, s1, s2 = (n.socket for n in net.nodes)
        with lattice.connect(s0) as c:
            wait_for(lambda: sum(1 for m in c.members().values() if m.get("alive")) >= 3, 60,
                     "3 live members", interval=0.1)
        ids = {name: _cli_json(s0, "models", "import", str(path), "--name", name)["id"]
               for name, path in paths.items()}
        r = run_cli("jobs", "submit", "merge", "--method", "ties", "--base", "base", "--models", "ft1",
                    "ft2", "--density", "0.5", "--weights", "1", "0.7", "--dtype", "bfloat16", "--name",
                    "soup", "--min-peers", "3", "--join-window", "2", socket=s0)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()
        tensors = 2 + 2 * LAYERS + 1
        watch = run_cli("jobs", "watch", job_id, socket=s2, timeout=300)
        assert watch.returncode == 0, watch.stdout + watch.stderr
        assert "done" in watch.stdout and f"tensors {tensors}/{tensors}" in watch.stdout

        job = _cli_json(s1, "jobs", "get", job_id)
        assert job["status"] == "done" and job["kind"] == "merge" and len(job["roster"]) == 3
        model_id = job["model"]
        record = job["models"][model_id]
        assert record["method"] == "ties" and record["inputs"] == [ids["ft1"], ids["ft2"]]
        assert record["base"] == ids["base"] and record["name"] == "soup"
        assert sum(record["shares"].values()) == tensors and len(record["shares"]) == 3
        # every participant fetched input pieces of its own tensors, none fetched them all
        fetched = [e["bytes_received"] for p, e in job["participants"].items() if p != net.nodes[0].peer_id]
        total = sum(path.stat().st_size for path in paths.values())
        assert all(0 < f < total for f in fetched), fetched

        # a daemon that did not import anything recomputes every byte by the name
        verdict = run_cli("models", "verify", "soup", socket=s2, timeout=120)
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr
        assert f"every byte of {tensors} tensors matches" in verdict.stdout
        # and one daemon alone makes the very same model of the same merge
        alone = _cli_json(s1, "models", "merge", "--method", "ties", "--base", ids["base"], "--models",
                          ids["ft1"], ids["ft2"], "--density", "0.5", "--weights", "1", "0.7",
                          "--dtype", "bfloat16")
        assert alone["id"] == model_id


def test_a_merge_that_cannot_be_done_is_refused_naming_the_tensor(tmp_path):
    paths = _checkpoints(tmp_path, drop="model.layers.2.mlp.up_proj.weight")
    with LocalNet(1, tmp_path / "net", log_level="warning") as net:
        net.start()
        s0 = net.nodes[0].socket
        for name, path in paths.items():
            _cli_json(s0, "models", "import", str(path), "--name", name)
        r = run_cli("jobs", "submit", "merge", "--method", "task_arithmetic", "--base", "base",
                    "--models", "ft1", "ft2", socket=s0)
        assert r.returncode == 1
        assert "'model.layers.2.mlp.up_proj.weight': missing from input" in r.stderr
        r = run_cli("jobs", "submit", "merge", "--method", "linear", "--models", "ft1", "nope", socket=s0)
        assert r.returncode == 1 and "no model named 'nope'" in r.stderr
        assert _cli_json(s0, "jobs", "list") == []
        assert net.nodes[0].process.poll() is None


def test_a_participant_killed_mid_merge_has_its_share_merged_by_the_others(tmp_path):
    paths = _checkpoints(tmp_path)
    config = tmp_path / "latticed.toml"
    config.write_text("[jobs]\nmerge_straggler_min_s = 3.0\n")  # judge who is behind soon
    with LocalNet(4, tmp_path / "net", extra_args=["--config", str(config)],
                  log_level="warning") as net:
        net.start()
        s0, s1, s2, s3 = (n.socket for n in net.nodes)
        victim = net.nodes[3]
        with lattice.connect(s0) as c:
            wait_for(lambda: sum(1 for m in c.members().values() if m.get("alive")) >= 4, 60,
                     "4 live members", interval=0.1)
        ids = {name: _cli_json(s0, "models", "import", str(path), "--name", name)["id"]
               for name, path in paths.items()}
        # the victim's volunteer pauses its compute: it joins and is given its share but
        # merges none of it, so when it dies every one of its tensors is still to be done
        assert run_cli("pause", "--reason", "test", socket=s3).returncode == 0
        r = run_cli("jobs", "submit", "merge", "--method", "ties", "--base", "base", "--models", "ft1",
                    "ft2", "--density", "0.5", "--dtype", "bfloat16", "--min-peers", "4",
                    "--max-peers", "4", socket=s0)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()
        def merging_without_the_victim(c):
            job = c.job(job_id)
            return victim.peer_id in (job["roster"] or []) and any(
                (e.get("steps") or 0) > 0 for e in job["participants"].values())

        with lattice.connect(s0) as c:  # it dies mid-merge: the others are at work
            wait_for(lambda: merging_without_the_victim(c), 120, "the others merging", interval=0.1)
        victim.process.kill()
        victim.process.wait()

        tensors = 2 + 2 * LAYERS + 1
        watch = run_cli("jobs", "watch", job_id, socket=s1, timeout=300)
        assert watch.returncode == 0, watch.stdout + watch.stderr
        job = _cli_json(s1, "jobs", "get", job_id)
        assert job["status"] == "done" and victim.peer_id in job["roster"]
        record = job["models"][job["model"]]
        # the three others merged every tensor between them, the victim's included
        assert victim.peer_id not in record["shares"] and victim.peer_id in record["missing"]
        assert sum(record["shares"].values()) == tensors
        helped = [e.get("helped", 0) for p, e in job["participants"].items() if p != victim.peer_id]
        assert sum(helped) > 0, job["participants"]
        # and the model is byte for byte the one a single daemon makes of the same merge
        alone = _cli_json(s2, "models", "merge", "--method", "ties", "--base", ids["base"], "--models",
                          ids["ft1"], ids["ft2"], "--density", "0.5", "--dtype", "bfloat16")
        assert alone["id"] == job["model"]
        verdict = run_cli("models", "verify", job["model"], socket=s1, timeout=120)
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr


def test_a_merge_job_limited_to_listed_peers_takes_only_them(tmp_path):
    paths = _checkpoints(tmp_path)
    with LocalNet(3, tmp_path / "net", log_level="warning") as net:
        net.start()
        s0 = net.nodes[0].socket
        me, listed, unlisted = (n.peer_id for n in net.nodes)
        with lattice.connect(s0) as c:
            wait_for(lambda: sum(1 for m in c.members().values() if m.get("alive")) >= 3, 60,
                     "3 live members", interval=0.1)
        for name, path in paths.items():
            _cli_json(s0, "models", "import", str(path), "--name", name)
        job_id = _cli_json(s0, "jobs", "submit", "merge", "--method", "linear", "--models",
                           "ft1", "ft2", "--min-peers", "2", "--join-window", "2",
                           "--allow", me, "--allow", listed)["job_id"]
        watch = run_cli("jobs", "watch", job_id, socket=s0, timeout=300)
        assert watch.returncode == 0, watch.stdout + watch.stderr
        job = _cli_json(s0, "jobs", "get", job_id)
        assert job["status"] == "done" and sorted(job["roster"]) == sorted([me, listed])
        assert unlisted not in job["roster"] and unlisted not in job["participants"]

        private = run_cli("jobs", "submit", "merge", "--method", "linear", "--models", "ft1",
                          "ft2", "--private", socket=s0)
        assert private.returncode == 0, private.stderr
        job_line, token_line = private.stdout.split()
        assert len(job_line) == 32 and len(token_line) == 32  # the token to hand out
