"""Hole punching, sans-I/O: what kind of NAT we are behind, and the per-peer punch session.

Owns: `classify_nat` (the NAT kind and the addresses worth punching to, from what
observers saw of our connections), `decide` (the decision table: punch, one side dials,
or stay relayed), `HolePunchSession` (the `/lattice/holepunch/1` exchange as a state
machine: ``handle(event, now) -> actions``), message validation and the limits.
Must not import trio, libp2p or sockets, and reads no clock: the driver
(`lattice.net.nat.holepunch`) feeds it decoded frames, dial results and ``now``.
proto/holepunch.md is the normative text; a test keeps its limits table in step.

Theory of operation
-------------------
Two peers, A and B, have a *relayed* connection: A dialed B through a relay on which B
holds a reservation (B needed one because it is not reachable). B, the side that
accepted the relayed connection, opens the exchange (role ``initiator``):

    B -> A  connect {id, round, reach, nat, addrs}      t0
    A -> B  connect {id, round, reach, nat, addrs}      rtt = now - t0
    B decides (`decide`) and tells A the plan:
    B -> A  sync {id, round, plan}   or   cancel {id, reason}
    plan "punch":            B dials at t0 + rtt + rtt/2, A dials on receipt of sync:
                             both SYNs cross, TCP simultaneous open from both listen ports
    plan "initiator_dials":  A is publicly reachable: B dials it, A waits
    plan "responder_dials":  B is publicly reachable: A dials it, B waits

Noise roles are fixed so every TCP outcome agrees (docs/natlab.md): B's dial upgrades
as the Noise *initiator*; A's dial in a punch upgrades as the *responder*, and A's
listener upgrades whatever lands on it as responder too. When a peer is public, only
the other side dials, as an ordinary initiator, landing on the public side's listener.

Addresses are what *observers* saw of our listen port (`Observation`), never LAN
addresses: a peer's LAN address dialed from another network hangs until a timeout.
A NAT that gives every destination its own port ("symmetric", e.g. `--random-fully`)
makes the observed port useless to anyone else, so any symmetric side means: stay
relayed at once, with the reason, instead of seconds of doomed dials.

Bounded: at most `MAX_ROUNDS` rounds; a round is the exchange (`EXCHANGE_TIMEOUT`) plus
dialing (`ROUND_TIMEOUT`); `MAX_ADDRS` addresses; frames of at most `MAX_MESSAGE` bytes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PROTOCOL_ID = "/lattice/holepunch/1"
MAX_MESSAGE = 4096  # bytes per frame
MAX_ADDRS = 8  # addresses offered per side
ID_BYTES = 8  # session id
MAX_REASON_CHARS = 200
EXCHANGE_TIMEOUT = 2.0  # seconds for connect/connect/sync over the relay
ROUND_TIMEOUT = 1.2  # seconds of dialing per round (a lost SYN is resent after 1 s)
MAX_ROUNDS = 2

REACH = ("public", "private", "unknown")
KINDS = ("none", "cone", "symmetric", "unknown")
PLANS = ("punch", "initiator_dials", "responder_dials")

Addr = tuple[str, int]


class HolePunchProtocolError(ValueError):
    """The remote broke `/lattice/holepunch/1` (malformed or unexpected message)."""


# -- what observers saw: the NAT kind ------------------------------------------------------

@dataclass(frozen=True)
class Observation:
    """One observer's view of one of our connections to it."""

    observer: str  # peer id of the observer
    local: Addr  # our end of that connection (ip, port), as our socket reports it
    observed: Addr  # the same connection's far end as the observer saw it


@dataclass(frozen=True)
class NatView:
    kind: str  # "none" | "cone" | "symmetric" | "unknown"
    addrs: tuple[Addr, ...]  # where others can reach our listen port (if anywhere)
    reason: str


