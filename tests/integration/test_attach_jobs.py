"""Attach jobs across real daemons, driven as users would: each user's loop is its own
process attached to its own daemon through lattice.attach; the job is watched from the
CLI; a loop whose process dies makes its daemon leave while the others finish; a loop
with another model is refused naming the tensor."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lattice
from lattice.api.paths import child_env
from lattice.client.localnet import LocalNet
from lattice.demo import download_model
from lattice.learn.merge import loads_safetensors
from lattice.testing.daemons import run_cli, wait_for

pytestmark = pytest.mark.integration
LOOP = Path(__file__).with_name("attach_loop.py")


def wait_members(client, n):
    wait_for(lambda: sum(1 for m in client.members().values() if m.get("alive")) >= n, 60,
             f"{n} live members", interval=0.1)


def start_loop(node, job_id, out, *args):
    return subprocess.Popen([sys.executable, str(LOOP), str(node.socket), job_id, str(out),
                             *args], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_three_loops_train_together_and_the_cli_watches_them(tmp_path):
    with LocalNet(3, tmp_path / "net", log_level="warning") as net:
        net.start()
        with lattice.connect(net.nodes[0].socket) as c:
            wait_members(c, 3)
            job_id = c.submit_job({"kind": "attach", "name": "line", "min_peers": 3,
                                   "sync_every": 5, "merge_timeout": 60})["job_id"]
        loops = [start_loop(n, job_id, tmp_path / f"loop{i}.npz", "--seed", str(i))
                 for i, n in enumerate(net.nodes)]
        watch = run_cli("jobs", "watch", job_id, socket=net.nodes[1].socket, timeout=300)
        outs = [p.communicate(timeout=300) for p in loops]
        assert [p.returncode for p in loops] == [0, 0, 0], outs
        assert watch.returncode == 0 and "done" in watch.stdout, watch.stdout + watch.stderr
        results = [np.load(tmp_path / f"loop{i}.npz") for i in range(3)]
        # all started from the same weights (the reference member's), and end on one model
        for r in results[1:]:
            np.testing.assert_array_equal(r["start_w"], results[0]["start_w"])
        model_id = str(results[0]["model_id"])
        assert all(str(r["model_id"]) == model_id for r in results)
        with lattice.connect(net.nodes[2].socket) as c:
            job = c.job(job_id)
            assert job["status"] == "done" and job["model"] == model_id
            assert job["task"] == "line"  # jobs list / watch show the attach job's name
            record = c.models()[model_id]
            assert record["kind"] == "attach" and record["missing"] == []
            assert record["metrics"]["samples"] == 3 * 60 * 32
            arrays, _meta = loads_safetensors(download_model(c, model_id))
        expected_w = np.mean([r["final_w"] for r in results], axis=0)
        np.testing.assert_allclose(arrays["w"], expected_w, rtol=1e-5)
        # averaging pulled the loops together: the merged line is close to the truth
        assert np.abs(arrays["w"] - np.arange(1.0, 7.0)).max() < 0.5
        listed = json.loads(run_cli("jobs", "list", "--json", socket=net.nodes[0].socket).stdout)
        assert listed[0]["kind"] == "attach"


def test_a_dead_loop_makes_its_daemon_leave_and_a_mismatch_is_refused(tmp_path):
    with LocalNet(4, tmp_path / "net", log_level="warning") as net:
        net.start()
        with lattice.connect(net.nodes[0].socket) as c:
            wait_members(c, 4)
            job_id = c.submit_job({"kind": "attach", "min_peers": 4, "sync_every": 4,
                                   "merge_timeout": 20})["job_id"]
        peer = {n.index: n.peer_id for n in net.nodes}
        # the lowest peer id is the reference (rank 0): it must be a healthy loop
        order = sorted(range(4), key=lambda i: peer[i])
        dying, wide = order[2], order[3]
        loops = {}
        for i, node in enumerate(net.nodes):
            extra = ["--seed", str(i), "--steps", "200"]
            if i == dying:
                extra += ["--die-after", "30"]
            if i == wide:
                extra += ["--wide"]
            loops[i] = start_loop(node, job_id, tmp_path / f"loop{i}.npz", *extra)
        outs = {i: p.communicate(timeout=300) for i, p in loops.items()}
        assert loops[dying].returncode == -9
        assert loops[wide].returncode == 3
        assert ("tensor 'w' is float32[7] here but float32[6] in the job's model"
                in outs[wide][1]), outs[wide]
        for i in set(range(4)) - {dying, wide}:
            assert loops[i].returncode == 0, outs[i]
        with lattice.connect(net.nodes[order[0]].socket) as c:
            job = c.job(job_id)
            assert job["status"] == "done"
            entries = job["participants"]
            assert entries[peer[dying]]["state"] == "left"
            assert "went away" in entries[peer[dying]]["reason"]
            assert entries[peer[wide]]["state"] == "failed"
            model = c.models()[job["model"]]
            assert sorted(model["missing"]) == sorted([peer[dying], peer[wide]])


def test_a_restarted_daemon_raises_daemon_lost_and_the_loop_reattaches(tmp_path):
    from lattice.attach import DaemonLost, attach
    from lattice.testing.daemons import DaemonProc

    first = DaemonProc(tmp_path / "a").start()
    first.wait_running()
    second = DaemonProc(tmp_path / "b", "--bootstrap", first.addr()).start()
    second.wait_running()
    try:
        with first.client() as c:
            wait_members(c, 2)
            job_id = c.submit_job({"kind": "attach", "min_peers": 2, "sync_every": 2,
                                   "merge_timeout": 60})["job_id"]
        steady = start_loop(first, job_id, tmp_path / "steady.npz", "--steps", "400")
        client = second.client()
        loop = attach(client, job_id, {"w": np.zeros(6, np.float32),
                                       "b": np.zeros(1, np.float32)}, timeout=120)
        for _ in range(6):
            loop.arrays["w"] += np.float32(0.1)
            loop.step(samples=8)
        second.stop()  # SIGTERM: the daemon restarts below with the same state dir
        trained = loop.arrays["w"].copy()
        with pytest.raises(DaemonLost):
            for _ in range(2):
                loop.step(samples=8)
        second.start()
        second.wait_running()
        loop.reattach(timeout=120)
        assert loop.info["resumed"] and not loop.info["loaded"]
        np.testing.assert_array_equal(loop.arrays["w"], trained)  # kept what it trained
        for _ in range(10):
            loop.step(samples=8)
        result = loop.finish(timeout=180)
        steady.communicate(timeout=300)
        assert steady.returncode == 0
        with first.client() as c:
            job = c.job(job_id)
            assert job["status"] == "done" and job["model"] == result.model_id
            assert job["participants"][second.peer_id()]["resumed"] == 1
    finally:
        second.stop()
        first.stop()


def test_a_private_attach_job_takes_loops_whose_daemon_joined_with_the_token(tmp_path):
    with LocalNet(2, tmp_path / "net", log_level="warning") as net:
        net.start()
        submitter, friend = net.nodes
        with lattice.connect(submitter.socket) as c:
            wait_members(c, 2)
            r = c.submit_job({"kind": "attach", "min_peers": 2, "sync_every": 5,
                              "merge_timeout": 60}, private=True)
        job_id, token = r["job_id"], r["token"]
        early = start_loop(friend, job_id, tmp_path / "early.npz")
        _, err = early.communicate(timeout=120)
        assert early.returncode == 3 and "private" in err, err  # no token: refused
        joined = run_cli("jobs", "join", job_id, "--token", token, socket=friend.socket)
        assert joined.returncode == 0 and "joined" in joined.stdout, joined.stderr
        loops = [start_loop(n, job_id, tmp_path / f"loop{i}.npz", "--seed", str(i))
                 for i, n in enumerate(net.nodes)]  # the submitter needs no token
        outs = [p.communicate(timeout=300) for p in loops]
        assert [p.returncode for p in loops] == [0, 0], outs
        with lattice.connect(friend.socket) as c:
            job = c.job(job_id)
            assert job["status"] == "done"
            assert sorted(job["roster"]) == sorted(n.peer_id for n in net.nodes)
