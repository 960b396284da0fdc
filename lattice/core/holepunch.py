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

    B -> A  connect {id, round, reach, nat, filtering, addrs, local, caps}   t0
    A -> B  connect {id, round, ...}                                          rtt = now - t0
    B decides (`decide`) and tells A the plan:
    B -> A  sync {id, round, plan, ...}   or   cancel {id, reason}

    "lan"               A and B are behind one NAT (the same public IP): B dials A's LAN
                        addresses (and A's public one, for routers that hairpin); A waits
    "initiator_dials"   A is reachable without a NAT: B dials it, A waits
    "responder_dials"   B is reachable without a NAT: A dials it, B waits
    "punch"             B dials at t0 + rtt + rtt/2, A dials on receipt of sync: both SYNs
                        cross, TCP simultaneous open from both listen ports
    "birthday"          one side's NAT is symmetric (a new port per destination): that
                        side (the *primer*) opens `ports` connections to the other's
                        mapped address and says `primed`; the other side (the *prober*)
                        then dials `probes` random ports at the primer's IP, at most
                        `rate` a second. With 256 ports open and 1024 probes of 64,512
                        possible ports, some probe meets an open mapping with
                        probability 1 - (1 - 256/64512)^1024 = 98%

Noise roles are fixed so every TCP outcome agrees (docs/natlab.md): in "punch" B's dial
upgrades as the Noise *initiator*, A's as the *responder*, and A's listener upgrades
whatever lands on it as responder too; in the one-sided plans the dialer is an ordinary
initiator and lands on the other's listener; in "birthday" the prober is the initiator
and the primer's connections complete as responders (simultaneous open).

Addresses are what *observers* saw of our listen port (`Observation`), never LAN
addresses, except in "lan": a peer's LAN address dialed from another network hangs
until a timeout. A symmetric NAT makes the observed port useless to anyone else: only
its IP is used, and only by birthday probing; symmetric against symmetric stays
relayed at once, with the reason, instead of seconds of doomed dials. So does birthday
probing when the cone side's router rejects unsolicited SYNs: the primer's SYNs would
be reset there before the prober found their ports, and a reset closes the primer's
own NAT mapping with them.

Bounded: at most `MAX_ROUNDS` rounds; a round is the exchange (`EXCHANGE_TIMEOUT`) plus
dialing (`ROUND_TIMEOUT`, or the probing time for birthday); `MAX_ADDRS` addresses;
`MAX_LOCAL_ADDRS` LAN addresses; birthday ports and probes within the initiator's and
the responder's own limits (the smaller wins); frames of at most `MAX_MESSAGE` bytes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PROTOCOL_ID = "/lattice/holepunch/1"
MAX_MESSAGE = 4096  # bytes per frame
MAX_ADDRS = 8  # addresses offered per side
MAX_LOCAL_ADDRS = 4  # LAN addresses offered per side
ID_BYTES = 8  # session id
MAX_REASON_CHARS = 200
EXCHANGE_TIMEOUT = 2.0  # seconds for connect/connect/sync over the relay
ROUND_TIMEOUT = 1.2  # seconds of dialing per round (a lost SYN is resent after 1 s)
MAX_ROUNDS = 2
MAX_BIRTHDAY_PORTS = 1024  # the most a peer may ask us to open
MAX_BIRTHDAY_PROBES = 4096  # the most a peer may ask us to send
MAX_BIRTHDAY_RATE = 2000  # probes (SYNs) a second

REACH = ("public", "private", "unknown")
KINDS = ("none", "cone", "symmetric", "unknown")
FILTERING = ("open", "drop", "reject", "unknown")
CAPS = ("lan", "birthday")  # what our side of the protocol can do beyond v1
PLANS = ("punch", "initiator_dials", "responder_dials", "lan", "birthday")

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
    - observers saw it mapped to different addresses: ``symmetric``; the addresses are
      what observers saw, of which only the IP is of use (to birthday probing);
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
        return NatView("symmetric", seen[:MAX_ADDRS], f"{len(observers)} observers saw "
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
    addrs: tuple[Addr, ...]  # where observers saw our listen port
    filtering: str = "unknown"  # how our router answers unsolicited SYNs: `FILTERING`
    local: tuple[Addr, ...] = ()  # our LAN listen addresses (dialed only behind one NAT)
    caps: tuple[str, ...] = ()  # `CAPS` our side supports (and, for birthday, allows)


@dataclass(frozen=True)
class Birthday:
    """Birthday-probing limits: ports the primer opens, probes the prober sends, and
    probes (and primes) per second."""

    ports: int = 256
    probes: int = 1024
    rate: float = 500.0

    def clamp(self, other: Birthday) -> Birthday:
        return Birthday(min(self.ports, other.ports, MAX_BIRTHDAY_PORTS),
                        min(self.probes, other.probes, MAX_BIRTHDAY_PROBES),
                        min(self.rate, other.rate, MAX_BIRTHDAY_RATE))

    def probe_time(self) -> float:
        return (self.ports + self.probes) / self.rate


DEFAULT_BIRTHDAY = Birthday()  # the defaults, one shared (frozen) instance


@dataclass(frozen=True)
class Decision:
    plan: str | None  # a `PLANS` value, None: stay relayed
    reason: str
    primer: str = ""  # birthday: "initiator" | "responder", the symmetric side


def _public_ips(view: PeerView) -> set[str]:
    return {ip for ip, _ in view.addrs}


def _directly_reachable(view: PeerView) -> bool:
    # a verified public address with no NAT in front: anyone's SYN lands on its
    # listener. A translated "public" side (a port forward, a full-cone NAT, or an
    # address-restricted one that let the observer in) punches like any NATed side.
    return view.reach == "public" and view.nat == "none" and bool(view.addrs)


def decide(initiator: PeerView, responder: PeerView) -> Decision:
    """The plan for `initiator` (B, who decides) and `responder` (A); see the module
    docstring. Reasons name whose NAT (ours = the initiator's, theirs = the responder's)."""
    same_nat = bool(_public_ips(initiator) & _public_ips(responder))
    if same_nat and responder.local and "lan" in initiator.caps and "lan" in responder.caps:
        return Decision("lan", "behind the same NAT: dialing its LAN address")
    if _directly_reachable(responder):
        return Decision("initiator_dials", "the dialing peer is publicly reachable")
    if _directly_reachable(initiator):
        return Decision("responder_dials", "the accepting peer is publicly reachable")
    sym_b, sym_a = initiator.nat == "symmetric", responder.nat == "symmetric"
    if sym_b and sym_a:
        return Decision(None, "both NATs are symmetric (a new port per destination): "
                              "neither side has an address the other could aim at")
    if sym_b or sym_a:
        side, cone, primer = (("our", responder, "initiator") if sym_b
                              else ("their", initiator, "responder"))
        prober = "their" if sym_b else "our"
        if not ("birthday" in initiator.caps and "birthday" in responder.caps):
            return Decision(None, f"{side} NAT is symmetric (a new port per destination) "
                                  "and birthday probing is off on one side")
        if not cone.addrs or not (initiator.addrs if sym_b else responder.addrs):
            return Decision(None, f"{side} NAT is symmetric and no public address was "
                                  "observed to probe")
        if cone.filtering == "reject":
            return Decision(None, f"{side} NAT is symmetric and {prober} router rejects "
                                  "unsolicited connections: birthday probing cannot work")
        return Decision("birthday", f"{side} NAT is symmetric: birthday probing", primer)
    for side, view in (("us", initiator), ("them", responder)):
        if not view.addrs:
            return Decision(None, f"no observed public address for {side}")
    return Decision("punch", "both behind endpoint-independent NATs or firewalls")


_SWAP = {"our": "their", "their": "our", "us": "them", "them": "us", "we": "they",
         "they": "we"}


def from_their_side(reason: str) -> str:
    """A peer's `cancel` reason, worded from its side ("our NAT is symmetric"), reworded
    from ours ("their NAT is symmetric") for our own record."""
    words = reason.split(" ")
    return " ".join(_SWAP.get(w, w) for w in words)


# -- messages ----------------------------------------------------------------------------------

def encode_view(view: PeerView) -> dict[str, Any]:
    return {"reach": view.reach, "nat": view.nat, "filtering": view.filtering,
            "addrs": [[ip, port] for ip, port in view.addrs[:MAX_ADDRS]],
            "local": [[ip, port] for ip, port in view.local[:MAX_LOCAL_ADDRS]],
            "caps": [c for c in view.caps if c in CAPS]}


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


def _addrs(value: Any, limit: int, what: str) -> tuple[Addr, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise HolePunchProtocolError(f"{what} must be a list of at most {limit}")
    return _unique(a for a in (check_addr(x) for x in value) if a is not None)


def decode_view(msg: dict[str, Any]) -> PeerView:
    """The view in a ``connect``; fields of later versions are optional, unknown
    capabilities ignored."""
    reach, nat, filtering = msg.get("reach"), msg.get("nat"), msg.get("filtering", "unknown")
    if reach not in REACH or nat not in KINDS or filtering not in FILTERING:
        raise HolePunchProtocolError(f"reach must be one of {REACH}, nat one of {KINDS}, "
                                     f"filtering one of {FILTERING}")
    caps = msg.get("caps", [])
    if not isinstance(caps, list) or len(caps) > 16:
        raise HolePunchProtocolError("caps must be a list of at most 16")
    return PeerView(reach, nat, _addrs(msg.get("addrs"), MAX_ADDRS, "addrs"), filtering,
                    _addrs(msg.get("local", []), MAX_LOCAL_ADDRS, "local"),
                    tuple(c for c in CAPS if c in caps))


def _decode_birthday(msg: dict[str, Any], ours: Birthday) -> Birthday:
    ports, probes, rate = msg.get("ports"), msg.get("probes"), msg.get("rate")
    if (type(ports) is not int or type(probes) is not int
            or not isinstance(rate, (int, float)) or isinstance(rate, bool)
            or not (ports > 0 and probes > 0 and rate > 0)):
        raise HolePunchProtocolError("birthday needs positive ports, probes and rate")
    return ours.clamp(Birthday(ports, probes, float(rate)))


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
class Primed:
    """Birthday primer only: the driver has opened its connections (their SYNs left)."""


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
class Prime:
    """Birthday primer: open ``ports`` connections from fresh ports to ``target`` (the
    prober's mapped address), at most ``rate`` a second, keep them until ``until``
    (each completes, if a probe finds it, as a Noise responder); then deliver `Primed`."""

    target: Addr
    ports: int
    rate: float
    until: float


@dataclass(frozen=True)
class Probe:
    """Birthday prober: dial ``count`` random ports (1024-65535) at ``ips`` from our
    listen port, at most ``rate`` a second, as Noise initiator, until ``until``."""

    ips: tuple[str, ...]
    count: int
    rate: float
    until: float


@dataclass(frozen=True)
class Done:
    outcome: str  # "direct" | "relayed" (decided not to try) | "failed" (tried, no luck)
    reason: str


Event = Start | Received | DirectUp | Timer | Closed | Primed
Action = Send | Dial | Prime | Probe | Done

_WAIT_CONNECT, _WAIT_SYNC, _WAIT_PRIMED, _DIALING, _DONE = (
    "wait_connect", "wait_sync", "wait_primed", "dialing", "done")
_PRIMING = "priming"


class HolePunchSession:
    """One exchange with one peer over the relayed connection (module docstring).

    The driver calls `handle` for every event and carries out the returned actions, and
    delivers `Timer` when ``now >= deadline``. After a `Done` action the session is over.
    ``birthday``: our limits for birthday probing (both sides' apply, the smaller wins).
    """

    def __init__(self, role: str, ours: PeerView, *, now: float,
                 session_id: bytes | None = None, birthday: Birthday = Birthday()) -> None:
        if role not in ("initiator", "responder"):
            raise ValueError(f"role must be initiator or responder, not {role!r}")
        if role == "initiator" and (session_id is None or len(session_id) != ID_BYTES):
            raise ValueError(f"the initiator chooses a {ID_BYTES}-byte session id")
        self.role = role
        self.ours = PeerView(ours.reach, ours.nat, tuple(ours.addrs[:MAX_ADDRS]),
                             ours.filtering, tuple(ours.local[:MAX_LOCAL_ADDRS]),
                             tuple(c for c in ours.caps if c in CAPS))
        self.birthday = birthday
        self.id = session_id
        self.round = -1
        self.state = _WAIT_CONNECT
        # The responder waits for the first connect; the initiator's clock starts at Start.
        self.deadline: float | None = now + EXCHANGE_TIMEOUT if role == "responder" else None
        self.theirs: PeerView | None = None
        self.plan: str | None = None
        self.primer = ""  # birthday: "initiator" | "responder"
        self.agreed: Birthday | None = None  # birthday limits both sides accept
        self.rtt: float | None = None
        self.outcome: Done | None = None
        self._sent_at = 0.0

    @property
    def done(self) -> bool:
        return self.state == _DONE

    @property
    def tried(self) -> str:
        """What this session tried, for `lattice peers` ("punch, 2 rounds")."""
        if self.plan is None:
            return "nothing"
        return f"{self.plan}, {self.round + 1} round{'s' if self.round else ''}"

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
        if isinstance(event, Primed):
            if self.state != _PRIMING:
                raise ValueError("Primed while not priming")
            return self._primed(now)
        msg = _message(event.msg)
        if msg["type"] == "cancel":
            if self.id is not None and _check_id(msg) != self.id:
                raise HolePunchProtocolError("cancel for another session")
            reason = msg.get("reason")
            reason = reason[:MAX_REASON_CHARS] if isinstance(reason, str) else "cancelled"
            return self._finish("relayed", from_their_side(reason))
        if msg["type"] == "primed":
            return self._on_primed(msg, now)
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
        decision = decide(self.ours, theirs)
        if decision.plan is None:
            return [Send({"type": "cancel", "id": self.id, "reason": decision.reason}),
                    *self._finish("relayed", decision.reason)]
        self.plan, self.primer = decision.plan, decision.primer
        sync: dict[str, Any] = {"type": "sync", "id": self.id, "round": self.round,
                                "plan": self.plan}
        if self.plan == "birthday":
            self.agreed = self.birthday
            sync.update(primer=self.primer, ports=self.agreed.ports,
                        probes=self.agreed.probes, rate=self.agreed.rate)
            return [Send(sync), *self._start_birthday(now, primer=self.primer == "initiator")]
        self.state = _DIALING
        actions: list[Action] = [Send(sync)]
        # sync reaches A after ~rtt/2; A dials then, so B waits as long before dialing.
        start = now + (self.rtt / 2 if self.plan == "punch" else 0.0)
        self.deadline = start + ROUND_TIMEOUT
        if self.plan in ("punch", "initiator_dials"):
            actions.append(Dial(start, self.deadline, theirs.addrs, noise_initiator=True))
        elif self.plan == "lan":
            actions.append(Dial(start, self.deadline, _unique(theirs.local + theirs.addrs),
                                noise_initiator=True))
        return actions

    # -- responder (A) ---------------------------------------------------------------
    def _responder_receive(self, msg: dict[str, Any], now: float) -> list[Action]:
        kind = msg["type"]
        if kind == "connect" and self.state in (_WAIT_CONNECT, _DIALING, _WAIT_PRIMED,
                                                _PRIMING):
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
            if plan == "birthday":
                return self._responder_birthday(msg, now)
            self.state = _DIALING
            # Stay until the initiator's round ends, then allow for its next connect.
            self.deadline = now + ROUND_TIMEOUT + EXCHANGE_TIMEOUT
            if plan == "punch":
                return [Dial(now, now + ROUND_TIMEOUT, self.theirs.addrs, noise_initiator=False)]
            if plan == "responder_dials":
                return [Dial(now, now + ROUND_TIMEOUT, self.theirs.addrs, noise_initiator=True)]
            return []
        raise HolePunchProtocolError(f"unexpected {kind!r} in {self.state}")

    def _responder_birthday(self, msg: dict[str, Any], now: float) -> list[Action]:
        assert self.theirs is not None
        if "birthday" not in self.ours.caps:
            raise HolePunchProtocolError("birthday probing asked of a side that allows none")
        primer = msg.get("primer")
        if primer not in ("initiator", "responder"):
            raise HolePunchProtocolError("birthday needs primer initiator or responder")
        self.primer = primer
        self.agreed = _decode_birthday(msg, self.birthday)
        return self._start_birthday(now, primer=primer == "responder")

    # -- birthday probing (both roles) ------------------------------------------------
    def _start_birthday(self, now: float, *, primer: bool) -> list[Action]:
        """Ours to prime, or to wait for the other side's `primed`."""
        assert self.agreed is not None and self.theirs is not None
        if primer:
            if not self.theirs.addrs:
                raise HolePunchProtocolError("birthday: nothing to prime toward")
            self.state = _PRIMING
            self.deadline = now + EXCHANGE_TIMEOUT + self.agreed.probe_time()
            return [Prime(self.theirs.addrs[0], self.agreed.ports, self.agreed.rate,
                          now + EXCHANGE_TIMEOUT + self.agreed.probe_time() + ROUND_TIMEOUT)]
        self.state = _WAIT_PRIMED
        # the primer's SYNs at its rate, and as much again for a loaded machine
        self.deadline = now + EXCHANGE_TIMEOUT + 2 * self.agreed.ports / self.agreed.rate
        return []

    def _primed(self, now: float) -> list[Action]:
        assert self.agreed is not None
        self.state = _DIALING
        self.deadline = now + self.agreed.probes / self.agreed.rate + ROUND_TIMEOUT
        if self.role == "responder":
            self.deadline += EXCHANGE_TIMEOUT  # then allow for the initiator's next connect
        return [Send({"type": "primed", "id": self.id, "round": self.round})]

    def _on_primed(self, msg: dict[str, Any], now: float) -> list[Action]:
        if self.state != _WAIT_PRIMED:
            raise HolePunchProtocolError(f"unexpected 'primed' in {self.state}")
        if _check_id(msg) != self.id or _check_round(msg) != self.round:
            raise HolePunchProtocolError("primed for another session or round")
        assert self.agreed is not None and self.theirs is not None
        ips = tuple(dict.fromkeys(ip for ip, _ in self.theirs.addrs))
        if not ips:
            raise HolePunchProtocolError("birthday: no address to probe")
        self.state = _DIALING
        until = now + self.agreed.probes / self.agreed.rate + ROUND_TIMEOUT
        self.deadline = until + (EXCHANGE_TIMEOUT if self.role == "responder" else 0.0)
        return [Probe(ips, self.agreed.probes, self.agreed.rate, until)]

    # -- both ----------------------------------------------------------------------
    def _on_timer(self, now: float) -> list[Action]:
        if self.deadline is None or now < self.deadline:
            return []
        if self.role == "initiator" and self.state == _DIALING and self.round + 1 < MAX_ROUNDS:
            return self._send_connect(now)
        if self.state == _DIALING:
            return self._finish("failed", f"no direct connection after {self.tried}")
        if self.state == _WAIT_PRIMED:
            return self._finish("failed", "the primer did not say primed in time")
        return self._finish("failed", "the exchange timed out")

    def _finish(self, outcome: str, reason: str) -> list[Action]:
        self.state = _DONE
        self.deadline = None
        self.outcome = Done(outcome, reason)
        return [self.outcome]
