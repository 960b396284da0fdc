"""Speak Lattice's peer protocols wrongly, on purpose: the network half of the
hostile-peer kit (`lattice.testing.hostile`).

Owns an attacker's libp2p host (`open_hostile_peer` -> `HostilePeer`) whose streams
write anything (`HostileStream`: raw bytes, frames of any value, frames whose length
lies), and builders for what an attacker sends: nested msgpack, forged tensor headers
(`/lattice/gossip-avg/2`, `/lattice/bulk/2`), Kademlia requests and Sybil record spam
(`/lattice/kad/1`), blob requests (`/lattice/blob/1`), floods of idle side-channel
connections, and garbage for the local RPC socket. Everything here is for testing
deployments you run: point it at your own daemons (`lattice.testing.daemons`).

Must not import libp2p itself: the host comes from `lattice.net.host`. The builders
are pure; the coroutines use trio.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from lattice.core import codec
from lattice.core.identity import Identity
from lattice.core.kademlia import PROTOCOL_ID as KAD_PROTOCOL
from lattice.core.records import Record, sign_record, user_key
from lattice.net.streams import PeerError, Stream, StreamClosedError, read_exactly

__all__ = [
    "HostilePeer",
    "HostileStream",
    "arrays_header",
    "closed_by_peer",
    "flood_dht",
    "frame_bytes",
    "gossip_offer",
    "kad_request",
    "local_socket_garbage",
    "nested_msgpack",
    "open_hostile_peer",
    "open_idle_connections",
    "send_to_local_socket",
    "sybil_records",
]

_LEN = struct.Struct(">I")


# -- bytes a parser must survive ------------------------------------------------------


def nested_msgpack(depth: int, *, leaf: bytes = b"\xc0") -> bytes:
    """A msgpack value of ``depth`` nested one-element arrays (``[[[...nil...]]]``): 2 KB
    for 1,000 levels, enough to overflow anything that walks it recursively."""
    return b"\x91" * depth + leaf


def frame_bytes(body: bytes, *, declared: int | None = None) -> bytes:
    """One length-prefixed frame (4-byte big-endian length + body) whose declared length
    is ``declared`` when given: lie about it to test truncation and oversize handling."""
    return _LEN.pack(len(body) if declared is None else declared) + body


# -- a stream that writes anything ---------------------------------------------------------


class HostileStream:
    """One stream to a victim, with no protocol rules: write what you like, read what
    comes back. Wraps any `lattice.net.streams.Stream` (libp2p or memnet)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.remote_peer_id = stream.remote_peer_id

    async def send(self, data: bytes) -> None:
        """Raw bytes, as they are."""
        await self.stream.write(data)

    async def send_frame(self, message: Any) -> None:
        """A well-formed frame holding any msgpack value (well-formed or not for the
        protocol)."""
        await self.stream.write(frame_bytes(codec.pack(message)))

    async def send_body(self, body: bytes, *, declared: int | None = None) -> None:
        """A frame around raw ``body`` bytes (garbage msgpack, `nested_msgpack`...),
        optionally declaring another length."""
        await self.stream.write(frame_bytes(body, declared=declared))

    async def recv_frame(self, *, max_bytes: int = 1 << 20) -> Any:
        """The victim's next frame, decoded; raises `StreamClosedError` when it hung up."""
        (length,) = _LEN.unpack(await read_exactly(self.stream, _LEN.size))
        if length > max_bytes:
            raise ValueError(f"the victim sent a frame of {length} bytes")
        return codec.unpack(await read_exactly(self.stream, length), max_bytes=max_bytes)

    async def drain(self, *, timeout: float = 10.0) -> str:
        """Read until the victim ends the stream: "eof", "reset", or "open" if it is
        still open after ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            try:
                while await self.stream.read(1 << 16):
                    pass
                return "eof"
            except StreamClosedError:
                return "reset"
        return "open"

    async def close(self) -> None:
        await self.stream.close()

    async def reset(self) -> None:
        await self.stream.reset()


# -- an attacker's host ---------------------------------------------------------------------


@dataclass
class HostilePeer:
    """A libp2p host (TCP + Noise + Yamux, as our daemons speak) that follows no
    protocol: it opens any stream and writes anything on it. Get one from
    `open_hostile_peer`."""

    node: Any  # lattice.net.host.Libp2pNode
    identity: Identity

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def addrs(self) -> list[str]:
        """Where victims can dial us (``/ip4/.../tcp/.../p2p/<our id>``): make a daemon
        dial us (``peers connect``) so that its connection sees our listen address."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.node.listen_addrs()]

    async def connect(self, addr: str) -> str:
        """Dial a victim at ``addr`` (ending in /p2p/<peer id>); returns its peer id."""
        return await self.node.connect(addr)

    async def open(self, peer_id: str, protocol: str) -> HostileStream:
        """A raw stream for ``protocol`` to a peer we are connected to."""
        return HostileStream(await self.node.open_stream(peer_id, protocol, route=False))

    def serve(self, protocol: str, handler: Callable[[HostileStream], Awaitable[None]]) -> None:
        """Answer ``protocol`` ourselves (a lying responder): ``handler`` gets each
        inbound stream as a `HostileStream`."""
        async def wrapped(stream: Stream) -> None:
            await handler(HostileStream(stream))
        self.node.set_stream_handler(protocol, wrapped)


