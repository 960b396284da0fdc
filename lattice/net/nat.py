"""The connectivity manager: reachability, relays (both roles), hole punching, UPnP.

Owns, for one libp2p node:
- `/lattice/observe/1` (proto/observe.md), both sides: peers tell us the address they
  see for our connection to them (-> the NAT kind, `lattice.core.holepunch.classify_nat`)
  and, on request, have a *third* peer dial that address on a fresh connection
  (-> public / private, `lattice.core.reachability`). Not py-libp2p's AutoNAT, which
  dials back over the connection it already has and reports firewalled and NATed hosts
  as PUBLIC (PY-LIBP2P.md).
- Circuit Relay v2, hop side (`_CircuitRelay`): served when we are publicly reachable
  (or configured "on"), within `NatConfig` limits; and the STOP side (accepting relayed
  connections), which also tells the hole puncher about each one.
- Reservations on relays found through bootstrap peers and observers (each observer
  lists the relays it knows), refreshed before they expire and re-made when a relay
  connection drops; relayed dialing by peer id (`NatManager.connect`).
- Hole punching (`lattice.net.holepunch`) for relayed connections we accepted.
- UPnP port mapping when configured (off by default), never on the startup path.
- `NatManager.status()` for `lattice status`.
Must not import latticed. Only this module and `lattice.net.host` touch libp2p internals.

Failure policy (`serve_nat`): everything per peer (an observation, a dial-back, a
reservation, a relayed dial) is contained: a peer that vanishes or misbehaves is logged
with its id and retried later with backoff; the service keeps running. Our bugs
propagate and take the daemon down.

Private py-libp2p API used (0.8.1): `CircuitV2Protocol._handle_reserve`,
`._handle_connect` (the hop's message handlers, reused behind our own one-message-per-
stream HOP handler and circuit cap), overrides of `._handle_hop_stream` and
`._relay_data` (and its `_active_relays` registry); `Swarm.upgrader.upgrade_security`
(dial-backs verify the peer's identity on a connection the swarm never sees).
tests/nat/test_nat_relay_loopback.py fails if a py-libp2p upgrade changes them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p.abc import INetConn, INotifee
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol, _is_relayed_stream
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service
from libp2p.tools.constants import MAX_READ_LEN
from libp2p.transport.exceptions import OpenConnectionError, UpgradeFailure
from libp2p.transport.tcp.tcp import TCP

from lattice.core import reachability as rcore
from lattice.core.holepunch import Addr, NatView, Observation, PeerView, classify_nat
from lattice.core.reachability import (
    DialBack,
    ObserveProtocolError,
    ReachabilityTracker,
    Verdict,
)
from lattice.net.holepunch import HolePunchConfig, HolePuncher, serve_holepunch
from lattice.net.host import (
    PEER_ERRORS,
    BadDialTarget,
    DialError,
    Libp2pStream,
    is_relayed,
    local_address,
    remote_address,
)
from lattice.net.nat_config import NatConfig as NatConfig
from lattice.net.streams import PeerError, RemoteProtocolError, recv_frame, send_frame

log = logging.getLogger("lattice.net.nat")

OBSERVE_PROTOCOL_ID = rcore.OBSERVE_PROTOCOL_ID
_HOP_READ_TIMEOUT = 10.0
_RELAY_CANDIDATES_MAX = 32
_MAX_OBSERVE_FAILURES = 1024
_LEARNED_RELAY_TTL = 3600.0
_HUNGER_MIN = 2.0


# -- the relay hop and stop sides ------------------------------------------------------------

class _CircuitRelay(CircuitV2Protocol):
    """py-libp2p's Circuit Relay v2, with what we need around it.

    - The HOP handler reads one message per stream (as rust-libp2p does) and is gated:
      refused unless `serving`. py-libp2p's own handler loops on the stream and logs an
      ERROR every time a client closes it.
    - A cap on circuits through us at once (py-libp2p only caps them per reservation).
    - `on_relayed_inbound(peer)` after an accepted relayed connection is tagged relayed
      (py-libp2p tags it only after the swarm's "connected" notification).
    - Our own byte pump (`_relay_data`): py-libp2p's cleans up by *peer id*, so the end
      of one circuit closed another circuit of the same peer; and it checked the
      duration limit only when bytes arrived, so an idle circuit outlived it.
    """

    def __init__(self, host: Any, config: NatConfig, on_relayed_inbound: Any) -> None:
        super().__init__(host, limits=config.relay_limits(), allow_hop=True)
        self.serving = False
        self.max_circuits = config.relay_max_circuits
        self.on_relayed_inbound = on_relayed_inbound
        self.active_circuits = 0
        self.circuits_total = 0
        self.bytes_relayed = 0
        self.circuits_cut = {"duration": 0, "bytes": 0}
        self._pumps: dict[frozenset[int], list[trio.CancelScope]] = {}  # per circuit
        self.refused = {"not_serving": 0, "circuit_limit": 0, "relayed": 0, "malformed": 0}
        self._reserved: dict[ID, None] = {}

    def active_reservations(self) -> int:
        live = [p for p in self._reserved if self.resource_manager.get_reservation(p) is not None]
        self._reserved = dict.fromkeys(live)
        return len(live)

    async def _refuse(self, stream: Any, code: StatusCode, reason: str) -> None:
        self.refused[reason] += 1
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS,
                                                         status=to_proto_status(code)))
            await stream.close()
        except PEER_ERRORS:
            pass

    async def _handle_hop_stream(self, stream: Any) -> None:
        if not self.serving:
            await self._refuse(stream, StatusCode.PERMISSION_DENIED, "not_serving")
            return
        if _is_relayed_stream(stream):  # spec: no hops over relayed connections
            await self._refuse(stream, StatusCode.PERMISSION_DENIED, "relayed")
            return
        try:
            with trio.fail_after(_HOP_READ_TIMEOUT):
                msg = await read_delimited_msg(stream, HopMessage)
        except (trio.TooSlowError, ProtobufDecodeError, ValueError) + PEER_ERRORS:
            await self._refuse(stream, StatusCode.MALFORMED_MESSAGE, "malformed")
            return
        if msg.type == HopMessage.RESERVE:
            # noted first: py-libp2p's handler lingers 0.1 s after answering
            self._reserved[stream.muxed_conn.peer_id] = None
            if len(self._reserved) > 2 * self.limits.max_reservations:
                self.active_reservations()  # prune the refused and the expired
            await self._handle_reserve(stream, msg)
            try:
                await stream.close()
            except PEER_ERRORS:
                pass
        elif msg.type == HopMessage.CONNECT:
            await self._handle_connect(stream, msg)
        else:
            await self._refuse(stream, StatusCode.UNEXPECTED_MESSAGE, "malformed")

    async def _handle_connect(self, stream: Any, msg: Any) -> None:
        if self.active_circuits >= self.max_circuits:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuit_limit")
            return
        self.active_circuits += 1
        self.circuits_total += 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self.active_circuits -= 1

    async def _relay_data(self, src_stream: Any, dst_stream: Any, peer_id: ID,
                          deadline: float | None = None,
                          circuit_data_limit: list[int] | None = None) -> None:
        """One direction of a circuit, called by py-libp2p's `_handle_connect` (twice,
        in one nursery). ``deadline`` is on time.monotonic(); ``circuit_data_limit`` is
        the shared [bytes left] of both directions. When this direction ends, for any
        reason, both streams are reset and the other direction is cancelled (a local
        reset does not wake py-libp2p's pending read on the same stream)."""
        key = frozenset((id(src_stream), id(dst_stream)))
        scopes = self._pumps.setdefault(key, [])
        scope = trio.CancelScope()
        scopes.append(scope)
        try:
            with scope:
                await self._pump(src_stream, dst_stream, deadline, circuit_data_limit)
        except (EOFError,) + PEER_ERRORS:
            pass  # one end went away: the circuit is over
        finally:
            for other in scopes:
                other.cancel()
            scopes.remove(scope)
            if not scopes:
                del self._pumps[key]
            with trio.CancelScope(shield=True):
                for s in (src_stream, dst_stream):
                    try:
                        await s.reset()
                    except (EOFError,) + PEER_ERRORS:
                        pass
            for k, (a, b) in list(self._active_relays.items()):
                if a in (src_stream, dst_stream) or b in (src_stream, dst_stream):
                    del self._active_relays[k]

    async def _pump(self, src_stream: Any, dst_stream: Any, deadline: float | None,
                    circuit_data_limit: list[int] | None) -> None:
        while True:
            left = math.inf if deadline is None else deadline - time.monotonic()
            data = b""
            with trio.move_on_after(max(0.0, left)):
                data = await src_stream.read(MAX_READ_LEN)
            if deadline is not None and not data and time.monotonic() >= deadline:
                self.circuits_cut["duration"] += 1
                return
            if not data:
                return
            if circuit_data_limit is not None:
                if len(data) > circuit_data_limit[0]:
                    self.circuits_cut["bytes"] += 1
                    return
                circuit_data_limit[0] -= len(data)
            await dst_stream.write(data)
            self.bytes_relayed += len(data)

    async def handle_incoming_connection(self, stream: Any, remote_peer_id: bytes) -> None:
        await super().handle_incoming_connection(stream, remote_peer_id)
        self.on_relayed_inbound(ID(remote_peer_id).to_base58())


# -- small records ----------------------------------------------------------------------------

@dataclass
class Reservation:
    relay: str
    addr: str  # the relay address we reached it at (ends in /p2p/<relay>)
    expires: float  # wall clock, from the relay's answer
    reserved_at: float  # wall clock

    def circuit_addr(self, me: str) -> str:
        return f"{self.addr}/p2p-circuit/p2p/{me}"


@dataclass
class _Backoff:
    until: float = 0.0
    delay: float = 0.0

    def fail(self, now: float, *, lo: float = 1.0, hi: float = 300.0) -> None:
        self.delay = min(hi, max(lo, self.delay * 2))
        self.until = now + self.delay * random.uniform(0.8, 1.2)


@dataclass
class _Upnp:
    enabled: bool = False
    state: str = "off"  # off | searching | mapped | none | failed
    external: Addr | None = None
    detail: str = ""


@dataclass
class _Stats:
    observations: int = 0
    observe_failures: int = 0
    probes: int = 0
    dialbacks_served: int = 0
    dialbacks_refused: int = 0
    reservations_made: int = 0
    reservation_failures: int = 0
    relayed_dials: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class _Notifee(INotifee):
    def __init__(self, manager: NatManager) -> None:
        self._m = manager

    async def connected(self, network: Any, conn: INetConn) -> None:
        self._m._on_connected(conn)

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        self._m._on_disconnected(conn)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, maddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, maddr: Any) -> None:
        pass


