"""The relay path of `lattice.net.nat` on loopback, no root needed: reservations, relayed
dialing by peer id, the relay's limits and refusals, and a hole-punch exchange that
decides to stay relayed when nobody observed a public address.

Real py-libp2p hosts in one trio run on 127.0.0.1 (real time: conditions of the real
network are polled with deadlines). The namespace suite (test_nat_daemons.py) covers
the NAT cases themselves.
"""

from __future__ import annotations

import functools
import logging
import random

import pytest
import trio

from lattice.core.identity import Identity
from lattice.net.host import DialError, is_relayed, open_libp2p_node, quiet_libp2p_logging
from lattice.net.nat import NatConfig, serve_nat
from lattice.net.streams import ADDED, CONNECTED, PeerError, recv_frame, send_frame

pytestmark = pytest.mark.integration

ECHO = "/test/echo/1"
# On loopback every daemon is reachable (a dial-back always lands), hence public, and
# a public daemon holds no reservations: the NATed side of each case is set private.
PRIVATE = NatConfig(reachability="private")


async def poll(predicate, timeout: float = 10.0):
    with trio.fail_after(timeout):
        while not (value := predicate()):
            await trio.sleep(0.01)
    return value


async def _run_node(config: NatConfig, bootstrap: list[str], rng: random.Random, *,
                    task_status) -> None:
    """One host with the connectivity manager, inside its own task (its nurseries and
    contexts open and close there)."""
    async with open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as node:
        async def echo(stream):
            await send_frame(stream, await recv_frame(stream))

        node.set_stream_handler(ECHO, echo)
        async with trio.open_nursery() as nursery:
            manager = await nursery.start(functools.partial(
                serve_nat, node, config=config, bootstrap=bootstrap, rng=rng))
            task_status.started((node, manager))
            await trio.sleep_forever()


@pytest.fixture
def nodes(nursery, lattice_seed):
    """``await nodes(config=..., bootstrap=...) -> (node, NatManager)``; each manager's
    rng (session ids, backoff jitter) derives from the test's seed."""
    quiet_libp2p_logging(logging.WARNING)
    seeds = random.Random(lattice_seed)

    async def make(*, config: NatConfig = NatConfig(), bootstrap=()):
        rng = random.Random(seeds.getrandbits(64))
        return await nursery.start(_run_node, config, list(bootstrap), rng)

    return make


def addr(node) -> str:
    return f"{node.listen_addrs()[0]}/p2p/{node.peer_id}"


async def test_reserve_then_reach_by_peer_id_through_the_relay(nodes):
    relay, relay_nat = await nodes(config=NatConfig(relay_service="on"))
    b, b_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    a, a_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    await poll(lambda: relay.peer_id in b_nat.reservations)
    res = b_nat.status()["reservations"]
    assert res[0]["addr"] == f"{addr(relay)}/p2p-circuit/p2p/{b.peer_id}"
    assert relay_nat.status()["relay_service"]["reservations"] >= 1

    assert await a_nat.connect(b.peer_id, timeout=5) == b.peer_id
    assert a.connection_kind(b.peer_id) == "relayed"
    stream = await a.open_stream(b.peer_id, ECHO)
    await send_frame(stream, {"hello": 1})
    assert await recv_frame(stream) == {"hello": 1}
    # nobody observed a public address on loopback: b decides to stay relayed, says why
    record = await poll(lambda: b_nat.peer_info(a.peer_id))
    assert record["outcome"] == "relayed" and "no observed public address" in record["reason"]
    assert a.connection_kind(b.peer_id) == "relayed"
    row = next(r for r in a.connections() if r["peer_id"] == b.peer_id)
    assert row["connection"] == "relayed"
    assert relay_nat.status()["relay_service"]["circuits"] == 1


async def test_a_relayed_connection_beside_a_direct_one_is_retired(nodes):
    # Not every direct connection comes from a hole punch: a NATed b may dial a public
    # a itself (its DHT does) just as a reaches b through a relay. With no punch to
    # finish, the relayed connection must still go: the relay carries nothing after.
    relay, relay_nat = await nodes(config=NatConfig(relay_service="on"))
    b, b_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    a, a_nat = await nodes()
    await poll(lambda: relay.peer_id in b_nat.reservations)
    await a.connect(addr(b), timeout=5)
    await a_nat.connect(f"{addr(relay)}/p2p-circuit/p2p/{b.peer_id}", timeout=5)
    await poll(lambda: relay_nat.status()["relay_service"]["circuits"] == 0, timeout=15)
    # each end notices the circuit's close in its own time
    await poll(lambda: not any(is_relayed(c) for c in a.live_connections(b.peer_id))
               and not any(is_relayed(c) for c in b.live_connections(a.peer_id)))
    assert a.connection_kind(b.peer_id) == "direct" == b.connection_kind(a.peer_id)


