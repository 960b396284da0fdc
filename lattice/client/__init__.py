"""The client library: talk to a local `latticed` over its RPC socket.

`lattice.connect()` gives a blocking client, `lattice.open_client()` its trio twin.
Both share `RpcSession` (pure request/response bookkeeping) and raise the exception
class chosen by the daemon's stable error code (`lattice.api.errors`).
"""

from lattice.client._session import DaemonNotRunningError as DaemonNotRunningError
from lattice.client._session import RpcSession as RpcSession
from lattice.client.async_client import AsyncClient as AsyncClient
from lattice.client.async_client import open_client as open_client
from lattice.client.sync_client import Client as Client
from lattice.client.sync_client import connect as connect
