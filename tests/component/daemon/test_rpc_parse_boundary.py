"""The local socket's parse boundary: whatever the frame decoder or a method's params
check raises on a client's bytes is that client's error (a closed connection, or
INVALID_PARAMS), counted, and the server serves every other client on."""

import struct

import msgpack
import pytest
import trio

import lattice
from lattice.api.framing import frame
from lattice.api.methods import METHODS, Method
from latticed.events import EventBus
from latticed.rpc_server import RpcServer

PEER_ERRORS = [ValueError, RecursionError, KeyError, OverflowError, TypeError, IndexError]


def make_server(path):
    async def status(client):
        return {"state": "running"}

    async def unused(client, **kw):
        raise AssertionError("not called")

    handlers = {name: unused for name in METHODS}
    handlers["status"] = status
    return RpcServer(path, handlers, EventBus(8), max_frame=1 << 20, max_clients=8)


async def _reply(stream: trio.SocketStream) -> list | None:
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk
    return msgpack.unpackb(buf[4:], raw=False)


@pytest.fixture
async def server(nursery, tmp_path):
    server = make_server(tmp_path / "s.sock")
    await nursery.start(server.serve)
    return server


@pytest.mark.parametrize("error", PEER_ERRORS)
async def test_a_decoder_that_chokes_closes_only_that_connection(server, monkeypatch, error):
    def boom(*args, **kwargs):
        raise error("injected")

    async with lattice.open_client(server.path) as bystander:
        monkeypatch.setattr("lattice.api.framing.unpack", boom)
        async with await trio.open_unix_socket(str(server.path)) as raw:
            await raw.send_all(frame([0, 1, "status", {}]))
            assert await _reply(raw) is None  # closed, nothing answered
        monkeypatch.undo()
        assert (await bystander.status())["state"] == "running"
    assert server.stats.unrecoverable_streams == 1 and server.stats.internal_errors == 0


@pytest.mark.parametrize("error", PEER_ERRORS)
async def test_a_params_check_that_chokes_is_invalid_params(server, monkeypatch, error):
    def boom(self, params):
        raise error("injected")

    monkeypatch.setattr(Method, "bind", boom)
    async with await trio.open_unix_socket(str(server.path)) as raw:
        await raw.send_all(frame([0, 7, "status", {}]))
        reply = await _reply(raw)
        assert reply[1] == 7 and reply[2]["name"] == "INVALID_PARAMS"
        monkeypatch.undo()
        await raw.send_all(frame([0, 8, "status", {}]))
        assert (await _reply(raw))[3] == {"state": "running"}  # the same connection serves on
    assert server.stats.invalid_params == 1 and server.stats.internal_errors == 0


async def test_deeply_nested_requests_are_a_parse_error(server):
    deep = b"\x94\x00\x01\xa6status" + b"\x91" * 1000 + b"\xc0"
    async with await trio.open_unix_socket(str(server.path)) as raw:
        await raw.send_all(struct.pack(">I", len(deep)) + deep)
        reply = await _reply(raw)
        assert reply[2]["name"] == "PARSE_ERROR" and "nested deeper" in reply[2]["message"]
        await raw.send_all(frame([0, 2, "status", {}]))
        assert (await _reply(raw))[3] == {"state": "running"}
    assert server.stats.parse_errors == 1
