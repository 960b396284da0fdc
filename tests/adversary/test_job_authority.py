"""Hostile peers against real daemons' jobs (issue 11): records mean what they say. A
job counts only under the author its id commits to, a model under a job only from that
job's merger, a job ends only on the claims of the roles allowed to end it, and only
live (or, for a private job, token-holding) volunteers are sealed into rosters."""

from __future__ import annotations

import functools
import time

import pytest
import trio

import lattice
from lattice.core.identity import Identity
from lattice.core.jobs import join_proof
from lattice.core.state import Set
from lattice.testing.daemons import run_cli
from lattice.testing.hostile.state import (
    Author,
    Fleet,
    hijack_record,
    job_records,
    open_attacker,
)

from .conftest import eventually

pytestmark = pytest.mark.integration

FAKE_MODEL = "00" * 32
SMALL = {"task": "digits-softmax", "steps": 20, "sync_every": 4, "merge_timeout": 5.0}


@pytest.fixture
def fleet(tmp_path):
    with Fleet(tmp_path) as f:
        yield f


async def start(fleet: Fleet, *extra: str, env: dict | None = None):
    return await trio.to_thread.run_sync(functools.partial(fleet.start, *extra, env=env))


async def rpc(d, method: str, **params):
    async with lattice.open_client(d.socket) as c:
        return await c.call(method, **params)



async def job_in(d, job_id: str, statuses: tuple[str, ...]) -> dict:
    async def reached():
        try:
            job = await rpc(d, "jobs.get", job_id=job_id)
        except lattice.LatticeError:  # not replicated here yet
            return None
        return job if job["status"] in statuses else None
    return await eventually(reached, f"job {job_id} to be {statuses}", timeout=120)


def sorting_before(peer_id: str) -> Author:
    """An attacker whose peer id sorts first: once, that won it every tie in the views."""
    while True:
        author = Author(Identity.generate())
        if author.peer_id < peer_id:
            return author


async def victim(fleet: Fleet):
    d = await start(fleet)
    status = await rpc(d, "status")
    return d, status["peer_id"], status["advertised_addrs"][0]


async def test_a_hijacked_job_record_is_ignored_and_the_submitter_keeps_its_job(fleet):
    v, v_id, addr = await victim(fleet)
    job_id = (await rpc(v, "jobs.submit", spec={**SMALL, "min_peers": 3}))["job_id"]
    record = (await rpc(v, "jobs.get", job_id=job_id))["record"]
    mallory = sorting_before(v_id)
    now = time.time()
    async with open_attacker(mallory.identity) as attacker:
        session = await attacker.open_session(await attacker.connect(addr))
        await session.send_envelopes([
            mallory.member(now),
            # the victim's job under the attacker's name: itself as submitter and roster,
            # and a done claim with a model record to back it
            mallory.write([Set(f"jobs/{job_id}", hijack_record(mallory, record,
                                                               roster=[mallory.peer_id]))]),
            mallory.write([Set(f"participation/{job_id}",
                               {"state": "done", "job_state": "done", "model": FAKE_MODEL}),
                           Set(f"models/{FAKE_MODEL}", {"producer": mallory.peer_id,
                                                        "job": job_id,
                                                        "metrics": {"accuracy": 1.0}})])])
        await session.sync_point()
    job = await rpc(v, "jobs.get", job_id=job_id)
    assert job["submitter"] == v_id and job["record"]["submitter"] == v_id
    assert job["status"] == "submitted" and job["roster"] == [] and job["model"] is None
    assert job["models"] == {} and FAKE_MODEL not in await rpc(v, "models.list")
    stats = (await rpc(v, "state.stats"))["store"]["views"]["ignored"]
    assert stats["job_record"] >= 1 and stats["model_record"] >= 1
    assert (await rpc(v, "jobs.cancel", job_id=job_id)) == {"cancelled": True}
    assert (await rpc(v, "jobs.get", job_id=job_id))["status"] == "cancelled"


async def test_forged_claims_and_model_records_cannot_end_a_job_its_merger_does(fleet):
    v, v_id, addr = await victim(fleet)
    job_id = (await rpc(v, "jobs.submit", spec={**SMALL, "min_peers": 1}))["job_id"]
    mallory = Author()
    imported = "11" * 32
    now = time.time()
    async with open_attacker(mallory.identity) as attacker:
        session = await attacker.open_session(await attacker.connect(addr))
        await session.send_envelopes([
            mallory.member(now),
            mallory.write([Set(f"participation/{job_id}", {"state": "done", "job_state": "done",
                                                            "model": FAKE_MODEL, "loss": 0.0,
                                                            "accuracy": 1.0}),
                           Set(f"models/{FAKE_MODEL}", {"producer": mallory.peer_id,
                                                        "job": job_id}),
                           Set(f"models/{imported}", {"producer": mallory.peer_id,
                                                      "format": "safetensors"})])])
        await session.sync_point()
        early = await rpc(v, "jobs.get", job_id=job_id)
        assert early["status"] != "done" and early["model"] is None
        done = await job_in(v, job_id, ("done", "failed"))
    assert done["status"] == "done" and done["model"] not in (None, FAKE_MODEL)
    models = await rpc(v, "models.list")
    assert models[done["model"]]["producers"] == [v_id]
    assert FAKE_MODEL not in models and list(done["models"]) == [done["model"]]
    # a model naming no job is shown as what it is: the importer's, under no job
    assert models[imported]["producers"] == [mallory.peer_id] and "job" not in models[imported]
    assert done["accuracy"] != 1.0  # the outsider's claimed accuracy is not averaged in


