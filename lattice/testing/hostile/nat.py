"""Hostile peers for the NAT protocols: the pieces to speak `/lattice/observe/1` and
`/lattice/holepunch/1` wrongly (or rightly, with lies in them) against a daemon.

Owns `open_hostile_node` (a bare py-libp2p host on loopback, our identity kit, none of
our services), one-exchange helpers that send any message or raw bytes and return what
came back, catalogs of malformed messages, and `Witness`, a TCP listener that counts
who knocked: the proof that a daemon did *not* dial an address an attacker named.
Must not import latticed; shipped so users can attack their own deployments too.
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from lattice.core import holepunch as hp
from lattice.core import reachability as rc
from lattice.core.codec import pack
from lattice.core.identity import Identity
from lattice.net.host import Libp2pNode, open_libp2p_node
from lattice.net.streams import PeerError, recv_frame_or_eof

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
SID = b"\x5a" * rc.OBSERVE_ID_BYTES


@asynccontextmanager
async def open_hostile_node(listen: str = LOOPBACK) -> AsyncIterator[Libp2pNode]:
    """A py-libp2p host with a fresh identity and no Lattice services at all."""
    async with open_libp2p_node(Identity.generate(), [listen]) as node:
        yield node


async def exchange(node: Libp2pNode, peer_id: str, protocol: str, messages: list[Any], *,
                   timeout: float = 15.0) -> list[Any] | None:
    """Open ``protocol`` to ``peer_id``, send each of ``messages`` (a message is packed
    and framed; ``bytes`` go out as they are), then read frames until the other side
    closes. The frames that came back, or None when it reset the stream on us (a reset
    that races the protocol negotiation fails the open itself: the same refusal)."""
    try:
        stream = await node.open_stream(peer_id, protocol)
    except PeerError:
        if not node.live_connections(peer_id):
            raise  # not a refusal: we are not connected at all
        return None
    replies: list[Any] = []
    try:
        with trio.fail_after(timeout):
            for m in messages:
                await stream.write(m if isinstance(m, bytes) else frame(m))
            await stream.close_write()
            while (reply := await recv_frame_or_eof(stream)) is not None:
                replies.append(reply)
    except PeerError:
        return None
    finally:
        await stream.close()
    return replies


async def observe(node: Libp2pNode, peer_id: str, message: Any) -> Any | None:
    """One `/lattice/observe/1` request; the answer, or None when the stream was reset."""
    replies = await exchange(node, peer_id, rc.OBSERVE_PROTOCOL_ID, [message])
    return None if not replies else replies[0]


def frame(message: Any) -> bytes:
    body = pack(message)
    return struct.pack(">I", len(body)) + body


def observe_request(*, dialback: list[list[Any]] | None = None, relay: bool = False,
                    sid: bytes = SID) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "observe", "id": sid, "relay": relay}
    if dialback is not None:
        msg["dialback"] = dialback
    return msg


def dialback_request(peer: Any, addrs: list[list[Any]], *, sid: bytes = SID) -> dict[str, Any]:
    """The forwarded dial-back of the old helper scheme: "dial ``peer`` at ``addrs``"."""
    return {"type": "dialback", "id": sid, "peer": peer, "addrs": addrs}


def holepunch_connect(*, addrs: list[list[Any]], reach: str = "private", nat: str = "cone",
                      sid: bytes = SID, rnd: int = 0, **extra: Any) -> dict[str, Any]:
    return {"type": "connect", "id": sid, "round": rnd, "reach": reach, "nat": nat,
            "addrs": addrs, **extra}


def deep(levels: int) -> Any:
    """A list nested ``levels`` deep: what a recursive parser chokes on."""
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


# Messages no honest peer sends. Each must cost the sender, never the daemon.
MALFORMED_OBSERVE: dict[str, Any] = {
    "not a map": [1, 2, 3],
    "no type": {"id": SID},
    "unknown type": {"type": "ping", "id": SID},
    "short id": {"type": "observe", "id": b"x"},
    "id not bytes": {"type": "observe", "id": "x" * rc.OBSERVE_ID_BYTES},
    "relay not a bool": {"type": "observe", "id": SID, "relay": "yes"},
    "dialback not a list": {"type": "observe", "id": SID, "dialback": {"a": 1}},
    "too many dialback addrs": observe_request(dialback=[["127.0.0.1", p] for p in range(1, 9)]),
    "deeply nested dialback": observe_request(dialback=deep(200)),
    "an answer as a request": {"type": "observed", "id": SID, "addr": None, "relays": []},
    "undecodable bytes": struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",
    "oversized frame": struct.pack(">I", rc.OBSERVE_MAX_MESSAGE + 1) + b"\x00" * 64,
}

MALFORMED_HOLEPUNCH: dict[str, Any] = {
    "not a map": "connect",
    "unknown reach": holepunch_connect(addrs=[], reach="everywhere"),
    "addrs not a list": holepunch_connect(addrs={"ip": "127.0.0.1"}),  # type: ignore[arg-type]
    "too many addrs": holepunch_connect(addrs=[["127.0.0.1", p] for p in range(1, hp.MAX_ADDRS + 2)]),
    "round out of range": holepunch_connect(addrs=[], rnd=hp.MAX_ROUNDS),
    "sync first": {"type": "sync", "id": SID, "round": 0, "plan": "punch"},
    "undecodable bytes": struct.pack(">I", 3) + b"\xc1\xc1\xc1",
}


class GarbageNoise:
    """A TCP listener that says it speaks Noise (multistream-select), then answers the
    dialer's first handshake message with random bytes: what a daemon that dials it
    (a dial-back, a punch) must survive. `serve` runs it; `answered` counts dialers."""

    def __init__(self, ip: str = "127.0.0.1") -> None:
        self.ip = ip
        self.port = 0
        self.answered = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.ip)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._lie, listeners)

    async def _lie(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                for _ in range(2):  # "/multistream/1.0.0\n", "/noise\n": echo each
                    line = await _read_varint_frame(stream)
                    await stream.send_all(_varint(len(line)) + line)
                length = int.from_bytes(await _read_exactly(stream, 2), "big")
                await _read_exactly(stream, length)  # the dialer's ephemeral key
                garbage = os.urandom(96)
                await stream.send_all(len(garbage).to_bytes(2, "big") + garbage)
                self.answered += 1
                await stream.receive_some(1)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass
        finally:
            await stream.aclose()

    @property
    def addr(self) -> list[Any]:
        return [self.ip, self.port]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def _read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


async def _read_varint_frame(stream: trio.SocketStream) -> bytes:
    n, shift = 0, 0
    while True:
        byte = (await _read_exactly(stream, 1))[0]
        n |= (byte & 0x7F) << shift
        if not byte & 0x80 or shift > 28:
            break
        shift += 7
    return await _read_exactly(stream, min(n, 1024))


class Witness:
    """A TCP listener on ``(ip, port 0)`` that accepts and counts every connection:
    nothing should ever knock on it. `serve` runs it; `knocks` says who did."""

    def __init__(self, ip: str = "127.0.0.2") -> None:
        self.ip = ip
        self.port = 0
        self.knocks: list[tuple[str, int]] = []

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.ip)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)

        async def knocked(stream: trio.SocketStream) -> None:
            self.knocks.append(stream.socket.getpeername()[:2])
            await stream.aclose()

        await trio.serve_listeners(knocked, listeners)

    @property
    def addr(self) -> list[Any]:
        return [self.ip, self.port]


__all__ = ["open_hostile_node", "exchange", "observe", "frame", "observe_request",
           "dialback_request", "holepunch_connect", "deep", "MALFORMED_OBSERVE",
           "MALFORMED_HOLEPUNCH", "Witness", "GarbageNoise"]