def classify_nat(listen_port: int, observations: Iterable[Observation]) -> NatView:
    """The NAT kind in front of us and the addresses worth punching to.

    - no observation translated our address: ``none`` (no NAT; maybe a firewall);
    - two or more observers saw our listen port mapped to one address: ``cone``
      (endpoint-independent mapping), and that address is punchable;
    - observers saw it mapped to different addresses: ``symmetric``, nothing punchable;
    - one observer, port kept: ``cone`` (port-preserving NATs keep the mapping for every
      destination); port changed: ``unknown``, the address is still worth one punch.

    Only observations of connections made *from the listen port* say where the listen
    port is mapped; others only tell whether there is a NAT at all.
    """
    obs = list(observations)
    if not obs:
        return NatView("unknown", (), "no observations yet")
    translated = [o for o in obs if o.observed != o.local]
    from_listen = [o for o in obs if o.local[1] == listen_port]
    if not translated:
        addrs = _unique(o.observed for o in from_listen)[:MAX_ADDRS]
        return NatView("none", addrs, f"{_n(obs, 'observer')} saw our own address")
    mapped = [o for o in translated if o.local[1] == listen_port]
    if not mapped:
        return NatView("unknown", (), "translated, but no observation of the listen port")
    seen = _unique(o.observed for o in mapped)
    observers = {o.observer for o in mapped}
    if len(seen) > 1:
        return NatView("symmetric", (), f"{len(observers)} observers saw "
                       f"{len(seen)} different mappings of the listen port")
    if len(observers) >= 2:
        return NatView("cone", seen, f"{len(observers)} observers saw one mapping")
    if seen[0][1] == listen_port:
        return NatView("cone", seen, "one observer; the NAT kept our port")
    return NatView("unknown", seen, "one observer; the NAT changed our port")


def _unique(addrs: Iterable[Addr]) -> tuple[Addr, ...]:
    return tuple(dict.fromkeys(addrs))


def _n(items: list[Any], word: str) -> str:
    return f"{len(items)} {word}{'' if len(items) == 1 else 's'}"


# -- the decision table ----------------------------------------------------------------------

@dataclass(frozen=True)
class PeerView:
    """What one side says about itself in ``connect``."""

    reach: str  # "public" (verified by a dial-back) | "private" | "unknown"
    nat: str  # a `KINDS` value
    addrs: tuple[Addr, ...]


def decide(initiator: PeerView, responder: PeerView) -> tuple[str | None, str]:
    """(plan, reason): a `PLANS` value, or None to stay relayed."""
    if responder.reach == "public" and responder.addrs:
        return "initiator_dials", "the dialing peer is publicly reachable"
    if initiator.reach == "public" and initiator.addrs:
        return "responder_dials", "the accepting peer is publicly reachable"
    for side, view in (("our", initiator), ("their", responder)):
        if view.nat == "symmetric":
            return None, f"{side} NAT is symmetric (a new port per destination)"
    for side, view in (("us", initiator), ("them", responder)):
        if not view.addrs:
            return None, f"no observed public address for {side}"
    return "punch", "both behind endpoint-independent NATs or firewalls"


# -- messages ----------------------------------------------------------------------------------

def encode_view(view: PeerView) -> dict[str, Any]:
    return {"reach": view.reach, "nat": view.nat,
            "addrs": [[ip, port] for ip, port in view.addrs[:MAX_ADDRS]]}


def _check_id(msg: dict[str, Any]) -> bytes:
    sid = msg.get("id")
    if not isinstance(sid, bytes) or len(sid) != ID_BYTES:
        raise HolePunchProtocolError(f"id must be {ID_BYTES} bytes")
    return sid


def _check_round(msg: dict[str, Any]) -> int:
    r = msg.get("round")
    if type(r) is not int or not 0 <= r < MAX_ROUNDS:
        raise HolePunchProtocolError(f"round must be an int in [0, {MAX_ROUNDS})")
    return r