async def test_a_sybil_volunteer_is_sealed_only_when_live_and_cannot_fail_the_job(fleet):
    v, v_id, addr = await victim(fleet)
    job_id = (await rpc(v, "jobs.submit", spec={**SMALL, "min_peers": 2, "steps": 400}))["job_id"]
    ghost, sybil = Author(), Author()
    now = time.time()
    async with open_attacker(sybil.identity) as attacker:
        session = await attacker.open_session(await attacker.connect(addr))
        # first a joiner with no member record: not alive, never sealed
        await session.send_envelopes([ghost.write([Set(f"participation/{job_id}",
                                                       {"state": "joined"})])])
        await session.sync_point()
        await session.send_envelopes([sybil.member(now), sybil.write(
            [Set(f"participation/{job_id}", {"state": "joined"})])])
        running = await job_in(v, job_id, ("running", "merging", "done", "failed"))
        assert running["roster"] == sorted([v_id, sybil.peer_id])
        # sealed, the Sybil fails the job as loudly as it can
        await session.send_envelopes([sybil.write([Set(f"participation/{job_id}", {
            "state": "failed", "job_state": "failed", "reason": "sabotage"})])])
        await session.sync_point()
        assert (await rpc(v, "jobs.get", job_id=job_id))["status"] != "failed"
        done = await job_in(v, job_id, ("done", "failed"))
    assert done["status"] == "done"
    model = (await rpc(v, "models.list"))[done["model"]]
    assert model["missing"] == [sybil.peer_id] and model["producers"] == [v_id]


async def test_a_private_job_seals_only_the_peers_given_its_token(fleet):
    v, v_id, addr = await victim(fleet)
    friend = await start(fleet, "--bootstrap", addr)
    friend_id = (await rpc(friend, "status"))["peer_id"]
    r = await rpc(v, "jobs.submit", spec={**SMALL, "min_peers": 2}, private=True)
    job_id, token = r["job_id"], r["token"]
    sybil = Author()
    now = time.time()
    async with open_attacker(sybil.identity) as attacker:
        session = await attacker.open_session(await attacker.connect(addr))
        await session.send_envelopes([sybil.member(now), sybil.write([Set(
            f"participation/{job_id}",
            {"state": "joined", "proof": join_proof("a guess", job_id, sybil.peer_id)})])])
        await session.sync_point()

        async def replicated():
            try:
                return await rpc(friend, "jobs.get", job_id=job_id)
            except lattice.LatticeError:
                return None

        await eventually(replicated, "the friend to see the job")
        cli = await trio.to_thread.run_sync(functools.partial(
            run_cli, "jobs", "join", job_id, "--token", token, socket=friend.socket))
        assert cli.returncode == 0 and "joined" in cli.stdout, cli.stderr
        done = await job_in(v, job_id, ("done", "failed"))
    assert done["status"] == "done" and done["roster"] == sorted([v_id, friend_id])
    assert token not in repr(await rpc(friend, "state.get", path=""))


async def test_a_job_its_submitter_never_seals_does_not_hold_a_volunteers_slot(fleet):
    env = {"LATTICE_JOBS_JOIN_TIMEOUT_S": "3"}
    v = await start(fleet, env=env)
    v_id, addr = (s := await rpc(v, "status"))["peer_id"], s["advertised_addrs"][0]
    mallory = Author()
    async with open_attacker(mallory.identity) as attacker:
        session = await attacker.open_session(await attacker.connect(addr))
        [bait], raw = job_records(mallory, 1, time.time(), min_peers=64)
        await session.send_envelopes([mallory.member(time.time()), raw])
        await session.sync_point()

        def in_state(state):
            async def check():
                job = await rpc(v, "jobs.get", job_id=bait)
                return job["participants"].get(v_id, {}).get("state") == state and job
            return check

        await eventually(in_state("joined"), "the victim to volunteer")
        job = await eventually(in_state("left"), "the victim to give up")
        assert job["participants"][v_id]["reason"] == "not_sealed"
        # its one slot is free again: it takes part in an honest job
        helper = await start(fleet, "--bootstrap", addr, env=env)
        honest = (await rpc(helper, "jobs.submit", spec={**SMALL, "min_peers": 2}))["job_id"]
        done = await job_in(v, honest, ("done", "failed"))
    assert done["status"] == "done" and v_id in done["roster"]
