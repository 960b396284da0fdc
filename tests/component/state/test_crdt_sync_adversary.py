"""A misbehaving peer on the wire: rejected, counted, penalized; nothing changes."""

import pytest
import trio
from pycrdt import Doc, Map

from lattice.core.codec import canonical, pack, unpack
from lattice.core.identity import Identity
from lattice.core.state import Set
from lattice.core.state.envelope import seal
from lattice.net.crdt_sync import PROTOCOL, SyncConfig
from lattice.net.streams import PeerError, recv_frame, recv_frame_or_eof, send_frame


def signed_write(identity, seq, entries, prev=b""):
    doc = Doc()
    with doc.transaction():
        for (root, key), value in entries.items():
            doc.get(root, type=Map)[key] = canonical(value)
    return seal(identity, seq, "delta", doc.get_update(), prev)


async def open_raw_session(mallory, victim, summary=None):
    stream = await mallory.open_stream(victim.peer_id, PROTOCOL)
    await send_frame(stream, {"t": "hello", "sid": "evil", "v": 2, "root": [0, bytes(8)],
                              "summary": summary or {}, "banned": []})
    hello = await recv_frame(stream)
    assert hello["t"] == "hello" and hello["sid"] == "evil"
    return stream


async def ended_by_victim(stream, timeout=10) -> bool:
    """Drain what the victim sends until it resets or closes the session."""
    with trio.fail_after(timeout):
        try:
            while await recv_frame_or_eof(stream) is not None:
                pass
        except PeerError:
            pass
    return True


def _tampered(raw):
    fields = unpack(raw)
    update = bytearray(fields["update"])
    update[-1] ^= 0x01
    fields["update"] = bytes(update)
    return pack(fields)


