"""One peer, one stream of garbage, against a real daemon: for each protocol anyone can
open (gossip averaging, blobs, the DHT), malformed frames are refused, counted and
penalized, and the daemon serves on. Before, one 1,000-level list on
`/lattice/gossip-avg/1` made the daemon exit (v1; the protocol is v2 now)."""

from __future__ import annotations

import time

import pytest

from lattice.core.gossip_messages import PROTOCOL as GOSSIP_PROTOCOL
from lattice.core.identity import Identity
from lattice.core.kademlia import PROTOCOL_ID as KAD
from lattice.core.records import sign_record, user_key
from lattice.testing.hostile import (
    gossip_offer,
    kad_request,
    nested_msgpack,
    open_hostile_peer,
)

from .conftest import assert_alive, call, eventually

pytestmark = pytest.mark.adversary

GOSSIP = GOSSIP_PROTOCOL  # /lattice/gossip-avg/2
BLOB = "/lattice/blob/1"
JOB = "0" * 32
BID = "a" * 64
DEEP = nested_msgpack(1000)


def _deep_value_record(now: float) -> dict:
    # validly signed, but its value nests 1,000 levels deep
    return sign_record(Identity.generate(), user_key("deep"), DEEP, now + 60).to_wire()


# (protocol, what, how): how(stream, attacker) sends it
ATTACKS = [
    (GOSSIP, "a 1,000-level list", lambda s, a: s.send_body(DEEP)),
    (GOSSIP, "not msgpack", lambda s, a: s.send_body(b"\xc1\xc1\xc1")),
    (GOSSIP, "a list, not a message", lambda s, a: s.send_frame([1, 2, 3])),
    (GOSSIP, "transports as a string", lambda s, a: s.send_frame(gossip_offer(JOB, transports="framed"))),
    (GOSSIP, "an xid that is a list", lambda s, a: s.send_frame(gossip_offer(JOB, xid=["x"] * 50))),
    (GOSSIP, "samples as a bool", lambda s, a: s.send_frame(gossip_offer(JOB, samples=True))),
    (GOSSIP, "a 4 GiB length", lambda s, a: s.send(b"\xff\xff\xff\xff" + bytes(64))),
    (BLOB, "a 1,000-level list", lambda s, a: s.send_body(DEEP)),
    (BLOB, "an id that is a list", lambda s, a: s.send_frame({"t": "get", "v": 1, "rid": 1, "id": [BID] * 9,
                                                              "offset": 0, "length": 1})),
    (BLOB, "a rid that is a string", lambda s, a: s.send_frame({"t": "have", "v": 1, "rid": "1", "id": BID})),
    (BLOB, "an offset past 2^63", lambda s, a: s.send_frame({"t": "get", "v": 1, "rid": 1, "id": BID,
                                                             "offset": 2**64 - 1, "length": 1})),
    (KAD, "a 1,000-level list", lambda s, a: s.send_body(DEEP)),
    (KAD, "a sender that is not its peer", lambda s, a: s.send_frame(kad_request("PING", Identity.generate().peer_id))),
    (KAD, "a target of 3 bytes", lambda s, a: s.send_frame(kad_request("FIND_NODE", a.peer_id, target=b"abc"))),
    (KAD, "a key that is a list", lambda s, a: s.send_frame(kad_request("GET_VALUE", a.peer_id, key=[["k"]] * 30))),
    (KAD, "a record whose value nests 1,000 deep",
     lambda s, a: s.send_frame(kad_request("PUT_VALUE", a.peer_id, record=_deep_value_record(time.time())))),
]


@pytest.mark.parametrize("protocol, what, attack", ATTACKS, ids=[f"{p.split('/')[2]}: {w}" for p, w, _ in ATTACKS])
async def test_a_malformed_stream_is_refused_and_the_daemon_serves_on(victim, protocol, what, attack):
    status = await call(victim, "status")
    before = await _counters(victim)
    async with open_hostile_peer() as attacker:
        await attacker.connect(status["advertised_addrs"][0] + "/p2p/" + status["peer_id"])
        stream = await attacker.open(status["peer_id"], protocol)
        await attack(stream, attacker)
        if protocol == KAD and what.startswith("a record"):
            # a bad record is answered ok=false (and its sender penalized)
            assert (await stream.recv_frame())["reason"] == "malformed"
        else:
            assert await stream.drain() in ("reset", "eof")
    assert_alive(victim)
    after = await eventually(lambda: _counters_changed(victim, before), f"{what} to be counted", 10)
    assert after[protocol] == before[protocol] + 1
    assert (await call(victim, "status"))["state"] == "running"


async def _counters(d) -> dict[str, int]:
    """Per protocol, how many malformed inputs the daemon counted (and penalized)."""
    jobs = await call(d, "jobs.stats")
    dht = (await call(d, "status"))["dht"]
    return {GOSSIP: jobs["gossip"]["penalties"].get("protocol", 0),
            BLOB: jobs["blobs"].get("bad_requests", 0),
            KAD: sum(dht["rejected"].get(r, 0) for r in ("malformed_message", "malformed"))}


async def _counters_changed(d, before):
    now = await _counters(d)
    return now if now != before else None
