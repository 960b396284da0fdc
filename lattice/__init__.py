"""Lattice: a peer-to-peer decentralized compute network.

`import lattice` gives the client library for a local `latticed`:

    client = lattice.connect()            # blocking
    client.status(); client.peers()
    async with lattice.open_client() as c:  # trio
        await c.status()
"""

from lattice.api.errors import LatticeError as LatticeError
from lattice.client import AsyncClient as AsyncClient
from lattice.client import Client as Client
from lattice.client import DaemonNotRunningError as DaemonNotRunningError
from lattice.client import connect as connect
from lattice.client import open_client as open_client

__all__ = ["AsyncClient", "Client", "DaemonNotRunningError", "LatticeError", "connect",
           "open_client"]
