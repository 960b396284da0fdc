"""`/lattice/gossip-avg/1` between memnet peers: exact averages, busy peers, peers that
send garbage, and streams killed at every step (both sides end equal, or both keep
their own parameters)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import trio

from lattice.core import bulk_frames
from lattice.core.codec import DecodeError, pack, unpack
from lattice.core.jobs import TrainSpec
from lattice.learn.participant import make_participant, participant_round
from lattice.learn.simulate import sync_pair
from lattice.learn.tasks import get_task
from lattice.learn.validate import NormBound
from lattice.net.bulk import serve_bulk_listener
from lattice.net.gossip_avg import (
    PROTOCOL,
    AveragingParty,
    BulkTensorTransport,
    FramedTensorTransport,
    GossipConfig,
    Outcome,
    run_both,
    serve_gossip_avg,
)
from lattice.net.streams import StreamClosedError, recv_frame, send_frame
from lattice.testing.hostile import arrays_header
from lattice.testing.memnet import MemoryNetwork

JOB = "0123456789abcdef0123456789abcdef"
CONFIG = GossipConfig(accept_timeout=3.0, hold_timeout=2.0, step_timeout=2.0, resolve_timeout=3.0)
# this test's tiny model takes a bulk transport only when no size is "small"
ANY_SIZE = dataclasses.replace(CONFIG, small_payload_bytes=0)


@pytest.fixture(scope="module")
def task():
    return get_task("digits-softmax")


class FaultyNetwork:
    """A memnet peer whose streams reset instead of writing a chosen control message
    (``kill_before``: a message type such as "commit" or "ack")."""

    def __init__(self, peer) -> None:
        self._peer = peer
        self.kill_before: str | None = None
        self.killed = 0
        self.on_kill = lambda: None

    @property
    def peer_id(self) -> str:
        return self._peer.peer_id

    def connected_peers(self):
        return self._peer.connected_peers()

    async def open_stream(self, peer_id, protocol, *, route=True):
        return _FaultyStream(await self._peer.open_stream(peer_id, protocol, route=route), self)

    def set_stream_handler(self, protocol, handler):
        async def wrapped(stream):
            await handler(_FaultyStream(stream, self))
        self._peer.set_stream_handler(protocol, wrapped)


class _FaultyStream:
    def __init__(self, stream, owner: FaultyNetwork) -> None:
        self._s = stream
        self._owner = owner
        self.remote_peer_id = stream.remote_peer_id
        self.protocol = stream.protocol

    async def write(self, data):
        data = bytes(data)
        target = self._owner.kill_before
        if target is not None and len(data) > 4 and int.from_bytes(data[:4], "big") == len(data) - 4:
            try:
                msg = unpack(data[4:])
            except DecodeError:
                msg = None
            if isinstance(msg, dict) and msg.get("t") == target:
                self._owner.killed += 1
                await self._s.reset()
                self._owner.on_kill()
                return await self._s.write(data)  # raises: the stream is gone
        await self._s.write(data)

    async def read(self, n):
        return await self._s.read(n)

    async def close_write(self):
        await self._s.close_write()

    async def close(self):
        await self._s.close()

    async def reset(self):
        await self._s.reset()


class Pair:
    """Two participants of one job on two memnet peers, each serving gossip-avg."""

    def __init__(self, nursery, task, spec: TrainSpec, transport=None, config=CONFIG) -> None:
        self.nursery, self.task, self.spec, self.transport = nursery, task, spec, transport
        self.config = config

    async def start(self):
        self.net = MemoryNetwork()
        peers = [self.net.add_peer() for _ in range(2)]
        for p in peers:
            await self.nursery.start(p.serve)
        self.nets = [FaultyNetwork(p) for p in peers]
        transports = self.transport if isinstance(self.transport, list) else [self.transport] * 2
        self.services = [await self.nursery.start(lambda task_status, n=n, t=t: serve_gossip_avg(
            n, config=self.config, transport=t, task_status=task_status))
            for n, t in zip(self.nets, transports)]
        roster = sorted(p.peer_id for p in peers)
        self.parties = []
        for net, service in zip(self.nets, self.services):
            rank = roster.index(net.peer_id)
            participant = make_participant(self.spec, self.task, rank)
            participant_round(participant, self.spec)  # so the two models differ
            party = AveragingParty(JOB, net.peer_id, roster, participant, weighting=self.spec.weighting,
                                   bound=NormBound(self.spec.norm_factor))
            service.register(party)
            self.parties.append(party)
        return self

    def params(self):
        return [p.params.copy() for p in self.parties]


@pytest.fixture
def pair(nursery, task):
    async def make(transport=None, config=CONFIG, **kw):
        spec = TrainSpec(task="digits-softmax", min_peers=2, steps=20, sync_every=5, seed=4, **kw)
        return await Pair(nursery, task, spec, transport, config).start()
    return make


@pytest.mark.parametrize("options", [{}, {"compression": "int8", "algorithm": "noloco"},
                                     {"weighting": "samples", "compression": "fp16"}])
async def test_a_committed_exchange_gives_both_the_in_process_result_bit_for_bit(pair, autojump_clock, options):
    p = await pair(**options)
    await _check_exchange_matches_the_reference(p)


@pytest.mark.parametrize("options", [{}, {"compression": "int8"}, {"compression": "topk:0.5"}])
async def test_the_bulk_transport_plugs_into_the_same_exchange(pair, options, monkeypatch):
    # real clock: bulk's timers are its own (the fallback path runs over the memnet stream)
    p = await pair(transport=BulkTensorTransport(), config=ANY_SIZE, **options)
    made = []
    real = bulk_frames.EphemeralKey
    monkeypatch.setattr(bulk_frames, "EphemeralKey", lambda *a: made.append(1) or real(*a))
    with trio.fail_after(30):
        await _check_exchange_matches_the_reference(p)
    # every array of the payload (2 or 3 of them) in one session: one key agreement
    assert len(made) == 2


async def test_bytes_sent_over_the_bulk_side_channel_are_counted_like_bytes_on_the_stream(pair, nursery):
    # real clock: bulk's timers are its own. Daemons move payloads over the raw TCP side
    # channel, which the stream's counters never see; job progress must still show them.
    on_stream = await pair(transport=BulkTensorTransport(), config=ANY_SIZE)
    listeners = [await nursery.start(serve_bulk_listener) for _ in range(2)]
    side = await pair(transport=[BulkTensorTransport(listener=x) for x in listeners], config=ANY_SIZE)
    with trio.fail_after(30):
        await _check_exchange_matches_the_reference(on_stream)
        await _check_exchange_matches_the_reference(side)
    assert [x.statistics()["authenticated"] for x in listeners] == [1, 1]  # both ways went that way
    payload = on_stream.parties[0].channel.codec.encode(on_stream.parties[0].params)[1]
    for a, b in zip(on_stream.parties, side.parties):
        assert b.bytes_sent >= payload and b.bytes_received >= payload  # the arrays are counted
        # the rest is control frames, which differ between the two paths (a tiny model here)
        assert abs(b.bytes_sent - a.bytes_sent) < 0.15 * a.bytes_sent
        assert abs(b.bytes_received - a.bytes_received) < 0.15 * a.bytes_received


async def test_a_small_models_round_goes_framed_even_where_bulk_is_spoken(pair, nursery, monkeypatch):
    # real clock. A bulk session costs a key agreement, two round trips and a side-channel
    # connection: more than a payload under small_payload_bytes, which the stream carries
    # in one flight (a 12-daemon digits job spent its rounds on that setup).
    listeners = [await nursery.start(serve_bulk_listener) for _ in range(2)]
    p = await pair(transport=[BulkTensorTransport(listener=x) for x in listeners])
    assert p.parties[0].params.nbytes < CONFIG.small_payload_bytes
    made = []
    real = bulk_frames.EphemeralKey
    monkeypatch.setattr(bulk_frames, "EphemeralKey", lambda *a: made.append(1) or real(*a))
    with trio.fail_after(30):
        await _check_exchange_matches_the_reference(p)
    assert made == [] and [x.statistics()["authenticated"] for x in listeners] == [0, 0]


async def test_peers_with_different_transports_agree_on_one_they_both_speak(pair):
    p = await pair(transport=[BulkTensorTransport(), None], config=ANY_SIZE)
    with trio.fail_after(30):
        await _check_exchange_matches_the_reference(p)  # bulk offered, framed chosen
    p.services.reverse()
    p.parties.reverse()
    with trio.fail_after(30):
        assert await p.services[0].initiate(p.parties[0], p.parties[1].me) is Outcome.COMMITTED


async def _check_exchange_matches_the_reference(p):
    reference = [copy.deepcopy(x.participant) for x in p.parties]
    sync_pair(reference[0], reference[1], p.spec)
    outcome = await p.services[0].initiate(p.parties[0], p.parties[1].me)
    assert outcome is Outcome.COMMITTED
    a, b = p.params()
    assert a.tobytes() == reference[0].trainer.params.tobytes()
    assert b.tobytes() == reference[1].trainer.params.tobytes()
    if p.spec.algorithm == "gossip":
        assert a.tobytes() == b.tobytes()  # both hold the very same average
    # the error-feedback memory moved on as the reference's did
    for party, ref in zip(p.parties, reference):
        for k, v in ref.channel.state().items():
            assert party.channel.state()[k].tobytes() == v.tobytes()
    assert p.parties[0].bytes_sent > 0 and p.parties[1].bytes_received == p.parties[0].bytes_sent


async def test_an_offer_to_a_training_peer_is_held_until_its_round_ends(pair, autojump_clock):
    p = await pair()
    trainer_done = trio.Event()
    release = trio.Event()
    responder = p.parties[1]

    async def slow_compute(fn):
        await release.wait()
        return fn()

    responder.compute = slow_compute

    async def train():
        await responder.train(lambda: None)
        trainer_done.set()

    p.nursery.start_soon(train)
    await trio.testing.wait_all_tasks_blocked()
    assert responder.training
    result = {}
    offered = trio.Event()

    async def offer():
        result["outcome"] = await p.services[0].initiate(p.parties[0], responder.me)
        offered.set()

    p.nursery.start_soon(offer)
    await trio.testing.wait_all_tasks_blocked()
    assert responder.held is not None and "outcome" not in result
    before = p.params()
    responder.compute = lambda fn: _inline(fn)
    release.set()
    await trainer_done.wait()
    with trio.fail_after(5):
        await offered.wait()
    assert result["outcome"] is Outcome.COMMITTED and responder.mixed
    a, b = p.params()
    assert a.tobytes() == b.tobytes() and a.tobytes() != before[0].tobytes()


async def _inline(fn):
    await trio.lowlevel.checkpoint()
    return fn()


async def test_busy_peers_say_so_and_nothing_changes(pair, autojump_clock):
    p = await pair()
    before = p.params()
    p.parties[1].begin("another-exchange")
    assert await p.services[0].initiate(p.parties[0], p.parties[1].me) is Outcome.BUSY
    p.parties[1].end()
    p.parties[1].close()
    assert await p.services[0].initiate(p.parties[0], p.parties[1].me) is Outcome.BUSY
    p.services[1].unregister(JOB)
    assert await p.services[0].initiate(p.parties[0], p.parties[1].me) is Outcome.BUSY
    stats = p.services[1].statistics()
    assert stats["busy_exchange"] == 1 and stats["busy_finished"] == 1 and stats["busy_unknown_job"] == 1
    assert all(x.tobytes() == y.tobytes() for x, y in zip(before, p.params()))


def _bad_payloads(n: int):
    good = np.zeros(n, np.float32)
    nan = good.copy()
    nan[3] = np.nan
    return {
        "non_finite": {"data": nan, "shape": np.array([n], np.int64)},
        "payload": {"data": np.zeros(n + 1, np.float32), "shape": np.array([n + 1], np.int64)},
        "norm": {"data": np.full(n, 1e6, np.float32), "shape": np.array([n], np.int64)},
    }


@pytest.mark.parametrize("kind", ["non_finite", "payload", "norm", "dtype"])
async def test_a_peer_sending_garbage_is_rejected_and_penalized_and_our_model_is_untouched(pair, autojump_clock, kind):
    p = await pair()
    honest, service = p.parties[1], p.services[1]
    before = honest.params.copy()
    n = before.size
    payload = _bad_payloads(n).get(kind) or {"data": np.zeros(n, np.float16), "shape": np.array([n], np.int64)}
    stream = await p.nets[0].open_stream(honest.me, PROTOCOL)  # the attacker is a roster member
    await send_frame(stream, {"t": "offer", "v": 2, "job": JOB, "xid": "x" * 32, "samples": 100, "codec": "none"})
    assert (await recv_frame(stream))["t"] == "accept"
    transport = FramedTensorTransport()
    try:
        await run_both(lambda: transport.send_arrays(stream, payload),
                       lambda: transport.receive_arrays(stream, expect=None, max_bytes=1 << 24))
    except StreamClosedError:
        assert kind == "dtype"  # refused at the header, before any tensor bytes: stream reset
    if kind != "dtype":
        reply = await recv_frame(stream)
        assert reply == {"t": "abort", "xid": "x" * 32, "reason": f"invalid_tensor:{kind}"}
    await trio.testing.wait_all_tasks_blocked()
    assert honest.params.tobytes() == before.tobytes()
    assert service.health.is_penalized(p.nets[0].peer_id, trio.current_time())
    stats = service.statistics()
    assert stats["rejected"] == ({} if kind == "dtype" else {kind: 1})
    # a penalized peer is not served again for a while
    assert await p.services[0].initiate(p.parties[0], honest.me) is Outcome.BUSY
    assert service.statistics()["busy_penalized"] == 1


async def test_a_stream_killed_between_the_tensors_and_the_commit_leaves_both_as_they_were(pair, autojump_clock):
    p = await pair()
    before = p.params()
    p.nets[0].kill_before = "commit"
    outcome = await p.services[0].initiate(p.parties[0], p.parties[1].me)
    assert p.nets[0].killed == 1
    assert outcome is Outcome.ABORTED  # the status query says the responder never applied
    assert all(x.tobytes() == y.tobytes() for x, y in zip(before, p.params()))
    assert p.parties[1].stats["failed"] == 1 and not p.parties[1].mixed


async def test_a_lost_ack_is_settled_by_a_status_query_and_both_end_equal(pair, autojump_clock):
    p = await pair()
    before = p.params()
    p.nets[1].kill_before = "ack"
    outcome = await p.services[0].initiate(p.parties[0], p.parties[1].me)
    assert p.nets[1].killed == 1
    assert outcome is Outcome.COMMITTED
    a, b = p.params()
    assert a.tobytes() == b.tobytes() and a.tobytes() != before[0].tobytes()
    assert p.services[0].statistics()["resolved_committed"] == 1


async def test_a_lost_ack_with_the_responder_gone_is_the_documented_window(pair, autojump_clock):
    p = await pair()
    before = p.params()
    p.nets[1].kill_before = "ack"
    p.nets[1].on_kill = lambda: p.net.disconnect(p.nets[1].peer_id)  # gone right after applying
    outcome = await p.services[0].initiate(p.parties[0], p.parties[1].me)
    assert outcome is Outcome.ABORTED
    assert p.parties[0].stats["in_doubt_kept"] == 1
    assert p.params()[0].tobytes() == before[0].tobytes()  # the initiator kept its own
    assert p.params()[1].tobytes() != before[1].tobytes()  # the responder had applied


async def test_a_killed_tensor_transfer_aborts_both(pair, autojump_clock):
    p = await pair()
    before = p.params()
    p.nets[1].kill_before = "arrays"
    assert await p.services[0].initiate(p.parties[0], p.parties[1].me) is Outcome.FAILED
    await trio.testing.wait_all_tasks_blocked()
    assert all(x.tobytes() == y.tobytes() for x, y in zip(before, p.params()))
    assert p.parties[0].exchange is None and p.parties[1].exchange is None



# -- the handler boundary: whatever a parser raises on peer input is the peer's fault --

ATTACKER_OFFER = {"t": "offer", "v": 2, "job": JOB, "xid": "a" * 32, "samples": 1, "codec": "none"}
PEER_ERRORS = [ValueError, RecursionError, KeyError, OverflowError, TypeError, IndexError]


async def _attack(p, header=None, *, raw: bytes | None = None):
    """Attacker = parties[0]'s peer, speaking raw frames to parties[1]'s service: an offer
    (or ``raw`` bytes instead), then ``header`` and as many zero bytes as it announces.
    Returns what the victim answered first (None if it reset the stream at once)."""
    stream = await p.nets[0].open_stream(p.parties[1].me, PROTOCOL)
    await stream.write(raw if raw is not None else
                       len(pack(ATTACKER_OFFER)).to_bytes(4, "big") + pack(ATTACKER_OFFER))
    reply = None
    try:
        reply = await recv_frame(stream)
        if header is not None:
            await send_frame(stream, header)
            size = sum(spec["nbytes"] for _, spec in header["items"])
            await stream.write(bytes(min(size, 1 << 20)))
        while await stream.read(1 << 16):
            pass  # until the victim resets or closes
    except StreamClosedError:
        pass
    await trio.testing.wait_all_tasks_blocked()
    return reply


def _payload_header(n: int, shape=None):
    shape = [n] if shape is None else shape
    return arrays_header(("data", "<f4", shape, 4 * int(np.prod(shape))), ("shape", "<i8", [1], 8))


async def _victim_serves_on(p):
    """The victim's handler is alive: a new offer is answered (busy: penalized)."""
    stream = await p.nets[0].open_stream(p.parties[1].me, PROTOCOL)
    await send_frame(stream, {**ATTACKER_OFFER, "xid": "b" * 32})
    assert await recv_frame(stream) == {"t": "busy", "xid": "b" * 32, "reason": "penalized"}


