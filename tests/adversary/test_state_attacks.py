"""Hostile peers against real daemons' replicated state (issue 11): a py-libp2p attacker
speaks /lattice/crdt-sync/2 with the kit in `lattice.testing.hostile.state`. Each
attack is refused or bounded, counted, its sender penalized where it broke the
protocol, and the daemon keeps serving its honest peers. Real time: every wait is on
a condition with a deadline."""

from __future__ import annotations

import functools
import os
import textwrap
import time

import pytest
import trio

import lattice
from lattice.core.identity import Identity
from lattice.core.state import Set
from lattice.net.streams import PeerError
from lattice.testing.hostile.state import (
    Author,
    Fleet,
    job_records,
    nested_array_envelope,
    nested_type_update,
    open_attacker,
    raw_envelope,
    sybils,
)

from .conftest import eventually

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture
def fleet(tmp_path):
    with Fleet(tmp_path) as f:
        yield f


async def start(fleet: Fleet, *extra: str, env: dict | None = None, **kw):
    return await trio.to_thread.run_sync(functools.partial(fleet.start, *extra, env=env, **kw))


async def rpc(d, method: str, **params):
    async with lattice.open_client(d.socket) as c:
        return await c.call(method, **params)



async def honest_pair(fleet: Fleet, env: dict | None = None):
    """A victim and an honest peer connected to it: (victim, peer, victim's address)."""
    victim = await start(fleet, env=env)
    peer = await start(fleet)
    addr = (await rpc(victim, "status"))["advertised_addrs"][0]
    await rpc(peer, "peers.connect", addr=addr, timeout=10.0)
    return victim, peer, addr


async def still_serving(victim, peer, token: int) -> None:
    """The victim process lives, answers, and an honest write reaches it."""
    assert victim.proc.poll() is None, victim.log_text()
    await rpc(peer, "state.set", path="counters/still-here", value=token)

    async def arrived():
        counters = await rpc(victim, "state.get", path="counters")
        return counters.get("still-here") == token

    await eventually(arrived, "an honest write to reach the victim")


# -- one envelope that crashed daemons -----------------------------------------------------------

@pytest.mark.parametrize("update", ["nested-arrays", "nested-types"])
async def test_an_envelope_nesting_30000_levels_is_refused_and_the_daemon_lives(fleet, update):
    victim, peer, addr = await honest_pair(fleet)
    mallory = Identity.generate()
    raw = (nested_array_envelope(mallory) if update == "nested-arrays"
           else raw_envelope(mallory, nested_type_update(30_000)))
    assert len(raw) < 256 * 1024
    async with open_attacker(mallory) as attacker:
        victim_id = await attacker.connect(addr)
        session = await attacker.open_session(victim_id)
        await session.send_envelopes([raw])
        assert await session.wait_ended()  # reset: penalized
        stats = await rpc(victim, "state.stats")
        assert stats["store"]["rejected"] == {"unsupported_update": 1}
        assert stats["sync"]["sync"]["penalties"] == {"unsupported_update": 1}
        with pytest.raises(PeerError):  # in backoff: no hello, the stream is reset
            await attacker.open_session(victim_id)
    await still_serving(victim, peer, 1)


# -- the protocol spoken wrongly ------------------------------------------------------------------

WRONG = {
    # name: (what the attacker sends after the hellos, the penalty it earns)
    "not-msgpack": (b"\x00\x00\x00\x03\xc1\xc1\xc1", "malformed"),
    "oversized-frame": (b"\x7f\xff\xff\xff", "malformed"),
    "second-hello": ({"t": "hello", "v": 2, "root": [0, bytes(8)], "summary": {}, "banned": []},
                     "unexpected"),
    "other-session-id": ({"t": "summary", "sid": "not-ours", "summary": {}, "reply": True},
                         "malformed"),
    "huge-summary": ({"t": "summary", "summary": {f"a{i}": [1, b"12345678"]
                                                  for i in range(9000)}, "reply": True},
                     "malformed"),
    "items-not-bytes": ({"t": "envelopes", "items": [1, 2, 3]}, "malformed"),
    "bogus-proof": ({"t": "proof", "envelopes": [b"x", b"y"]}, "malformed"),
    "unknown-type": ({"t": "gimme"}, "malformed"),
}


async def test_the_sync_protocol_spoken_wrongly_is_penalized_and_the_daemon_lives(fleet):
    victim, peer, addr = await honest_pair(fleet)
    expected: dict[str, int] = {}
    for case, (wrong, penalty) in sorted(WRONG.items()):  # a fresh attacker each time
        async with open_attacker() as attacker:
            session = await attacker.open_session(await attacker.connect(addr))
            if isinstance(wrong, bytes):
                await session.send_raw(wrong)
            else:
                await session.send({"sid": session.sid, **wrong})
            assert await session.wait_ended(), case
        expected[penalty] = expected.get(penalty, 0) + 1
        stats = (await rpc(victim, "state.stats"))["sync"]["sync"]
        assert stats["penalties"] == expected, case
    assert stats["internal_errors"] == 0
    await still_serving(victim, peer, 6)


# -- Sybil authors ------------------------------------------------------------------------------------

async def test_sybil_authors_over_one_connection_are_held_to_its_allowance(fleet):
    victim, peer, addr = await honest_pair(fleet)
    authors = sybils(16, snapshots=False)
    envelopes = [raw for a in authors for raw in a.bulk(MiB)]
    async with open_attacker() as attacker:
        session = await attacker.open_session(await attacker.connect(addr))
        for i in range(0, len(envelopes), 6):  # ~360 KiB frames
            await session.send_envelopes(envelopes[i:i + 6])
        summary = await session.sync_point()
    kept = [a for a in authors if a.peer_id in summary]
    stats = (await rpc(victim, "state.stats"))["store"]
    # the peer's byte allowance (4 MiB at once) bounds what it got in: about 4 of 16
    assert 1 <= len(kept) <= 5 and stats["held_bytes"] <= 5 * MiB
    assert stats["refused"]["peer_byte_rate"] > 0 and stats["rejected"] == {}
    status = (await rpc(victim, "status"))["state_sync"]
    assert status["refused"] > 0 and status["max_state_bytes"] == 32 * MiB
    await still_serving(victim, peer, 2)


