"""A 24+ node DHT on the in-memory network: join through one node, put anywhere, get
everywhere within log2(N)+2 hops, refuse bad records, survive churn, keep clients out
of routing tables."""

import math
import random
from functools import partial

import pytest
import trio

from lattice.core import codec
from lattice.core.identity import Identity
from lattice.core.kademlia import (
    PROTOCOL_ID,
    Mode,
    PeerInfo,
    key_hash,
    make_message,
    parse_message,
    peer_hash,
)
from lattice.core.records import RecordLimits, peer_key, sign_record, user_key
from lattice.net.dht import DHTConfig, PeerNotFound, serve_dht
from lattice.net.streams import StreamClosedError, recv_frame, recv_frame_or_eof, send_frame

from .conftest import wall_clock

N = 24
HOP_BOUND = math.ceil(math.log2(N)) + 2


async def test_every_put_is_readable_from_every_node_within_log_n_hops(swarm, autojump_clock):
    nodes = await swarm.grow(N)
    assert all(len(d.table) >= 10 for d in nodes)
    rnd = random.Random(1)
    worst = 0
    for i in range(6):
        writer = rnd.choice(nodes)
        put = await writer.put(user_key(f"k{i}"), {"n": i}, ttl=600)
        assert len(put.stored_at) >= 15
        assert put.hops <= HOP_BOUND
        for reader in nodes:
            # as users get it (a replica answers from its store), and over the network
            for fresh in (False, True):
                got = await reader.get_result(user_key(f"k{i}"), fresh=fresh)
                assert [(r.publisher, r.unpack_value()) for r in got.records] == [
                    (writer.peer_id, {"n": i})]
                worst = max(worst, got.hops)
    assert 1 <= worst <= HOP_BOUND
    for reader in nodes[:4]:
        lookup = await reader.find_closest_peers(12345)
        assert len(lookup.peers) == 20 and lookup.hops <= HOP_BOUND


async def test_several_publishers_under_one_key_and_newest_wins(swarm, autojump_clock):
    nodes = await swarm.grow(N)
    key = user_key("shared")
    for i, writer in enumerate(nodes[:5]):
        await writer.put(key, i, ttl=600)
    await nodes[0].put(key, "updated", ttl=900)
    got = await nodes[-1].get(key)
    assert {r.publisher: r.unpack_value() for r in got} == {
        nodes[0].peer_id: "updated", **{n.peer_id: i for i, n in enumerate(nodes[1:5], 1)}}


async def test_records_expire_everywhere(swarm, autojump_clock):
    nodes = await swarm.grow(N)
    await nodes[3].put(user_key("short"), "x", ttl=30)
    assert await nodes[7].get(user_key("short"))
    await trio.sleep(31)
    assert await nodes[7].get(user_key("short")) == []
    await trio.sleep(DHTConfig().gc_interval)
    assert all(n.statistics()["records_stored"] == 0 for n in nodes)


async def _raw_request(swarm, rogue, target, mtype, **body):
    stream = await rogue.open_stream(target, PROTOCOL_ID)
    msg = make_message(mtype, 99, False, PeerInfo(rogue.peer_id, (), Mode.CLIENT), **body)
    await send_frame(stream, msg.to_wire())
    answer = parse_message(await recv_frame(stream))
    await stream.close()
    return answer