def _maddr(addr: Addr) -> str:
    ip, port = addr
    return f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{port}"


def _split_p2p(addr: str) -> tuple[str, str]:
    base, _, peer_id = addr.rpartition("/p2p/")
    return base, peer_id


# -- the manager ------------------------------------------------------------------------------

class NatManager:
    """Handle returned by `serve_nat`; see the module docstring."""

    def __init__(self, node: Any, config: NatConfig, bootstrap: list[str]) -> None:
        self.node = node
        self.config = config
        self.me = node.peer_id
        self.bootstrap: list[tuple[str, str]] = []  # (peer id, full multiaddr)
        for addr in bootstrap:
            base, pid = _split_p2p(addr)
            if pid and pid != self.me:
                self.bootstrap.append((pid, addr))
        # While unknown, retry within seconds: an observer with no helper to dial us back
        # usually has one as soon as the next daemon connects to it.
        self.tracker = ReachabilityTracker(self.me, recheck=config.recheck_interval_s,
                                           retry_min=0.5, retry_max=10.0)
        self.observations: dict[str, Observation] = {}
        self.reservations: dict[str, Reservation] = {}
        self.stats = _Stats()
        self.upnp = _Upnp(enabled=config.upnp, state="searching" if config.upnp else "off")
        self.relay = _CircuitRelay(node.host, config, self._on_relayed_inbound)
        self.puncher: HolePuncher | None = None
        self._verdict = Verdict("unknown", "unknown", (), "starting")
        self._verdict_changed = trio.Event()
        self._observed_at: dict[str, float] = {}
        self._observing: set[str] = set()
        self._observe_failed: dict[str, float] = {}  # peers that do not speak observe
        self._observe_peers: dict[str, None] = {}  # peers known to speak observe (helpers)
        self._learned_relays: dict[str, tuple[list[str], float]] = {}
        self._announced: dict[str, tuple[Addr, float]] = {}  # relays that told us so
        self._relay_backoff: dict[str, _Backoff] = {}
        self._dialback_last: dict[str, float] = {}
        self._dialback_slots = trio.Semaphore(4)
        self._plain_tcp = TCP()  # dial-backs leave from an ephemeral port, never pooled
        self._wake_observe = trio.Event()
        self._wake_keeper = trio.Event()
        self._hunger = _HUNGER_MIN  # re-observe this often while short of relays
        self._probing = False
        self._nursery: trio.Nursery | None = None

    # -- what we know --------------------------------------------------------------------
    def listen_port(self) -> int | None:
        ep = self.node.listen_endpoint()
        return None if ep is None else ep[1]

    def nat_view(self) -> NatView:
        port = self.listen_port()
        if port is None:
            return NatView("unknown", (), "not listening")
        return classify_nat(port, self.observations.values())

    def verdict(self) -> Verdict:
        return self._verdict

    def _recompute(self) -> None:
        old = self._verdict
        new = self.tracker.verdict(self.nat_view(), trio.current_time())
        self._verdict = new
        serve = (self.config.relay_service == "on"
                 or (self.config.relay_service == "auto" and new.reachability == "public"))
        if serve != self.relay.serving:
            self.relay.serving = serve
            log.info("relay service %s", "on" if serve else "off")
            # Tell our observers at once: they list the relays they know to others.
            self._observed_at.clear()
            self._wake_observe.set()
        if (old.reachability, old.nat) != (new.reachability, new.nat):
            log.info("reachability=%s nat=%s (%s)", new.reachability, new.nat, new.reason)
            self._wake_keeper.set()
            self._verdict_changed.set()
            self._verdict_changed = trio.Event()

    async def wait_reachability_change(self) -> Verdict:
        """The verdict, once its reachability or NAT kind has changed (for the daemon to
        publish an event or switch the DHT mode without polling)."""
        await self._verdict_changed.wait()
        return self._verdict

    def local_view(self) -> PeerView:
        """What we tell a peer in a hole-punch exchange."""
        v, view = self._verdict, self.nat_view()
        addrs = v.public_addrs if v.reachability == "public" else view.addrs
        return PeerView(v.reachability, view.kind, tuple(addrs))

    def observed_addrs(self) -> list[str]:
        return sorted({_maddr(o.observed) for o in self.observations.values()})

    def advertised_addrs(self) -> list[str]:
        """Addresses others can use for us: verified public ones, then relayed ones."""
        out = [f"{_maddr(a)}/p2p/{self.me}" for a in self._verdict.public_addrs]
        out += [r.circuit_addr(self.me) for r in self.reservations.values()]
        return out

    def status(self) -> dict[str, Any]:
        v = self._verdict
        via = []
        if v.reachability == "public":
            upnp = self.upnp.external
            if any(a != upnp for a in v.public_addrs):
                via.append("direct")
            if upnp is not None and upnp in v.public_addrs:
                via.append("upnp")
        if self.reservations:
            via.append("relay")
        return {
            "reachability": v.reachability,
            "nat": v.nat,
            "reason": v.reason,
            "observed_addrs": self.observed_addrs(),
            "public_addrs": [_maddr(a) for a in v.public_addrs],
            "reachable_via": via,
            "reservations": [{"relay": r.relay, "expires": round(r.expires, 3),
                              "addr": r.circuit_addr(self.me)}
                             for r in sorted(self.reservations.values(), key=lambda r: r.relay)],
            "relay_service": {
                "mode": self.config.relay_service,
                "active": self.relay.serving,
                "reservations": self.relay.active_reservations(),
                "circuits": self.relay.active_circuits,
                "circuits_total": self.relay.circuits_total,
                "bytes_relayed": self.relay.bytes_relayed,
                "circuits_cut": dict(self.relay.circuits_cut),
                "refused": dict(self.relay.refused),
                "max_reservations": self.config.relay_max_reservations,
                "max_circuits": self.config.relay_max_circuits,
                "max_circuits_per_peer": self.config.relay_max_circuits_per_peer,
                "max_circuit_bytes": self.config.relay_max_circuit_bytes,
                "max_circuit_duration_s": self.config.relay_max_circuit_duration_s,
            },
            "holepunch": ({"enabled": True, **self.puncher.statistics()}
                          if self.puncher is not None else {"enabled": False}),
            "upnp": {"enabled": self.upnp.enabled, "state": self.upnp.state,
                     "external": None if self.upnp.external is None else _maddr(self.upnp.external),
                     "detail": self.upnp.detail},
            "observers": sorted(self.observations),
            "statistics": {k: v for k, v in dataclasses.asdict(self.stats).items() if k != "extra"},
        }

    def peer_info(self, peer_id: str) -> dict[str, Any] | None:
        """The last hole-punch outcome with a peer (for `lattice peers`), or None."""
        return None if self.puncher is None else self.puncher.peer_record(peer_id)

    # -- connection events ---------------------------------------------------------------
    def _on_connected(self, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id.to_base58()
        if self.puncher is not None:
            self.puncher.note_connection(peer, is_relayed(conn))
        if self._verdict.reachability == "unknown":
            # An observer that had no helper to dial us back may have one now.
            self.tracker.probe_now()
        self._wake_observe.set()

    def _on_disconnected(self, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id.to_base58()
        if self.node.live_connections(peer):
            return
        self.observations.pop(peer, None)
        self._observed_at.pop(peer, None)
        if self.reservations.pop(peer, None) is not None:
            log.info("relay=%s disconnected: reservation lost", peer)
            self._wake_keeper.set()

    def _on_relayed_inbound(self, peer: str) -> None:
        log.debug("peer=%s relayed connection accepted", peer)
        if self.puncher is not None:
            self.puncher.request(peer)

    def _direct_peers(self) -> list[str]:
        return [p for p in self.node.connected_peers()
                if p != self.me and self.node.connection_kind(p) == "direct"]

    # -- observing and probing (requester side) --------------------------------------------
    async def _observe_loop(self) -> None:
        assert self._nursery is not None
        while True:
            self._wake_observe = trio.Event()
            now = trio.current_time()
            # Short of relays: ask observers again soon (backing off), they may have
            # learned of relays since; otherwise refresh every observe_interval_s.
            interval = self.config.observe_interval_s
            if self._wants_reservations() and len(self.reservations) < self.config.max_relays:
                interval = min(interval, self._hunger)
            preferred = {pid for pid, _ in self.bootstrap} | set(self.reservations) | set(
                self._learned_relays)
            peers = sorted(self._direct_peers(), key=lambda p: (p not in preferred, p))
            # When to look again: only for things that can happen then. Whatever waits on
            # an event (an observation or a probe ending, a new connection) wakes us
            # through _wake_observe; waking for it sooner would only spin.
            due = []
            for peer in peers:
                if peer in self._observing:
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
                    self._hunger = min(self.config.observe_interval_s, self._hunger * 2)
                self._nursery.start_soon(self._observe, peer, ())
            if not self._probing and self.observations and self._dialback_candidates():
                if self.tracker.probe_due(now):
                    self._probing = True
                    self._nursery.start_soon(self._probe)
                else:
                    due.append(self.tracker.next_probe_at())
            wait = max(0.05, min([30.0] + [t - now for t in due]))
            with trio.move_on_after(wait):
                await self._wake_observe.wait()

    def _dialback_candidates(self) -> tuple[Addr, ...]:
        port = self.listen_port()
        addrs = [o.observed for o in self.observations.values() if o.local[1] == port]
        if self.upnp.external is not None:
            addrs.append(self.upnp.external)
        return tuple(dict.fromkeys(addrs))[:rcore.MAX_DIALBACK_ADDRS]

    async def _observe(self, peer: str, dialback: tuple[Addr, ...]) -> rcore.ObserveAnswer | None:
        """Ask ``peer`` what it sees of our connection (and maybe for a dial-back)."""
        try:
            answer = await self._ask_observe(peer, dialback)
        except (PeerError, ObserveProtocolError, trio.TooSlowError) as e:
            self.stats.observe_failures += 1
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
            self._wake_observe.set()
        return answer

    async def _ask_observe(self, peer: str, dialback: tuple[Addr, ...]) -> rcore.ObserveAnswer:
        sid = os.urandom(rcore.OBSERVE_ID_BYTES)
        try:
            raw = await self.node.host.new_stream(ID.from_base58(peer), [OBSERVE_PROTOCOL_ID])
        except PEER_ERRORS as e:
            raise PeerError(f"cannot open observe stream: {e}") from None
        stream = Libp2pStream(raw, OBSERVE_PROTOCOL_ID)
        try:
            conn = _swarm_conn(self.node, raw)
            local = None if conn is None or is_relayed(conn) else local_address(conn)
            request: dict[str, Any] = {"type": "observe", "id": sid, "relay": self.relay.serving}
            if dialback:
                request["dialback"] = [list(a) for a in dialback]
            timeout = 5.0 + (self._arrange_budget(len(dialback)) if dialback else 0.0)
            with trio.fail_after(timeout):
                await send_frame(stream, request)
                msg = rcore.check_message(await recv_frame(stream, max_bytes=rcore.OBSERVE_MAX_MESSAGE))
            if msg["type"] != "observed" or msg["id"] != sid:
                raise ObserveProtocolError("expected observed with our id")
            answer = rcore.decode_observed(msg)
        finally:
            await stream.close()
        self._note_observe_peer(peer)
        now = trio.current_time()
        self._observed_at[peer] = now  # even when unusable: not again before the interval
        if answer.observed is not None and local is not None:
            self.observations[peer] = Observation(peer, local, answer.observed)
            self.stats.observations += 1
        self._learn_relays(peer, answer.relays, now)
        self._recompute()
        return answer

    def _note_observe_peer(self, peer: str) -> None:
        self._observe_peers.pop(peer, None)
        self._observe_peers[peer] = None  # most recent last; bounded
        while len(self._observe_peers) > 1024:
            self._observe_peers.pop(next(iter(self._observe_peers)))

    def _arrange_budget(self, n_addrs: int) -> float:
        """Seconds an observer may spend arranging one dial-back (all helpers)."""
        return 2.0 + n_addrs * self.config.dialback_timeout_s

    def _learn_relays(self, observer: str, relays: tuple[rcore.RelayInfo, ...], now: float) -> None:
        for r in relays:
            if r.peer == self.me or not r.addrs:
                continue
            if r.peer not in self._learned_relays:
                self._wake_keeper.set()
            self._learned_relays[r.peer] = ([f"{_maddr(a)}/p2p/{r.peer}" for a in r.addrs], now)
        while len(self._learned_relays) > _RELAY_CANDIDATES_MAX:
            self._learned_relays.pop(next(iter(self._learned_relays)))

    async def _probe(self) -> None:
        """One reachability probe: observers in turn, until one has a third peer dial
        us back (an observer with no other peer has no helper to offer)."""
        try:
            candidates = self._dialback_candidates()
            observers = [p for p in self.observations if p in self.node.connected_peers()]
            self.stats.probes += 1
            if observers:
                k = self.stats.probes % len(observers)
                observers = observers[k:] + observers[:k]  # spread the load
            for observer in observers if candidates else []:
                answer = await self._observe(observer, candidates)
                now = trio.current_time()
                if answer is not None and answer.dialback in ("ok", "failed"):
                    addr = answer.dialback_addr or candidates[0]
                    self.tracker.record(DialBack(observer, answer.helper, addr,
                                                 answer.dialback == "ok", now), now)
                    break
                log.debug("reachability probe via %s: %s", observer,
                          "no answer" if answer is None else answer.dialback)
            else:
                self.tracker.no_result(trio.current_time())
            self._recompute()
        finally:
            self._probing = False
            self._wake_observe.set()

    # -- observing (observer and helper side) -------------------------------------------------
    async def _serve_observe(self, raw: Any) -> None:
        stream = Libp2pStream(raw, OBSERVE_PROTOCOL_ID)
        peer = stream.remote_peer_id
        try:
            with trio.fail_after(5.0):
                msg = rcore.check_message(await recv_frame(stream, max_bytes=rcore.OBSERVE_MAX_MESSAGE))
            if msg["type"] == "observe":
                self._note_observe_peer(peer)
                reply = await self._answer_observe(peer, raw, msg)
            elif msg["type"] == "dialback":
                reply = await self._answer_dialback(msg)
            else:
                raise ObserveProtocolError(f"unexpected {msg['type']}")
            await send_frame(stream, reply)
        except (ObserveProtocolError, RemoteProtocolError) as e:
            log.info("observe peer=%s broke the protocol: %s", peer, e)
            await stream.reset()
        except (PeerError, trio.TooSlowError):
            pass  # gone or slow: nothing to answer
        finally:
            await stream.close()

    async def _answer_observe(self, peer: str, raw: Any, msg: dict[str, Any]) -> dict[str, Any]:
        req = rcore.decode_observe(msg)
        conn = _swarm_conn(self.node, raw)
        observed = None if conn is None or is_relayed(conn) else remote_address(conn)
        now = trio.current_time()
        if observed is not None and req.relay:
            if peer not in self._announced:
                self._wake_keeper.set()  # a relay for us too
            self._announced[peer] = (observed, now)
            while len(self._announced) > _RELAY_CANDIDATES_MAX:
                self._announced.pop(next(iter(self._announced)))
        elif not req.relay:
            self._announced.pop(peer, None)
        reply: dict[str, Any] = {"type": "observed", "id": msg["id"],
                                 "addr": None if observed is None else list(observed),
                                 "relays": self._relays_for(peer, now)}
        if req.dialback:
            reply["dialback"] = await self._arrange_dialback(peer, observed, req.dialback, now)
        return reply

    def _relays_for(self, asker: str, now: float) -> list[dict[str, Any]]:
        out = []
        if self.relay.serving and self._verdict.public_addrs:
            out.append({"peer": self.me, "addrs": [list(a) for a in self._verdict.public_addrs]})
        for pid, (addr, at) in list(self._announced.items()):
            if pid != asker and now - at < _LEARNED_RELAY_TTL and pid in self.node.connected_peers():
                out.append({"peer": pid, "addrs": [list(addr)]})
        return out[:rcore.MAX_RELAYS_LISTED]

    async def _arrange_dialback(self, peer: str, observed: Addr | None,
                                wanted: tuple[Addr, ...], now: float) -> dict[str, Any]:
        """Have a peer other than ``peer`` and us dial ``wanted`` on a fresh connection.
        Only addresses at the IP we see ``peer`` at: we never aim helpers at others."""
        addrs = [a for a in wanted if observed is not None and a[0] == observed[0]]
        if not addrs or now - self._dialback_last.get(peer, -1e9) < 1.0:
            self.stats.dialbacks_refused += 1
            return {"status": "refused", "helper": "", "addr": None}
        self._dialback_last[peer] = now
        while len(self._dialback_last) > 1024:
            self._dialback_last.pop(next(iter(self._dialback_last)))
        helpers = [p for p in self._direct_peers() if p != peer]
        random.shuffle(helpers)
        helpers.sort(key=lambda p: p not in self._observe_peers)
        with trio.move_on_after(self._arrange_budget(len(addrs))):  # the requester waits so long
            for helper in helpers[:3]:
                try:
                    status, addr = await self._ask_helper(helper, peer, addrs)
                except (PeerError, ObserveProtocolError, trio.TooSlowError) as e:
                    log.debug("dial-back helper=%s for peer=%s failed: %s", helper, peer, e)
                    continue
                if status == "busy":
                    continue
                return {"status": status, "helper": helper,
                        "addr": None if addr is None else list(addr)}
        return {"status": "no_helper", "helper": "", "addr": None}

    async def _ask_helper(self, helper: str, peer: str,
                          addrs: list[Addr]) -> tuple[str, Addr | None]:
        sid = os.urandom(rcore.OBSERVE_ID_BYTES)
        stream = await self.node.open_stream(helper, OBSERVE_PROTOCOL_ID)
        try:
            with trio.fail_after(2.0 + len(addrs) * self.config.dialback_timeout_s):
                await send_frame(stream, {"type": "dialback", "id": sid, "peer": peer,
                                          "addrs": [list(a) for a in addrs]})
                msg = rcore.check_message(await recv_frame(stream, max_bytes=rcore.OBSERVE_MAX_MESSAGE))
        finally:
            await stream.close()
        if msg["type"] != "dialback_result" or msg["id"] != sid:
            raise ObserveProtocolError("expected dialback_result with our id")
        return rcore.decode_dialback_result(msg)

    async def _answer_dialback(self, msg: dict[str, Any]) -> dict[str, Any]:
        req = rcore.decode_dialback(msg)
        reply: dict[str, Any] = {"type": "dialback_result", "id": msg["id"], "status": "busy",
                                 "addr": None}
        if req.peer == self.me:
            reply["status"] = "failed"
            return reply
        try:
            self._dialback_slots.acquire_nowait()
        except trio.WouldBlock:
            return reply
        try:
            self.stats.dialbacks_served += 1
            for addr in req.addrs:
                if await self._dial_back(req.peer, addr):
                    reply.update(status="ok", addr=list(addr))
                    return reply
            reply["status"] = "failed"
            return reply
        finally:
            self._dialback_slots.release()

    async def _dial_back(self, peer: str, addr: Addr) -> bool:
        """A fresh TCP connection to ``addr`` that completes a Noise handshake with
        ``peer``; the swarm never sees it, so no existing connection can be reused."""
        maddr = multiaddr.Multiaddr(f"{_maddr(addr)}/p2p/{peer}")
        upgrader = self.node.host.get_network().upgrader
        with trio.move_on_after(self.config.dialback_timeout_s):
            raw = None
            try:
                raw = await self._plain_tcp.dial(maddr)
                secured = await upgrader.upgrade_security(raw, True, ID.from_base58(peer))
                await secured.close()
                return True
            except (OpenConnectionError, UpgradeFailure) + PEER_ERRORS as e:
                log.debug("dial-back to peer=%s at %s failed: %s", peer, addr, e)
                return False
            finally:
                if raw is not None:
                    with trio.CancelScope(shield=True):
                        try:
                            await raw.close()
                        except PEER_ERRORS:
                            pass
        return False

    # -- relays found elsewhere (the DHT) ----------------------------------------------------
    def learn_relays(self, relays: list[tuple[str, list[str]]]) -> None:
        """Relays found by others means (the daemon's DHT provider lookup): (peer id,
        multiaddrs without /p2p) each; they join the candidates we reserve on."""
        now = trio.current_time()
        for pid, addrs in relays:
            if pid == self.me or not addrs:
                continue
            if pid not in self._learned_relays:
                self._wake_keeper.set()
            self._learned_relays[pid] = ([f"{a}/p2p/{pid}" for a in addrs[:8]], now)
        while len(self._learned_relays) > _RELAY_CANDIDATES_MAX:
            self._learned_relays.pop(next(iter(self._learned_relays)))

    @property
    def relaying(self) -> bool:
        """True while we serve as a relay hop for others."""
        return bool(self.relay.serving)

    # -- reservations (client side) ---------------------------------------------------------
    def _wants_reservations(self) -> bool:
        return self.config.max_relays > 0 and self._verdict.reachability != "public"

    def _relay_candidates(self) -> list[tuple[str, str]]:
        """(peer id, address) of relays to reserve on, best first: peers that told us
        they serve as relays, relays observers listed, then bootstrap peers (which may
        or may not serve)."""
        now = trio.current_time()
        out = []
        for pid, (addr, at) in list(self._announced.items()):
            if now - at <= _LEARNED_RELAY_TTL:
                out.append((pid, f"{_maddr(addr)}/p2p/{pid}"))
        for pid, (addrs, at) in list(self._learned_relays.items()):
            if now - at > _LEARNED_RELAY_TTL:
                del self._learned_relays[pid]
                continue
            out += [(pid, a) for a in addrs]
        out += self.bootstrap
        seen: dict[str, str] = {}
        for pid, relay_addr in out:
            if pid != self.me:
                seen.setdefault(pid, relay_addr)
        return list(seen.items())

    async def _keep_reservations(self) -> None:
        while True:
            self._wake_keeper = trio.Event()
            wall = time.time()
            if not self._wants_reservations():
                if self.reservations:
                    log.info("publicly reachable: dropping %d relay reservation(s)",
                             len(self.reservations))
                    self.reservations.clear()
            else:
                todo = [(r.relay, r.addr) for r in self.reservations.values()
                        if r.expires - wall <= self._refresh_margin(r)]
                now = trio.current_time()
                for pid, addr in self._relay_candidates():
                    if len(self.reservations) + len(todo) >= self.config.max_relays:
                        break
                    if pid in self.reservations or now < self._relay_backoff.get(pid, _Backoff()).until:
                        continue
                    todo.append((pid, addr))
                if todo:
                    async with trio.open_nursery() as nursery:
                        for pid, addr in todo:
                            nursery.start_soon(self._reserve, pid, addr)
                    continue  # look again at once: some may have failed, others appeared
            wait = 30.0
            for r in self.reservations.values():
                wait = min(wait, r.expires - self._refresh_margin(r) - time.time())
            now = trio.current_time()
            for pid, _ in self._relay_candidates():
                b = self._relay_backoff.get(pid)
                if b is not None and pid not in self.reservations:
                    wait = min(wait, b.until - now)
            with trio.move_on_after(max(0.05, wait)):
                await self._wake_keeper.wait()

    @staticmethod
    def _refresh_margin(r: Reservation) -> float:
        """Refresh this long before expiry: a quarter of the TTL within [30 s, 10 min],
        but never more than half of it (a short TTL must not mean refreshing nonstop)."""
        ttl = max(0.0, r.expires - r.reserved_at)
        return min(max(30.0, min(600.0, ttl / 4)), ttl / 2)

    async def _reserve(self, relay: str, addr: str) -> None:
        backoff = self._relay_backoff.setdefault(relay, _Backoff())
        try:
            with trio.fail_after(10.0):
                if relay not in self.node.connected_peers():
                    await self.node.connect(addr, timeout=5.0)
                expires = await self._send_reserve(relay)
        except (PeerError, trio.TooSlowError) as e:
            self.stats.reservation_failures += 1
            # "not serving (yet)" is what a public daemon says until its own dial-back
            # came through: ask again soon. Anything else backs off up to 5 minutes.
            soft = "PERMISSION_DENIED" in str(e) or "RESOURCE_LIMIT" in str(e)
            backoff.fail(trio.current_time(), hi=30.0 if soft else 300.0)
            lost = self.reservations.pop(relay, None) is not None
            log.log(logging.INFO if lost or not soft else logging.DEBUG,
                    "relay=%s reservation failed (%s); retry in %.0f s", relay, e, backoff.delay)
            return
        backoff.delay = 0.0
        backoff.until = 0.0
        new = relay not in self.reservations
        self._hunger = _HUNGER_MIN
        self.reservations[relay] = Reservation(relay, addr, expires, time.time())
        self.stats.reservations_made += 1
        if new:
            log.info("relay=%s reservation until %s: reachable at %s", relay,
                     time.strftime("%H:%M:%S", time.localtime(expires)),
                     self.reservations[relay].circuit_addr(self.me))

    async def _send_reserve(self, relay: str) -> float:
        try:
            stream = await self.node.host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL_ID])
        except PEER_ERRORS as e:
            raise PeerError(f"no relay service: {e}") from None
        try:
            await write_delimited_msg(stream, HopMessage(
                type=HopMessage.RESERVE, peer=CircuitPeerId(id=ID.from_base58(self.me).to_bytes())))
            resp = await read_delimited_msg(stream, HopMessage)
        except (ProtobufDecodeError, ValueError) as e:
            raise RemoteProtocolError(f"bad reservation answer: {e}") from None
        except PEER_ERRORS as e:
            raise PeerError(f"reservation stream failed: {e}") from None
        finally:
            try:
                await stream.close()
            except PEER_ERRORS:
                pass
        status = StatusCode(resp.status) if resp.HasField("status") else StatusCode.UNUSED
        if status != StatusCode.OK or not resp.HasField("reservation"):
            raise PeerError(f"refused: {_status_name(status)}")
        expires = float(resp.reservation.expire)
        if expires <= time.time():
            raise RemoteProtocolError("reservation already expired")
        return expires

    # -- dialing by peer id -----------------------------------------------------------------
    async def connect(self, target: str, *, timeout: float = 10.0) -> str:
        """Connect to ``target``: a multiaddr (also ``.../p2p-circuit/p2p/<id>``), or a
        peer id (``12D3KooW...`` or ``/p2p/<id>``), reached directly at addresses we know
        for it, else through a relay (ours, or ones it advertised). Returns the peer id;
        raises `DialError` with the reasons."""
        target = target.strip()
        if "/p2p-circuit" in target:
            return await self._dial_circuit(target, timeout)
        if target.startswith("/p2p/"):
            target = target[len("/p2p/"):]
        if target.startswith("/"):
            return await self.node.connect(target, timeout=timeout)
        try:
            pid = ID.from_base58(target)
        except (ValueError, KeyError) as e:
            raise BadDialTarget(f"not a dialable multiaddr or peer id: {target!r} ({e})") from None
        peer = pid.to_base58()
        if peer == self.me:
            raise BadDialTarget("that is this daemon itself")
        if self.node.live_connections(peer):
            return peer
        errors: list[str] = []
        known = self.node.get_addrs(peer)
        direct = [multiaddr.Multiaddr(a) for a in known if "/p2p-circuit" not in a]
        relays = [_split_p2p(a.split("/p2p-circuit")[0])[1] for a in known if "/p2p-circuit" in a]
        relays += list(self.reservations) + [p for p, _ in self._relay_candidates()]
        relays = list(dict.fromkeys(r for r in relays if r and r not in (peer, self.me)))

        async def via_direct(cancel: trio.CancelScope) -> None:
            # Known addresses may be LAN addresses of another network, which hang until
            # a timeout: so this races the relays instead of going first.
            try:
                await self.node.host.connect(PeerInfo(pid, direct))
            except PEER_ERRORS as e:
                errors.append(f"direct: {e}")
                return
            cancel.cancel()

        async def via_relays(cancel: trio.CancelScope) -> None:
            for relay in relays:
                try:
                    await self._dial_via(relay, pid)
                except PeerError as e:
                    errors.append(f"via {relay[-8:]}: {e}")
                    continue
                cancel.cancel()
                return

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                if direct:
                    nursery.start_soon(via_direct, nursery.cancel_scope)
                nursery.start_soon(via_relays, nursery.cancel_scope)
        if self.node.live_connections(peer):
            return peer
        if not direct and not relays:
            raise DialError(f"no address or relay known for {peer}")
        reasons = "; ".join(errors[-4:]) or f"timed out after {timeout:g} s"
        raise DialError(f"cannot reach {peer}: {reasons}")

    async def _dial_circuit(self, target: str, timeout: float) -> str:
        relay_part, _, dest = target.partition("/p2p-circuit")
        _, dest_id = _split_p2p(dest)
        base, relay_id = _split_p2p(relay_part)
        try:
            pid, rid = ID.from_base58(dest_id), ID.from_base58(relay_id)
        except (ValueError, KeyError) as e:
            raise BadDialTarget(f"not a circuit address: {target!r} ({e})") from None
        with trio.move_on_after(timeout):
            if rid.to_base58() not in self.node.connected_peers():
                if not base:
                    raise DialError(f"not connected to relay {relay_id} and no address for it")
                await self.node.connect(relay_part, timeout=timeout)
            try:
                await self._dial_via(rid.to_base58(), pid)
            except DialError:
                raise
            except PeerError as e:
                raise DialError(f"relayed dial {target} failed: {e}") from None
            return pid.to_base58()
        raise DialError(f"relayed dial {target} timed out after {timeout:g} s")

    async def _dial_via(self, relay: str, target: ID) -> INetConn:
        """A relayed connection to ``target`` through ``relay`` (we must be connected to
        the relay). py-libp2p's `host.connect` cannot dial `/p2p-circuit` addresses."""
        self.stats.relayed_dials += 1
        if relay not in self.node.connected_peers():
            addr = next((a for p, a in self._relay_candidates() if p == relay), None)
            if addr is None:
                raise PeerError("not connected to the relay")
            await self.node.connect(addr, timeout=5.0)
        try:
            stream = await self.node.host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL_ID])
        except PEER_ERRORS as e:
            raise PeerError(f"no relay service: {e}") from None
        try:
            with trio.fail_after(10.0):
                await write_delimited_msg(stream, HopMessage(
                    type=HopMessage.CONNECT, peer=CircuitPeerId(id=target.to_bytes())))
                resp = await read_delimited_msg(stream, HopMessage)
            status = StatusCode(resp.status) if resp.HasField("status") else StatusCode.UNUSED
            if status != StatusCode.OK:
                raise PeerError(f"relay said {_status_name(status)}")
            circuit = multiaddr.Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{target.to_base58()}")
            raw = RawConnection(stream=stream, initiator=True,
                                connection_type=ConnectionType.RELAYED, addresses=[circuit])
            return await self.node.host.upgrade_outbound_connection(raw, target)
        except BaseException as e:
            with trio.CancelScope(shield=True):
                try:
                    await stream.reset()
                except PEER_ERRORS:
                    pass
            if isinstance(e, (ProtobufDecodeError, ValueError)):
                raise RemoteProtocolError(f"bad relay answer: {e}") from None
            if isinstance(e, trio.TooSlowError):
                raise PeerError("relay did not answer in 10 s") from None
            if isinstance(e, PEER_ERRORS) and not isinstance(e, PeerError):
                raise PeerError(f"relayed connection failed: {e}") from None
            raise

    # -- UPnP ---------------------------------------------------------------------------------
    async def _upnp(self) -> None:
        """Map our listen port on a UPnP gateway and keep the lease; never on the startup
        path (discovery takes ~1 s, more with no gateway) and never a traceback."""
        port = self.listen_port()
        if port is None:
            self.upnp.state, self.upnp.detail = "failed", "not listening"
            return
        while True:
            result = await trio.to_thread.run_sync(_upnp_map, port, abandon_on_cancel=True)
            state, external, detail = result
            self.upnp.state, self.upnp.external, self.upnp.detail = state, external, detail
            if state != "mapped" or external is None:
                log.info("upnp: %s", detail)
                return
            log.info("upnp: mapped %s -> port %d", _maddr(external), port)
            self.tracker.probe_now()
            self._wake_observe.set()
            await trio.sleep(1800)  # the lease is 3600 s