@asynccontextmanager
async def open_hostile_peer(identity: Identity | None = None, *,
                            listen: str = "/ip4/127.0.0.1/tcp/0",
                            look_alive: bool = True) -> AsyncIterator[HostilePeer]:
    """Run an attacker's host for the duration of the block. ``identity``: whose key to
    use (e.g. a roster member's, to get past "are you in this job?"); ``listen``: any
    loopback address works on Linux (127.0.1.2 is another /24 than 127.0.0.1, to test
    quotas per source network on one machine); ``look_alive``: answer the victims'
    membership probes as a live member would (`answer_membership_probes`), which costs
    an attacker nothing, so that a victim counts a roster identity we took over alive."""
    from lattice.net.host import open_libp2p_node  # libp2p takes ~1 s to import

    identity = identity or Identity.generate()
    async with open_libp2p_node(identity, [listen]) as node:
        peer = HostilePeer(node, identity)
        if look_alive:
            answer_membership_probes(peer)
        yield peer


def answer_membership_probes(peer: HostilePeer) -> None:
    """Answer `/lattice/swim/1` pings with acks, refuting whatever they say of us (a
    higher incarnation each time we hear we are suspect or dead)."""
    from lattice.net.membership import PROTOCOL

    incarnation = 0

    async def handler(stream: HostileStream) -> None:
        nonlocal incarnation
        msg = await stream.recv_frame()
        if not isinstance(msg, dict) or msg.get("t") not in ("ping", "members"):
            return
        for rumour in msg.get("g") or []:
            if isinstance(rumour, list) and len(rumour) == 3 and rumour[0] == peer.peer_id \
                    and rumour[1] != "alive" and isinstance(rumour[2], int):
                incarnation = max(incarnation, rumour[2] + 1)
        if msg["t"] == "ping":
            await stream.send_frame({"t": "ack", "n": msg.get("n"),
                                     "g": [[peer.peer_id, "alive", incarnation]]})
        await stream.close()

    peer.serve(PROTOCOL, handler)


# -- /lattice/gossip-avg/2 ------------------------------------------------------------------


def gossip_offer(job_id: str, codec_spec: str = "none", *, xid: str | None = None,
                 samples: int = 1, transports: Sequence[str] = ("framed",),
                 **override: Any) -> dict[str, Any]:
    """An ``offer`` to average in ``job_id``; ``override`` replaces or adds any field
    (``samples=True``, ``transports="framed"``...) to make it malformed."""
    return {"t": "offer", "v": 2, "job": job_id, "xid": xid or os.urandom(16).hex(),
            "samples": samples, "codec": codec_spec, "transports": transports,
            **override}


def arrays_header(*items: tuple[str, str, list[int], int]) -> dict[str, Any]:
    """An ``arrays`` header announcing (name, dtype, shape, nbytes) per array, as given
    (dtypes as numpy ``dtype.str``, e.g. ``"<f4"``): e.g. ``("data", "<f4", [0, 8000,
    8000, 8000, 8000, 8000, 8000], 0)`` announces zero bytes whose dimensions multiply
    past what numpy can allocate."""
    return {"t": "arrays", "items": [[n, {"dtype": d, "shape": list(s), "nbytes": b}]
                                     for n, d, s, b in items]}


# -- /lattice/kad/1 ----------------------------------------------------------------------------


def kad_request(mtype: str, sender: str, *, request_id: int = 1, mode: str = "client",
                addrs: Sequence[str] = (), **body: Any) -> dict[str, Any]:
    """A Kademlia request from ``sender`` (no schema check: pass any body)."""
    return {"type": mtype, "id": request_id, "response": False,
            "sender": {"peer_id": sender, "addrs": list(addrs), "mode": mode}, **body}


