"""64 idle TCP connections took every handshake slot of a daemon's bulk side channel
(for 10 s each, renewable at will). Now one source network holds at most
`max_handshakes_per_ip` slots, idle connections are dropped after `hello_timeout`,
and a connection from elsewhere still gets its hello read."""

from __future__ import annotations

import pytest
import trio

from lattice.core.bulk_frames import CHANNEL_HELLO_BYTES, CHANNEL_MAGIC
from lattice.testing.hostile import closed_by_peer, open_idle_connections

from .conftest import assert_alive, call, eventually, running

pytestmark = pytest.mark.adversary


async def _bulk(v) -> dict:
    return (await call(v, "status"))["bulk"]


async def test_idle_connections_from_one_network_cannot_shut_the_side_channel(daemons):
    v = daemons()
    await running(v)
    (host, port), = (await _bulk(v))["addresses"]
    async with open_idle_connections(host, port, 64, local_ip="127.0.1.2") as idle:
        bulk = await eventually(
            lambda: _settled(v, 64), "the listener to see all 64 connections", 10)
        assert bulk["handshaking"] == bulk["max_handshakes_per_ip"] == 4
        assert bulk["refused_ip_busy"] == 60
        # someone else still gets a slot: its hello is read (and refused: no such session)
        conn = await trio.open_tcp_stream(host, port)
        async with conn:
            await conn.send_all(CHANNEL_MAGIC + bytes(CHANNEL_HELLO_BYTES - len(CHANNEL_MAGIC)))
            assert await closed_by_peer(conn, timeout=10)
        assert (await _bulk(v))["unknown_session"] == 1
        # and the idle ones are dropped after the hello timeout (3 s)
        assert all([await closed_by_peer(c, timeout=10) for c in idle])
        assert (await _bulk(v))["hello_timeouts"] == 4
    assert_alive(v)


async def _settled(v, total: int):
    bulk = await _bulk(v)
    return bulk if bulk["handshaking"] + bulk["refused_ip_busy"] + bulk["refused_busy"] >= total else None
