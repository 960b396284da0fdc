"""The trio driver of `/lattice/holepunch/1`: relayed connections upgraded to direct ones.

Owns: running `lattice.core.holepunch.HolePunchSession` machines over libp2p streams
(the exchange), the dials of a punch (from our listen port, with the Noise role the
core assigns), noticing the direct connection, and retiring the relayed connection
once its streams are done, so the relay carries nothing afterwards. Must not import
latticed; NAT knowledge (what we are, which addresses) comes from the caller
(`lattice.net.nat`) as a `PeerView` callback.

When: the peer that *accepted* a relayed connection starts a session (`request`, called
by `lattice.net.nat` once py-libp2p has tagged the connection as relayed); the dialing
peer answers in `_handle`. When both dialed each other at once, both accepted a relayed
connection and both initiate: the session of the smaller peer id goes on and the other
side yields and answers it. Not py-libp2p's DCUtR: it reaches a direct connection only
~10 s after the relayed one (docs/natlab.md); never start both.

Failure policy (`serve_holepunch`): a session ends quietly when the peer vanishes, times
out or breaks the protocol (logged with the peer and session id, outcome "failed");
the relayed connection keeps working in every case. Anything else is our bug and
propagates.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID

from lattice.core import holepunch as core
from lattice.core.holepunch import (
    Closed,
    Dial,
    DirectUp,
    Done,
    HolePunchProtocolError,
    HolePunchSession,
    PeerView,
    Received,
    Send,
    Start,
    Timer,
)
from lattice.net.host import PEER_ERRORS, Libp2pStream, is_relayed
from lattice.net.streams import PeerError, recv_frame_or_eof, send_frame

log = logging.getLogger("lattice.net.holepunch")

PROTOCOL_ID = core.PROTOCOL_ID
_RETRY_PAUSE = 0.02  # between dials of one address within a round


@dataclass(frozen=True)
class HolePunchConfig:
    max_concurrent: int = 8  # sessions at once, both roles together
    relay_drain_s: float = 5.0  # then the relayed connection is closed even if busy
    close_relayed: bool = True


@dataclass
class PunchRecord:
    """The last session with a peer, for `lattice peers` and statistics."""

    outcome: str  # "direct" | "relayed" | "failed"
    reason: str
    role: str
    plan: str | None
    rtt_ms: float | None
    elapsed_ms: float
    at: float  # wall clock


class HolePuncher:
    """Runs sessions; started by `serve_holepunch`."""

    def __init__(self, node: Any, *, local_view: Callable[[], PeerView],
                 config: HolePunchConfig) -> None:
        self.node = node
        self.local_view = local_view
        self.config = config
        self.records: dict[str, PunchRecord] = {}
        self.counts = {"direct": 0, "relayed": 0, "failed": 0, "busy": 0, "dial_errors": 0}
        self._sessions: dict[str, trio.MemorySendChannel[Any]] = {}
        # our initiator sessions: a peer initiating at the same instant may take over
        self._initiating: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self._retiring: set[str] = set()  # peers whose relayed connections are draining
        self._nursery: trio.Nursery | None = None

    # -- public ------------------------------------------------------------------------
    def request(self, peer_id: str) -> None:
        """Start an initiator session with ``peer_id`` (we accepted its relayed
        connection); does nothing when one runs already. When the peer is connected
        directly too, the relayed connection is retired instead."""
        if self._nursery is None or peer_id in self._sessions:
            return
        if self.node.connection_kind(peer_id) == "direct":
            self._retire_if_redundant(peer_id)
            return
        if len(self._sessions) >= self.config.max_concurrent:
            self.counts["busy"] += 1
            log.info("holepunch peer=%s skipped: %d sessions running", peer_id,
                     len(self._sessions))
            return
        send, recv = trio.open_memory_channel[Any](16)
        self._sessions[peer_id] = send
        self._nursery.start_soon(self._initiate, peer_id, send, recv)

    def note_connection(self, peer_id: str, relayed: bool) -> None:
        """A connection to ``peer_id`` appeared (any direction). A direct one ends a
        running session's wait; that session retires the relayed connection when it
        ends. Without a session, a direct and a relayed connection side by side (either
        side dialed the other's public address, or a relayed dial raced a direct one)
        leave the relay carrying nothing more: the relayed one is retired now."""
        chan = self._sessions.get(peer_id)
        if chan is not None:
            if not relayed:
                try:
                    chan.send_nowait(DirectUp())
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the session is ending, or has the event queued already
            return
        self._retire_if_redundant(peer_id)

    def _retire_if_redundant(self, peer_id: str) -> None:
        if self._nursery is None or not self.config.close_relayed:
            return
        conns = self.node.live_connections(peer_id)
        if any(is_relayed(c) for c in conns) and not all(is_relayed(c) for c in conns):
            self._nursery.start_soon(self._retire_relayed, peer_id)

    def statistics(self, recent: int = 8) -> dict[str, Any]:
        """Counts by outcome, and the last ``recent`` sessions (why a peer is relayed)."""
        last = list(self.records.items())[-recent:]
        return {**self.counts, "active": len(self._sessions),
                "recent": [{"peer": p, **r.__dict__} for p, r in reversed(last)]}

    def peer_record(self, peer_id: str) -> dict[str, Any] | None:
        r = self.records.get(peer_id)
        return None if r is None else dict(r.__dict__)

    # -- the two roles -------------------------------------------------------------------
    async def _initiate(self, peer_id: str, send: trio.MemorySendChannel[Any],
                        recv: trio.MemoryReceiveChannel[Any]) -> None:
        sid = os.urandom(core.ID_BYTES)
        session = HolePunchSession("initiator", self.local_view(), session_id=sid,
                                   now=trio.current_time())
        scope, ended = trio.CancelScope(), trio.Event()
        self._initiating[peer_id] = (scope, ended)
        result = None
        try:
            with scope:
                try:
                    raw = await self.node.host.new_stream(ID.from_base58(peer_id), [PROTOCOL_ID])
                except PEER_ERRORS as e:
                    self._record(peer_id, session, Done("failed", f"cannot open exchange: {e}"), 0.0)
                    return
                result = await self._run(peer_id, session, Libp2pStream(raw, PROTOCOL_ID), send,
                                         recv, first=Start())
        finally:
            self._sessions.pop(peer_id, None)
            self._initiating.pop(peer_id, None)
            ended.set()
        if result is not None and result.outcome == "direct" and self.config.close_relayed:
            await self._retire_relayed(peer_id)

    async def _handle(self, raw: Any) -> None:
        stream = Libp2pStream(raw, PROTOCOL_ID)
        peer_id = stream.remote_peer_id
        ours = self._initiating.get(peer_id)
        if ours is not None and peer_id < self.node.peer_id:
            # Both ends accepted a relayed connection from the other (they dialed each
            # other at once) and both initiated. The smaller peer id's session goes on:
            # here that is theirs, so ours yields and we answer. (They refuse ours.)
            scope, ended = ours
            scope.cancel()
            await ended.wait()
        if peer_id in self._sessions or len(self._sessions) >= self.config.max_concurrent:
            self.counts["busy"] += 1
            await stream.reset()
            return
        send, recv = trio.open_memory_channel[Any](16)
        self._sessions[peer_id] = send
        try:
            session = HolePunchSession("responder", self.local_view(),
                                       now=trio.current_time())
            result = await self._run(peer_id, session, stream, send, recv, first=None)
        finally:
            self._sessions.pop(peer_id, None)
        if result.outcome == "direct" and self.config.close_relayed:
            await self._retire_relayed(peer_id)

    # -- one session -----------------------------------------------------------------------
    async def _run(self, peer_id: str, session: HolePunchSession, stream: Libp2pStream,
                   send: trio.MemorySendChannel[Any], recv: trio.MemoryReceiveChannel[Any],
                   *, first: Any) -> Done:
        t0 = trio.current_time()
        result: Done | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, stream, send.clone())
                try:
                    result = await self._drive(peer_id, session, stream, nursery, send, recv, first)
                except HolePunchProtocolError as e:
                    log.info("holepunch peer=%s id=%s protocol error: %s", peer_id,
                             _sid(session), e)
                    await stream.reset()
                    result = Done("failed", f"protocol error: {e}")
                except PeerError as e:
                    result = Done("failed", f"exchange broke: {e}")
                nursery.cancel_scope.cancel()
        finally:
            await stream.close()
        assert result is not None
        if self.node.connection_kind(peer_id) == "direct" and result.outcome != "direct":
            # the other side's dial (or ours) landed just as the exchange ended
            result = Done("direct", "direct connection up")
        self._record(peer_id, session, result, trio.current_time() - t0)
        return result

    async def _drive(self, peer_id: str, session: HolePunchSession, stream: Libp2pStream,
                     nursery: trio.Nursery, send: trio.MemorySendChannel[Any],
                     recv: trio.MemoryReceiveChannel[Any], event: Any) -> Done:
        """Feed events to the session and carry out its actions until it is done."""
        while True:
            direct = self.node.connection_kind(peer_id) == "direct"
            if isinstance(event, DirectUp) and not direct:
                event = None  # a relayed connection, seen before py-libp2p tagged it
            elif event is not None and direct:
                event = DirectUp()
            if event is not None:
                for act in session.handle(event, trio.current_time()):
                    if isinstance(act, Send):
                        await send_frame(stream, act.msg)
                    elif isinstance(act, Dial):
                        nursery.start_soon(self._dial, peer_id, act, send.clone())
                    elif isinstance(act, Done):
                        return act
            assert session.deadline is not None, "a running session always has a deadline"
            event = Timer()
            with trio.move_on_at(session.deadline):
                event = await recv.receive()

    async def _read(self, stream: Libp2pStream, events: trio.MemorySendChannel[Any]) -> None:
        async with events:
            try:
                while True:
                    msg = await recv_frame_or_eof(stream, max_bytes=core.MAX_MESSAGE)
                    if msg is None:
                        break
                    await events.send(Received(msg))
            except PeerError:
                pass  # reported as Closed below: the session decides what it means
            await events.send(Closed())

    async def _dial(self, peer_id: str, act: Dial, events: trio.MemorySendChannel[Any]) -> None:
        """Dial every address from our listen port until one connects or ``act.until``."""
        async with events:
            await trio.sleep_until(act.at)
            source = self.node.listen_endpoint()
            net = self.node.host.get_network()
            pid = ID.from_base58(peer_id)
            done = trio.Event()

            async def one(ip: str, port: int) -> None:
                proto = "ip6" if ":" in ip else "ip4"
                addr = multiaddr.Multiaddr(f"/{proto}/{ip}/tcp/{port}")
                while not done.is_set() and self.node.connection_kind(peer_id) != "direct":
                    try:
                        if act.noise_initiator:
                            await net.dial_addr(addr, pid, source)
                        else:
                            await net.dial_addr_as_responder(addr, pid, source)
                        done.set()
                        return
                    except PEER_ERRORS:
                        # Expected while the peer's SYN has not opened its NAT yet, or
                        # when its SYN landed on our listener first (EADDRNOTAVAIL):
                        # that connection is the direct one, and the loop sees it.
                        self.counts["dial_errors"] += 1
                        await trio.sleep(_RETRY_PAUSE)
                done.set()

            with trio.move_on_at(act.until):
                async with trio.open_nursery() as nursery:
                    for ip, port in act.addrs:
                        nursery.start_soon(one, ip, port)
            if self.node.connection_kind(peer_id) == "direct":
                await events.send(DirectUp())

    async def _retire_relayed(self, peer_id: str) -> None:
        """Close relayed connections to ``peer_id`` once their streams are done (new
        streams already take the direct one), at most after ``relay_drain_s``."""
        if peer_id in self._retiring:
            return
        self._retiring.add(peer_id)
        try:
            deadline = trio.current_time() + self.config.relay_drain_s
            for conn in [c for c in self.node.live_connections(peer_id) if is_relayed(c)]:
                while trio.current_time() < deadline and _stream_count(conn) > 0:
                    await trio.sleep(0.1)  # py-libp2p has no per-connection "idle" event
                try:
                    await conn.close()
                except PEER_ERRORS:
                    pass  # already gone
        finally:
            self._retiring.discard(peer_id)

    def _record(self, peer_id: str, session: HolePunchSession, result: Done,
                elapsed: float) -> None:
        self.counts[result.outcome] = self.counts.get(result.outcome, 0) + 1
        self.records.pop(peer_id, None)  # re-insert: the dict's order is recency
        self.records[peer_id] = PunchRecord(
            result.outcome, result.reason, session.role, session.plan,
            None if session.rtt is None else round(session.rtt * 1000, 2),
            round(elapsed * 1000, 1), time.time())
        while len(self.records) > 1024:  # bounded: forget the oldest peers
            self.records.pop(next(iter(self.records)))
        log.info("holepunch peer=%s id=%s role=%s plan=%s outcome=%s (%s) in %.0f ms",
                 peer_id, _sid(session), session.role, session.plan, result.outcome,
                 result.reason, elapsed * 1000)


def _sid(session: HolePunchSession) -> str:
    return session.id.hex() if session.id else "-"


def _stream_count(conn: Any) -> int:
    try:
        return len(conn.get_streams())
    except PEER_ERRORS:
        return 0


async def serve_holepunch(node: Any, *, local_view: Callable[[], PeerView],
                          config: HolePunchConfig = HolePunchConfig(),
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Answer `/lattice/holepunch/1` and run sessions until cancelled; hands back the
    `HolePuncher` (call `request(peer)` for relayed connections we accepted)."""
    puncher = HolePuncher(node, local_view=local_view, config=config)
    node.host.set_stream_handler(PROTOCOL_ID, puncher._handle)
    try:
        async with trio.open_nursery() as nursery:
            puncher._nursery = nursery
            task_status.started(puncher)
            await trio.sleep_forever()
    finally:
        puncher._nursery = None
        node.host.remove_stream_handler(PROTOCOL_ID)