async def test_a_second_connection_to_a_peer_is_an_added_peer_event(nodes):
    # The connectivity manager learns of a peer's second connection (a punched direct
    # one, or a relayed one racing a direct dial) from the node's peer events: a peer's
    # first connection is "connected", one beside it "added", saying which kind it is.
    relay, _ = await nodes(config=NatConfig(relay_service="on"))
    b, b_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    a, a_nat = await nodes(config=NatConfig(holepunch=False))
    await poll(lambda: relay.peer_id in b_nat.reservations)
    with a.peer_events() as events:
        await a.connect(addr(b), timeout=5)
        await a_nat.connect(f"{addr(relay)}/p2p-circuit/p2p/{b.peer_id}", timeout=5)
        seen = []
        with trio.fail_after(10):
            async for ev in events:
                if ev.peer_id == b.peer_id:
                    seen.append((ev.kind, ev.relayed))
                if len(seen) == 2:
                    break
    assert seen == [(CONNECTED, False), (ADDED, True)]


async def test_a_circuit_address_dials_through_that_relay(nodes):
    relay, _ = await nodes(config=NatConfig(relay_service="on"))
    b, b_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    a, a_nat = await nodes()
    await poll(lambda: b_nat.reservations)
    circuit = b_nat.advertised_addrs()[-1]
    assert "/p2p-circuit/" in circuit
    assert await a_nat.connect(circuit, timeout=5) == b.peer_id
    assert a.connection_kind(b.peer_id) == "relayed"


async def test_relay_refuses_beyond_its_circuit_limit_and_when_not_serving(nodes):
    relay, relay_nat = await nodes(config=NatConfig(relay_service="on", relay_max_circuits=1))
    off, _ = await nodes(config=NatConfig(relay_service="off"))
    b, b_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay), addr(off)])
    a, a_nat = await nodes()
    c, c_nat = await nodes()
    await poll(lambda: relay.peer_id in b_nat.reservations)
    # the relay that does not serve refused b's reservation
    assert off.peer_id not in b_nat.reservations
    await a_nat.connect(f"{addr(relay)}/p2p-circuit/p2p/{b.peer_id}", timeout=5)
    with pytest.raises(DialError, match="RESOURCE_LIMIT_EXCEEDED"):
        await c_nat.connect(f"{addr(relay)}/p2p-circuit/p2p/{b.peer_id}", timeout=5)
    with pytest.raises(DialError, match="PERMISSION_DENIED"):
        await c_nat.connect(f"{addr(off)}/p2p-circuit/p2p/{b.peer_id}", timeout=5)
    assert relay_nat.status()["relay_service"]["refused"]["circuit_limit"] == 1


async def test_unknown_peer_with_no_route_fails_with_reasons(nodes):
    a, a_nat = await nodes()
    with pytest.raises(DialError, match="no address or relay known"):
        await a_nat.connect(Identity.generate().peer_id, timeout=2)
    with pytest.raises(DialError, match="not a dialable multiaddr or peer id"):
        await a_nat.connect("not-a-peer", timeout=2)


async def test_closing_one_circuit_leaves_the_sources_other_circuits_alone(nodes):
    # py-libp2p's relay cleaned up by peer id: a's second circuit died with its first
    relay, relay_nat = await nodes(config=NatConfig(relay_service="on"))
    b, b_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    c, c_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    a, a_nat = await nodes()
    await poll(lambda: b_nat.reservations and c_nat.reservations)
    await a_nat.connect(f"{addr(relay)}/p2p-circuit/p2p/{b.peer_id}", timeout=5)
    await a_nat.connect(f"{addr(relay)}/p2p-circuit/p2p/{c.peer_id}", timeout=5)
    await poll(lambda: relay_nat.status()["relay_service"]["circuits"] == 2)
    for conn in a.live_connections(b.peer_id):
        await conn.close()
    await poll(lambda: relay_nat.status()["relay_service"]["circuits"] == 1)
    stream = await a.open_stream(c.peer_id, ECHO)
    await send_frame(stream, {"still": "here"})
    assert await recv_frame(stream) == {"still": "here"}
    assert relay_nat.status()["relay_service"]["bytes_relayed"] > 0


async def test_an_idle_circuit_ends_at_its_duration_limit(nodes):
    relay, relay_nat = await nodes(config=NatConfig(relay_service="on",
                                                    relay_max_circuit_duration_s=1))
    b, b_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    a, a_nat = await nodes()
    await poll(lambda: b_nat.reservations)
    await a_nat.connect(f"{addr(relay)}/p2p-circuit/p2p/{b.peer_id}", timeout=5)
    await poll(lambda: not a.live_connections(b.peer_id), timeout=5)
    assert relay_nat.status()["relay_service"]["circuits_cut"]["duration"] >= 1


