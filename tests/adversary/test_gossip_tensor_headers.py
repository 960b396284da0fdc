"""Forged tensor headers in a job the attacker submitted (daemons volunteer for any job
of a task they accept): a zero-length dimension next to dimensions whose product numpy
cannot allocate made `np.empty` raise ValueError and the daemon exit. Now the header is
refused, the attacker penalized, and the daemon trains on.

The attacker runs an honest daemon to submit the job and get into its roster, then
stops it and speaks `/lattice/gossip-avg/2` under the same identity with the kit."""

from __future__ import annotations

import os
import signal

import pytest
import trio

import lattice
from lattice.core.gossip_messages import PROTOCOL as GOSSIP_PROTOCOL
from lattice.core.identity import Identity, encode_identity_file
from lattice.testing.hostile import arrays_header, gossip_offer, open_hostile_peer

from .conftest import assert_alive, call, eventually, running

pytestmark = pytest.mark.adversary

GOSSIP = GOSSIP_PROTOCOL  # /lattice/gossip-avg/2
# each dimension within the payload bound of digits-softmax (~9 KB), their product past
# what numpy can allocate; announced size 0 bytes
ZERO_DIM = arrays_header(("data", "<f4", [0] + [8000] * 6, 0), ("shape", "<i8", [1], 8))


async def _attackers_job(daemons, tmp_path, attackers: int):
    """(victim, its status, the attackers' identities, the job id): a job submitted by
    the first attacker's daemon, running on the victim with every attacker in its
    roster; the attackers' daemons are stopped once the roster is sealed."""
    identities, procs = [], []
    for i in range(attackers):
        identity = Identity.generate()
        state = tmp_path / f"attacker{i}"
        state.mkdir(mode=0o700)
        key = state / "identity.key"
        key.write_bytes(encode_identity_file(identity))
        os.chmod(key, 0o600)
        identities.append(identity)
        procs.append(daemons(state_dir=state) if i == 0 else None)
    first = await running(procs[0])
    bootstrap = ("--bootstrap", f"{first['advertised_addrs'][0]}/p2p/{first['peer_id']}")
    for i in range(1, attackers):
        procs[i] = daemons(*bootstrap, state_dir=tmp_path / f"attacker{i}")
    v = daemons(*bootstrap)
    v_status = await running(v)
    for proc in procs[1:]:
        await running(proc)

    async def all_alive():
        members = await call(procs[0], "members.list")
        return sum(1 for m in members.values() if m.get("alive")) >= attackers + 1

    await eventually(all_alive, "every daemon to see the others alive", 60)
    job_id = (await call(procs[0], "jobs.submit", spec={
        "task": "digits-softmax", "min_peers": attackers + 1, "steps": 200_000,
        "sync_every": 20}))["job_id"]

    async def victim_training():
        try:
            job = await call(v, "jobs.get", job_id=job_id)
        except lattice.LatticeError:  # NOT_FOUND: not replicated to the victim yet
            return None
        return job["status"] == "running" and v_status["peer_id"] in job["roster"]

    await eventually(victim_training, "the victim to train in the attacker's job", 90)
    for proc in procs:  # the attacker needs its daemons no more; how they end is its business
        await trio.to_thread.run_sync(proc.stop, signal.SIGKILL)
    return v, v_status, identities, job_id


async def _accepted_offer(peer, victim: str, job_id: str):
    """A stream on which the victim accepted our offer: it answers busy while it is in
    an exchange of its own (e.g. trying a stopped roster peer) or has not set up its
    side of the job yet, so offer again."""
    with trio.fail_after(60):
        while True:
            stream = await peer.open(victim, GOSSIP)
            await stream.send_frame(gossip_offer(job_id, "none"))
            reply = await stream.recv_frame()
            if reply["t"] == "accept":
                return stream
            assert reply["t"] == "busy" and reply["reason"] in ("exchange", "unknown_job"), reply
            await stream.close()
            await trio.sleep(0.1)  # a retry pause, as an honest initiator takes


async def _penalties(v) -> dict:
    return (await call(v, "jobs.stats"))["gossip"]["penalties"]


async def test_a_zero_length_dimension_is_refused_and_the_daemon_trains_on(daemons, tmp_path):
    v, status, (initiator, responder), job_id = await _attackers_job(daemons, tmp_path, 2)
    victim_addr = f"{status['advertised_addrs'][0]}/p2p/{status['peer_id']}"

    # as initiator: an offer (held while the victim's round runs), then the header
    async with open_hostile_peer(initiator) as peer:
        await peer.connect(victim_addr)
        stream = await _accepted_offer(peer, status["peer_id"], job_id)
        await stream.send_frame(ZERO_DIM)
        assert await stream.drain() in ("reset", "eof")
    assert_alive(v)
    assert (await _penalties(v)).get("protocol") == 1

    # as responder to the victim's own offers (it counts us alive for a while yet):
    # accept, then the same header
    async with open_hostile_peer(responder) as peer:
        lied = trio.Event()

        async def lie(s):
            offer = await s.recv_frame()
            await s.send_frame({"t": "accept", "xid": offer["xid"], "samples": 1})
            await s.send_frame(ZERO_DIM)
            lied.set()
            await s.drain(timeout=5)

        peer.serve(GOSSIP, lie)
        await peer.connect(victim_addr)
        with trio.fail_after(120):
            await lied.wait()
        await eventually(lambda: _protocol_penalties_at_least(v, 2),
                         "the victim to penalize the lying responder", 30)
    assert_alive(v)
    job = await call(v, "jobs.get", job_id=job_id)
    assert job["status"] == "running" and job["peers"][status["peer_id"]] == "running"


async def _protocol_penalties_at_least(v, n: int) -> bool:
    return (await _penalties(v)).get("protocol", 0) >= n
