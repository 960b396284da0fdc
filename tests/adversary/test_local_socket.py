"""Garbage on the local RPC socket, from the kit: every piece is answered with a typed
error or a closed connection, counted, and neither the daemon nor another client
notices."""

from __future__ import annotations

import struct

import msgpack
import pytest

import lattice
from lattice.testing.hostile import local_socket_garbage, send_to_local_socket

from .conftest import assert_alive

pytestmark = pytest.mark.adversary

TYPED = {"PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS",
         "INVALID_ARGUMENT", "FRAME_TOO_LARGE"}


COUNTERS = ("parse_errors", "invalid_requests", "unknown_methods", "invalid_params",
            "oversized_frames", "unrecoverable_streams")
COUNTED = {  # what each piece of garbage is counted as in status()["rpc"]
    "not msgpack": "parse_errors", "nested 1000 deep": "parse_errors",
    "nested params": "parse_errors", "ext type": "parse_errors", "int map key": "parse_errors",
    "not a request": "invalid_requests", "id not an int": "invalid_requests",
    "unknown method": "unknown_methods", "params ill-typed": "invalid_params",
    "length 4 GiB": "unrecoverable_streams",
    "truncated": None,  # the client hung up mid-frame: nothing to answer, nothing wrong yet
}


def _replies(data: bytes) -> list:
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        out.append(msgpack.unpackb(data[4:4 + n], raw=False))
        data = data[4 + n:]
    return out


@pytest.mark.parametrize("what, garbage", list(local_socket_garbage()),
                         ids=[w for w, _ in local_socket_garbage()])
async def test_garbage_gets_a_typed_error_or_a_closed_connection(victim, what, garbage):
    async with lattice.open_client(victim.socket) as bystander:
        before = (await bystander.status())["rpc"]
        for reply in _replies(await send_to_local_socket(victim.socket, garbage)):
            assert reply[0] == 1 and reply[3] is None and reply[2]["name"] in TYPED, reply
        after = (await bystander.status())["rpc"]
        assert after["internal_errors"] == before["internal_errors"] == 0
        changed = {k: after[k] - before[k] for k in COUNTERS if after[k] != before[k]}
        assert changed == ({COUNTED[what]: 1} if COUNTED[what] else {})
        assert (await bystander.status())["state"] == "running"
    assert_alive(victim)
