"""Reachability, sans-I/O: are we publicly reachable, from dial-backs by other peers.

Owns: the verdict (`public` / `private` / `unknown`, with the NAT kind from
`lattice.core.holepunch.classify_nat` and how our router answers unsolicited traffic),
which dial-back results count, and when to probe again; and the `/lattice/observe/1`
messages (proto/observe.md). Must not import trio, libp2p or sockets, and reads no clock
(``now`` is passed in). The driver is `lattice.net.nat.observe`.

Why our own: py-libp2p's AutoNAT dials back over the connection we already have, so a
firewalled public host and a NATed host announcing its WAN address both came out PUBLIC
(PY-LIBP2P.md). Here a result counts only if it came from a *fresh* connection: the
observer we asked dials the address it saw us at from a new ephemeral port, on a
connection its swarm never sees, and completes a Noise handshake with our peer id.
A NAT or stateful firewall that only lets in what belongs to connections we made
(port-restricted, symmetric) drops or rejects it; no NAT, a port forward or an
endpoint-independent NAT lets it in. The observer dials only the IP it sees us at
(AutoNAT v2's rule), so asking for a dial-back can never aim anyone at a third party;
and any peer that can dial out can do it, NATed ones included, so a network's lone
public daemon learns that it is public from the first peer that connects to it.

Verdict: the most recent `WINDOW` results younger than ``result_ttl`` decide: any
success -> ``public`` (a success is hard to fake by accident; a lying observer at worst
makes us offer relay service), else any failure -> ``private``, else ``unknown``. How
the failures failed says how our router filters: ``reject`` (a RST or ICMP error came
back: the router answers unsolicited SYNs), ``drop`` (silence), else ``unknown``.
Probing: while the verdict is unknown, back off from ``retry_min`` to ``retry_max``;
once known, probe again every ``recheck``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lattice.core.holepunch import Addr, NatView, Observation, check_addr
from lattice.core.identity import InvalidPeerId, public_key_from_peer_id

WINDOW = 3
MAX_RESULTS = 16


DIAL_ERRORS = ("", "timeout", "refused", "unreachable", "handshake")
FILTERING = ("open", "drop", "reject", "unknown")


@dataclass(frozen=True)
class DialBack:
    """One dial-back: ``dialer`` dialed ``addr`` on a fresh connection at our request
    (``observer`` asked; today the observer dials itself). ``ok``: it completed a
    handshake with us (our peer id); else ``error`` says how it failed (`DIAL_ERRORS`)."""

    observer: str
    dialer: str
    addr: Addr
    ok: bool
    at: float
    error: str = ""


@dataclass(frozen=True)
class Verdict:
    reachability: str  # "public" | "private" | "unknown"
    nat: str  # "none" | "cone" | "symmetric" | "unknown" (see classify_nat)
    public_addrs: tuple[Addr, ...]  # addresses a dial-back reached
    reason: str
    filtering: str = "unknown"  # how our router answers unsolicited inbound: FILTERING


@dataclass
class ReachabilityTracker:
    """Dial-back results for one node, the verdict, and the probe schedule."""

    self_id: str
    result_ttl: float = 1800.0
    retry_min: float = 1.0
    retry_max: float = 60.0
    recheck: float = 600.0
    results: list[DialBack] = field(default_factory=list)
    rejected: int = 0
    _next_probe: float = 0.0
    _backoff: float = 0.0

    def record(self, result: DialBack, now: float) -> bool:
        """Keep ``result`` if it counts (see the module docstring); reschedule probing."""
        if result.dialer in ("", self.self_id) or result.error not in DIAL_ERRORS:
            self.rejected += 1
            self._no_answer(now)
            return False
        self.results.append(result)
        del self.results[:-MAX_RESULTS]
        self._backoff = 0.0
        self._next_probe = now + self.recheck
        return True

    def no_result(self, now: float) -> None:
        """A probe produced nothing usable (no helper, observer gone): try again later."""
        self._no_answer(now)

    def _no_answer(self, now: float) -> None:
        self._backoff = min(self.retry_max, max(self.retry_min, self._backoff * 2))
        known = self.verdict(NatView("unknown", (), ""), now).reachability != "unknown"
        self._next_probe = now + (self.recheck if known else self._backoff)

    def probe_due(self, now: float) -> bool:
        return now >= self._next_probe

    def next_probe_at(self) -> float:
        return self._next_probe

    def probe_now(self) -> None:
        """Something changed (new address, new observer): probe at the next chance."""
        self._next_probe = 0.0

    def verdict(self, view: NatView, now: float,
                addrs: tuple[Addr, ...] | None = None) -> Verdict:
        """The verdict from recent results; with ``addrs`` (`dialback_candidates`), only
        results for those addresses count: a dial-back a LAN peer made to our LAN
        address, before any observer outside our NAT was heard from, says nothing."""
        recent = [r for r in self.results if now - r.at <= self.result_ttl
                  and (addrs is None or r.addr in addrs)][-WINDOW:]
        ok = tuple(dict.fromkeys(r.addr for r in recent if r.ok))
        if ok:
            return Verdict("public", view.kind, ok,
                           f"dial-back by {_peers(r.dialer for r in recent if r.ok)} reached us",
                           "open")
        if recent:
            errors = {r.error for r in recent}
            filtering = ("reject" if errors & {"refused", "unreachable"}
                         else "drop" if "timeout" in errors else "unknown")
            how = ", ".join(sorted(e for e in errors if e)) or "failed"
            return Verdict("private", view.kind, (),
                           f"dial-back by {_peers(r.dialer for r in recent)} failed ({how})",
                           filtering)
        return Verdict("unknown", view.kind, (), "no dial-back result yet")


def dialback_candidates(listen_port: int, observations: Iterable[Observation],
                        extra: Iterable[Addr] = ()) -> tuple[Addr, ...]:
    """The addresses worth a dial-back: where observers saw our listen port, and
    ``extra`` (a UPnP mapping). When any observer saw it translated, only translated
    ones: an observer that sees our own address is then on our side of the NAT (a LAN
    peer, found by mDNS), and its dial-back of that address proves nothing about
    whether the internet can reach us."""
    seen = [o for o in observations if o.local[1] == listen_port]
    translated = [o for o in seen if o.observed != o.local]
    addrs = [o.observed for o in (translated or seen)] + list(extra)
    return tuple(dict.fromkeys(addrs))[:MAX_DIALBACK_ADDRS]


def _peers(ids: Iterable[str]) -> str:
    return ", ".join(sorted({p[-8:] for p in ids}))


# -- `/lattice/observe/1` messages (proto/observe.md) ------------------------------------------

OBSERVE_PROTOCOL_ID = "/lattice/observe/1"
OBSERVE_MAX_MESSAGE = 4096  # bytes per frame
OBSERVE_ID_BYTES = 8
MAX_DIALBACK_ADDRS = 4
MAX_RELAYS_LISTED = 8
MAX_PEER_ID_CHARS = 128
# "no_helper": what observers of earlier versions said with no third peer to ask
DIALBACK_STATUS = ("ok", "failed", "no_helper", "refused", "busy")


class ObserveProtocolError(ValueError):
    """The remote broke `/lattice/observe/1` (malformed or unexpected message)."""


def _peer_id(value: object, what: str) -> str:
    """An Ed25519 peer id (the only kind our daemons have); anything else is the
    peer's fault, checked here so no caller builds a multiaddr out of it."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_ID_CHARS:
        raise ObserveProtocolError(f"{what} must be a peer id string")
    try:
        public_key_from_peer_id(value)
    except InvalidPeerId:
        raise ObserveProtocolError(f"{what} is not an Ed25519 peer id") from None
    return value


