"""Train jobs across real daemons, driven as a researcher would: submit from the CLI,
watch to the end, fetch the merged model by id; and the job survives a killed peer."""

import hashlib
import json
import signal

import numpy as np
import pytest

import lattice
from lattice.client.localnet import LocalNet
from lattice.testing.daemons import run_cli, wait_for

pytestmark = pytest.mark.integration


def wait_members(client, n):
    wait_for(lambda: sum(1 for m in client.members().values() if m.get("alive")) >= n, 60,
             f"{n} live members", interval=0.1)


def test_submit_watch_and_fetch_the_merged_model_from_the_cli(tmp_path):
    with LocalNet(3, tmp_path / "net", log_level="warning") as net:
        net.start()
        s0, s2 = net.nodes[0].socket, net.nodes[2].socket
        with lattice.connect(s0) as c:
            wait_members(c, 3)
        r = run_cli("jobs", "submit", "train", "--task", "digits-softmax", "--min-peers", "3",
                    "--steps", "80", "--sync-every", "4", "--seed", "1", socket=s0)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()
        watch = run_cli("jobs", "watch", job_id, socket=s2, timeout=300)
        assert watch.returncode == 0, watch.stderr
        assert "done" in watch.stdout and "steps 240/240" in watch.stdout

        job = json.loads(run_cli("jobs", "get", job_id, "--json", socket=s0).stdout)
        assert job["status"] == "done" and len(job["roster"]) == 3
        model_id = job["model"]
        listed = json.loads(run_cli("jobs", "list", "--json", socket=s2).stdout)
        assert [j["id"] for j in listed] == [job_id]
        models = json.loads(run_cli("models", "list", "--json", socket=s2).stdout)
        assert models[model_id]["job"] == job_id
        assert models[model_id]["metrics"]["accuracy"] > 0.85

        out = tmp_path / "m.safetensors"
        r = run_cli("models", "get", model_id, "-o", str(out), socket=s2)
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(out.read_bytes()).hexdigest() == model_id  # content address
        npz = tmp_path / "m.npz"
        assert run_cli("models", "get", model_id, "-o", str(npz), socket=s0).returncode == 0
        with np.load(npz, allow_pickle=False) as z:
            assert all(np.isfinite(z[k]).all() for k in z.files if z[k].dtype.kind == "f")


def test_a_killed_participant_does_not_stall_the_job(tmp_path):
    with LocalNet(4, tmp_path / "net", log_level="warning") as net:
        net.start()
        c = lattice.connect(net.nodes[0].socket, timeout=60)
        wait_members(c, 4)
        job_id = c.submit_job({"task": "digits-mlp", "min_peers": 4, "steps": 400,
                               "sync_every": 2, "merge_timeout": 15})["job_id"]
        job = wait_for(lambda: (j := c.job(job_id))["steps"] >= 200 and j, 120,
                       "the job to get going", interval=0.1)
        victim_id = next(p for p in job["roster"] if p != net.nodes[0].peer_id)
        victim = next(n for n in net.nodes if n.peer_id == victim_id)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        final = wait_for(lambda: (j := c.job(job_id))["status"] in ("done", "failed") and j,
                         180, "the job to finish without the killed peer", interval=0.2)
        assert final["status"] == "done"
        model = c.models()[final["model"]]
        assert model["missing"] == [victim_id] and model["metrics"]["missing"] == 1
        assert model["metrics"]["participants"] == 3
        assert model["metrics"]["accuracy"] > 0.85
        c.close()


def test_bad_specs_are_refused_naming_the_field(daemons):
    d = daemons()
    d.wait_running()
    with d.client() as c:
        for spec, field in [({"task": "digits-mlp", "steps": -1}, "steps"),
                            ({"task": "digits-mlp", "stpes": 5}, "stpes"),
                            ({"min_peers": 2}, "task")]:
            with pytest.raises(lattice.LatticeError) as e:
                c.submit_job(spec)
            assert type(e.value).__name__ == "InvalidArgumentError"
            assert e.value.data == {"field": field}
        with pytest.raises(lattice.LatticeError) as e:
            c.job("0" * 32)
        assert type(e.value).__name__ == "NotFoundError"


def test_the_submitter_cancels_a_job(daemons):
    d = daemons()
    d.wait_running()
    with d.client() as c:
        job_id = c.submit_job({"task": "digits-softmax", "min_peers": 3})["job_id"]
        assert c.cancel_job(job_id) == {"cancelled": True}
        assert c.job(job_id)["status"] == "cancelled"
        assert c.cancel_job(job_id) == {"cancelled": False}
