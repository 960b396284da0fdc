"""The hostile-peer kit: pieces to speak Lattice's protocols wrongly against real
daemons, so you can check that your deployment refuses, counts and survives what a
hostile peer sends (`tests/adversary/` uses it against ours).

    from lattice.testing.hostile import open_hostile_peer, gossip_offer, nested_msgpack

    async with open_hostile_peer() as attacker:
        victim = await attacker.connect("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...")
        stream = await attacker.open(victim, "/lattice/gossip-avg/2")
        await stream.send_body(nested_msgpack(1000))
        assert await stream.drain() in ("reset", "eof")   # refused; the daemon serves on

`net`: the peer protocols and the local socket; `state`: the replicated state (see
its docstring). Point them only at daemons you run.
"""

from lattice.testing.hostile.net import HostilePeer as HostilePeer
from lattice.testing.hostile.net import HostileStream as HostileStream
from lattice.testing.hostile.net import arrays_header as arrays_header
from lattice.testing.hostile.net import closed_by_peer as closed_by_peer
from lattice.testing.hostile.net import flood_dht as flood_dht
from lattice.testing.hostile.net import frame_bytes as frame_bytes
from lattice.testing.hostile.net import gossip_offer as gossip_offer
from lattice.testing.hostile.net import kad_request as kad_request
from lattice.testing.hostile.net import local_socket_garbage as local_socket_garbage
from lattice.testing.hostile.net import nested_msgpack as nested_msgpack
from lattice.testing.hostile.net import open_hostile_peer as open_hostile_peer
from lattice.testing.hostile.net import open_idle_connections as open_idle_connections
from lattice.testing.hostile.net import send_to_local_socket as send_to_local_socket
from lattice.testing.hostile.net import sybil_records as sybil_records
