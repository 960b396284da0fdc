"""A hostile peer against a real daemon's `/lattice/holepunch/1` (issue 11): malformed
exchanges cost the sender and never the daemon, and nobody can make a daemon dial the
addresses it names by asking for a "punch" over a direct connection.
"""

from __future__ import annotations

import pytest

from lattice.core import holepunch as hp
from lattice.testing.hostile.nat import (
    MALFORMED_HOLEPUNCH,
    SID,
    Witness,
    exchange,
    holepunch_connect,
    open_hostile_node,
)

from .conftest import status

pytestmark = pytest.mark.integration




async def test_asking_for_a_punch_over_a_direct_connection_dials_nothing(daemon, nursery):
    witness = await nursery.start(Witness().serve)
    st = await status(daemon)
    async with open_hostile_node() as evil:
        await evil.connect(st["advertised_addrs"][0])
        replies = await exchange(evil, st["peer_id"], hp.PROTOCOL_ID, [
            holepunch_connect(addrs=[witness.addr]),
            {"type": "sync", "id": SID, "round": 0, "plan": "punch"}])
    assert not replies  # refused (reset): a punch upgrades a relayed connection only
    assert witness.knocks == []
    punch = (await status(daemon))["reachability"]["holepunch"]
    assert punch["refused_direct"] == 1 and punch["direct"] == punch["failed"] == 0


async def test_malformed_exchanges_leave_the_daemon_running(daemon):
    st = await status(daemon)
    async with open_hostile_node() as evil:
        await evil.connect(st["advertised_addrs"][0])
        for name, message in MALFORMED_HOLEPUNCH.items():
            assert not await exchange(evil, st["peer_id"], hp.PROTOCOL_ID, [message]), name
    assert daemon.proc.poll() is None, daemon.log_text()
    assert (await status(daemon))["state"] == "running"
