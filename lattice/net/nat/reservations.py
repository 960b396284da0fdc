"""Relay reservations (Circuit Relay v2, client side): which relays we know, and slots on
up to `nat.max_relays` of them while we are not publicly reachable.

Owns `RelayDirectory` (relays that announced themselves to us, relays observers listed,
relays the DHT found, then our bootstrap peers) and `ReservationKeeper` (making,
refreshing and re-making reservations, with backoff per relay). Must not import
latticed. The HOP messages are py-libp2p's public protobufs.

Failure policy: a relay that refuses, vanishes or answers garbage costs a logged line
and a backoff for that relay (30 s at most while it says "not serving yet", 5 min
otherwise); the keeper keeps running. Our bugs propagate.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio
from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from lattice.core.holepunch import Addr
from lattice.net.host import PEER_ERRORS
from lattice.net.nat_config import NatConfig
from lattice.net.streams import PeerError, RemoteProtocolError

log = logging.getLogger("lattice.net.nat")

RELAY_CANDIDATES_MAX = 32  # relays remembered per source (announced, learned)
LEARNED_RELAY_TTL = 3600.0  # a relay we heard of is forgotten this long after


class RelayRefused(PeerError):
    """A relay answered our reservation or connect with a status other than OK."""

    def __init__(self, status: StatusCode | int) -> None:
        self.status = status
        super().__init__(f"relay said {status_name(status)}")

    @property
    def not_yet(self) -> bool:
        """It does not serve (yet), or is full: ask again soon."""
        return self.status in (StatusCode.PERMISSION_DENIED, StatusCode.RESOURCE_LIMIT_EXCEEDED)


def hop_status(msg: Any) -> StatusCode | int:
    """A HOP answer's status: a `StatusCode`, or the bare int a peer sent that is none
    (never raised on: the peer chose it)."""
    if not msg.HasField("status"):
        return StatusCode.UNUSED
    try:
        return StatusCode(msg.status)
    except ValueError:
        return int(msg.status)


def status_name(code: StatusCode | int) -> str:
    try:
        return StatusCode(code).name
    except ValueError:
        return f"status {int(code)}"


def maddr(addr: Addr) -> str:
    ip, port = addr
    return f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{port}"


def split_p2p(addr: str) -> tuple[str, str]:
    """``/ip4/../tcp/../p2p/ID`` -> (``/ip4/../tcp/..``, ``ID``)."""
    base, _, peer_id = addr.rpartition("/p2p/")
    return base, peer_id


@dataclass
class Reservation:
    relay: str
    addr: str  # the relay address we reached it at (ends in /p2p/<relay>)
    expires: float  # wall clock, from the relay's answer
    reserved_at: float  # wall clock

    def circuit_addr(self, me: str) -> str:
        return f"{self.addr}/p2p-circuit/p2p/{me}"

    def refresh_margin(self) -> float:
        """Refresh this long before expiry: a quarter of the TTL within [30 s, 10 min],
        but never more than half of it (a short TTL must not mean refreshing nonstop)."""
        ttl = max(0.0, self.expires - self.reserved_at)
        return min(max(30.0, min(600.0, ttl / 4)), ttl / 2)


@dataclass
class Backoff:
    until: float = 0.0
    delay: float = 0.0

    def fail(self, now: float, rng: random.Random, *, lo: float = 1.0, hi: float = 300.0) -> None:
        self.delay = min(hi, max(lo, self.delay * 2))
        self.until = now + self.delay * rng.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.until = self.delay = 0.0


class RelayDirectory:
    """Relays we could reserve on or dial through, by how we heard of them (bounded,
    oldest first out). ``on_new`` is called when a relay we did not know appears."""

    def __init__(self, me: str, bootstrap: Iterable[str], on_new: Callable[[], None]) -> None:
        self.me = me
        self.bootstrap: list[tuple[str, str]] = []  # (peer id, full multiaddr)
        for addr in bootstrap:
            _, pid = split_p2p(addr)
            if pid and pid != me:
                self.bootstrap.append((pid, addr))
        self.on_new = on_new
        self.announced: dict[str, tuple[Addr, float]] = {}  # peers that said they relay
        self.learned: dict[str, tuple[list[str], float]] = {}  # from observers, the DHT

    def announce(self, peer: str, addr: Addr, now: float) -> None:
        """``peer`` told us it serves as a relay, at ``addr`` (as our socket sees it)."""
        if peer not in self.announced:
            self.on_new()
        self.announced[peer] = (addr, now)
        _bound(self.announced)

    def withdraw(self, peer: str) -> None:
        self.announced.pop(peer, None)

    def learn(self, peer: str, addrs: list[str], now: float) -> None:
        """A relay heard of elsewhere, at full multiaddrs (ending in /p2p/<peer>)."""
        if peer == self.me or not addrs:
            return
        if peer not in self.learned:
            self.on_new()
        self.learned[peer] = (addrs[:8], now)
        _bound(self.learned)

    def candidates(self, now: float) -> list[tuple[str, str]]:
        """(peer id, address) of relays to reserve on, best first: peers that told us
        they serve as relays, relays others listed, then bootstrap peers (which may or
        may not serve)."""
        out = []
        for pid, (addr, at) in list(self.announced.items()):
            if now - at <= LEARNED_RELAY_TTL:
                out.append((pid, f"{maddr(addr)}/p2p/{pid}"))
        for pid, (addrs, at) in list(self.learned.items()):
            if now - at > LEARNED_RELAY_TTL:
                del self.learned[pid]
                continue
            out += [(pid, a) for a in addrs]
        out += self.bootstrap
        seen: dict[str, str] = {}
        for relay, where in out:
            if relay != self.me:
                seen.setdefault(relay, where)
        return list(seen.items())

    def listed_for(self, asker: str, now: float, connected: Iterable[str]) -> list[tuple[str, Addr]]:
        """Relays that announced themselves to us and are still connected, for ``asker``."""
        live = set(connected)
        return [(pid, addr) for pid, (addr, at) in self.announced.items()
                if pid != asker and now - at < LEARNED_RELAY_TTL and pid in live]

    def address_of(self, peer: str, now: float) -> str | None:
        return next((a for p, a in self.candidates(now) if p == peer), None)


def _bound(d: dict[str, Any]) -> None:
    while len(d) > RELAY_CANDIDATES_MAX:
        d.pop(next(iter(d)))


class ReservationKeeper:
    """Slots on up to ``config.max_relays`` relays while ``wanted()``; see the module
    docstring. `serve` runs the loop; `wake` makes it look again at once."""

    def __init__(self, node: Any, config: NatConfig, directory: RelayDirectory, *,
                 wanted: Callable[[], bool], rng: random.Random,
                 on_reserved: Callable[[], None]) -> None:
        self.node = node
        self.config = config
        self.directory = directory
        self.me = node.peer_id
        self.wanted = wanted
        self.rng = rng
        self.on_reserved = on_reserved
        self.reservations: dict[str, Reservation] = {}
        self.backoff: dict[str, Backoff] = {}
        self.made = 0
        self.failures = 0
        self._wake = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    def lost(self, relay: str) -> None:
        """The connection to ``relay`` is gone, and the reservation with it."""
        if self.reservations.pop(relay, None) is not None:
            log.info("relay=%s disconnected: reservation lost", relay)
            self.wake()

    async def serve(self) -> None:
        while True:
            self._wake = trio.Event()
            wall = time.time()
            if not self.wanted():
                if self.reservations:
                    log.info("publicly reachable: dropping %d relay reservation(s)",
                             len(self.reservations))
                    self.reservations.clear()
            else:
                todo = [(r.relay, r.addr) for r in self.reservations.values()
                        if r.expires - wall <= r.refresh_margin()]
                now = trio.current_time()
                for pid, addr in self.directory.candidates(now):
                    if len(self.reservations) + len(todo) >= self.config.max_relays:
                        break
                    if pid in self.reservations or now < self.backoff.get(pid, Backoff()).until:
                        continue
                    todo.append((pid, addr))
                if todo:
                    async with trio.open_nursery() as nursery:
                        for pid, addr in todo:
                            nursery.start_soon(self._reserve, pid, addr)
                    continue  # look again at once: some may have failed, others appeared
            with trio.move_on_after(self.next_look(trio.current_time(), time.time())):
                await self._wake.wait()

    def next_look(self, now: float, wall: float) -> float:
        """Seconds until something is due: a reservation's refresh, or a relay's backoff
        ending. Only backoffs still running count: one that ended while every slot is
        taken is no reason to look (it made this loop wake every 50 ms, forever, on
        every NATed daemon holding max_relays reservations)."""
        wait = 30.0
        for r in self.reservations.values():
            wait = min(wait, r.expires - r.refresh_margin() - wall)
        for pid, _ in self.directory.candidates(now):
            b = self.backoff.get(pid)
            if b is not None and pid not in self.reservations and b.until > now:
                wait = min(wait, b.until - now)
        return max(0.05, wait)

    async def _reserve(self, relay: str, addr: str) -> None:
        backoff = self.backoff.setdefault(relay, Backoff())
        try:
            with trio.fail_after(10.0):
                if relay not in self.node.connected_peers():
                    await self.node.connect(addr, timeout=5.0)
                expires = await self._send_reserve(relay)
        except (PeerError, trio.TooSlowError) as e:
            self.failures += 1
            # "not serving (yet)" is what a public daemon says until its own dial-back
            # came through: ask again soon. Anything else backs off up to 5 minutes.
            soft = isinstance(e, RelayRefused) and e.not_yet
            backoff.fail(trio.current_time(), self.rng, hi=30.0 if soft else 300.0)
            lost = self.reservations.pop(relay, None) is not None
            log.log(logging.INFO if lost or not soft else logging.DEBUG,
                    "relay=%s reservation failed (%s); retry in %.0f s", relay, e, backoff.delay)
            return
        backoff.reset()
        new = relay not in self.reservations
        self.reservations[relay] = Reservation(relay, addr, expires, time.time())
        self.made += 1
        self.on_reserved()
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
        status = hop_status(resp)
        if status != StatusCode.OK or not resp.HasField("reservation"):
            raise RelayRefused(status)
        expires = float(resp.reservation.expire)
        if expires <= time.time():
            raise RemoteProtocolError("reservation already expired")
        return expires
