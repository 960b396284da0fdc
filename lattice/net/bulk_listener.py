"""The receiving end of `/lattice/bulk/2`'s side channel (proto/bulk.md, "Side
channel"): a TCP listener that hands each authenticated connection to the transfer
waiting for it.

Owns `BulkListener` (registered expectations, the hello and its one-time token, the
handshake bounds per source network and the hello timeout), `serve_bulk_listener` and
`BulkAuthError`. Must not import libp2p.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import trio

from lattice.core import bulk_frames as bf
from lattice.core.netgroups import source_group
from lattice.net.streams import PeerError, RemoteProtocolError, parse_peer_input

log = logging.getLogger("lattice.net.bulk")


class BulkAuthError(RemoteProtocolError):
    """A side-channel connection presented the wrong one-time token for the session."""


class Expectation:
    """One receiver waiting for its sender's side-channel connection.

    The listener's handler task keeps owning the connection (trio.serve_listeners closes
    it when the handler returns) and waits for `released`, set when the session ends."""

    def __init__(self, token: bytes) -> None:
        self.token = token
        self._ready = trio.Event()
        self.released = trio.Event()
        self._conn: trio.SocketStream | None = None
        self._error: PeerError | None = None

    def deliver(self, conn: trio.SocketStream) -> None:
        self._conn = conn
        self._ready.set()

    def fail(self, error: PeerError) -> None:
        self._error = error
        self._ready.set()

    async def wait(self) -> trio.SocketStream:
        await self._ready.wait()
        if self._error is not None:
            raise self._error
        assert self._conn is not None
        conn, self._conn = self._conn, None
        return conn

    def release(self) -> None:
        self.released.set()


class BulkListener:
    """Handle of a running side-channel listener (from `serve_bulk_listener`).

    A connection must open with the 72-byte channel hello (magic, channel id, token)
    within `hello_timeout`; the first connection naming a pending channel consumes it,
    and a wrong token fails that transfer with BulkAuthError (the token is one-time).
    Connections naming no pending channel are closed. At most ``max_handshakes``
    connections wait for their hello at once, at most ``max_handshakes_per_ip`` from
    one source network (`source_group`: an IPv4 /24, an IPv6 /48), so idle connections
    from one attacker cannot take every slot; the rest are closed at once, counted.
    """

    def __init__(self, addresses: list[tuple[str, int]], *, max_sessions: int,
                 max_handshakes: int, hello_timeout: float,
                 max_handshakes_per_ip: int = 4) -> None:
        self.addresses = addresses
        self._max_sessions = max_sessions
        self._max_handshakes = max_handshakes
        self._max_handshakes_per_ip = max_handshakes_per_ip
        self._hello_timeout = hello_timeout
        self._sessions: dict[bytes, Expectation] = {}
        self._handshaking = 0
        self._handshaking_from: Counter[str] = Counter()  # source network -> handshakes
        self._counts = {"authenticated": 0, "bad_token": 0, "unknown_session": 0,
                        "bad_hello": 0, "hello_timeouts": 0, "refused_busy": 0,
                        "refused_ip_busy": 0}

    def statistics(self) -> dict[str, Any]:
        return {"addresses": [list(a) for a in self.addresses],
                "pending_sessions": len(self._sessions),
                "max_sessions": self._max_sessions,
                "handshaking": self._handshaking,
                "max_handshakes": self._max_handshakes,
                "max_handshakes_per_ip": self._max_handshakes_per_ip,
                "hello_timeout_s": self._hello_timeout,
                **self._counts}

    @contextlib.contextmanager
    def expect(self, keys: bf.DirectionKeys) -> Iterator[Expectation | None]:
        """Register an inbound transfer for the duration of the block; yields None when
        the listener is at its limit (the caller then offers no channel)."""
        cid = keys.channel_id
        if len(self._sessions) >= self._max_sessions or cid in self._sessions:
            yield None
            return
        exp = Expectation(keys.token)
        self._sessions[cid] = exp
        try:
            yield exp
        finally:
            if self._sessions.get(cid) is exp:
                del self._sessions[cid]
            exp.release()

    async def _handle(self, conn: trio.SocketStream) -> None:
        source = _source_of(conn)
        if self._handshaking >= self._max_handshakes:
            self._counts["refused_busy"] += 1
            await conn.aclose()
            return
        if self._handshaking_from[source] >= self._max_handshakes_per_ip:
            self._counts["refused_ip_busy"] += 1
            await conn.aclose()
            return
        self._handshaking += 1
        self._handshaking_from[source] += 1
        try:
            hello = b""
            with trio.move_on_after(self._hello_timeout) as scope:
                hello = await _receive_hello(conn)
            if scope.cancelled_caught:
                self._counts["hello_timeouts"] += 1
        finally:
            self._handshaking -= 1
            self._handshaking_from[source] -= 1
            if not self._handshaking_from[source]:
                del self._handshaking_from[source]
        try:
            cid, token = parse_peer_input(bf.parse_channel_hello, hello)
        except RemoteProtocolError:
            self._counts["bad_hello"] += 1
            await conn.aclose()
            return
        exp = self._sessions.pop(cid, None)
        if exp is None:
            self._counts["unknown_session"] += 1
            await conn.aclose()
            return
        if not bf.token_matches(exp.token, token):
            self._counts["bad_token"] += 1
            exp.fail(BulkAuthError("side-channel connection presented a wrong token"))
            await conn.aclose()
            return
        self._counts["authenticated"] += 1
        exp.deliver(conn)
        await exp.released.wait()  # serve_listeners closes conn when we return


def _source_of(conn: trio.SocketStream) -> str:
    try:
        ip = str(conn.socket.getpeername()[0])
    except (OSError, IndexError):
        ip = None  # gone already: it gets no more than one slot's worth of attention
    return source_group(ip, "?")


async def _receive_hello(conn: trio.SocketStream) -> bytes:
    buf = bytearray()
    while len(buf) < bf.CHANNEL_HELLO_BYTES:
        try:
            part = await conn.receive_some(bf.CHANNEL_HELLO_BYTES - len(buf))
        except (trio.BrokenResourceError, OSError):
            return b""
        if not part:
            return b""
        buf += part
    return bytes(buf)


async def serve_bulk_listener(host: str = "127.0.0.1", port: int = 0, *,
                              advertise: list[tuple[str, int]] | None = None,
                              max_sessions: int = 64, max_handshakes: int = 64,
                              max_handshakes_per_ip: int = 4, hello_timeout: float = 3.0,
                              task_status: trio.TaskStatus[BulkListener] = trio.TASK_STATUS_IGNORED,
                              ) -> None:
    """Listen for side-channel connections until cancelled; `nursery.start` returns the
    `BulkListener` to pass to `receive_array` / `exchange_arrays` / `serve_bulk`.

    ``advertise`` is what receivers offer to senders; by default the bound addresses, which
    requires a concrete ``host`` (with a wildcard bind, say which addresses peers reach).
    Failure policy: a misbehaving connection is closed and counted; accept errors other
    than resource exhaustion (which trio.serve_listeners rides out) propagate.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = [tuple(ln.socket.getsockname()[:2]) for ln in listeners]
    if advertise is None:
        if any(h in ("0.0.0.0", "::") for h, _ in bound):
            raise ValueError("bulk listener bound to a wildcard address: pass advertise=")
        advertise = [(str(h), int(p)) for h, p in bound]
    listener = BulkListener(advertise, max_sessions=max_sessions,
                            max_handshakes=max_handshakes, hello_timeout=hello_timeout,
                            max_handshakes_per_ip=max_handshakes_per_ip)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, listener._handle, listeners)
        task_status.started(listener)
