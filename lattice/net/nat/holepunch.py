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

Failure policy (`serve_holepunch`): a session ends quietly when the peer vanishes or
times out (logged with the peer and session id, outcome "failed"); when the peer breaks
the protocol — a malformed frame, or anything the session machine raises on its
message (`parse_peer_input`) — the session also ends "failed", the peer is counted
(``malformed``) and penalized (no sessions with it for ``penalty_s``, doubling). The
relayed connection keeps working in every case. Anything else is our bug and
propagates.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.peer.id import ID

from lattice.core import holepunch as core
from lattice.core.holepunch import (
    Birthday,
    Closed,
    Dial,
    DirectUp,
    Done,
    HolePunchProtocolError,
    HolePunchSession,
    PeerView,
    Prime,
    Primed,
    Probe,
    Received,
    Send,
    Start,
    Timer,
)
from lattice.core.penalties import PenaltyBox
from lattice.net.host import PEER_ERRORS, Libp2pStream, is_relayed
from lattice.net.nat import tcp_punch
from lattice.net.nat.observe import swarm_conn
from lattice.net.nat.punch_history import PunchHistory
from lattice.net.streams import (
    PeerError,
    RemoteProtocolError,
    parse_peer_input,
    recv_frame_or_eof,
    send_frame,
)

log = logging.getLogger("lattice.net.nat.holepunch")

PROTOCOL_ID = core.PROTOCOL_ID
# Between dials of one address within a round. Short: a router that rejects answers a
# SYN that came too early at once, and a punch through two such routers succeeds only
# when both SYNs leave within one one-way delay of each other (docs/natlab.md); a SYN a
# router drops is resent by the kernel, so this only spins against rejecting routers,
# for one round at most.
_RETRY_PAUSE = 0.005


@dataclass(frozen=True)
class HolePunchConfig:
    max_concurrent: int = 8  # sessions at once, both roles together
    relay_drain_s: float = 5.0  # then the relayed connection is closed even if busy
    close_relayed: bool = True
    penalty_s: float = 60.0  # no sessions with a peer that broke the protocol, doubling
    birthday: bool = True  # birthday probing against a symmetric NAT
    birthday_limits: Birthday = core.DEFAULT_BIRTHDAY
    # a session that did not end direct is tried again after this, doubling to the max
    retry_min_s: float = 30.0
    retry_max_s: float = 1800.0


