"""The local API speaks standard msgpack-RPC: a client nobody here wrote (pynvim's
msgpack-RPC session layer, the one Neovim's Python clients use) calls methods with
positional params and receives subscription notifications."""

import socket

import msgpack
import pytest
from pynvim.msgpack_rpc import socket_session

pytestmark = pytest.mark.integration


def test_an_off_the_shelf_msgpack_rpc_client_calls_and_subscribes(daemons):
    d = daemons()
    running = d.wait_running()
    session = socket_session(str(d.socket))
    try:
        status = session.request("status")
        assert status["peer_id"] == running["peer_id"]
        info = session.request("api.info")
        assert "status" in {m["name"] for m in info["methods"]}
        # positional params, in the order proto/local-rpc.json lists them
        assert session.request("state.get", "members")[running["peer_id"]]["alive"] in (True, False)
        sub = session.request("subscribe", ["daemon"])
        assert sub["topics"] == ["daemon"]
        kind, name, args = session.next_message()
        assert (kind, name) == ("notification", "event")
        assert args[0]["topic"] == "daemon" and args[0]["event"] == "snapshot"
        assert args[0]["subscription"] == sub["subscription"]
        # a typed error arrives as msgpack-RPC's error object, with its stable code
        with pytest.raises(Exception) as e:
            session.request("jobs.get", "nope")
        assert "NOT_FOUND" in str(e.value)
    finally:
        session.close()
    stats = d.client().status()["rpc"]
    assert stats["plain_connections"] >= 1


def test_a_garbled_plain_stream_is_told_why_and_closed_while_others_are_served(daemons):
    d = daemons()
    d.wait_running()
    bystander = d.client()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(d.socket))
    s.sendall(b"\x94\x00\x01\xc1")  # an array, then a byte msgpack never uses
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    s.close()
    msg = msgpack.unpackb(reply, raw=False)
    # Neovim's error shape for plain-stream clients: [code, "NAME: message"]
    assert msg[0] == 1 and msg[2][0] == 1 and msg[2][1].startswith("PARSE_ERROR: ")
    assert bystander.status()["rpc"]["unrecoverable_streams"] == 1
