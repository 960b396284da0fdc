"""A hostile peer against a real daemon's `/lattice/observe/1` (issue 11): it cannot kill
the daemon, cannot aim its dial-backs at anyone but itself, and pays for garbage.

The attacker is a bare py-libp2p host (`lattice.testing.hostile.nat`) on loopback; the
daemon a real `latticed` process. A `Witness` listener on 127.0.0.2 stands for the
third party an attacker would like the daemon to dial: it must never be knocked on.
"""

from __future__ import annotations

import pytest

from lattice.testing.daemons import DaemonProc
from lattice.testing.hostile.nat import (
    MALFORMED_OBSERVE,
    GarbageNoise,
    Witness,
    dialback_request,
    observe,
    observe_request,
    open_hostile_node,
)

from .conftest import status

pytestmark = pytest.mark.integration




async def attach(d: DaemonProc):
    """(hostile node context, the daemon's peer id, its address)."""
    st = await status(d)
    return st["peer_id"], st["advertised_addrs"][0]


@pytest.mark.parametrize("peer", ["x", "", "/ip4/127.0.0.2/tcp/1", "1" * 128, 42, None])
async def test_a_dialback_naming_garbage_as_peer_leaves_the_daemon_running(daemon, peer, nursery):
    witness = await nursery.start(Witness().serve)
    pid, addr = await attach(daemon)
    async with open_hostile_node() as evil:
        await evil.connect(addr)
        reply = await observe(evil, pid, dialback_request(peer, [witness.addr]))
    assert daemon.proc.poll() is None, daemon.log_text()
    assert reply is None or reply["status"] == "busy"
    st = await status(daemon)
    assert st["state"] == "running"
    assert witness.knocks == []


async def test_an_unsolicited_dialback_is_never_dialed(daemon, nursery):
    # the old helper scheme: "dial this peer at these addresses" from anyone
    witness = await nursery.start(Witness().serve)
    pid, addr = await attach(daemon)
    async with open_hostile_node() as evil:
        await evil.connect(addr)
        reply = await observe(evil, pid, dialback_request(evil.peer_id, [witness.addr]))
    assert reply["type"] == "dialback_result" and reply["status"] == "busy"
    # the reply comes after any dial the daemon would have made
    assert witness.knocks == []
    assert (await status(daemon))["reachability"]["statistics"]["unsolicited_dialbacks"] == 1


async def test_a_dialback_of_another_ip_than_the_requesters_is_refused(daemon, nursery):
    witness = await nursery.start(Witness().serve)  # 127.0.0.2; the attacker is at .1
    pid, addr = await attach(daemon)
    async with open_hostile_node() as evil:
        await evil.connect(addr)
        reply = await observe(evil, pid, observe_request(dialback=[witness.addr]))
    assert reply["type"] == "observed" and reply["dialback"]["status"] == "refused"
    assert witness.knocks == []


async def test_a_dialback_of_the_requesters_own_address_is_made(daemon):
    # the control: what the rule allows still works, on a fresh connection
    pid, addr = await attach(daemon)
    async with open_hostile_node() as peer:
        await peer.connect(addr)
        ip, port = peer.listen_endpoint()
        reply = await observe(peer, pid, observe_request(dialback=[[ip, port]]))
        again = await observe(peer, pid, observe_request(dialback=[[ip, port]]))
    assert reply["dialback"]["status"] == "ok" and reply["dialback"]["helper"] == pid
    assert reply["dialback"]["addr"] == [ip, port]
    # at most one per second per requester: no amplification by repetition
    assert again["dialback"]["status"] == "refused"


async def test_a_dial_back_answered_with_garbage_noise_fails_and_nothing_else(daemon, nursery):
    # the requester's own IP, but what listens there answers the Noise handshake with
    # random bytes: the AEAD's InvalidTag once escaped py-libp2p's upgrader raw
    liar = await nursery.start(GarbageNoise().serve)
    pid, addr = await attach(daemon)
    async with open_hostile_node() as evil:
        await evil.connect(addr)
        reply = await observe(evil, pid, observe_request(dialback=[liar.addr]))
    assert liar.answered == 1
    assert reply["dialback"]["status"] == "failed" and reply["dialback"]["error"] == "handshake"
    assert daemon.proc.poll() is None, daemon.log_text()
    assert (await status(daemon))["state"] == "running"


async def test_malformed_requests_cost_the_sender_and_the_daemon_serves_on(daemon):
    pid, addr = await attach(daemon)
    async with open_hostile_node() as evil, open_hostile_node() as honest:
        await evil.connect(addr)
        await honest.connect(addr)
        for name, message in MALFORMED_OBSERVE.items():
            assert await observe(evil, pid, message) is None, name  # reset, no answer
        assert daemon.proc.poll() is None, daemon.log_text()
        # the sender is penalized: even a well-formed request is refused for a while
        assert await observe(evil, pid, observe_request()) is None
        answer = await observe(honest, pid, observe_request())
    assert answer["type"] == "observed" and answer["addr"][0] == "127.0.0.1"
    reach = (await status(daemon))["reachability"]
    # the first malformed one penalized it; the rest were refused unread
    assert reach["statistics"]["malformed"] >= 1
    assert reach["penalties"]["penalized_now"] >= 1