def _upnp_map(port: int) -> tuple[str, Addr | None, str]:
    """Blocking (worker thread): find a gateway, map TCP ``port`` to us for an hour."""
    try:
        import miniupnpc
    except ImportError:
        return "failed", None, "miniupnpc is not installed"
    upnp = miniupnpc.UPnP()
    upnp.discoverdelay = 500  # ms; discover() takes ~4 s anyway when nobody answers
    # miniupnpc raises bare Exception("...") for every failure; the message is all there
    # is. discover() raises "Success" when nothing answered: selectigd() then says so.
    try:
        upnp.discover()
    except Exception as e:  # noqa: BLE001 - see above
        if str(e) != "Success":
            return "none", None, f"UPnP discovery failed: {e}"
    try:
        upnp.selectigd()
    except Exception as e:  # noqa: BLE001 - see above
        if "No UPnP device" in str(e):
            return "none", None, "no UPnP gateway found"
        return "none", None, f"no usable UPnP gateway: {e}"
    try:
        external = upnp.externalipaddress()
        upnp.addportmapping(port, "TCP", upnp.lanaddr, port, "latticed", "", 3600)
    except Exception as e:  # noqa: BLE001 - see above
        return "failed", None, f"gateway {upnp.lanaddr} refused the mapping: {e}"
    if not external:
        return "failed", None, f"gateway {upnp.lanaddr} gave no external address"
    return "mapped", (str(external), port), f"gateway {upnp.lanaddr}"


