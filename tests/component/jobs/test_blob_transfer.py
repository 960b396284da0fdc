"""`/lattice/blob/1` on memnet: content-addressed fetches that survive lying and vanishing
providers, and the local blob store."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from lattice.net.blob import (
    PROTOCOL,
    BlobConfig,
    BlobNotFound,
    BlobStore,
    BlobStoreFull,
    serve_blobs,
)
from lattice.net.streams import recv_frame, send_frame
from lattice.testing.memnet import MemoryNetwork

CONFIG = BlobConfig(chunk_bytes=1000, request_timeout=2.0, find_timeout=2.0)
DATA = os.urandom(10_500)
BID = hashlib.sha256(DATA).hexdigest()


async def _inline(fn):
    await trio.lowlevel.checkpoint()
    return fn()


@pytest.fixture
def swarm(nursery, tmp_path):
    async def make(n):
        net = MemoryNetwork()
        out = []
        for i in range(n):
            peer = net.add_peer()
            await nursery.start(peer.serve)
            store = BlobStore(tmp_path / f"n{i}")
            service = await nursery.start(lambda task_status, p=peer, s=store: serve_blobs(
                p, s, config=CONFIG, compute=_inline, task_status=task_status))
            out.append(service)
        return net, out
    return make


async def test_a_blob_arrives_whole_chunk_by_chunk_and_is_kept(swarm, autojump_clock):
    _, (client, provider) = await swarm(2)
    assert await provider.put(DATA) == BID
    assert await client.fetch(BID, hints=[provider.network.peer_id]) == DATA
    assert client.store.has(BID) and client.store.get(BID) == DATA
    assert provider.counts["chunks_served"] == 11 and client.bytes_fetched == len(DATA)
    assert await client.fetch(BID) == DATA  # now local: nothing more is asked
    assert provider.counts["chunks_served"] == 11


async def test_a_provider_serving_corrupt_bytes_is_penalized_and_another_one_delivers(swarm, autojump_clock):
    _, (client, liar, honest) = await swarm(3)
    await honest.put(DATA)
    bad = bytearray(DATA)
    bad[5000] ^= 0xFF
    (liar.store.root / BID).write_bytes(bytes(bad))  # the liar's disk says it has the blob
    liar.store._sizes[BID] = len(bad)
    data = await client.fetch(BID, hints=[liar.network.peer_id, honest.network.peer_id])
    assert data == DATA
    assert client.statistics()["penalties"] == {"corrupt": 1} and client.counts["corrupt"] == 1
    assert client.penalties.is_penalized(liar.network.peer_id, trio.current_time())


async def test_a_provider_vanishing_mid_transfer_is_resumed_from_the_offset_by_another(swarm, autojump_clock):
    net, (client, flaky, steady) = await swarm(3)
    await flaky.put(DATA)
    await steady.put(DATA)
    served = {"n": 0}
    original = flaky._answer

    async def answer_then_crash(stream, msg):
        await original(stream, msg)
        if msg.get("t") == "get":
            served["n"] += 1
            if served["n"] == 4:
                net.disconnect(flaky.network.peer_id)

    flaky._answer = answer_then_crash
    data = await client.fetch(BID, hints=[flaky.network.peer_id, steady.network.peer_id])
    assert data == DATA
    assert client.counts["resumed"] == 1 and client.counts["provider_failed"] == 1
    assert steady.bytes_served == len(DATA) - 4000  # only what was missing
    assert client.statistics()["penalties"] == {}


async def test_providers_are_found_among_connected_peers(swarm, autojump_clock):
    _, (client, empty, holder) = await swarm(3)
    await holder.put(DATA)
    for svc in (empty, holder):  # connect (memnet links form on first contact)
        assert await client.ask_have(svc.network.peer_id, "0" * 64) is None
    assert await client.providers.find_providers(BID) == [holder.network.peer_id]
    assert await client.fetch(BID) == DATA


async def test_a_blob_larger_than_the_caller_expects_is_refused(swarm, autojump_clock):
    _, (client, provider) = await swarm(2)
    await provider.put(DATA)
    with pytest.raises(BlobNotFound):
        await client.fetch(BID, hints=[provider.network.peer_id], max_bytes=len(DATA) - 1)
    assert client.statistics()["penalties"] == {"malformed_reply": 1}
    assert provider.counts["chunks_served"] == 0


async def test_nobody_has_it(swarm, autojump_clock):
    _, (client, other) = await swarm(2)
    with pytest.raises(BlobNotFound):
        await client.fetch(BID, hints=[other.network.peer_id])
    assert client.counts["fetch_failed"] == 1


async def test_malformed_requests_are_refused_and_penalized_and_others_are_served(swarm, autojump_clock):
    _, (client, provider, bystander) = await swarm(3)
    await provider.put(DATA)
    peer = provider.network.peer_id
    stream = await client.network.open_stream(peer, PROTOCOL)
    await send_frame(stream, {"t": "get", "v": 1, "rid": 1, "id": BID, "offset": len(DATA), "length": 10})
    assert await recv_frame(stream) == {"t": "error", "rid": 1, "reason": "range"}
    await send_frame(stream, {"t": "get", "v": 1, "rid": 2, "id": "../etc/passwd", "offset": 0, "length": 10})
    await trio.testing.wait_all_tasks_blocked()
    assert provider.counts["bad_requests"] == 1
    assert provider.statistics()["penalties"] == {"malformed_request": 1}
    assert await bystander.fetch(BID, hints=[peer]) == DATA  # the provider serves on
    with pytest.raises(BlobNotFound):  # but not the offender, for a while
        await client.fetch(BID, hints=[peer])
    assert provider.counts["refused_penalized"] >= 1  # the hint, and the have? that follows


PEER_ERRORS = [ValueError, RecursionError, KeyError, OverflowError, TypeError]


@pytest.mark.parametrize("error", PEER_ERRORS)
async def test_an_exception_inside_the_request_parser_cannot_escape_the_provider(
        swarm, autojump_clock, monkeypatch, error):
    _, (client, provider, bystander) = await swarm(3)
    await provider.put(DATA)

    def boom(msg):
        raise error("injected")

    monkeypatch.setattr("lattice.net.blob.parse_request", boom)
    with pytest.raises(BlobNotFound):
        await client.fetch(BID, hints=[provider.network.peer_id])
    monkeypatch.undo()
    assert provider.counts["bad_requests"] == 1
    assert provider.statistics()["penalties"] == {"malformed_request": 1}
    assert await bystander.fetch(BID, hints=[provider.network.peer_id]) == DATA


@pytest.mark.parametrize("error", PEER_ERRORS)
async def test_an_exception_inside_the_reply_parser_cannot_escape_the_client(
        swarm, autojump_clock, monkeypatch, error):
    _, (client, liar, honest) = await swarm(3)
    await liar.put(DATA)
    await honest.put(DATA)
    original = __import__("lattice.net.blob", fromlist=["parse_reply"]).parse_reply

    def boom_for_the_liar(msg, *args):
        if client._fetching and liar_is_answering[0]:
            raise error("injected")
        return original(msg, *args)

    liar_is_answering = [True]
    monkeypatch.setattr("lattice.net.blob.parse_reply", boom_for_the_liar)
    original_download_from = client._download_from

    async def track(provider, *args):
        liar_is_answering[0] = provider == liar.network.peer_id
        return await original_download_from(provider, *args)

    client._download_from = track
    assert await client.fetch(BID, hints=[liar.network.peer_id, honest.network.peer_id]) == DATA
    assert client.statistics()["penalties"] == {"malformed_reply": 1}
    assert client.penalties.is_penalized(liar.network.peer_id, trio.current_time())


def test_the_store_survives_a_reopen_refuses_to_overfill_and_cleans_torn_writes(tmp_path):
    store = BlobStore(tmp_path, max_bytes=15_000)
    assert store.put(DATA) == BID and store.put(DATA) == BID
    with pytest.raises(BlobStoreFull):
        store.put(os.urandom(6000))
    (tmp_path / ".tmp-deadbeef").write_bytes(b"torn")
    store.append_partial("a" * 64, 0, b"abc")
    again = BlobStore(tmp_path, max_bytes=15_000)
    assert again.get(BID) == DATA and again.read(BID, 10_000, 1000) == DATA[10_000:]
    assert not (tmp_path / ".tmp-deadbeef").exists()
    assert again.partial_size("a" * 64) == 3  # a download resumes after a restart
    assert not again.finish_partial("a" * 64) and again.partial_size("a" * 64) == 0
    assert again.statistics() == {"blobs": 1, "bytes": len(DATA), "max_bytes": 15_000,
                                  "keep_free_bytes": 0, "refused_disk": 0}


def test_the_store_leaves_keep_free_bytes_free_on_its_disk(tmp_path):
    """``[volunteer] keep_free_gb``: a put or a download chunk that would leave less
    free disk is refused (the fetch then fails with BlobStoreFull, nothing half-kept)."""
    free = [20_500]
    store = BlobStore(tmp_path, keep_free_bytes=8_000, free_bytes=lambda: free[0])
    assert store.put(DATA) == BID  # 10.5 kB of 20.5 kB free: 10 kB left
    free[0] -= len(DATA)
    with pytest.raises(BlobStoreFull, match="to keep free"):
        store.put(os.urandom(2_001))
    store.append_partial("a" * 64, 0, b"x" * 2_000)  # exactly 8 kB left: allowed
    free[0] -= 2_000
    with pytest.raises(BlobStoreFull, match="to keep free"):
        store.append_partial("a" * 64, 2_000, b"x")
    assert store.statistics()["refused_disk"] == 2 and store.ids() == [BID]


async def test_a_fetch_the_store_has_no_room_for_fails_typed_and_keeps_nothing(
        swarm, autojump_clock):
    _, (client, provider) = await swarm(2)
    await provider.put(DATA)
    client.store.keep_free_bytes = 1_000
    client.store._free_bytes = lambda: 1_500  # a 1 kB chunk would leave 0.5 kB
    with pytest.raises(BlobStoreFull):
        await client.fetch(BID, hints=[provider.network.peer_id])
    assert client.store.partial_size(BID) == 0 and not client.store.has(BID)
    assert client.statistics()["fetch_store_full"] == 1
