"""Each method's declared access is enforced: a client with read access only (a member
of `rpc.read_group`) may call read methods and subscribe, and gets PERMISSION_DENIED for
a write method, counted; a process with neither our uid nor the group is refused."""

import os

import pytest
import trio

import lattice
from lattice.api.errors import PermissionDeniedError
from lattice.api.methods import METHODS, WRITE
from latticed.events import EventBus
from latticed.rpc_server import RpcServer


def make_server(path, **kw):
    calls = []

    async def handler(client, **params):
        calls.append(client.access)
        return {"ok": True}

    server = RpcServer(path, {name: handler for name in METHODS}, EventBus(4),
                       max_frame=1 << 20, max_clients=4, **kw)
    return server, calls


async def test_a_read_only_client_reads_but_may_not_write(tmp_path):
    # we are not an owner here, only a member of the read group (our own gid)
    server, calls = make_server(tmp_path / "s.sock", owner_uids=frozenset({12345}),
                                read_gid=os.getgid())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert (tmp_path / "s.sock").stat().st_mode & 0o777 == 0o660
        async with lattice.open_client(tmp_path / "s.sock") as client:
            assert await client.status() == {"ok": True}
            writes = [m for m in METHODS.values() if m.access == WRITE]
            assert writes, "the table declares write methods"
            for m in writes:
                with pytest.raises(PermissionDeniedError, match="read access only"):
                    await client.call(m.name, **{p.name: "x" for p in m.params if p.required})
        assert calls == ["read"]
        assert server.stats.refused_access == len(writes)
        nursery.cancel_scope.cancel()


async def test_a_process_neither_owner_nor_in_the_read_group_is_refused(tmp_path):
    server, calls = make_server(tmp_path / "s.sock", owner_uids=frozenset({12345}))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert (tmp_path / "s.sock").stat().st_mode & 0o777 == 0o600
        async with lattice.open_client(tmp_path / "s.sock") as client:
            with pytest.raises(PermissionDeniedError, match="may not use this daemon"):
                await client.status()
        assert calls == [] and server.stats.refused_credentials == 1
        nursery.cancel_scope.cancel()


async def test_our_own_uid_has_write_access(tmp_path):
    server, calls = make_server(tmp_path / "s.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with lattice.open_client(tmp_path / "s.sock") as client:
            await client.call("dht.put", key="k", value=1)
        assert calls == ["write"]
        nursery.cancel_scope.cancel()
