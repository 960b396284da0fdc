"""The connectivity manager: composes observe, relay hop, reservations, dialing, hole
punching and UPnP for one libp2p node, and says how we are reachable.

Owns `NatManager` (the handle the daemon holds: `connect`, `status`, `advertised_addrs`,
`observed_addrs`, `learn_relays`, `relaying`, `wait_reachability_change`, `peer_info`)
and `serve_nat`, which runs it. The verdict (`lattice.core.reachability`) decides
whether we serve as a relay and whether we want reservations. It learns of connections
from the node's peer events (`PeerNetwork.peer_events`), like every other service. Must
not import latticed.

Failure policy (`serve_nat`): everything per peer (an observation, a dial-back, a
reservation, a relayed dial, a punch) is contained in the part that does it: a peer
that vanishes or misbehaves is logged with its id and retried later with backoff; the
service keeps running. Our bugs propagate and take the daemon down.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any

import trio
from libp2p.tools.anyio_service import background_trio_service

from lattice.core.holepunch import CAPS, MAX_LOCAL_ADDRS, Addr, Birthday, PeerView
from lattice.core.reachability import Verdict
from lattice.net.nat.dialing import PeerDialer
from lattice.net.nat.holepunch import HolePunchConfig, HolePuncher, serve_holepunch
from lattice.net.nat.observe import OBSERVE_PROTOCOL_ID, Observer
from lattice.net.nat.relay_hop import CircuitRelay, check_libp2p_version
from lattice.net.nat.reservations import RelayDirectory, ReservationKeeper, maddr
from lattice.net.nat.upnp import Upnp, serve_upnp
from lattice.net.nat_config import NatConfig
from lattice.net.shaping import ByteBudget
from lattice.net.streams import ADDED, CONNECTED, DISCONNECTED, PeerEvents

log = logging.getLogger("lattice.net.nat")

# Peer events queued for the manager; past it they are dropped and the manager re-reads
# the connections once (a ``lagged`` event), so the bound costs a resync, not a peer.
PEER_EVENT_BUFFER = 64


class NatManager:
    """Handle returned by `serve_nat`; see the module docstring."""

    def __init__(self, node: Any, config: NatConfig, bootstrap: list[str], *,
                 rng: random.Random | None = None, budget: ByteBudget | None = None) -> None:
        self.node = node
        self.config = config
        self.me = node.peer_id
        self.rng = rng or random.Random()
        self.upnp = Upnp(enabled=config.upnp, state="searching" if config.upnp else "off")
        self.relay = CircuitRelay(node.host, config, self._on_relayed_inbound, budget)
        self.directory = RelayDirectory(self.me, bootstrap, on_new=self._relay_heard_of)
        self.keeper = ReservationKeeper(node, config, self.directory, rng=self.rng,
                                        wanted=self._wants_reservations,
                                        on_reserved=self._on_reserved)
        self.observer = Observer(
            node, config, self.directory, rng=self.rng, serving=lambda: self.relay.serving,
            public_addrs=lambda: self._verdict.public_addrs, hungry=self._hungry,
            preferred=self._preferred_observers, upnp_external=lambda: self.upnp.external,
            on_change=self._recompute)
        self.dialer = PeerDialer(node, self.directory, self.keeper)
        self.puncher: HolePuncher | None = None
        self._verdict = Verdict("unknown", "unknown", (), "starting")
        self._verdict_changed = trio.Event()
        self.peer_events_lagged = 0

    # -- what the daemon uses ------------------------------------------------------------
    @property
    def reservations(self) -> dict[str, Any]:
        return self.keeper.reservations

    @property
    def observations(self) -> dict[str, Any]:
        return self.observer.observations

    def verdict(self) -> Verdict:
        return self._verdict

    async def connect(self, target: str, *, timeout: float = 10.0) -> str:
        """See `PeerDialer.connect`: a multiaddr, circuit address or peer id."""
        return await self.dialer.connect(target, timeout=timeout)

    async def wait_reachability_change(self) -> Verdict:
        """The verdict, once its reachability or NAT kind has changed (for the daemon to
        publish an event or switch the DHT mode without polling)."""
        await self._verdict_changed.wait()
        return self._verdict

    def local_view(self) -> PeerView:
        """What we tell a peer in a hole-punch exchange."""
        v, view = self._verdict, self.observer.nat_view()
        addrs = v.public_addrs if v.reachability == "public" else view.addrs
        caps = tuple(c for c in CAPS if c != "birthday" or self.config.birthday)
        return PeerView(v.reachability, view.kind, tuple(addrs), v.filtering,
                        self._lan_addrs(set(addrs)), caps)

    def _lan_addrs(self, public: set[Addr]) -> tuple[Addr, ...]:
        """Our listen addresses on this host's own networks (what a peer behind the same
        NAT dials), without loopback and without the public ones."""
        out = []
        for a in self.node.dialable_addrs():
            parts = a.split("/")
            if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
                continue
            addr = (parts[2], int(parts[4]))
            if addr not in public and not parts[2].startswith(("127.", "::1")):
                out.append(addr)
        return tuple(out[:MAX_LOCAL_ADDRS])

    def observed_addrs(self) -> list[str]:
        return self.observer.observed_addrs()

    def advertised_addrs(self) -> list[str]:
        """Addresses others can use for us: verified public ones, then relayed ones."""
        out = [f"{maddr(a)}/p2p/{self.me}" for a in self._verdict.public_addrs]
        out += [r.circuit_addr(self.me) for r in self.keeper.reservations.values()]
        return out

    def learn_relays(self, relays: list[tuple[str, list[str]]]) -> None:
        """Relays found by others means (the daemon's DHT provider lookup): (peer id,
        multiaddrs without /p2p) each; they join the candidates we reserve on."""
        now = trio.current_time()
        for pid, addrs in relays:
            self.directory.learn(pid, [f"{a}/p2p/{pid}" for a in addrs], now)

    @property
    def needs_relays(self) -> bool:
        """True while we are not public and hold fewer reservations than ``max_relays``:
        only then is it worth looking for more relays."""
        return self._hungry()

    @property
    def relaying(self) -> bool:
        """True while we serve as a relay hop for others."""
        return bool(self.relay.serving)

    def peer_info(self, peer_id: str) -> dict[str, Any] | None:
        """The last hole-punch outcome with a peer (for `lattice peers`), or None."""
        return None if self.puncher is None else self.puncher.peer_record(peer_id)

    def why_relayed(self, peer_id: str) -> str:
        """Why a peer we reach only through a relay is not reached directly: whose NAT,
        what was tried, when it is tried again (for `lattice peers` and `status`)."""
        if self.puncher is None:
            return "hole punching is off (nat.holepunch = false)"
        why = self.puncher.why_relayed(peer_id)
        if why is not None:
            return why
        if peer_id in self.puncher.active_peers():
            return "hole punch under way"
        return "no hole punch tried yet (it starts when the relayed connection is accepted)"

    def relayed_peers(self) -> dict[str, str]:
        return {p: self.why_relayed(p) for p in self.node.connected_peers()
                if self.node.connection_kind(p) == "relayed"}

    def status(self) -> dict[str, Any]:
        v = self._verdict
        via = []
        if v.reachability == "public":
            upnp = self.upnp.external
            if any(a != upnp for a in v.public_addrs):
                via.append("direct")
            if upnp is not None and upnp in v.public_addrs:
                via.append("upnp")
        if self.keeper.reservations:
            via.append("relay")
        stats = dict(self.observer.stats, reservations_made=self.keeper.made,
                     reservation_failures=self.keeper.failures,
                     relayed_dials=self.dialer.relayed_dials,
                     peer_events_lagged=self.peer_events_lagged)
        return {
            "reachability": v.reachability,
            "nat": v.nat,
            "reason": v.reason,
            "observed_addrs": self.observed_addrs(),
            "public_addrs": [maddr(a) for a in v.public_addrs],
            "reachable_via": via,
            "reservations": [{"relay": r.relay, "expires": round(r.expires, 3),
                              "addr": r.circuit_addr(self.me)}
                             for r in sorted(self.keeper.reservations.values(),
                                             key=lambda r: r.relay)],
            "relay_service": {
                "mode": self.config.relay_service,
                **self.relay.statistics(),
                "max_reservations": self.config.relay_max_reservations,
                "max_circuits": self.config.relay_max_circuits,
                "max_circuits_per_peer": self.config.relay_max_circuits_per_peer,
                "max_circuit_bytes": self.config.relay_max_circuit_bytes,
                "max_circuit_duration_s": self.config.relay_max_circuit_duration_s,
            },
            "holepunch": ({"enabled": True, **self.puncher.statistics()}
                          if self.puncher is not None else {"enabled": False}),
            "upnp": {"enabled": self.upnp.enabled, "state": self.upnp.state,
                     "external": None if self.upnp.external is None else maddr(self.upnp.external),
                     "detail": self.upnp.detail},
            "observers": sorted(self.observer.observations),
            "filtering": v.filtering,
            "relayed_peers": self.relayed_peers(),
            "statistics": stats,
            "penalties": self.observer.penalties.statistics(trio.current_time()),
            "limits": {k: getattr(self.config, k) for k in (
                "max_relays", "max_observers", "observe_interval_s", "dialback_timeout_s",
                "dialback_max_concurrent", "dialback_min_interval_s", "recheck_interval_s",
                "penalty_s")},
        }

    # -- the verdict and what follows from it ---------------------------------------------
    def _recompute(self) -> None:
        old = self._verdict
        view = self.observer.nat_view()
        new = self.observer.tracker.verdict(view, trio.current_time(),
                                            self.observer.dialback_candidates())
        forced = self.config.reachability
        if forced == "private" and new.reachability != "private":
            new = dataclasses.replace(new, reachability="private", public_addrs=(),
                                      reason="set by nat.reachability")
        elif forced == "public" and new.reachability != "public":
            new = dataclasses.replace(new, reachability="public",
                                      public_addrs=view.addrs or self._listen_addrs(),
                                      reason="set by nat.reachability")
        self._verdict = new
        serve = (self.config.relay_service == "on"
                 or (self.config.relay_service == "auto" and new.reachability == "public"))
        if serve != self.relay.serving:
            self.relay.serving = serve
            log.info("relay service %s", "on" if serve else "off")
            # Tell our observers at once: they list the relays they know to others.
            self.observer.refresh()
        if (old.reachability, old.nat) != (new.reachability, new.nat):
            log.info("reachability=%s nat=%s (%s)", new.reachability, new.nat, new.reason)
            self.keeper.wake()
            self._verdict_changed.set()
            self._verdict_changed = trio.Event()

    def _listen_addrs(self) -> tuple[Addr, ...]:
        ep = self.node.listen_endpoint()
        return () if ep is None or ep[0] in ("0.0.0.0", "::") else (ep,)

    def _wants_reservations(self) -> bool:
        return self.config.max_relays > 0 and self._verdict.reachability != "public"

    def _hungry(self) -> bool:
        return self._wants_reservations() and len(self.keeper.reservations) < self.config.max_relays

    def _preferred_observers(self) -> set[str]:
        return ({pid for pid, _ in self.directory.bootstrap} | set(self.keeper.reservations)
                | set(self.directory.learned))

    def _relay_heard_of(self) -> None:
        self.keeper.wake()

    def _on_reserved(self) -> None:
        self.observer.reset_hunger()

    def _on_upnp_mapped(self) -> None:
        self.observer.tracker.probe_now()
        self.observer.wake()

    # -- connection events (PeerNetwork.peer_events) --------------------------------------
    async def follow_peer_events(self, events: PeerEvents) -> None:
        """Act on the node's peer events until cancelled (``events`` is subscribed before
        anything can dial, so no connection is missed; `serve_nat` closes it)."""
        self._resync()
        async for ev in events:
            if ev.kind in (CONNECTED, ADDED):
                self._on_connected(ev.peer_id, ev.relayed)
            elif ev.kind == DISCONNECTED:
                self._on_disconnected(ev.peer_id)
            else:  # lagged: events were dropped, read the connections once
                self.peer_events_lagged += 1
                self._resync()

    def _on_connected(self, peer: str, relayed: bool) -> None:
        if self.puncher is not None:
            self.puncher.note_connection(peer, relayed)
        if self._verdict.reachability == "unknown":
            # A new peer is a new observer that can dial us back.
            self.observer.tracker.probe_now()
        self.observer.wake()

    def _on_disconnected(self, peer: str) -> None:
        self.observer.forget(peer)
        self.keeper.lost(peer)

    def _resync(self) -> None:
        connected = set(self.node.connected_peers())
        for peer in (set(self.observer.observations) | set(self.keeper.reservations)) - connected:
            self._on_disconnected(peer)
        for peer in sorted(connected):
            self._on_connected(peer, self.node.connection_kind(peer) == "relayed")

    def _on_relayed_inbound(self, peer: str) -> None:
        log.debug("peer=%s relayed connection accepted", peer)
        if self.puncher is not None:
            self.puncher.request(peer)


def holepunch_config(config: NatConfig) -> HolePunchConfig:
    return HolePunchConfig(
        penalty_s=config.penalty_s, birthday=config.birthday,
        birthday_limits=Birthday(config.birthday_ports, config.birthday_probes,
                                 config.birthday_rate),
        retry_min_s=config.holepunch_retry_s,
        retry_max_s=max(config.holepunch_retry_s, config.holepunch_retry_max_s))


async def serve_nat(node: Any, *, config: NatConfig, bootstrap: list[str],
                    rng: random.Random | None = None, budget: ByteBudget | None = None,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the connectivity manager for ``node`` (a `lattice.net.host.Libp2pNode`) until
    cancelled; hands back the `NatManager` once its protocol handlers are registered.
    Start it right after the node is up, before anything dials out. Raises
    `UnsupportedLibp2pError` at once on a py-libp2p version the relay was not written for.
    ``budget``: the volunteer's transfer limits, which relaying for others obeys."""
    check_libp2p_version()
    m = NatManager(node, config, bootstrap, rng=rng, budget=budget)
    # every service's streams reach peers by id as `lattice peers connect` does: a
    # NATed peer is dialed through a relay (and hole-punched from there)
    node.set_peer_router(m.connect)
    node.host.set_stream_handler(OBSERVE_PROTOCOL_ID, m.observer.handle)
    events = node.peer_events(buffer=PEER_EVENT_BUFFER)  # before anything dials
    m._recompute()
    try:
        async with trio.open_nursery() as nursery, background_trio_service(m.relay):
            if config.holepunch:
                m.puncher = await nursery.start(lambda task_status: serve_holepunch(
                    node, local_view=m.local_view,
                    config=holepunch_config(config), rng=m.rng,
                    task_status=task_status))
            nursery.start_soon(m.follow_peer_events, events)
            nursery.start_soon(m.observer.serve)
            nursery.start_soon(m.keeper.serve)
            if config.upnp:
                nursery.start_soon(serve_upnp, m.upnp, m.observer.listen_port(),
                                   m._on_upnp_mapped)
            task_status.started(m)
            await trio.sleep_forever()
    finally:
        events.close()
        node.set_peer_router(None)
        node.host.remove_stream_handler(OBSERVE_PROTOCOL_ID)