async def test_sybils_beyond_the_budget_evict_each_other_never_honest_state(fleet, tmp_path):
    env = {"LATTICE_STATE_MAX_STATE_BYTES": str(3 * MiB),
           "LATTICE_STATE_PEER_BYTES_BURST": str(64 * MiB)}
    victim, peer, addr = await honest_pair(fleet, env=env)
    peer_id = (await rpc(peer, "status"))["peer_id"]
    await rpc(peer, "state.set", path="counters/honest", value=7)
    authors = sybils(8, snapshots=False)
    async with open_attacker() as attacker:
        session = await attacker.open_session(await attacker.connect(addr))
        for author in authors:  # one connection, each Sybil ~0.9 MiB
            envelopes = author.bulk(MiB - 100 * 1024)
            for i in range(0, len(envelopes), 6):
                await session.send_envelopes(envelopes[i:i + 6])
            await session.sync_point()
    stats = (await rpc(victim, "state.stats"))
    store = stats["store"]
    assert store["held_bytes"] <= 3 * MiB and store["evicted"] >= 4
    members = await rpc(victim, "members.list")
    assert peer_id in members and (await rpc(victim, "state.get", path="counters"))["honest"] == 7
    assert stats["log"]["compactions"] >= 1
    kept = set(await rpc(victim, "state.get", path="authors"))
    # a restart loads back what was kept, not the evicted
    await trio.to_thread.run_sync(victim.stop)
    again = await start(fleet, env=env, state_dir=victim.state_dir)
    reloaded = set(await rpc(again, "state.get", path="authors"))
    assert reloaded <= kept and not ({a.peer_id for a in authors} - kept) & reloaded
    assert peer_id in reloaded


# -- a job-spec flood ------------------------------------------------------------------------------

async def test_a_job_spec_flood_is_bounded_per_author_and_the_daemon_keeps_answering(fleet):
    victim, peer, addr = await honest_pair(fleet)
    now = time.time()
    envelopes = [job_records(Author(), 25, now)[1] for _ in range(120)]
    async with open_attacker() as attacker:
        session = await attacker.open_session(await attacker.connect(addr))
        for i in range(0, len(envelopes), 16):
            await session.send_envelopes(envelopes[i:i + 16])
        summary = await session.sync_point()
    flooders = len(summary) - 2  # the victim and the honest peer
    assert flooders == 120
    jobs = await rpc(victim, "jobs.list")
    assert len(jobs) == 16 * flooders  # max_jobs_per_author (each wrote 25), newest first
    status = await rpc(victim, "status")
    assert status["state_sync"]["jobs"] == len(jobs)
    assert status["state_sync"]["max_jobs_per_author"] == 16
    await still_serving(victim, peer, 3)


# -- a session that says nothing -------------------------------------------------------------------

async def test_a_silent_session_is_ended_either_way_without_a_penalty(fleet):
    env = {"LATTICE_STATE_SESSION_IDLE_TIMEOUT_S": "3"}
    victim, peer, addr = await honest_pair(fleet, env=env)
    async with open_attacker() as attacker:
        attacker.accept_sessions()  # sessions the victim opens are answered, then held
        victim_id = await attacker.connect(addr)
        ours = await attacker.open_session(victim_id)
        with trio.fail_after(30):
            assert await ours.wait_ended()
            if victim_id < attacker.peer_id:  # the smaller id dials: the victim did
                held = await attacker.inbound.receive()
                assert await held.wait_ended()

        async def counted():
            sync = (await rpc(victim, "state.stats"))["sync"]["sync"]
            return sync["timeouts"].get("idle", 0) >= 1 and sync

        sync = await eventually(counted, "the idle timeout to be counted")
        assert sync["penalties"] == {}
        again = await attacker.open_session(victim_id)  # silence is not an offence
        await again.close()
    await still_serving(victim, peer, 4)  # the honest session lived on keepalives


# -- a bug in the handler's parsing, found by hostile input ---------------------------------------

FAULT = textwrap.dedent("""
    # injected by tests/adversary: a parser bug that only one hostile record reaches
    import lattice.core.state.store as _store

    _real = _store.read_content

    def _buggy(doc):
        content = _real(doc)
        if "parser-bug" in content["counters"]:
            raise KeyError("a bug in our parsing that hostile input found")
        return content

    _store.read_content = _buggy
""")


async def test_an_exception_raised_parsing_peer_input_is_typed_counted_and_penalized(
        fleet, tmp_path):
    """The daemon is real; a sitecustomize module plants the bug at start-up."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULT)
    victim, peer, addr = await honest_pair(fleet, env={
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])})
    mallory = Author()
    async with open_attacker(mallory.identity) as attacker:
        victim_id = await attacker.connect(addr)
        session = await attacker.open_session(victim_id)
        await session.send_envelopes([mallory.write([Set("counters/parser-bug", 1)])])
        assert await session.wait_ended()
    stats = (await rpc(victim, "state.stats"))["sync"]["sync"]
    assert stats["penalties"] == {"internal_error": 1} and stats["internal_errors"] == 1
    assert "KeyError handling a message" in victim.log.read_text(errors="replace")
    await still_serving(victim, peer, 5)
