"""One peer filled a daemon's DHT store (20,000 records) in ~10 s with records of Sybil
publishers, and honest publishers then got `store_full` for up to 48 h. Now one source
network gets at most its quota, a full store evicts from the biggest network first,
and an honest publisher's put is stored.

Loopback stands in for the Internet: 127.0.1.2, 127.0.2.2... are other /24s than the
honest daemons' 127.0.0.1, so each attacker counts as another source network."""

from __future__ import annotations

import time

import pytest

from lattice.testing.hostile import flood_dht, open_hostile_peer, sybil_records

from .conftest import assert_alive, call, running

pytestmark = pytest.mark.adversary

SMALL_STORE = {"LATTICE_DHT_MAX_RECORDS_TOTAL": "300", "LATTICE_DHT_MAX_RECORDS_PER_IP": "100"}


async def _victim_and_honest(daemons):
    v = daemons(env=SMALL_STORE)
    status = await running(v)
    h = daemons("--bootstrap", f"{status['advertised_addrs'][0]}/p2p/{status['peer_id']}")
    await running(h)
    return v, status, h


async def _flood_from(network: int, v, status, count: int):
    """A hostile peer on 127.0.<network>.2, dialed by the victim (so its connection
    comes from there), sends ``count`` Sybil records."""
    async with open_hostile_peer(listen=f"/ip4/127.0.{network}.2/tcp/0") as attacker:
        await call(v, "peers.connect", addr=attacker.addrs()[0])
        return await flood_dht(attacker, status["peer_id"],
                               sybil_records(count, now=time.time(), prefix=f"spam{network}"))


async def test_one_network_fills_only_its_quota_and_honest_puts_are_stored(daemons):
    v, status, h = await _victim_and_honest(daemons)
    assert await _flood_from(1, v, status, 150) == {"stored": 100, "ip_quota": 50}
    put = await call(h, "dht.put", key="honest", value="still room", ttl=600.0)
    assert put["stored_at"] == 1  # at the victim, the only other node
    dht = (await call(v, "status"))["dht"]
    assert dht["record_store"]["largest_source"] == 100
    assert dht["record_store"]["max_per_source"] == 100
    assert dht["rejected"]["ip_quota"] == 50
    assert_alive(v)


async def test_a_full_store_still_takes_an_honest_publisher(daemons):
    v, status, h = await _victim_and_honest(daemons)
    floods = [await _flood_from(n, v, status, 100) for n in (1, 2, 3, 4)]
    assert [f["stored"] for f in floods] == [100, 100, 100, 75]  # the 4th evened the shares
    assert (await call(v, "status"))["dht"]["record_store"]["stored"] == 300
    put = await call(h, "dht.put", key="honest", value="evicts the biggest", ttl=600.0)
    assert put["stored_at"] == 1
    got = await call(h, "dht.get", key="honest", fresh=True)
    assert [r["value"] for r in got["records"]] == ["evicts the biggest"]
    assert_alive(v)
