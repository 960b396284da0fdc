"""The libp2p host tells every subscriber when a peer's first connection comes up and
its last one goes down (`PeerNetwork.peer_events`), the same events the in-memory
network gives; services learn of peers this way and no other."""

from __future__ import annotations

import logging

import pytest
import trio

from lattice.core.identity import Identity
from lattice.net.host import open_libp2p_node, quiet_libp2p_logging

pytestmark = pytest.mark.integration  # real sockets, real time


async def next_event(events):
    with trio.fail_after(10):
        return await events.__aiter__().__anext__()


async def test_both_ends_hear_a_connection_come_and_go():
    quiet_libp2p_logging(logging.WARNING)
    async with open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as a, \
            open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as b:
        with a.peer_events() as a_events, b.peer_events() as b_events:
            await a.connect(f"{b.listen_addrs()[0]}/p2p/{b.peer_id}")
            ev = await next_event(a_events)
            assert (ev.kind, ev.peer_id, ev.direction) == ("connected", b.peer_id, "outbound")
            assert not ev.relayed and "/tcp/" in ev.addr
            ev = await next_event(b_events)
            assert (ev.kind, ev.peer_id, ev.direction) == ("connected", a.peer_id, "inbound")
            await a.connect(f"{b.listen_addrs()[0]}/p2p/{b.peer_id}")  # no news: no event
            await a.host.disconnect(b.host.get_id())
            ev = await next_event(a_events)
            assert (ev.kind, ev.peer_id) == ("disconnected", b.peer_id)
            assert a.events.statistics()["dropped"] == 0