BAD = {
    "forged": lambda alice, mallory, good: ("bad_signature", pack(
        {**unpack(seal(mallory, 2, "delta", good.update, good.prev).raw),
         "author": alice.peer_id})),
    "tampered": lambda alice, mallory, good: ("bad_signature", _tampered(good.raw)),
    "oversized": lambda alice, mallory, good: ("oversized", b"\xc4" + b"\x00" * 300_000),
    "another-members-record": lambda alice, mallory, good: ("out_of_bounds", signed_write(
        mallory, 1, {("member", "peer_id"): alice.peer_id, ("member", "name"): "evil"}).raw),
    "job-with-another-submitter": lambda alice, mallory, good: ("out_of_bounds", signed_write(
        mallory, 1, {("jobs", "j1"): {"submitter": alice.peer_id, "task": "evil"}}).raw),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_invalid_envelopes_are_rejected_counted_and_penalized(cluster, autojump_clock,
                                                                    case):
    victim, alice_node = await cluster.add(2)
    await cluster.link(victim, alice_node)
    alice_node.announce("alice")
    await cluster.wait_until(cluster.converged)
    good = alice_node.write(Set("member/name", "alice 2"))  # the envelope to abuse
    await cluster.wait_until(cluster.converged)
    before = victim.store.get("", 0), victim.store.summary()

    mallory = cluster.net.add_peer()
    await cluster.nursery.start(mallory.serve)
    reason, raw = BAD[case](alice_node.peer.identity, mallory.identity, good)
    stream = await open_raw_session(mallory, victim.peer)
    await send_frame(stream, {"t": "envelopes", "sid": "evil", "items": [raw]})
    assert await ended_by_victim(stream)

    assert (victim.store.get("", 0), victim.store.summary()) == before
    stats = victim.sync.statistics()
    assert stats["store"]["rejected"] == {reason: 1}
    assert stats["sync"]["penalties"] == {reason: 1}
    assert victim.sync.hub.in_backoff(mallory.peer_id, trio.current_time())
    # while in backoff, mallory cannot even open a session
    again = await mallory.open_stream(victim.peer_id, PROTOCOL)
    await send_frame(again, {"t": "hello", "sid": "evil2", "v": 2, "root": [0, bytes(8)], "summary": {},
                             "banned": []})
    assert await ended_by_victim(again)
    assert victim.sync.statistics()["sync"]["sessions_refused"] == 1
    # and the honest peer's session carries on
    alice_node.write(Set("member/name", "alice 3"))
    await cluster.wait_until(cluster.converged)


async def test_replays_are_counted_but_not_penalized(cluster, autojump_clock):
    victim, alice_node = await cluster.add(2)
    await cluster.link(victim, alice_node)
    good = alice_node.announce("alice")
    await cluster.wait_until(cluster.converged)
    mallory = cluster.net.add_peer()
    await cluster.nursery.start(mallory.serve)
    stream = await open_raw_session(mallory, victim.peer,
                                    summary={alice_node.peer_id: [1, good.digest[:8]]})
    for _ in range(3):
        await send_frame(stream, {"t": "envelopes", "sid": "evil", "items": [good.raw]})
    await trio.testing.wait_all_tasks_blocked()
    assert victim.store.statistics()["replayed"] == 3
    assert victim.sync.statistics()["sync"]["penalties"] == {}
    await stream.close()


async def test_malformed_frames_end_the_session_with_a_penalty(cluster, autojump_clock):
    (victim,) = await cluster.add(1)
    mallory = cluster.net.add_peer()
    await cluster.nursery.start(mallory.serve)
    stream = await open_raw_session(mallory, victim.peer)
    await stream.write(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # a frame that is not msgpack
    assert await ended_by_victim(stream)
    assert victim.sync.statistics()["sync"]["penalties"] == {"malformed": 1}


async def test_a_forking_author_is_banned_everywhere(cluster, autojump_clock):
    nodes = await cluster.add(6)
    for i, node in enumerate(nodes):
        await cluster.link(node, nodes[(i + 1) % len(nodes)])
    mallory = Identity.generate()
    fork_a = signed_write(mallory, 1, {("counters", "x"): 1})
    fork_b = signed_write(mallory, 1, {("counters", "x"): 2})
    # mallory shows one fork to half the network and the other fork to the rest
    for i, node in enumerate(nodes):
        node.store.receive((fork_a if i < 3 else fork_b).raw, trio.current_time())
    for node in nodes:  # ask everyone to compare summaries now
        node.sync.sync_now()
    await cluster.wait_until(lambda: all(mallory.peer_id in n.store.banned() for n in nodes))
    assert all(n.store.counters() == {} for n in nodes)


async def test_a_session_silent_after_its_hello_is_ended_without_a_penalty(cluster,
                                                                          autojump_clock):
    (victim,) = await cluster.add(1)
    mallory = cluster.net.add_peer()
    await cluster.nursery.start(mallory.serve)
    stream = await open_raw_session(mallory, victim.peer)
    start = trio.current_time()
    assert await ended_by_victim(stream, timeout=600)  # mallory says nothing after its hello
    assert trio.current_time() - start == pytest.approx(cluster.config.idle_timeout, abs=1)
    await trio.testing.wait_all_tasks_blocked()  # the victim's side of the close
    stats = victim.sync.statistics()["sync"]
    assert stats["timeouts"] == {"idle": 1} and stats["penalties"] == {}
    assert stats["sessions"] == 0
    # a silent peer is not a misbehaving one: it may come back at once
    again = await open_raw_session(mallory, victim.peer)
    await again.close()


async def test_a_frame_trickled_byte_by_byte_does_not_hold_a_session(cluster, autojump_clock):
    (victim,) = await cluster.add(1)
    mallory = cluster.net.add_peer()
    await cluster.nursery.start(mallory.serve)
    stream = await open_raw_session(mallory, victim.peer)

    async def trickle():
        await stream.write(b"\x00\x00\x10\x00")  # a 4 KiB frame, one byte at a time
        for _ in range(4096):
            await trio.sleep(cluster.config.idle_timeout / 4)
            await stream.write(b"\x90")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        assert await ended_by_victim(stream, timeout=600)
        nursery.cancel_scope.cancel()
    assert victim.sync.statistics()["sync"]["timeouts"] == {"idle": 1}


async def test_quiet_honest_sessions_stay_open_on_keepalives(cluster, autojump_clock):
    # no anti-entropy either: only keepalives cross the session
    cluster.config = SyncConfig(anti_entropy_interval=3600.0, idle_timeout=30.0)
    a, b = await cluster.add(2)
    await cluster.link(a, b)
    a.announce("a")
    b.announce("b")
    await cluster.wait_until(cluster.converged)
    opened = a.sync.hub.sessions_opened
    await trio.sleep(10 * cluster.config.idle_timeout)  # nobody writes anything
    for node in (a, b):
        stats = node.sync.statistics()["sync"]
        assert stats["timeouts"] == {} and stats["sessions"] == 1
        assert stats["sessions_detail"][0]["keepalives_sent"] >= 10
    assert a.sync.hub.sessions_opened == opened


async def test_an_exception_raised_parsing_a_peers_input_is_typed_counted_and_penalized(
        cluster, autojump_clock, monkeypatch):
    """Whatever a parser bug raises on hostile input ends that peer's session as a
    protocol error (internal_error): the service keeps serving everyone else."""
    import lattice.core.state.store as store_module

    victim, alice_node = await cluster.add(2)
    await cluster.link(victim, alice_node)
    real_read_content = store_module.read_content

    def buggy_read_content(doc):
        content = real_read_content(doc)
        if "trigger" in content["counters"]:
            raise KeyError("a parser bug only hostile input reaches")
        return content

    monkeypatch.setattr(store_module, "read_content", buggy_read_content)
    mallory = cluster.net.add_peer()
    await cluster.nursery.start(mallory.serve)
    stream = await open_raw_session(mallory, victim.peer)
    poison = signed_write(mallory.identity, 1, {("counters", "trigger"): 1})
    await send_frame(stream, {"t": "envelopes", "sid": "evil", "items": [poison.raw]})
    assert await ended_by_victim(stream)

    stats = victim.sync.statistics()
    assert stats["sync"]["penalties"] == {"internal_error": 1}
    assert stats["sync"]["internal_errors"] == 1
    assert victim.sync.hub.in_backoff(mallory.peer_id, trio.current_time())
    assert victim.store.summary().get(mallory.peer_id) is None
    alice_node.announce("alice")  # the service goes on
    await cluster.wait_until(cluster.converged)