def sybil_records(count: int, *, now: float, ttl: float = 47 * 3600.0, prefix: str = "spam",
                  value_bytes: int = 64) -> Iterator[Record]:
    """``count`` validly signed records, each from a fresh publisher key (free to make)
    under its own key: what one peer uses to fill a store."""
    for i in range(count):
        yield sign_record(Identity.generate(), user_key(f"{prefix}-{i}"),
                          codec.pack(os.urandom(value_bytes)), now + ttl)


async def flood_dht(peer: HostilePeer, victim: str, records: Iterator[Record] | list[Record],
                    *, provider: bool = False) -> Counter[str]:
    """Send every record to ``victim`` with ``PUT_VALUE`` (``ADD_PROVIDER`` when
    ``provider``) on one stream; returns the victim's answers counted by reason
    ("stored" when accepted). A victim that resets the stream ends the flood early
    (counted as "reset")."""
    mtype = "ADD_PROVIDER" if provider else "PUT_VALUE"
    stream = await peer.open(victim, KAD_PROTOCOL)
    reasons: Counter[str] = Counter()
    try:
        for i, record in enumerate(records):
            await stream.send_frame(kad_request(mtype, peer.peer_id, request_id=i,
                                                record=record.to_wire()))
            answer = await stream.recv_frame()
            reasons[answer.get("reason") or "stored"] += 1
    except PeerError:
        reasons["reset"] += 1
    finally:
        await stream.close()
    return reasons


# -- the bulk side channel --------------------------------------------------------------------


@asynccontextmanager
async def open_idle_connections(host: str, port: int, count: int, *,
                                local_ip: str | None = None
                                ) -> AsyncIterator[list[trio.SocketStream]]:
    """``count`` TCP connections to a side-channel listener that never send their hello
    (from ``local_ip`` when given: e.g. 127.0.1.2 is another source network than
    127.0.0.1). Connections the listener refuses are still returned (closed by it)."""
    conns: list[trio.SocketStream] = []
    try:
        for _ in range(count):
            conns.append(await trio.open_tcp_stream(host, port, local_address=local_ip))
        yield conns
    finally:
        for conn in conns:
            await conn.aclose()


async def closed_by_peer(conn: trio.SocketStream, *, timeout: float) -> bool:
    """Whether the other end closed ``conn`` within ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        try:
            while await conn.receive_some(1024):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


# -- the local RPC socket ------------------------------------------------------------------


def local_socket_garbage() -> Iterator[tuple[str, bytes]]:
    """(what, bytes) pairs a local RPC server must answer with a typed error or a closed
    connection, without harm to other clients."""
    yield "not msgpack", frame_bytes(b"\xc1\xff\x00garbage")
    yield "nested 1000 deep", frame_bytes(b"\x94\x00\x01\xa6status" + nested_msgpack(1000))
    yield "nested params", frame_bytes(
        b"\x94\x01\x01" + codec.pack("state.set") + b"\x82" + codec.pack("path")
        + codec.pack("member/x") + codec.pack("value") + nested_msgpack(40))
    yield "not a request", frame_bytes(codec.pack({"not": "a request"}))
    yield "id not an int", frame_bytes(codec.pack([0, [1] * 20, "status", {}]))
    yield "unknown method", frame_bytes(codec.pack([0, 2, "no.such.method", {}]))
    yield "params ill-typed", frame_bytes(codec.pack([0, 3, "peers.connect", {"addr": [1, 2]}]))
    yield "ext type", frame_bytes(b"\x94\x00\x04\xa6status\xd4\x01\x00")
    yield "int map key", frame_bytes(b"\x94\x00\x05\xa6status\x81\x01\x02")
    yield "truncated", frame_bytes(b"\x94\x00", declared=100)
    yield "length 4 GiB", b"\xff\xff\xff\xff" + os.urandom(64)


async def send_to_local_socket(path: str | Path, data: bytes, *,
                               timeout: float = 5.0) -> bytes:
    """Connect to a local RPC socket, write ``data``, and return whatever comes back
    until the server closes, goes quiet for a moment, or ``timeout`` passes."""
    stream = await trio.open_unix_socket(str(path))
    out = b""
    async with stream:
        try:
            await stream.send_all(data)
            with trio.move_on_after(timeout):
                while True:
                    with trio.move_on_after(0.5) as quiet:
                        chunk = await stream.receive_some(65536)
                    if quiet.cancelled_caught or not chunk:
                        break
                    out += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    return out
