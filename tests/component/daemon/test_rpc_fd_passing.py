"""Descriptors passed with a request (SCM_RIGHTS) reach that request's handler; more
than `max_fds` unclaimed, or from a read-only client, are closed at once and counted;
unclaimed ones are closed with the connection, whose close hooks then run."""

import os
import stat

import trio
import trio.testing

import lattice
from lattice.api.methods import METHODS
from latticed.events import EventBus
from latticed.rpc_server import RpcServer


def make_server(path, **kw):
    seen = {"fds": [], "clients": [], "closed": 0}

    async def handler(client, **params):
        seen["clients"].append(client)
        fd = client.take_fd()
        if fd is not None:
            st = os.fstat(fd)
            seen["fds"].append((st.st_ino, stat.S_ISREG(st.st_mode)))
            os.close(fd)

            def closed():
                seen["closed"] += 1
            client.on_close(closed)
        return {"ok": True}

    server = RpcServer(path, {name: handler for name in METHODS}, EventBus(4),
                       max_frame=1 << 20, max_clients=4, **kw)
    return server, seen


def memfd():
    fd = os.memfd_create("t")
    os.ftruncate(fd, 8)
    return fd


async def test_a_passed_fd_reaches_its_handler_and_close_hooks_run(tmp_path):
    server, seen = make_server(tmp_path / "s.sock")
    fd = memfd()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)

        def call():
            with lattice.connect(tmp_path / "s.sock") as c:
                c.call_passing_fds("status", [fd])
                c.call("status")  # nothing passed: the handler finds no fd
        await trio.to_thread.run_sync(call)
        await trio.testing.wait_all_tasks_blocked()
        assert seen["fds"] == [(os.fstat(fd).st_ino, True)]
        assert seen["closed"] == 1  # the connection ended: its hooks ran
        assert server.stats.fds_received == 1 and server.stats.fds_refused == 0
        nursery.cancel_scope.cancel()
    os.close(fd)


async def test_surplus_and_unclaimed_fds_are_closed(tmp_path):
    server, seen = make_server(tmp_path / "s.sock", max_fds=2)
    fds = [memfd() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)

        def call():
            with lattice.connect(tmp_path / "s.sock") as c:
                c.call_passing_fds("api.info", fds)  # the handler claims one of three
        await trio.to_thread.run_sync(call)
        await trio.testing.wait_all_tasks_blocked()
        client = seen["clients"][0]
        assert len(seen["fds"]) == 1 and not client.fds  # the rest closed with the connection
        # at most max_fds kept: with a buffer sized for 2, the kernel drops the third
        assert server.stats.fds_received == 2
        nursery.cancel_scope.cancel()
    for fd in fds:
        os.close(fd)


async def test_a_read_only_client_cannot_pass_fds(tmp_path):
    server, seen = make_server(tmp_path / "s.sock", owner_uids=frozenset({12345}),
                               read_gid=os.getgid())
    fd = memfd()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)

        def call():
            with lattice.connect(tmp_path / "s.sock") as c:
                c.call_passing_fds("status", [fd])
        await trio.to_thread.run_sync(call)
        assert seen["fds"] == [] and server.stats.fds_refused == 1
        nursery.cancel_scope.cancel()
    os.close(fd)