def _addr_list(value: object, limit: int, what: str) -> tuple[Addr, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise ObserveProtocolError(f"{what} must be a list of at most {limit} [ip, port]")
    return tuple(dict.fromkeys(a for a in (check_addr(x) for x in value) if a is not None))


def check_message(msg: object) -> dict[str, Any]:
    """A decoded frame as a message map with a valid ``type`` and ``id``."""
    if not isinstance(msg, dict) or msg.get("type") not in (
            "observe", "observed", "dialback", "dialback_result"):
        raise ObserveProtocolError("a message is a map whose type is observe, observed, "
                                   "dialback or dialback_result")
    sid = msg.get("id")
    if not isinstance(sid, bytes) or len(sid) != OBSERVE_ID_BYTES:
        raise ObserveProtocolError(f"id must be {OBSERVE_ID_BYTES} bytes")
    return msg


@dataclass(frozen=True)
class ObserveRequest:
    relay: bool  # the requester serves Circuit Relay v2 hops (and says it is public)
    dialback: tuple[Addr, ...]  # addresses to have a third peer dial; empty: none asked


def decode_observe(msg: dict[str, Any]) -> ObserveRequest:
    relay = msg.get("relay", False)
    if not isinstance(relay, bool):
        raise ObserveProtocolError("relay must be a bool")
    return ObserveRequest(relay, _addr_list(msg.get("dialback", []), MAX_DIALBACK_ADDRS,
                                            "dialback"))


@dataclass(frozen=True)
class RelayInfo:
    peer: str
    addrs: tuple[Addr, ...]


@dataclass(frozen=True)
class ObserveAnswer:
    observed: Addr | None  # None: the request came over a relayed connection
    relays: tuple[RelayInfo, ...]
    dialback: str | None  # a DIALBACK_STATUS, None when none was asked
    dialer: str  # who dialed (the ``helper`` field): the observer itself
    dialback_addr: Addr | None
    dialback_error: str = ""  # a DIAL_ERRORS value when the dial-back failed


def decode_observed(msg: dict[str, Any]) -> ObserveAnswer:
    raw = msg.get("addr")
    observed = None if raw is None else check_addr(raw)
    if raw is not None and observed is None:
        raise ObserveProtocolError("addr must be [ip, port] or nil")
    relays_raw = msg.get("relays", [])
    if not isinstance(relays_raw, list) or len(relays_raw) > MAX_RELAYS_LISTED:
        raise ObserveProtocolError(f"relays must be a list of at most {MAX_RELAYS_LISTED}")
    relays = []
    for r in relays_raw:
        if not isinstance(r, dict):
            raise ObserveProtocolError("a relay is a map {peer, addrs}")
        relays.append(RelayInfo(_peer_id(r.get("peer"), "relay peer"),
                                _addr_list(r.get("addrs"), MAX_DIALBACK_ADDRS, "relay addrs")))
    db = msg.get("dialback")
    if db is None:
        return ObserveAnswer(observed, tuple(relays), None, "", None)
    if not isinstance(db, dict) or db.get("status") not in DIALBACK_STATUS:
        raise ObserveProtocolError(f"dialback must be a map with status in {DIALBACK_STATUS}")
    dialer = db.get("helper", "")
    if not isinstance(dialer, str) or len(dialer) > MAX_PEER_ID_CHARS:
        raise ObserveProtocolError("helper must be a peer id string")
    error = db.get("error", "")
    if error not in DIAL_ERRORS:
        error = "" if db["status"] == "ok" else "timeout"  # a newer observer's word for it
    addr = db.get("addr")
    return ObserveAnswer(observed, tuple(relays), db["status"], dialer,
                         None if addr is None else check_addr(addr), error)