def _status_name(code: StatusCode | int) -> str:
    try:
        return StatusCode(code).name
    except ValueError:
        return f"status {int(code)}"


def _swarm_conn(node: Any, raw_stream: Any) -> INetConn | None:
    """The swarm connection a libp2p stream runs on."""
    muxed = getattr(raw_stream, "muxed_conn", None)
    if muxed is None:
        return None
    for conn in node.host.get_network().get_connections(muxed.peer_id):
        if conn.muxed_conn is muxed:
            return conn
    return None


async def serve_nat(node: Any, *, config: NatConfig, bootstrap: list[str],
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the connectivity manager for ``node`` (a `lattice.net.host.Libp2pNode`) until
    cancelled; hands back the `NatManager` once its protocol handlers are registered.
    Start it right after the node is up, before anything dials out."""
    m = NatManager(node, config, bootstrap)
    # every service's streams reach peers by id as `lattice peers connect` does: a
    # NATed peer is dialed through a relay (and hole-punched from there)
    node.set_peer_router(m.connect)
    node.host.set_stream_handler(OBSERVE_PROTOCOL_ID, m._serve_observe)
    node.host.get_network().register_notifee(_Notifee(m))
    m._recompute()
    try:
        async with trio.open_nursery() as nursery, background_trio_service(m.relay):
            m._nursery = nursery
            if config.holepunch:
                m.puncher = await nursery.start(lambda task_status: serve_holepunch(
                    node, local_view=m.local_view, config=HolePunchConfig(),
                    task_status=task_status))
            nursery.start_soon(m._observe_loop)
            nursery.start_soon(m._keep_reservations)
            if config.upnp:
                nursery.start_soon(m._upnp)
            task_status.started(m)
            await trio.sleep_forever()
    finally:
        m._nursery = None
        node.set_peer_router(None)
        node.host.remove_stream_handler(OBSERVE_PROTOCOL_ID)