def check_addr(value: Any) -> Addr | None:
    """A peer-supplied [ip, port], or None when it is not one we would dial."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    ip, port = value
    if not isinstance(ip, str) or len(ip) > 64 or type(port) is not int:
        return None
    if not 0 < port < 65536:
        return None
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if parsed.is_unspecified or parsed.is_multicast:
        return None
    return (str(parsed), port)


def decode_view(msg: dict[str, Any]) -> PeerView:
    reach, nat, addrs = msg.get("reach"), msg.get("nat"), msg.get("addrs")
    if reach not in REACH or nat not in KINDS:
        raise HolePunchProtocolError(f"reach must be one of {REACH}, nat one of {KINDS}")
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
        raise HolePunchProtocolError(f"addrs must be a list of at most {MAX_ADDRS}")
    good = tuple(a for a in (check_addr(x) for x in addrs) if a is not None)
    return PeerView(reach, nat, _unique(good))


def _message(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise HolePunchProtocolError("a message is a map with a 'type'")
    return value


# -- events and actions ------------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    """Initiator only: the relayed connection is up, begin."""


@dataclass(frozen=True)
class Received:
    msg: Any


@dataclass(frozen=True)
class DirectUp:
    """A direct connection to the peer exists (our dial, or theirs landing on us)."""


@dataclass(frozen=True)
class Timer:
    """`HolePunchSession.deadline` passed."""


@dataclass(frozen=True)
class Closed:
    """The peer closed the stream (or it broke)."""


@dataclass(frozen=True)
class Send:
    msg: dict[str, Any]


@dataclass(frozen=True)
class Dial:
    """Dial ``addrs`` from our listen port, starting at ``at``, retrying until ``until``.

    ``noise_initiator``: upgrade the connection as Noise initiator (an ordinary dial) or
    as responder (the A side of a punch)."""

    at: float
    until: float
    addrs: tuple[Addr, ...]
    noise_initiator: bool


@dataclass(frozen=True)
class Done:
    outcome: str  # "direct" | "relayed" (decided not to try) | "failed" (tried, no luck)
    reason: str


Event = Start | Received | DirectUp | Timer | Closed
Action = Send | Dial | Done

_WAIT_CONNECT, _WAIT_SYNC, _DIALING, _DONE = "wait_connect", "wait_sync", "dialing", "done"


class HolePunchSession:
    """One exchange with one peer over the relayed connection (module docstring).

    The driver calls `handle` for every event and carries out the returned actions, and
    delivers `Timer` when ``now >= deadline``. After a `Done` action the session is over.
    """

    def __init__(self, role: str, ours: PeerView, *, now: float,
                 session_id: bytes | None = None) -> None:
        if role not in ("initiator", "responder"):
            raise ValueError(f"role must be initiator or responder, not {role!r}")
        if role == "initiator" and (session_id is None or len(session_id) != ID_BYTES):
            raise ValueError(f"the initiator chooses a {ID_BYTES}-byte session id")
        self.role = role
        self.ours = PeerView(ours.reach, ours.nat, tuple(ours.addrs[:MAX_ADDRS]))
        self.id = session_id
        self.round = -1
        self.state = _WAIT_CONNECT
        # The responder waits for the first connect; the initiator's clock starts at Start.
        self.deadline: float | None = now + EXCHANGE_TIMEOUT if role == "responder" else None
        self.theirs: PeerView | None = None
        self.plan: str | None = None
        self.rtt: float | None = None
        self.outcome: Done | None = None
        self._sent_at = 0.0

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def handle(self, event: Event, now: float) -> list[Action]:
        if self.state == _DONE:
            return []
        if isinstance(event, DirectUp):
            return self._finish("direct", "direct connection up")
        if isinstance(event, Closed):
            return self._finish("failed", "the peer closed the exchange")
        if isinstance(event, Timer):
            return self._on_timer(now)
        if isinstance(event, Start):
            if self.role != "initiator" or self.round != -1:
                raise ValueError("only a fresh initiator session starts")
            return self._send_connect(now)
        msg = _message(event.msg)
        if msg["type"] == "cancel":
            if self.id is not None and _check_id(msg) != self.id:
                raise HolePunchProtocolError("cancel for another session")
            reason = msg.get("reason")
            reason = reason[:MAX_REASON_CHARS] if isinstance(reason, str) else "cancelled"
            return self._finish("relayed", f"peer: {reason}")
        if self.role == "initiator":
            return self._initiator_receive(msg, now)
        return self._responder_receive(msg, now)

    # -- initiator (B) ---------------------------------------------------------------
    def _send_connect(self, now: float) -> list[Action]:
        self.round += 1
        self.state = _WAIT_CONNECT
        self._sent_at = now
        self.deadline = now + EXCHANGE_TIMEOUT
        assert self.id is not None
        return [Send({"type": "connect", "id": self.id, "round": self.round,
                      **encode_view(self.ours)})]

    def _initiator_receive(self, msg: dict[str, Any], now: float) -> list[Action]:
        if msg["type"] != "connect" or self.state != _WAIT_CONNECT:
            raise HolePunchProtocolError(f"unexpected {msg['type']!r} in {self.state}")
        if _check_id(msg) != self.id or _check_round(msg) != self.round:
            raise HolePunchProtocolError("connect for another session or round")
        theirs = decode_view(msg)
        self.theirs = theirs
        self.rtt = max(0.0, now - self._sent_at)
        plan, reason = decide(self.ours, theirs)
        if plan is None:
            return [Send({"type": "cancel", "id": self.id, "reason": reason}),
                    *self._finish("relayed", reason)]
        self.plan = plan
        self.state = _DIALING
        actions: list[Action] = [Send({"type": "sync", "id": self.id, "round": self.round,
                                       "plan": plan})]
        # sync reaches A after ~rtt/2; A dials then, so B waits as long before dialing.
        start = now + (self.rtt / 2 if plan == "punch" else 0.0)
        self.deadline = start + ROUND_TIMEOUT
        if plan in ("punch", "initiator_dials"):
            actions.append(Dial(start, self.deadline, theirs.addrs, noise_initiator=True))
        return actions

    # -- responder (A) ---------------------------------------------------------------
    def _responder_receive(self, msg: dict[str, Any], now: float) -> list[Action]:
        kind = msg["type"]
        if kind == "connect" and self.state in (_WAIT_CONNECT, _DIALING):
            sid, rnd = _check_id(msg), _check_round(msg)
            if (self.id is not None and sid != self.id) or rnd != self.round + 1:
                raise HolePunchProtocolError("connect for another session or round")
            self.id, self.round = sid, rnd
            self.theirs = decode_view(msg)
            self.state = _WAIT_SYNC
            self.deadline = now + EXCHANGE_TIMEOUT
            return [Send({"type": "connect", "id": sid, "round": rnd, **encode_view(self.ours)})]
        if kind == "sync" and self.state == _WAIT_SYNC:
            if _check_id(msg) != self.id or _check_round(msg) != self.round:
                raise HolePunchProtocolError("sync for another session or round")
            plan = msg.get("plan")
            if plan not in PLANS:
                raise HolePunchProtocolError(f"plan must be one of {PLANS}")
            assert self.theirs is not None
            if plan in ("punch", "responder_dials") and not self.theirs.addrs:
                raise HolePunchProtocolError(f"plan {plan} but no addresses to dial")
            self.plan = plan
            self.state = _DIALING
            # Stay until the initiator's round ends, then allow for its next connect.
            self.deadline = now + ROUND_TIMEOUT + EXCHANGE_TIMEOUT
            if plan == "punch":
                return [Dial(now, now + ROUND_TIMEOUT, self.theirs.addrs, noise_initiator=False)]
            if plan == "responder_dials":
                return [Dial(now, now + ROUND_TIMEOUT, self.theirs.addrs, noise_initiator=True)]
            return []
        raise HolePunchProtocolError(f"unexpected {kind!r} in {self.state}")

    # -- both ----------------------------------------------------------------------
    def _on_timer(self, now: float) -> list[Action]:
        if self.deadline is None or now < self.deadline:
            return []
        if self.role == "initiator" and self.state == _DIALING and self.round + 1 < MAX_ROUNDS:
            return self._send_connect(now)
        if self.state == _DIALING:
            return self._finish("failed", f"no direct connection after {self.round + 1} "
                                          f"round{'s' if self.round else ''}")
        return self._finish("failed", "the exchange timed out")

    def _finish(self, outcome: str, reason: str) -> list[Action]:
        self.state = _DONE
        self.deadline = None
        self.outcome = Done(outcome, reason)
        return [self.outcome]