async def test_bad_records_are_refused_by_every_node(swarm, autojump_clock):
    nodes = await swarm.grow(N)
    rogue = swarm.net.add_peer()
    await swarm.nursery.start(rogue.serve)
    now = wall_clock()
    good = sign_record(rogue.identity, user_key("good"), codec.pack(1), now + 60)
    forged = good.to_wire() | {"value": codec.pack(2)}
    expired = sign_record(rogue.identity, user_key("old"), codec.pack(1), now - 1)
    oversize = sign_record(rogue.identity, user_key("big"),
                           codec.pack(b"x" * (RecordLimits().max_value_bytes + 1)), now + 60)
    far = sign_record(rogue.identity, user_key("far"), codec.pack(1), now + 30 * 86400)
    cases = [(forged, "bad_signature"), (expired.to_wire(), "expired"),
             (oversize.to_wire(), "too_large"), (far.to_wire(), "too_large")]
    for node in nodes:
        # each from its own sender: a forged record also gets its sender penalized
        for record, reason in cases:
            sender = swarm.net.add_peer()
            await swarm.nursery.start(sender.serve)
            answer = await _raw_request(swarm, sender, node.peer_id, "PUT_VALUE", record=record)
            assert answer.body == {"ok": False, "reason": reason}
            assert node.penalties.is_penalized(sender.peer_id, trio.current_time()) == (
                reason == "bad_signature")
        answer = await _raw_request(swarm, rogue, node.peer_id, "PUT_VALUE", record=good.to_wire())
        assert answer.body == {"ok": True, "reason": ""}
    for node in nodes:
        assert node.statistics()["rejected"] == {"bad_signature": 1, "expired": 1, "too_large": 2}
        assert [r.unpack_value() for r in await node.get(user_key("good"))] == [1]
        for key in ("old", "big", "far"):
            assert await node.get(user_key(key)) == []


async def test_a_peer_sending_garbage_is_counted_and_dropped(swarm, autojump_clock):
    nodes = await swarm.grow(8)
    victim = nodes[2]
    rogue = swarm.net.add_peer()
    await swarm.nursery.start(rogue.serve)
    # the rogue first looks like a good server...
    answer = await _raw_request(swarm, rogue, victim.peer_id, "PING")
    assert answer.type == "PING" and answer.response
    stream = await rogue.open_stream(victim.peer_id, PROTOCOL_ID)
    await send_frame(stream, make_message(
        "PING", 1, False, PeerInfo(rogue.peer_id, (), Mode.SERVER)).to_wire())
    await recv_frame(stream)
    assert rogue.peer_id in victim.table
    # ...then sends a frame that is not a message
    await send_frame(stream, {"type": "PING", "id": "not an int"})
    await trio.testing.wait_all_tasks_blocked()
    assert rogue.peer_id not in victim.table
    assert victim.statistics()["rejected"]["malformed_message"] == 1

    # a responder answering with garbage is dropped by the requester too
    async def garbage(stream):
        await recv_frame(stream)
        await stream.write(b"\x00\x00\x00\x03\xc1\xc1\xc1")

    rogue.set_stream_handler(PROTOCOL_ID, garbage)
    victim.table.observe(rogue.peer_id, Mode.SERVER, trio.current_time())
    await victim.find_closest_peers(7)
    assert rogue.peer_id not in victim.table
    assert victim.statistics()["rejected"]["malformed_message"] == 2


async def test_forged_records_in_answers_are_dropped_and_blamed(swarm, autojump_clock):
    nodes = await swarm.grow(6)
    liar, reader = nodes[1], nodes[4]
    # a key the liar is among the closest to, so the reader's get asks it
    key = next(k for k in (user_key(f"lie-{i}") for i in range(1000))
               if liar.peer_id in reader.table.closest(key_hash(k), 2))
    # the liar stores a forged record behind its own validation's back
    record = sign_record(liar.identity, key, codec.pack("true"), wall_clock() + 60)
    forged = record.to_wire() | {"value": codec.pack("false")}
    liar.records.put(type(record)(**forged), wall_clock())  # the store does not validate
    assert await reader.get(key) == []
    assert reader.statistics()["rejected"]["bad_signature"] == 1
    assert liar.peer_id not in reader.table