@pytest.mark.parametrize("error", PEER_ERRORS)
@pytest.mark.parametrize("parser", ["parse_message", "parse_array_header", "receive"])
async def test_an_exception_inside_any_parser_is_the_peers_fault_and_cannot_escape(
        pair, autojump_clock, monkeypatch, parser, error):
    p = await pair()
    victim, service = p.parties[1], p.services[1]
    before = victim.params.copy()

    def boom(*args, **kwargs):
        raise error("injected")

    if parser == "receive":
        monkeypatch.setattr(victim.channel, "receive", boom)
    else:
        module = "gossip_transports" if parser == "parse_array_header" else "gossip_avg"
        monkeypatch.setattr(f"lattice.net.{module}.{parser}", boom)
    n = before.size
    payload = _payload_header(n)
    await _attack(p, payload)
    monkeypatch.undo()
    assert victim.params.tobytes() == before.tobytes()
    assert service.statistics()["penalties"] == {"protocol": 1}
    assert service.health.is_penalized(p.nets[0].peer_id, trio.current_time())
    await _victim_serves_on(p)


@pytest.mark.parametrize("attack", [
    "deep_frame", "zero_dim_huge_extent", "transports_not_a_list", "bool_samples", "xid_not_str",
])
async def test_malformed_offers_and_headers_are_refused_penalized_and_served_on(pair, autojump_clock, attack):
    p = await pair()
    victim, service = p.parties[1], p.services[1]
    before = victim.params.copy()
    deep = b"\x91" * 1000 + b"\xc0"
    if attack == "deep_frame":
        await _attack(p, raw=len(deep).to_bytes(4, "big") + deep)
    elif attack == "zero_dim_huge_extent":
        # each dimension within the payload bound, their product past what numpy allows
        assert (await _attack(p, _payload_header(0, [0] + [8000] * 6)))["t"] == "accept"
    else:
        bad = {"transports_not_a_list": {"transports": "framed"}, "bool_samples": {"samples": True},
               "xid_not_str": {"xid": ["a"] * 999}}[attack]
        offer = {**ATTACKER_OFFER, **bad}
        body = pack(offer)
        assert await _attack(p, raw=len(body).to_bytes(4, "big") + body) is None
    assert victim.params.tobytes() == before.tobytes()
    assert service.statistics()["penalties"] == {"protocol": 1}
    await _victim_serves_on(p)


async def test_a_responder_answering_garbage_is_penalized_by_the_initiator(pair, autojump_clock):
    p = await pair()
    initiator, service = p.parties[0], p.services[0]

    async def liar(stream):
        offer = await recv_frame(stream)
        await send_frame(stream, {"t": "accept", "xid": offer["xid"], "samples": 1, "transport": []})
        await trio.sleep_forever()

    p.nets[1].set_stream_handler(PROTOCOL, liar)
    before = initiator.params.copy()
    assert await service.initiate(initiator, p.parties[1].me) is Outcome.FAILED
    assert initiator.params.tobytes() == before.tobytes()
    assert service.statistics()["penalties"] == {"protocol": 1}