async def test_reachability_changes_are_announced_after_one_peers_dial_back(nodes):
    # on loopback an inbound connection is observed at our own listen port; the first
    # peer to connect dials it back (no third daemon needed: the lone public bootstrap)
    relay, relay_nat = await nodes(config=NatConfig(relay_service="on"))
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            got = []

            async def watch():
                while not got or got[-1].reachability != "public":
                    got.append(await relay_nat.wait_reachability_change())

            n.start_soon(watch)
            first, _ = await nodes(bootstrap=[addr(relay)])
    # first the NAT kind (observations came in: none), then the dial-back's verdict
    assert [(v.reachability, v.nat) for v in got] == [("unknown", "none"), ("public", "none")]
    assert relay_nat.status()["reason"].startswith(f"dial-back by {first.peer_id[-8:]}")


async def test_reservations_are_refreshed_before_they_expire_and_remade_after_a_drop(nodes):
    relay, _ = await nodes(config=NatConfig(relay_service="on", relay_reservation_ttl_s=4))
    b, b_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    first = (await poll(lambda: b_nat.reservations.get(relay.peer_id))).expires
    # refreshed with half the TTL left (a short TTL must not mean refreshing nonstop)
    await poll(lambda: b_nat.reservations.get(relay.peer_id) is not None
               and b_nat.reservations[relay.peer_id].expires > first, timeout=5)
    assert b_nat.keeper.made == 2
    for conn in b.live_connections(relay.peer_id):
        await conn.close()  # a reservation lives only as long as the relay connection
    await poll(lambda: b_nat.keeper.made >= 3 and relay.peer_id in b_nat.reservations)


async def test_an_idle_manager_waits_instead_of_polling(nodes):
    # b dialed a, so b's observation carries an ephemeral port: b has no address a
    # dial-back could test, and its reachability probe can never start. The observe
    # loop must then sleep until something changes, not wake every 50 ms to look
    # (which took half a core per daemon in a 24-daemon network).
    a, a_nat = await nodes()
    b, b_nat = await nodes(bootstrap=[addr(a)])
    await poll(lambda: a.peer_id in b_nat.observations and b.peer_id in a_nat.observations)
    await poll(lambda: not a_nat.observer._observing and not b_nat.observer._observing
               and not a_nat.observer.probing and not b_nat.observer.probing)
    looks = {"a": 0, "b": 0}

    def counting(name, manager):
        original = manager.observer._direct_peers

        def direct_peers():
            looks[name] += 1
            return original()
        return direct_peers

    a_nat.observer._direct_peers = counting("a", a_nat)
    b_nat.observer._direct_peers = counting("b", b_nat)
    await trio.sleep(2.0)  # the window in which an idle loop is watched
    # a few looks are due: both are short of relays and re-ask their observer with a
    # doubling backoff; polling every 50 ms would be about 40
    assert looks["a"] <= 8 and looks["b"] <= 8, looks


async def test_both_ends_initiating_at_once_settle_on_one_session(nodes):
    # Two daemons that dial each other through relays at the same instant each accept
    # a relayed connection, so each starts a session. Without a tie-break each refuses
    # the other's ("busy") and both record a failure; one session must go on instead.
    relay, _ = await nodes(config=NatConfig(relay_service="on"))
    b, b_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    a, a_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    await poll(lambda: relay.peer_id in b_nat.reservations)
    await a_nat.connect(f"{addr(relay)}/p2p-circuit/p2p/{b.peer_id}", timeout=5)
    await poll(lambda: b_nat.peer_info(a.peer_id))  # b's own session, as the acceptor
    for _ in range(3):
        a_nat.puncher.request(b.peer_id)
        b_nat.puncher.request(a.peer_id)
        await poll(lambda: not a_nat.puncher.statistics()["active"]
                   and not b_nat.puncher.statistics()["active"])
        for nat, other in ((a_nat, b), (b_nat, a)):
            record = nat.peer_info(other.peer_id)
            assert record["outcome"] == "relayed", record
            assert "no observed public address" in record["reason"]
    assert a_nat.puncher.counts["failed"] == b_nat.puncher.counts["failed"] == 0
    assert a.connection_kind(b.peer_id) == "relayed"


async def test_a_service_stream_reaches_a_peer_by_id_through_a_relay(nodes):
    # What jobs, blobs and state sync rely on: opening a stream to a peer we hold no
    # connection to, and no address of, goes the way `lattice peers connect` goes.
    relay, _ = await nodes(config=NatConfig(relay_service="on"))
    b, b_nat = await nodes(config=PRIVATE, bootstrap=[addr(relay)])
    a, _ = await nodes(bootstrap=[addr(relay)])
    await poll(lambda: relay.peer_id in b_nat.reservations)
    assert not a.live_connections(b.peer_id) and not a.get_addrs(b.peer_id)
    stream = await a.open_stream(b.peer_id, ECHO)
    await send_frame(stream, {"via": "relay"})
    assert await recv_frame(stream) == {"via": "relay"}
    assert a.connection_kind(b.peer_id) == "relayed"
    # the DHT opts out: a server is reached at its addresses or not at all
    c, _ = await nodes()
    with pytest.raises(PeerError):
        await a.open_stream(c.peer_id, ECHO, route=False)
