"""`/lattice/observe/1` (proto/observe.md), both sides: what others see of our address,
and whether a peer can reach us unsolicited.

Owns `Observer`: asking peers what they see of our connection to them (-> the NAT
kind, `lattice.core.holepunch.classify_nat`), reachability probes (a dial-back of the
address observers saw, -> public / private, `lattice.core.reachability`), and the
answering side: observations, relay lists, dial-backs. Not py-libp2p's AutoNAT, which
dials back over the connection it already has and reports firewalled and NATed hosts
as PUBLIC (PY-LIBP2P.md). Must not import latticed.

Dial-backs (proto/observe.md): the observer asked dials back *itself*, from a fresh
ephemeral port, only addresses at the IP it sees the requester at (AutoNAT v2's rule):
asking for one can never aim us at a third party. `dialback` messages of the earlier
helper scheme are never acted on (answered `busy`, counted).

Failure policy: an observation or probe that fails (the peer vanished, was slow, or
broke the protocol) is logged with the peer and retried later with backoff. On both
sides, any exception a parser raises on a peer's message is that peer's fault
(`parse_peer_input`): counted as ``malformed``, the peer penalized (its requests
refused, it is not asked, for ``nat.penalty_s`` doubling per offence), the stream reset;
the handler keeps serving. Our bugs propagate.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP

from lattice.core import reachability as rcore
from lattice.core.holepunch import Addr, NatView, Observation, classify_nat
from lattice.core.penalties import PenaltyBox
from lattice.core.reachability import DialBack, ObserveProtocolError, ReachabilityTracker
from lattice.net.host import PEER_ERRORS, Libp2pStream, is_relayed, local_address, remote_address
from lattice.net.nat.reservations import RelayDirectory, maddr
from lattice.net.nat.tcp_punch import HANDSHAKE_ERRORS, dial_error
from lattice.net.nat_config import NatConfig
from lattice.net.streams import (
    PeerError,
    RemoteProtocolError,
    parse_peer_input,
    recv_frame,
    send_frame,
)

log = logging.getLogger("lattice.net.nat")

OBSERVE_PROTOCOL_ID = rcore.OBSERVE_PROTOCOL_ID
_MAX_OBSERVE_FAILURES = 1024
HUNGER_MIN = 2.0
_DIAL_ERRORS: tuple[type[BaseException], ...] = (OpenConnectionError, *PEER_ERRORS)


class Observer:
    """Both sides of `/lattice/observe/1` for one node; started by the manager.

    The manager passes what observing needs to know of the rest: whether we serve as a
    relay (`serving`), our public addresses (`public_addrs`), whether we are short of
    relay reservations (`hungry`), which peers to observe first (`preferred`), a UPnP
    mapping (`upnp_external`), and `on_change` to call after each new result."""

    def __init__(self, node: Any, config: NatConfig, directory: RelayDirectory, *,
                 rng: random.Random, serving: Callable[[], bool],
                 public_addrs: Callable[[], tuple[Addr, ...]],
                 hungry: Callable[[], bool], preferred: Callable[[], set[str]],
                 upnp_external: Callable[[], Addr | None],
                 on_change: Callable[[], None]) -> None:
        self.node = node
        self.config = config
        self.directory = directory
        self.me = node.peer_id
        self.rng = rng
        self.serving = serving
        self.public_addrs = public_addrs
        self.hungry = hungry
        self.preferred = preferred
        self.upnp_external = upnp_external
        self.on_change = on_change
        # While unknown, retry within seconds: an observer with no helper to dial us back
        # usually has one as soon as the next daemon connects to it.
        self.tracker = ReachabilityTracker(self.me, recheck=config.recheck_interval_s,
                                           retry_min=0.5, retry_max=10.0)
        self.observations: dict[str, Observation] = {}
        self.stats = {"observations": 0, "observe_failures": 0, "probes": 0,
                      "dialbacks_served": 0, "dialbacks_refused": 0, "dialbacks_busy": 0,
                      "unsolicited_dialbacks": 0, "malformed": 0}
        self.penalties = PenaltyBox(base=config.penalty_s)
        self.hunger = HUNGER_MIN  # re-observe this often while short of relays
        self.probing = False
        self._observed_at: dict[str, float] = {}
        self._observing: set[str] = set()
        self._observe_failed: dict[str, float] = {}  # peers that do not speak observe
        self._dialback_last: dict[str, float] = {}
        self._candidates: tuple[Addr, ...] = ()  # what the last probes tested
        self._dialback_slots = trio.Semaphore(config.dialback_max_concurrent)
        self._plain_tcp = TCP()  # dial-backs leave from an ephemeral port, never pooled
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- what we know ------------------------------------------------------------------
    def listen_port(self) -> int | None:
        ep = self.node.listen_endpoint()
        return None if ep is None else ep[1]

    def nat_view(self) -> NatView:
        port = self.listen_port()
        if port is None:
            return NatView("unknown", (), "not listening")
        return classify_nat(port, self.observations.values())

    def observed_addrs(self) -> list[str]:
        return sorted({maddr(o.observed) for o in self.observations.values()})

    def wake(self) -> None:
        self._wake.set()

    def refresh(self) -> None:
        """Observe every peer again at once (e.g. to tell them we now serve as a relay)."""
        self._observed_at.clear()
        self._wake.set()

    def forget(self, peer: str) -> None:
        """``peer`` is no longer connected: its view of our address is gone too."""
        self.observations.pop(peer, None)
        self._observed_at.pop(peer, None)

    def reset_hunger(self) -> None:
        self.hunger = HUNGER_MIN

    def _direct_peers(self) -> list[str]:
        return [p for p in self.node.connected_peers()
                if p != self.me and self.node.connection_kind(p) == "direct"]

    # -- observing and probing (requester side) ----------------------------------------
    async def serve(self) -> None:
        """The requester's loop: observe connected peers, probe reachability."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._loop()
            finally:
                self._nursery = None

    async def _loop(self) -> None:
        assert self._nursery is not None
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            # Short of relays: ask observers again soon (backing off), they may have
            # learned of relays since; otherwise refresh every observe_interval_s.
            interval = self.config.observe_interval_s
            if self.hungry():
                interval = min(interval, self.hunger)
            preferred = self.preferred()
            peers = sorted(self._direct_peers(), key=lambda p: (p not in preferred, p))
            # When to look again: only for things that can happen then. Whatever waits on
            # an event (an observation or a probe ending, a new connection) wakes us
            # through _wake; waking for it sooner would only spin.
            due = []
            for peer in peers:
                if peer in self._observing or self.penalties.is_penalized(peer, now):
                    continue
                failed_until = self._observe_failed.get(peer, 0.0)
                if now < failed_until:
                    due.append(failed_until)
                    continue
                fresh = peer not in self._observed_at
                if not fresh and now - self._observed_at[peer] < interval:
                    due.append(self._observed_at[peer] + interval)
                    continue
                if fresh and len(self.observations) + len(self._observing) >= self.config.max_observers:
                    continue
                self._observing.add(peer)
                if not fresh:
                    self.hunger = min(self.config.observe_interval_s, self.hunger * 2)
                self._nursery.start_soon(self._observe, peer, ())
            if not self.probing and self.observations and self.dialback_candidates():
                if self.tracker.probe_due(now):
                    self.probing = True
                    self._nursery.start_soon(self._probe)
                else:
                    due.append(self.tracker.next_probe_at())
            wait = max(0.05, min([30.0] + [t - now for t in due]))
            with trio.move_on_after(wait):
                await self._wake.wait()

    def dialback_candidates(self) -> tuple[Addr, ...]:
        """Our addresses worth a dial-back (`lattice.core.reachability`)."""
        port = self.listen_port()
        if port is None:
            return ()
        upnp = self.upnp_external()
        return rcore.dialback_candidates(port, self.observations.values(),
                                         () if upnp is None else (upnp,))

    async def _observe(self, peer: str, dialback: tuple[Addr, ...]) -> rcore.ObserveAnswer | None:
        """Ask ``peer`` what it sees of our connection (and maybe for a dial-back)."""
        try:
            answer = await self._ask_observe(peer, dialback)
        except (PeerError, ObserveProtocolError, trio.TooSlowError) as e:
            self.stats["observe_failures"] += 1
            if isinstance(e, (ObserveProtocolError, RemoteProtocolError)):
                self._penalize(peer, e)
            if not (dialback and isinstance(e, trio.TooSlowError)):
                # does not speak the protocol, or broke it: leave it alone for a minute
                # (a slow dial-back is not the observer's fault)
                self._observe_failed[peer] = trio.current_time() + 60.0
                while len(self._observe_failed) > _MAX_OBSERVE_FAILURES:
                    self._observe_failed.pop(next(iter(self._observe_failed)))
            log.debug("observe peer=%s failed: %s", peer, e)
            return None
        finally:
            self._observing.discard(peer)
            self._wake.set()
        return answer

    async def _ask_observe(self, peer: str, dialback: tuple[Addr, ...]) -> rcore.ObserveAnswer:
        sid = self.rng.randbytes(rcore.OBSERVE_ID_BYTES)
        try:
            raw = await self.node.host.new_stream(ID.from_base58(peer), [OBSERVE_PROTOCOL_ID])
        except PEER_ERRORS as e:
            raise PeerError(f"cannot open observe stream: {e}") from None
        stream = Libp2pStream(raw, OBSERVE_PROTOCOL_ID)
        try:
            conn = swarm_conn(self.node, raw)
            local = None if conn is None or is_relayed(conn) else local_address(conn)
            request: dict[str, Any] = {"type": "observe", "id": sid, "relay": self.serving()}
            if dialback:
                request["dialback"] = [list(a) for a in dialback]
            timeout = 5.0 + (self._arrange_budget(len(dialback)) if dialback else 0.0)
            with trio.fail_after(timeout):
                await send_frame(stream, request)
                frame = await recv_frame(stream, max_bytes=rcore.OBSERVE_MAX_MESSAGE)
            answer = parse_peer_input(_decode_answer, frame, sid, keep=(ObserveProtocolError,))
        finally:
            await stream.close()
        now = trio.current_time()
        self._observed_at[peer] = now  # even when unusable: not again before the interval
        if answer.observed is not None and local is not None:
            self.observations[peer] = Observation(peer, local, answer.observed)
            self.stats["observations"] += 1
            candidates = self.dialback_candidates()
            if candidates != self._candidates:  # e.g. the first observer outside our NAT
                self._candidates = candidates
                self.tracker.probe_now()
        for r in answer.relays:
            self.directory.learn(r.peer, [f"{maddr(a)}/p2p/{r.peer}" for a in r.addrs], now)
        self.on_change()
        return answer

    def _arrange_budget(self, n_addrs: int) -> float:
        """Seconds an observer may spend on one dial-back request (all addresses)."""
        return 2.0 + n_addrs * self.config.dialback_timeout_s

    def _penalize(self, peer: str, error: Exception) -> None:
        self.stats["malformed"] += 1
        backoff = self.penalties.penalize(peer, "malformed", trio.current_time())
        log.info("observe peer=%s broke the protocol (%s); ignored for %.0f s", peer, error,
                 backoff)

    async def _probe(self) -> None:
        """One reachability probe: observers in turn, until one says whether its dial
        back reached us (a busy or refusing observer passes to the next)."""
        try:
            candidates = self.dialback_candidates()
            observers = [p for p in self.observations if p in self.node.connected_peers()]
            self.stats["probes"] += 1
            if observers:
                k = self.stats["probes"] % len(observers)
                observers = observers[k:] + observers[:k]  # spread the load
            for observer in observers if candidates else []:
                answer = await self._observe(observer, candidates)
                now = trio.current_time()
                if answer is not None and answer.dialback in ("ok", "failed"):
                    addr = answer.dialback_addr or candidates[0]
                    self.tracker.record(DialBack(observer, answer.dialer, addr,
                                                 answer.dialback == "ok", now,
                                                 answer.dialback_error), now)
                    break
                log.debug("reachability probe via %s: %s", observer,
                          "no answer" if answer is None else answer.dialback)
            else:
                self.tracker.no_result(trio.current_time())
            self.on_change()
        finally:
            self.probing = False
            self._wake.set()

    # -- observing (observer side) ---------------------------------------------------
    async def handle(self, raw: Any) -> None:
        """The `/lattice/observe/1` stream handler (failure policy: module docstring)."""
        stream = Libp2pStream(raw, OBSERVE_PROTOCOL_ID)
        peer = stream.remote_peer_id
        try:
            if self.penalties.is_penalized(peer, trio.current_time()):
                await stream.reset()
                return
            with trio.fail_after(5.0):
                frame = await recv_frame(stream, max_bytes=rcore.OBSERVE_MAX_MESSAGE)
            msg = parse_peer_input(rcore.check_message, frame, keep=(ObserveProtocolError,))
            if msg["type"] == "observe":
                req = parse_peer_input(rcore.decode_observe, msg, keep=(ObserveProtocolError,))
                reply = await self._answer_observe(peer, raw, msg["id"], req)
            elif msg["type"] == "dialback":
                # the helper scheme of earlier versions: an observer asked us to dial a
                # third party. Never: that let anyone aim us at any ip:port (issue 11).
                self.stats["unsolicited_dialbacks"] += 1
                reply = {"type": "dialback_result", "id": msg["id"], "status": "busy",
                         "addr": None}
            else:
                raise ObserveProtocolError(f"unexpected {msg['type']}")
            await send_frame(stream, reply)
        except (ObserveProtocolError, RemoteProtocolError) as e:
            self._penalize(peer, e)
            await stream.reset()
        except (PeerError, trio.TooSlowError):
            pass  # gone or slow: nothing to answer
        finally:
            await stream.close()

    async def _answer_observe(self, peer: str, raw: Any, sid: bytes,
                              req: rcore.ObserveRequest) -> dict[str, Any]:
        conn = swarm_conn(self.node, raw)
        observed = None if conn is None or is_relayed(conn) else remote_address(conn)
        now = trio.current_time()
        if observed is not None and req.relay:
            self.directory.announce(peer, observed, now)  # a relay for us too
        elif not req.relay:
            self.directory.withdraw(peer)
        reply: dict[str, Any] = {"type": "observed", "id": sid,
                                 "addr": None if observed is None else list(observed),
                                 "relays": self._relays_for(peer, now)}
        if req.dialback:
            reply["dialback"] = await self._dial_back_requester(peer, observed, req.dialback, now)
        return reply

    def _relays_for(self, asker: str, now: float) -> list[dict[str, Any]]:
        out = []
        public = self.public_addrs()
        if self.serving() and public:
            out.append({"peer": self.me, "addrs": [list(a) for a in public]})
        for pid, addr in self.directory.listed_for(asker, now, self.node.connected_peers()):
            out.append({"peer": pid, "addrs": [list(addr)]})
        return out[:rcore.MAX_RELAYS_LISTED]

    async def _dial_back_requester(self, peer: str, observed: Addr | None,
                                   wanted: tuple[Addr, ...], now: float) -> dict[str, Any]:
        """Dial ``wanted`` on fresh connections, expecting ``peer``: only addresses at the
        IP we see ``peer`` at (so never a third party), at most once per
        ``nat.dialback_min_interval_s`` per requester, ``nat.dialback_max_concurrent``
        at once (``busy`` beyond)."""
        addrs = [a for a in wanted if observed is not None and a[0] == observed[0]]
        last = self._dialback_last.get(peer)
        if not addrs or (last is not None and now - last < self.config.dialback_min_interval_s):
            self.stats["dialbacks_refused"] += 1
            return {"status": "refused", "helper": "", "addr": None}
        self._dialback_last[peer] = now
        while len(self._dialback_last) > 1024:
            self._dialback_last.pop(next(iter(self._dialback_last)))
        try:
            self._dialback_slots.acquire_nowait()
        except trio.WouldBlock:
            self.stats["dialbacks_busy"] += 1
            return {"status": "busy", "helper": "", "addr": None}
        try:
            self.stats["dialbacks_served"] += 1
            error = "timeout"
            for addr in addrs:
                error = await self._dial_back(peer, addr)
                if not error:
                    return {"status": "ok", "helper": self.me, "addr": list(addr)}
            return {"status": "failed", "helper": self.me, "addr": None, "error": error}
        finally:
            self._dialback_slots.release()

    async def _dial_back(self, peer: str, addr: Addr) -> str:
        """A fresh TCP connection to ``addr`` from an ephemeral port, that completes a
        Noise handshake with ``peer``; the swarm never sees it, so no existing
        connection can be reused. "" when it did, else how it failed (`DIAL_ERRORS`)."""
        target = multiaddr.Multiaddr(f"{maddr(addr)}/p2p/{peer}")
        upgrader = self.node.host.get_network().upgrader
        with trio.move_on_after(self.config.dialback_timeout_s):
            raw = None
            try:
                raw = await self._plain_tcp.dial(target)
            except _DIAL_ERRORS as e:
                log.debug("dial-back to peer=%s at %s failed: %s", peer, addr, e)
                return dial_error(e)
            try:
                secured = await upgrader.upgrade_security(raw, True, ID.from_base58(peer))
                await secured.close()
                return ""
            except (*HANDSHAKE_ERRORS, *PEER_ERRORS) as e:
                log.debug("dial-back to peer=%s at %s: handshake failed: %s", peer, addr, e)
                return "handshake"
            finally:
                with trio.CancelScope(shield=True):
                    try:
                        await raw.close()
                    except PEER_ERRORS:
                        pass
        return "timeout"


def _decode_answer(frame: Any, sid: bytes) -> rcore.ObserveAnswer:
    msg = rcore.check_message(frame)
    if msg["type"] != "observed" or msg["id"] != sid:
        raise ObserveProtocolError("expected observed with our id")
    return rcore.decode_observed(msg)


def swarm_conn(node: Any, raw_stream: Any) -> Any:
    """The swarm connection (`INetConn`) a libp2p stream runs on, or None."""
    muxed = getattr(raw_stream, "muxed_conn", None)
    if muxed is None:
        return None
    for conn in node.host.get_network().get_connections(muxed.peer_id):
        if conn.muxed_conn is muxed:
            return conn
    return None
