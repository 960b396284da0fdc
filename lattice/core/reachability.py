"""Reachability, sans-I/O: are we publicly reachable, from dial-backs by other peers.

Owns: the verdict (`public` / `private` / `unknown`, with the NAT kind from
`lattice.core.holepunch.classify_nat`), which dial-back results count, and when to
probe again. Must not import trio, libp2p or sockets, and reads no clock (``now`` is
passed in). The driver is `lattice.net.nat` (the `/lattice/observe/1` protocol,
proto/observe.md).

Why our own: py-libp2p's AutoNAT dials back over the connection we already have, so a
firewalled public host and a NATed host announcing its WAN address both came out PUBLIC
(PY-LIBP2P.md). Here a result counts only if it came from a *helper*: a peer other than
us and other than the observer we asked, dialing a fresh connection to the address the
observer saw us at. A NAT or firewall that lets the observer in because we talked to it
(address-restricted filtering) does not let a third party in.

Verdict: the most recent `WINDOW` results younger than ``result_ttl`` decide: any
success -> ``public`` (a success is hard to fake by accident; a lying helper at worst
makes us offer relay service), else any failure -> ``private``, else ``unknown``.
Probing: while the verdict is unknown, back off from ``retry_min`` to ``retry_max``;
once known, probe again every ``recheck``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lattice.core.holepunch import Addr, NatView, check_addr

WINDOW = 3
MAX_RESULTS = 16


@dataclass(frozen=True)
class DialBack:
    """One dial-back: ``helper`` dialed ``addr`` on a fresh connection, at ``observer``'s
    request on our behalf. ``ok``: it completed a handshake with us (our peer id)."""

    observer: str
    helper: str
    addr: Addr
    ok: bool
    at: float


@dataclass(frozen=True)
class Verdict:
    reachability: str  # "public" | "private" | "unknown"
    nat: str  # "none" | "cone" | "symmetric" | "unknown" (see classify_nat)
    public_addrs: tuple[Addr, ...]  # addresses a dial-back reached
    reason: str


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
        if result.helper in ("", self.self_id, result.observer):
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

    def verdict(self, view: NatView, now: float) -> Verdict:
        recent = [r for r in self.results if now - r.at <= self.result_ttl][-WINDOW:]
        ok = tuple(dict.fromkeys(r.addr for r in recent if r.ok))
        if ok:
            return Verdict("public", view.kind, ok,
                           f"dial-back by {_peers(r.helper for r in recent if r.ok)} reached us")
        if recent:
            return Verdict("private", view.kind, (),
                           f"dial-back by {_peers(r.helper for r in recent)} failed")
        return Verdict("unknown", view.kind, (), "no dial-back result yet")


def _peers(ids: Iterable[str]) -> str:
    return ", ".join(sorted({p[-8:] for p in ids}))


# -- `/lattice/observe/1` messages (proto/observe.md) ------------------------------------------

OBSERVE_PROTOCOL_ID = "/lattice/observe/1"
OBSERVE_MAX_MESSAGE = 4096  # bytes per frame
OBSERVE_ID_BYTES = 8
MAX_DIALBACK_ADDRS = 4
MAX_RELAYS_LISTED = 8
MAX_PEER_ID_CHARS = 128
DIALBACK_STATUS = ("ok", "failed", "no_helper", "refused", "busy")


class ObserveProtocolError(ValueError):
    """The remote broke `/lattice/observe/1` (malformed or unexpected message)."""


def _peer_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_ID_CHARS:
        raise ObserveProtocolError(f"{what} must be a peer id string")
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
    helper: str
    dialback_addr: Addr | None


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
    helper = db.get("helper", "")
    if not isinstance(helper, str) or len(helper) > MAX_PEER_ID_CHARS:
        raise ObserveProtocolError("helper must be a peer id string")
    addr = db.get("addr")
    return ObserveAnswer(observed, tuple(relays), db["status"], helper,
                         None if addr is None else check_addr(addr))


@dataclass(frozen=True)
class DialBackRequest:
    peer: str  # whom to dial (the requester, as the observer knows it)
    addrs: tuple[Addr, ...]


def decode_dialback(msg: dict[str, Any]) -> DialBackRequest:
    addrs = _addr_list(msg.get("addrs"), MAX_DIALBACK_ADDRS, "addrs")
    if not addrs:
        raise ObserveProtocolError("dialback needs at least one address")
    return DialBackRequest(_peer_id(msg.get("peer"), "peer"), addrs)


def decode_dialback_result(msg: dict[str, Any]) -> tuple[str, Addr | None]:
    """(status, the address that answered): status ``ok``, ``failed`` or ``busy`` (the
    helper is at its dial-back limit; ask another)."""
    status = msg.get("status")
    if status not in ("ok", "failed", "busy"):
        raise ObserveProtocolError("status must be ok, failed or busy")
    addr = msg.get("addr")
    return status, None if addr is None else check_addr(addr)
