"""The handler boundary of `/lattice/observe/1` and `/lattice/holepunch/1` (issue 11):
an exception of any type raised while parsing a peer's message is that peer's fault.
It is counted and penalized, and it never escapes the handler (which would end the
daemon): the node keeps serving other peers. Likewise the relay's HOP handler, whose
reservations py-libp2p serves.

In-process py-libp2p hosts on loopback with the real connectivity manager; the
exception is injected into the parser the handler calls.
"""

from __future__ import annotations

import functools
import logging

import pytest
import trio

from lattice.core import holepunch as hp
from lattice.core import reachability as rc
from lattice.core.identity import Identity
from lattice.net.host import open_libp2p_node, quiet_libp2p_logging
from lattice.net.nat import NatConfig, serve_nat
from lattice.testing.hostile.nat import exchange, holepunch_connect, observe, observe_request

pytestmark = pytest.mark.integration


async def _run_node(config: NatConfig, bootstrap: list[str], *, task_status) -> None:
    async with open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as node:
        async with trio.open_nursery() as nursery:
            manager = await nursery.start(functools.partial(
                serve_nat, node, config=config, bootstrap=bootstrap))
            task_status.started((node, manager))
            await trio.sleep_forever()


@pytest.fixture
def nodes(nursery):
    quiet_libp2p_logging(logging.WARNING)

    async def make(*, config: NatConfig = NatConfig(), bootstrap=()):
        return await nursery.start(_run_node, config, list(bootstrap))

    return make


def addr(node) -> str:
    return f"{node.listen_addrs()[0]}/p2p/{node.peer_id}"


def raise_once(monkeypatch, module, name, error):
    original = getattr(module, name)
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, fake)
    return calls


@pytest.mark.parametrize("error", [KeyError("addrs"), RecursionError("too deep"),
                                   TypeError("unhashable"), ZeroDivisionError()])
async def test_an_exception_in_observe_parsing_is_the_peers_fault(nodes, monkeypatch, error):
    server, server_nat = await nodes(config=NatConfig(max_observers=0))
    evil, _ = await nodes(config=NatConfig(max_observers=0), bootstrap=[addr(server)])
    honest, _ = await nodes(config=NatConfig(max_observers=0), bootstrap=[addr(server)])
    calls = raise_once(monkeypatch, rc, "decode_observe", error)
    assert await observe(evil, server.peer_id, observe_request()) is None
    answer = await observe(honest, server.peer_id, observe_request())
    assert answer["type"] == "observed" and len(calls) == 2
    st = server_nat.status()
    assert st["statistics"]["malformed"] == 1
    assert st["penalties"]["penalized_now"] == 1
    # penalized: refused without reading its message
    assert await observe(evil, server.peer_id, observe_request()) is None
    assert len(calls) == 2


@pytest.mark.parametrize("error", [KeyError("addrs"), RecursionError("too deep"),
                                   IndexError()])
async def test_an_exception_in_holepunch_parsing_is_the_peers_fault(nodes, monkeypatch, error):
    relay, _ = await nodes(config=NatConfig(relay_service="on"))
    private = NatConfig(reachability="private")  # on loopback all would be public
    b, b_nat = await nodes(config=private, bootstrap=[addr(relay)])
    a, a_nat = await nodes(config=private, bootstrap=[addr(relay)])
    with trio.fail_after(10):
        while relay.peer_id not in b_nat.reservations:
            await trio.sleep(0.01)  # another process's progress: nothing to wait on
    calls = raise_once(monkeypatch, hp, "decode_view", error)
    # a dials b through the relay; b opens a session; a's parse of b's connect raises
    await a_nat.connect(f"{addr(relay)}/p2p-circuit/p2p/{b.peer_id}", timeout=5)
    with trio.fail_after(10):
        while a_nat.peer_info(b.peer_id) is None:
            await trio.sleep(0.01)
    record = a_nat.peer_info(b.peer_id)
    assert record["outcome"] == "failed" and "protocol error" in record["reason"]
    punch = a_nat.status()["holepunch"]
    assert punch["malformed"] == 1 and punch["penalties"]["penalized_now"] == 1
    assert len(calls) == 1
    # a serves on: the relayed connection works, and another peer's exchange is read
    assert a.connection_kind(b.peer_id) == "relayed"
    c, _ = await nodes()
    await c.connect(addr(a))
    replies = await exchange(c, a.peer_id, hp.PROTOCOL_ID, [holepunch_connect(addrs=[])])
    assert not replies  # direct: refused, by the handler
    assert a_nat.status()["holepunch"]["refused_direct"] >= 1


async def test_a_reserve_naming_another_peer_reserves_for_the_sender_and_the_relay_lives_on(
        nodes):
    # py-libp2p reserved for whatever peer the message named, then read the reservation
    # back, found that peer unconnected, and raised from its error path (a NetStream
    # method that does not exist): the exception ended the relay's host, and its daemon.
    from libp2p.peer.id import ID
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
    from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    from lattice.net.nat.reservations import hop_status

    relay, relay_nat = await nodes(config=NatConfig(relay_service="on"))
    evil, _ = await nodes(bootstrap=[addr(relay)])
    with trio.fail_after(10):
        while relay.peer_id not in evil.connected_peers():
            await trio.sleep(0.01)  # another task's progress: nothing to wait on
    stranger = ID.from_base58(Identity.generate().peer_id)
    for _ in range(2):
        stream = await evil.host.new_stream(ID.from_base58(relay.peer_id), [HOP])
        with trio.fail_after(10):
            await write_delimited_msg(stream, HopMessage(
                type=HopMessage.RESERVE, peer=CircuitPeerId(id=stranger.to_bytes())))
            answer = await read_delimited_msg(stream, HopMessage)
        assert hop_status(answer) == StatusCode.OK
    hop = relay_nat.relay
    assert hop.resource_manager.get_reservation(ID.from_base58(evil.peer_id)) is not None
    assert hop.resource_manager.get_reservation(stranger) is None
    assert relay_nat.status()["relay_service"]["reservations"] == 1