class HolePuncher:
    """Runs sessions; started by `serve_holepunch`."""

    def __init__(self, node: Any, *, local_view: Callable[[], PeerView],
                 config: HolePunchConfig, rng: random.Random) -> None:
        self.node = node
        self.local_view = local_view
        self.config = config
        self.rng = rng
        self.history = PunchHistory(retry_min=config.retry_min_s,
                                    retry_max=config.retry_max_s, rng=rng)
        self.counts = {"direct": 0, "relayed": 0, "failed": 0, "busy": 0, "dial_errors": 0,
                       "malformed": 0, "refused_penalized": 0, "refused_direct": 0,
                       "handshake_errors": 0}
        self.penalties = PenaltyBox(base=config.penalty_s)
        self._sessions: dict[str, trio.MemorySendChannel[Any]] = {}
        # our initiator sessions: a peer initiating at the same instant may take over
        self._initiating: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self._retiring: set[str] = set()  # peers whose relayed connections are draining
        self._probe_stats: dict[str, dict[str, int]] = {}  # birthday, per running session
        self._wake_retries = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- public ------------------------------------------------------------------------
    def request(self, peer_id: str) -> None:
        """Start an initiator session with ``peer_id`` (we accepted its relayed
        connection); does nothing when one runs already. When the peer is connected
        directly too, the relayed connection is retired instead."""
        if self._nursery is None or peer_id in self._sessions:
            return
        if self.penalties.is_penalized(peer_id, trio.current_time()):
            self.counts["refused_penalized"] += 1
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
        return {**self.counts, "active": len(self._sessions),
                "max_concurrent": self.config.max_concurrent,
                "birthday": self.config.birthday,
                "birthday_limits": dataclasses.asdict(self.config.birthday_limits),
                "retry_min_s": self.config.retry_min_s, "retry_max_s": self.config.retry_max_s,
                "penalties": self.penalties.statistics(trio.current_time()),
                "recent": self.history.recent(recent)}

    def peer_record(self, peer_id: str) -> dict[str, Any] | None:
        return self.history.peer_record(peer_id)

    def active_peers(self) -> list[str]:
        return list(self._sessions)

    def why_relayed(self, peer_id: str) -> str | None:
        """Why ``peer_id`` is reached only through a relay (`PunchHistory.why_relayed`)."""
        return self.history.why_relayed(peer_id, time.time())

    # -- the two roles -------------------------------------------------------------------
    async def _initiate(self, peer_id: str, send: trio.MemorySendChannel[Any],
                        recv: trio.MemoryReceiveChannel[Any]) -> None:
        sid = self.rng.randbytes(core.ID_BYTES)
        session = HolePunchSession("initiator", self.local_view(), session_id=sid,
                                   now=trio.current_time(),
                                   birthday=self.config.birthday_limits)
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
        if self.penalties.is_penalized(peer_id, trio.current_time()):
            self.counts["refused_penalized"] += 1
            await stream.reset()
            return
        conn = swarm_conn(self.node, raw)
        if conn is None or not is_relayed(conn):
            # A session upgrades a relayed connection; asked over a direct one it could
            # only serve to make us dial whatever addresses the asker names.
            self.counts["refused_direct"] += 1
            await stream.reset()
            return
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
                                       now=trio.current_time(),
                                       birthday=self.config.birthday_limits)
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
                except (HolePunchProtocolError, RemoteProtocolError) as e:
                    self.counts["malformed"] += 1
                    backoff = self.penalties.penalize(peer_id, "malformed", trio.current_time())
                    log.info("holepunch peer=%s id=%s protocol error: %s; no sessions for "
                             "%.0f s", peer_id, _sid(session), e, backoff)
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
            if isinstance(event, RemoteProtocolError):
                raise event  # a frame we could not decode (`_read`)
            if event is not None:
                actions = parse_peer_input(session.handle, event, trio.current_time(),
                                           keep=(HolePunchProtocolError,))
                for act in actions:
                    if isinstance(act, Send):
                        await send_frame(stream, act.msg)
                    elif isinstance(act, Dial):
                        nursery.start_soon(self._dial, peer_id, act, send.clone())
                    elif isinstance(act, Prime):
                        nursery.start_soon(self._prime, peer_id, act, send.clone())
                    elif isinstance(act, Probe):
                        nursery.start_soon(self._probe, peer_id, act)
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
            except RemoteProtocolError as e:
                await events.send(e)  # an undecodable frame: `_drive` blames the peer
                return
            except PeerError:
                pass  # reported as Closed below: the session decides what it means
            await events.send(Closed())

    async def _dial(self, peer_id: str, act: Dial, events: trio.MemorySendChannel[Any]) -> None:
        """Dial every address from our listen port until one connects or ``act.until``
        (`tcp_punch.punch`), upgrading it with the Noise role the plan fixed."""
        async with events:
            await trio.sleep_until(act.at)
            source = self.node.listen_endpoint()
            if source is None:
                return
            stats: dict[str, int] = {}
            await tcp_punch.punch(
                source, act.addrs, act.until,
                functools.partial(self._adopt, peer_id, initiator=act.noise_initiator),
                pause=_RETRY_PAUSE, stats=stats)
            self.counts["dial_errors"] += max(0, stats.get("attempts", 0) - 1)
            if self.node.connection_kind(peer_id) == "direct":
                await events.send(DirectUp())

    async def _prime(self, peer_id: str, act: Prime, events: trio.MemorySendChannel[Any]) -> None:
        """Birthday primer: many connections from fresh ports toward the prober."""
        async with events:
            source = self.node.listen_endpoint()
            if source is None:
                return

            def primed() -> None:
                try:
                    events.send_nowait(Primed())
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the session is ending

            stats: dict[str, int] = {}
            self._probe_stats[peer_id] = stats
            await tcp_punch.prime(
                source[0], act.target, act.ports, act.rate, act.until,
                functools.partial(self._adopt, peer_id, initiator=False), primed=primed,
                stats=stats)
            log.info("holepunch peer=%s birthday primer: %d connections opened toward %s:%d, "
                     "%d failed, %d found by a probe", peer_id, stats["opened"], *act.target,
                     stats["failed"], stats["connected"])

    async def _probe(self, peer_id: str, act: Probe) -> None:
        """Birthday prober: dial random ports at the primer's IP from our listen port."""
        source = self.node.listen_endpoint()
        if source is None:
            return
        stats: dict[str, int] = {}
        self._probe_stats[peer_id] = stats
        await tcp_punch.probe(source, act.ips, act.count, act.rate, act.until,
                              functools.partial(self._adopt, peer_id, initiator=True),
                              rng=self.rng, stats=stats)
        log.info("holepunch peer=%s birthday prober: %d probes sent to %s at %.0f/s, %s",
                 peer_id, stats["sent"], ",".join(act.ips), act.rate,
                 "one connected" if stats["connected"] else "none answered")

    async def _adopt(self, peer_id: str, sock: Any, *, initiator: bool) -> bool:
        try:
            await tcp_punch.adopt(self.node, sock, peer_id, initiator=initiator)
        except PeerError as e:
            self.counts["handshake_errors"] += 1
            log.info("holepunch peer=%s: %s", peer_id, e)
            return False
        return True

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
        now = trio.current_time()
        retry_at = self.history.record(peer_id, session, result, elapsed=elapsed, now=now,
                                       wall=time.time(),
                                       probes=self._probe_stats.pop(peer_id, None))
        if retry_at is not None:
            self._wake_retries.set()
        log.info("holepunch peer=%s id=%s role=%s plan=%s outcome=%s (%s) in %.0f ms%s",
                 peer_id, _sid(session), session.role, session.plan, result.outcome,
                 result.reason, elapsed * 1000,
                 "" if retry_at is None else f"; again in {retry_at - now:.0f} s")

    async def serve_retries(self) -> None:
        """Try again, when due, the peers still connected only through a relay."""
        while True:
            self._wake_retries = trio.Event()
            now = trio.current_time()
            for peer_id in self.history.due(now):
                if self.node.connection_kind(peer_id) != "relayed":
                    self.history.forget_retry(peer_id)  # direct meanwhile, or gone
                    continue
                self.request(peer_id)
            due = self.history.next_due()
            with trio.move_on_at(now + 3600.0 if due is None else due):
                await self._wake_retries.wait()


def _sid(session: HolePunchSession) -> str:
    return session.id.hex() if session.id else "-"


def _stream_count(conn: Any) -> int:
    try:
        return len(conn.get_streams())
    except PEER_ERRORS:
        return 0


async def serve_holepunch(node: Any, *, local_view: Callable[[], PeerView],
                          config: HolePunchConfig = HolePunchConfig(),
                          rng: random.Random | None = None,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Answer `/lattice/holepunch/1` and run sessions until cancelled; hands back the
    `HolePuncher` (call `request(peer)` for relayed connections we accepted)."""
    puncher = HolePuncher(node, local_view=local_view, config=config,
                          rng=rng or random.Random())
    node.host.set_stream_handler(PROTOCOL_ID, puncher._handle)
    try:
        async with trio.open_nursery() as nursery:
            puncher._nursery = nursery
            nursery.start_soon(puncher.serve_retries)
            task_status.started(puncher)
            await trio.sleep_forever()
    finally:
        puncher._nursery = None
        node.host.remove_stream_handler(PROTOCOL_ID)
