"""A misbehaving peer on the wire: rejected, counted, penalized; nothing changes."""

import pytest
import trio
from pycrdt import Doc, Map

from lattice.core.codec import canonical, pack, unpack
from lattice.core.identity import Identity
from lattice.core.state import Set
from lattice.core.state.envelope import seal
from lattice.net.crdt_sync import PROTOCOL
from lattice.net.streams import PeerError, recv_frame, recv_frame_or_eof, send_frame


def signed_write(identity, seq, entries, prev=b""):
    doc = Doc()
    with doc.transaction():
        for (root, key), value in entries.items():
            doc.get(root, type=Map)[key] = canonical(value)
    return seal(identity, seq, "delta", doc.get_update(), prev)


async def open_raw_session(mallory, victim, summary=None):
    stream = await mallory.open_stream(victim.peer_id, PROTOCOL)
    await send_frame(stream, {"t": "hello", "sid": "evil", "v": 1, "summary": summary or {},
                              "banned": []})
    hello = await recv_frame(stream)
    assert hello["t"] == "hello" and hello["sid"] == "evil"
    return stream


async def ended_by_victim(stream) -> bool:
    """Drain what the victim sends until it resets or closes the session."""
    with trio.fail_after(10):
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
    await send_frame(again, {"t": "hello", "sid": "evil2", "v": 1, "summary": {},
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