async def test_churn_a_third_of_the_nodes_and_the_rest_still_find_records(swarm, autojump_clock):
    # a small replication factor so that churn really loses replicas and republishing
    # has to restore them
    config = DHTConfig(replication=4, republish_interval=300.0, refresh_interval=120.0)
    nodes = await swarm.grow(N, config=config)
    keys = [user_key(f"c{i}") for i in range(N)]
    for i, node in enumerate(nodes):
        await node.put(keys[i], i, ttl=3600)
    # kill the third of the nodes that hold the most replicas
    dead = set(sorted(range(N), key=lambda i: -len(nodes[i].records))[:N // 3])
    for i in dead:
        swarm.net.disconnect(nodes[i].peer_id)
    alive = [n for i, n in enumerate(nodes) if i not in dead]
    survivors = [i for i in range(N) if i not in dead]

    def replicas_missing(i):
        """Of the `replication` closest live nodes to key i, those without its record."""
        target = key_hash(keys[i])
        closest = sorted(alive, key=lambda n: peer_hash(n.peer_id) ^ target)
        return [n for n in closest[:config.replication]
                if not n.records.get(keys[i], wall_clock())]

    lost = [i for i in survivors if replicas_missing(i)]
    assert lost, "churn lost no replica: this test would not exercise republishing"
    await trio.sleep(config.republish_interval + 1)
    assert not [i for i in survivors if replicas_missing(i)]
    for reader in alive:
        for i in survivors:
            got = await reader.get(keys[i])
            assert [r.unpack_value() for r in got] == [i], (reader.peer_id, i)
    for node in alive:
        assert not any(nodes[i].peer_id in node.table for i in dead)


async def test_client_mode_peers_never_enter_routing_tables(swarm, autojump_clock):
    servers = await swarm.grow(N)
    clients = [await swarm.add(config=DHTConfig(mode=Mode.CLIENT)) for _ in range(4)]
    for c in clients:
        assert not c.statistics()["joined"]
        await c.bootstrap([servers[0].peer_id])
        assert len(c.table) >= 10 and c.statistics()["joined"]
        await c.put(user_key(f"from-{c.peer_id}"), "hi", ttl=600)
    await trio.testing.wait_all_tasks_blocked()  # clients publish their peer records
    for s in servers:
        await s.refresh()
    for c in clients:
        for s in servers[::5]:
            assert [r.unpack_value() for r in await s.get(user_key(f"from-{c.peer_id}"))] == ["hi"]
    await clients[0].get(user_key(f"from-{clients[1].peer_id}"))
    for node in servers + clients:
        assert not any(c.peer_id in node.table for c in clients)
    # a client is still found by id through its signed peer record
    assert await servers[5].find_peer(clients[2].peer_id) == []
    assert await servers[5].get(peer_key(clients[2].peer_id))
    # a server that loses reachability turns client and leaves the tables of the peers
    # it talks to
    turned = servers[7]
    assert sum(turned.peer_id in s.table for s in servers) >= 10
    turned.set_mode(Mode.CLIENT)
    await turned.refresh()
    for s in servers:
        if s is not turned:
            await turned.request(s.peer_id, "PING")
    assert not any(turned.peer_id in s.table for s in servers)


async def test_providers_and_peer_routing(swarm, autojump_clock):
    nodes = await swarm.grow(N)
    for p in nodes[3:6]:
        await p.provide("blob-abc")
    found = await nodes[20].find_providers("blob-abc")
    assert sorted(p.peer_id for p in found) == sorted(n.peer_id for n in nodes[3:6])
    assert await nodes[20].find_providers("blob-none") == []
    # find a peer that is not in our table: someone on the way names it
    seeker, stranger = nodes[11], nodes[17]
    seeker.table.remove(stranger.peer_id)
    assert await seeker.find_peer(stranger.peer_id) == []  # memnet: no addresses
    with pytest.raises(PeerNotFound):
        await seeker.find_peer(Identity.generate().peer_id)


async def test_restarted_node_rejoins_from_its_state_and_republishes(swarm, autojump_clock):
    nodes = await swarm.grow(N)
    old = nodes[9]
    await old.put(user_key("persisted"), "still here", ttl=3600)
    await old.provide("model-1")
    state = old.export_state()
    identity = old.identity
    # crash it, and let every other node forget its records
    swarm.net.disconnect(old.peer_id)
    for n in nodes:
        n.records.clear()
        n.providers.clear()
    assert await nodes[0].get(user_key("persisted")) == []
    # restart: same identity, new process, no bootstrap peers given
    del swarm.net.peers[identity.peer_id]
    swarm.net.reconnect(identity.peer_id)
    fresh = await swarm.add(peer=swarm.net.add_peer(identity), state=state)
    assert len(fresh.table) >= 10
    assert await fresh.bootstrap([]) >= 10
    await trio.testing.wait_all_tasks_blocked()
    assert [r.unpack_value() for r in await nodes[0].get(user_key("persisted"))] == ["still here"]
    assert [p.peer_id for p in await nodes[0].find_providers("model-1")] == [fresh.peer_id]


async def test_a_node_whose_bootstrap_peer_is_down_joins_when_it_comes_back(
        swarm, autojump_clock):
    nodes = await swarm.grow(8)
    seed = nodes[0]
    swarm.net.disconnect(seed.peer_id)
    late = await swarm.add()
    assert await late.bootstrap([seed.peer_id]) == 0
    assert not late.statistics()["joined"]
    # the seed restarts a minute later: the newcomer is in well before the 10 min refresh
    await trio.sleep(60)
    swarm.net.reconnect(seed.peer_id)
    started = trio.current_time()
    with trio.fail_after(120):
        while not late.statistics()["joined"]:
            await trio.sleep(1)
    assert trio.current_time() - started <= 64  # the retry backs off to 64 s at most here
    assert len(late.table) >= 8
    assert late.peer_id in {p for n in nodes[1:] for p in n.table.peers()}


async def test_statistics_report_the_table_mode_and_traffic(swarm, autojump_clock):
    nodes = await swarm.grow(4)
    stats = nodes[0].statistics()
    assert stats["mode"] == "server"
    assert stats["routing_table_size"] == 3
    assert stats["requests_in"]["PING"] == 3  # one bootstrap ping from each joiner
    assert stats["inflight_out"] == 0 and stats["inbound_streams"] <= 3
    assert nodes[3].statistics()["requests_out"]["FIND_NODE"] > 0
    assert nodes[3].statistics()["rejected"] == {}


async def test_what_a_get_costs(swarm, autojump_clock):
    nodes = await swarm.grow(N)
    writer, reader = nodes[2], nodes[9]
    ours = peer_hash(reader.peer_id)

    def rank(key):
        """How many of the reader's known peers are closer to ``key`` than it is."""
        target = key_hash(key)
        return sum(peer_hash(p) ^ target < ours ^ target for p in reader.table.peers())

    def gets_sent():
        return reader.statistics()["requests_out"].get("GET_VALUE", 0)

    keys = [user_key(f"key-{i}") for i in range(1000)]
    far = next(k for k in keys if rank(k) >= reader.config.replication)
    near = next(k for k in keys if rank(k) < 2)
    mid = next(k for k in keys if 3 <= rank(k) < reader.config.replication)

    # not a replica: the quorum closest answer
    await writer.put(far, "far", ttl=600)
    before = gets_sent()
    assert [r.unpack_value() for r in await reader.get(far)] == ["far"]
    assert gets_sent() - before == 3

    # a replica holding the record answers from its store at once...
    await writer.put(mid, "mid", ttl=600)
    before = gets_sent()
    assert [r.unpack_value() for r in await reader.get(mid)] == ["mid"]
    assert gets_sent() == before
    # ...and asks the quorum in the background, once per refresh interval
    await trio.testing.wait_all_tasks_blocked()
    assert gets_sent() - before == 3
    await reader.get(mid)
    await trio.testing.wait_all_tasks_blocked()
    assert gets_sent() - before == 3

    # a replica among the quorum closest whose store missed the put: its own (empty)
    # store is one answer of the quorum, and it keeps what the others hold
    await writer.put(near, "near", ttl=600)
    assert reader.records.drop(near) == 1
    before = gets_sent()
    assert [r.unpack_value() for r in await reader.get(near)] == ["near"]
    assert gets_sent() - before == 2
    assert reader.records.get(near, wall_clock())


async def test_a_miss_at_the_quorum_widens_the_get_and_repairs_the_replicas(swarm, autojump_clock):
    nodes = await swarm.grow(N)
    writer = nodes[0]
    key = user_key("scarce")
    put = await writer.put(key, "here", ttl=600)
    # the reader is the node farthest from the key; every replica but the farthest one
    # within its k closest loses the record (as if their stores had failed)
    target = key_hash(key)
    order = sorted(nodes, key=lambda n: peer_hash(n.peer_id) ^ target)
    reader = next(n for n in reversed(order) if n is not writer)
    within_k = [n for n in order if n is not reader][:reader.config.k]
    keeper = [n for n in within_k if n.peer_id in put.stored_at][-1]
    assert order.index(keeper) > 3  # well outside the quorum
    for n in nodes:
        if n is not keeper:
            n.records.drop(key)
    before = reader.statistics()["requests_out"].get("GET_VALUE", 0)
    got = await reader.get(key)
    assert [r.unpack_value() for r in got] == ["here"]
    assert reader.statistics()["requests_out"].get("GET_VALUE", 0) - before > 3  # beyond the quorum
    # the quorum closest replicas that answered empty-handed got the record back
    await trio.testing.wait_all_tasks_blocked()
    closest = sorted((n for n in nodes if n is not reader),
                     key=lambda n: peer_hash(n.peer_id) ^ target)[:3]
    assert all(n.records.get(key, wall_clock()) for n in closest)


async def test_a_stream_that_fails_to_open_is_tried_again_and_the_peer_kept(swarm, autojump_clock):
    nodes = await swarm.grow(8)
    writer, flaky = nodes[0], {n.peer_id for n in nodes[1:4]}
    await trio.sleep(writer.config.pool_idle_timeout + 1)  # the put opens fresh streams
    real_open = writer.network.open_stream
    refused: list[str] = []

    async def open_stream(peer_id, protocol, *, route=True):
        # the first stream to each flaky peer dies in negotiation (a connection that
        # closed under it); the next one is fine
        if peer_id in flaky and peer_id not in refused:
            refused.append(peer_id)
            raise StreamClosedError("connection closed while negotiating")
        return await real_open(peer_id, protocol, route=route)

    writer.network.open_stream = open_stream
    put = await writer.put(user_key("stubborn"), "v", ttl=600)
    assert sorted(refused) == sorted(flaky)
    # the lookup kept them, the put stored at them, the table still holds them
    assert flaky <= set(put.stored_at) and len(put.stored_at) == 7
    assert all(p in writer.table for p in flaky)
    assert writer.statistics()["open_retries"] == 3


async def test_a_lookup_answers_by_its_deadline_when_every_peer_stalls(swarm, autojump_clock):
    # Peers that accept a request and never answer: each costs request_timeout, and a
    # lookup that waited for them round after round could keep a user waiting for
    # minutes. By lookup_timeout it answers with what it has.
    config = DHTConfig(request_timeout=5.0, lookup_timeout=8.0)
    nodes = await swarm.grow(N, config=config)
    writer = nodes[2]
    put = await writer.put(user_key("k"), "v", ttl=600)
    reader = next(n for n in nodes if n.peer_id in put.stored_at)

    for node in nodes:
        if node is not reader:
            swarm.net.stall(node.peer_id)
    started = trio.current_time()
    got = await reader.get_result(user_key("k"), fresh=True)
    assert trio.current_time() - started == pytest.approx(8.0, abs=0.5)
    # what the reader held itself (a replica of the record) is still the answer
    assert [r.unpack_value() for r in got.records] == ["v"]
    started = trio.current_time()
    put = await reader.put(user_key("k2"), "w", ttl=600)
    # nobody answered its lookup (the get's timeouts already dropped most stalled peers
    # from the table; the rest time out now): there is nowhere to store it yet, the
    # record stays ours and is republished
    assert trio.current_time() - started <= 8.0
    assert put.stored_at == [] and reader.statistics()["own_records"] == 1


# -- the handler boundary: a parser choking on peer input is the peer's fault ---------------

PEER_ERRORS = [ValueError, RecursionError, KeyError, OverflowError, TypeError]


@pytest.mark.parametrize("error", PEER_ERRORS)
@pytest.mark.parametrize("parser", ["parse_message", "validate_record"])
async def test_an_exception_inside_a_request_parser_cannot_escape_the_handler(
        swarm, autojump_clock, monkeypatch, parser, error):
    nodes = await swarm.grow(4)
    victim = nodes[1]
    rogue = swarm.net.add_peer()
    await swarm.nursery.start(rogue.serve)
    record = sign_record(rogue.identity, user_key("x"), codec.pack(1), wall_clock() + 60)

    def boom(*args, **kwargs):
        raise error("injected")

    monkeypatch.setattr(f"lattice.net.dht_server.{parser}", boom)
    with pytest.raises(StreamClosedError):  # the victim resets the stream
        await _raw_request(swarm, rogue, victim.peer_id, "PUT_VALUE", record=record.to_wire())
    monkeypatch.undo()
    assert victim.statistics()["rejected"] == {"malformed_message": 1}
    assert victim.penalties.is_penalized(rogue.peer_id, trio.current_time())
    with pytest.raises(StreamClosedError):  # refused for a while
        await _raw_request(swarm, rogue, victim.peer_id, "PING")
    # and everyone else is served as before
    await nodes[3].put(user_key("y"), "still here", ttl=60)
    assert [r.unpack_value() for r in await victim.get(user_key("y"))] == ["still here"]


@pytest.mark.parametrize("error", PEER_ERRORS)
async def test_an_exception_inside_the_answer_parser_blames_the_responder(
        swarm, autojump_clock, monkeypatch, error):
    nodes = await swarm.grow(6)
    asker, liar = nodes[0], nodes[3]
    real = parse_message

    def boom_on_the_liars_answers(raw):
        if raw.get("response") and raw["sender"]["peer_id"] == liar.peer_id:
            raise error("injected")
        return real(raw)

    monkeypatch.setattr("lattice.net.dht_client.parse_message", boom_on_the_liars_answers)
    lookup = await asker.find_closest_peers(peer_hash(liar.peer_id))
    monkeypatch.undo()
    assert liar.peer_id not in lookup.peers and liar.peer_id not in asker.table
    assert asker.statistics()["rejected"] == {"malformed_message": 1}
    assert len(lookup.peers) == 4  # all the others answered


# -- quotas: one peer, or one network of Sybils, cannot shut honest publishers out ---------


async def _flood(swarm, victim, network: str, senders: int, records_each: int):
    """Sybil senders on ``network`` (an IPv4 /24) PUT records of Sybil publishers under
    fresh keys; returns the answers' reasons, counted."""
    reasons: dict[str, int] = {}
    for s in range(senders):
        sender = swarm.net.add_peer()
        await swarm.nursery.start(sender.serve)
        swarm.ips[sender.peer_id] = f"{network}.{s + 1}"
        stream = await sender.open_stream(victim.peer_id, PROTOCOL_ID)
        for i in range(records_each):
            publisher = Identity.generate()
            record = sign_record(publisher, user_key(f"spam-{network}-{s}-{i}"), codec.pack(i),
                                 wall_clock() + 47 * 3600)
            msg = make_message("PUT_VALUE", i, False, PeerInfo(sender.peer_id, (), Mode.CLIENT),
                               record=record.to_wire())
            await send_frame(stream, msg.to_wire())
            answer = parse_message(await recv_frame(stream))
            reason = answer.body["reason"] or "stored"
            reasons[reason] = reasons.get(reason, 0) + 1
        await stream.close()
    return reasons


async def test_one_network_of_sybils_fills_only_its_quota(swarm, autojump_clock):
    config = DHTConfig(max_records_total=200, max_records_per_ip=50, max_records_per_publisher=5)
    victim, honest = await swarm.add(config=config), await swarm.add()
    swarm.ips[honest.peer_id] = "198.51.100.7"
    await honest.bootstrap([victim.peer_id])
    assert await _flood(swarm, victim, "203.0.113", senders=4, records_each=20) == {
        "stored": 50, "ip_quota": 30}
    put = await honest.put(user_key("honest"), "still room", ttl=60)
    assert victim.peer_id in put.stored_at
    stats = victim.statistics()
    assert stats["rejected"] == {"ip_quota": 30}
    assert stats["record_store"]["largest_source"] == 50
    assert stats["record_store"]["max_per_source"] == 50


async def test_a_full_store_still_takes_honest_publishers(swarm, autojump_clock):
    # attackers on 5 networks fill the store entirely; an honest publisher from a sixth
    # network evicts from the biggest
    config = DHTConfig(max_records_total=200, max_records_per_ip=60)
    victim, honest = await swarm.add(config=config), await swarm.add()
    swarm.ips[honest.peer_id] = "198.51.100.7"
    await honest.bootstrap([victim.peer_id])
    for n in range(5):
        await _flood(swarm, victim, f"203.0.{n}", senders=1, records_each=60)
    # each later network evicted from the biggest until the shares were even: 5 x 40
    assert len(victim.records) == 200
    assert victim.statistics()["rejected"] == {"store_full": 30}
    assert victim.statistics()["record_store"]["largest_source"] == 40
    for i in range(3):
        put = await honest.put(user_key(f"honest-{i}"), i, ttl=60)
        assert victim.peer_id in put.stored_at
    assert len(victim.records) == 200 and victim.statistics()["rejected"] == {"store_full": 30}


async def test_one_publisher_holds_at_most_its_quota_at_every_node(swarm, autojump_clock):
    config = DHTConfig(max_records_per_publisher=3)
    nodes = await swarm.grow(4, config=config)
    rogue = swarm.net.add_peer()
    await swarm.nursery.start(rogue.serve)
    answers = []
    for i in range(5):
        record = sign_record(rogue.identity, user_key(f"mine-{i}"), codec.pack(i), wall_clock() + 60)
        answer = await _raw_request(swarm, rogue, nodes[1].peer_id, "PUT_VALUE", record=record.to_wire())
        answers.append(answer.body["reason"])
    assert answers == ["", "", "", "publisher_quota", "publisher_quota"]


async def test_the_dhts_randomness_comes_only_from_its_rng(swarm, autojump_clock):
    """Request ids and refresh targets are drawn from the injected rng: two nodes seeded
    alike ask alike (a run can be replayed from its seed)."""
    listener = swarm.net.add_peer()
    await swarm.nursery.start(listener.serve)
    asked: dict[str, list[int]] = {}

    async def answer(stream):
        while (raw := await recv_frame_or_eof(stream)) is not None:
            request = parse_message(raw)
            asked.setdefault(stream.remote_peer_id, []).append(request.id)
            await send_frame(stream, make_message(
                request.type, request.id, True, PeerInfo(listener.peer_id, (), Mode.SERVER),
                **({"closer": []} if request.type == "FIND_NODE" else {})).to_wire())

    listener.set_stream_handler(PROTOCOL_ID, answer)
    seeded = []
    for _ in range(2):
        peer = swarm.net.add_peer()
        await swarm.nursery.start(peer.serve)
        dht = await swarm.nursery.start(partial(serve_dht, peer, peer.identity,
                                                wall_clock=wall_clock, rng=random.Random(3)))
        await dht.bootstrap([listener.peer_id])
        seeded.append(dht.peer_id)
    first, second = (asked[p][:2] for p in seeded)  # the bootstrap ping, the self lookup
    assert first == second and len(first) == 2
