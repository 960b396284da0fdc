"""SWIM-style failure detection with piggybacked gossip, as a sans-I/O machine.

Owns who is alive as this daemon sees it, without a replicated write per member: each
daemon probes one of its overlay neighbours per probe interval (``ping``, answered by
``ack``); a neighbour that does not answer within the probe timeout is *suspected*, and
one still suspected after the suspicion timeout is declared *dead*. Changes of status
(``alive``/``suspect``/``dead`` at an incarnation) are rumours that ride on every probe
and ack, each retransmitted about λ·log2(N) times, so every daemon hears of a failure
in O(log N) probe rounds while each sends O(1) messages per round, whatever N. A daemon
that hears itself suspected or declared dead refutes it with a higher incarnation, and
says it again whenever it hears the stale news (a refutation rides on a bounded number
of messages: one that missed it would otherwise hold a live daemon dead).
(Das, Gupta, Motivala, "SWIM", DSN 2002; the suspicion mechanism of its section 4.2.)

A daemon that closes a connection on purpose (its connection manager trims it) first
says ``bye`` on it, and neither side probes the other once more for the closed
connection: that recheck is for crashes, and after a trim it redialed the connection
just closed, on both sides, undoing every trim.

A daemon announces its own start as a rumour, and hands each new neighbour its table
(``members``, once per connection), so a daemon that joins late learns who is alive
and who died without waiting for news. Memory is what a daemon has heard of, at most
``max_entries`` (its neighbours are never forgotten); a member it has no news of is
not tracked, and the views fall back to its record's heartbeat.

Must not import trio, libp2p, sockets or read the clock: the driver passes ``now`` and
carries the returned ``(peer, message)`` pairs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2}
MAX_PIGGYBACK = 8
"""Rumours carried by one ping or ack (SWIM piggybacks a bounded number)."""
MAX_PEER_CHARS = 128
MAX_TABLE = 4096
"""Entries in one ``members`` message: the table a daemon hands a new neighbour."""


class MembershipError(ValueError):
    """A malformed membership message (``reason`` is the statistics key)."""

    reason = "malformed"


@dataclass
class _Entry:
    status: str
    incarnation: int
    changed: float
    """Local time the status last changed."""
    seen: float | None
    """Local time of the last evidence that it was alive (an ack, or an alive rumour)."""
    transmits: int = 0
    """How many more messages carry this entry as a rumour."""


class Membership:
    """One daemon's view of liveness (see the module docstring)."""

    def __init__(self, me: str, *, rng: random.Random | None = None,
                 probe_interval: float = 3.0, probe_timeout: float = 2.0,
                 suspicion_timeout: float = 15.0, retransmit_mult: int = 3,
                 max_entries: int = 4096, dead_ttl: float = 600.0,
                 gossip_joins: bool = True) -> None:
        self.me = me
        self.rng = rng or random.Random()
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.suspicion_timeout = suspicion_timeout
        self.retransmit_mult = retransmit_mult
        self.max_entries = max_entries
        self.dead_ttl = dead_ttl
        self.gossip_joins = gossip_joins
        """Spread our start, and each member we hear from first, as news (off: a
        simulation of a network whose members all joined long ago)."""
        self.incarnation = 0
        self._entries: dict[str, _Entry] = {}
        self._neighbours: set[str] = set()
        self._order: list[str] = []
        self._recheck: set[str] = set()
        self._parting: set[str] = set()
        """Peers whose connection is being closed on purpose (a ``bye`` either way): its
        close is not a crash to recheck."""
        self._tell: set[str] = set()
        """Peers that spoke to us while we hold them suspect or dead."""
        self._awaiting: dict[int, tuple[str, float]] = {}  # nonce -> (peer, deadline)
        self._nonce = 0
        self._own_rumour = self._transmits() if gossip_joins else 0  # start, refutations
        self.counts = {"pings": 0, "acks": 0, "suspected": 0, "declared_dead": 0,
                       "refuted": 0, "reasserted": 0, "malformed": 0, "byes": 0}

    # -- the overlay ----------------------------------------------------------------------
    def add_neighbour(self, peer: str, now: float) -> None:
        """A connection to ``peer`` exists: probe it from now on."""
        if peer != self.me:
            self._neighbours.add(peer)
            self._parting.discard(peer)
            self._evidence(peer, None, now)

    def remove_neighbour(self, peer: str) -> None:
        """The connection to ``peer`` closed: probe it once more at the next tick (a
        crash closes connections too), then no longer; not when either side said
        ``bye`` first."""
        if peer in self._neighbours:
            self._neighbours.discard(peer)
            if peer in self._parting:
                self._parting.discard(peer)
            else:
                self._recheck.add(peer)

    def part(self, peer: str) -> dict[str, Any]:
        """We are about to close our connection to ``peer`` on purpose: the ``bye`` to
        send it first, so that neither side takes the close for a crash."""
        self._parting.add(peer)
        self._recheck.discard(peer)
        return {"t": "bye", "n": 0, "g": self._rumours(peer)}

    def neighbours(self) -> set[str]:
        return set(self._neighbours)

    # -- queries --------------------------------------------------------------------------
    def status(self, peer: str) -> str | None:
        """alive, suspect or dead as we know it; None: never heard of it."""
        if peer == self.me:
            return ALIVE
        e = self._entries.get(peer)
        return e.status if e is not None else None

    def liveness(self, peer: str, now: float) -> tuple[bool | None, float | None]:
        """(alive?, seconds since the last evidence of life); (None, None) when we
        never heard of ``peer``: the caller decides what no news means."""
        if peer == self.me:
            return True, 0.0
        e = self._entries.get(peer)
        if e is None:
            return None, None
        return e.status != DEAD, (now - e.seen) if e.seen is not None else None

    def heard_dead(self, peer: str) -> float | None:
        e = self._entries.get(peer)
        return e.changed if e is not None and e.status == DEAD else None

    def table(self) -> dict[str, Any]:
        """A ``members`` message with what we know (for a new neighbour)."""
        rows = [[self.me, ALIVE, self.incarnation]]
        rows += [[p, e.status, e.incarnation] for p, e in self._entries.items()]
        return {"t": "members", "n": 0, "g": rows[:MAX_TABLE]}

    def tracked(self) -> int:
        return len(self._entries)

    def _estimate(self) -> int:
        return max(len(self._entries), len(self._neighbours), 1) + 1

    def _transmits(self) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log2(self._estimate() + 1)))

    # -- probing --------------------------------------------------------------------------
    def tick(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        """Once per probe interval: time out probes and suspicions, then ping the next
        neighbour (round robin over a shuffled order, as SWIM's section 4.3)."""
        for nonce, (peer, deadline) in list(self._awaiting.items()):
            if now >= deadline:
                del self._awaiting[nonce]
                e = self._entries.get(peer)
                if e is not None and e.status == ALIVE:
                    self._set(peer, SUSPECT, e.incarnation, now)
                    self.counts["suspected"] += 1
        for peer, e in list(self._entries.items()):
            if e.status == SUSPECT and now >= e.changed + self.suspicion_timeout:
                self._set(peer, DEAD, e.incarnation, now)
                self.counts["declared_dead"] += 1
            elif e.status == DEAD and now >= e.changed + self.dead_ttl and e.transmits == 0:
                del self._entries[peer]
        while self._recheck:
            peer = min(self._recheck)  # not set.pop(): its order is the hash seed's
            self._recheck.discard(peer)
            if peer not in self._neighbours and peer not in self._parting:
                return [self._ping(peer, now)]
        if not self._order:
            # sorted first: a set's order follows the hash seed, the shuffle our rng
            self._order = sorted(self._neighbours)  # a dead one may answer: it refutes
            self.rng.shuffle(self._order)
        while self._order:
            peer = self._order.pop()
            if peer in self._neighbours:
                return [self._ping(peer, now)]
        return []

    def _ping(self, peer: str, now: float) -> tuple[str, dict[str, Any]]:
        self._nonce += 1
        self._awaiting[self._nonce] = (peer, now + self.probe_timeout)
        self.counts["pings"] += 1
        return peer, {"t": "ping", "n": self._nonce, "g": self._rumours(peer)}

    def handle(self, sender: str, msg: Any, now: float) -> list[tuple[str, dict[str, Any]]]:
        """One message from ``sender``; returns what to send. Raises MembershipError
        for a malformed message (counted)."""
        try:
            kind, nonce, gossip = _check(msg)
        except MembershipError:
            self.counts["malformed"] += 1
            raise
        self._evidence(sender, None, now)
        for peer, status, inc in gossip:
            self._rumour(peer, status, inc, now, news=kind != "members")
        if kind == "bye":  # it closes the connection on purpose next
            self.counts["byes"] += 1
            self._parting.add(sender)
            self._recheck.discard(sender)
            return []
        if kind == "members":
            return []
        if kind == "ping":
            self.counts["acks"] += 1
            return [(sender, {"t": "ack", "n": nonce, "g": self._rumours(sender)})]
        waiting = self._awaiting.pop(nonce, None)
        if waiting is not None and waiting[0] != sender:
            self._awaiting[nonce] = waiting  # not the peer we asked: ignore
        return []

    # -- rumours --------------------------------------------------------------------------
    def _evidence(self, peer: str, incarnation: int | None, now: float) -> None:
        """``peer`` spoke to us: alive at least at its known incarnation."""
        e = self._entries.get(peer)
        if e is None:  # news: a member we never heard of is alive
            self._entries[peer] = _Entry(ALIVE, incarnation or 0, now, now,
                                         self._transmits() if self.gossip_joins else 0)
            self._bound()
        else:
            e.seen = now
            if e.status != ALIVE:
                # It speaks, so it lives, but only its own refutation (a higher
                # incarnation) can overrule the rumour everywhere: tell it what is said
                # of it, with our next message to it (`_rumours`).
                self._tell.add(peer)

    def _rumour(self, peer: str, status: str, inc: int, now: float, *,
                news: bool = True) -> None:
        if peer == self.me:
            if status != ALIVE:
                if inc >= self.incarnation:
                    self.incarnation = inc + 1  # refute (SWIM 4.2)
                    self.counts["refuted"] += 1
                else:  # refuted already, but the sender missed it: say it again
                    self.counts["reasserted"] += 1
                self._own_rumour = self._transmits()
            return
        e = self._entries.get(peer)
        if e is None:
            self._entries[peer] = _Entry(status, inc, now, now if status == ALIVE else None,
                                         self._transmits() if news else 0)
            self._bound()
            return
        newer = inc > e.incarnation or (inc == e.incarnation and _RANK[status] > _RANK[e.status])
        if newer:
            self._set(peer, status, inc, now)
            if not news:
                e.transmits = 0
            if status == ALIVE:
                e.seen = now

    def _set(self, peer: str, status: str, inc: int, now: float) -> None:
        e = self._entries[peer]
        e.status, e.incarnation, e.changed = status, inc, now
        e.transmits = self._transmits()

    def _rumours(self, to: str | None = None) -> list[list[Any]]:
        out: list[list[Any]] = []
        if to in self._tell:
            self._tell.discard(to)
            e = self._entries.get(to)
            if e is not None and e.status != ALIVE:
                out.append([to, e.status, e.incarnation])
        if self._own_rumour > 0:
            self._own_rumour -= 1
            out.append([self.me, ALIVE, self.incarnation])
        live = [(p, e) for p, e in self._entries.items() if e.transmits > 0]
        room = MAX_PIGGYBACK + 1 - len(out) if to is not None else MAX_PIGGYBACK - len(out)
        if len(live) > room:
            live.sort(key=lambda pe: -pe[1].transmits)  # the newest first
            live = live[:room]
        for peer, e in live:
            e.transmits -= 1
            out.append([peer, e.status, e.incarnation])
        return out

    def _bound(self) -> None:
        while len(self._entries) > self.max_entries:
            # forget an entry that is not a neighbour: one whose rumour is spent first,
            # then the oldest (a flood of rumours cannot grow us past the bound)
            spare = [(e.transmits > 0, e.changed, p) for p, e in self._entries.items()
                     if p not in self._neighbours]
            if not spare:
                return
            del self._entries[min(spare)[2]]

    def statistics(self) -> dict[str, Any]:
        by_status = {ALIVE: 0, SUSPECT: 0, DEAD: 0}
        for e in self._entries.values():
            by_status[e.status] += 1
        return {"incarnation": self.incarnation, "neighbours": len(self._neighbours),
                "tracked": len(self._entries), **by_status, **self.counts}


def _check(msg: Any) -> tuple[str, int, list[tuple[str, str, int]]]:
    if not isinstance(msg, dict) or msg.get("t") not in ("ping", "ack", "members", "bye") \
            or type(msg.get("n")) is not int or not isinstance(msg.get("g"), list) \
            or len(msg["g"]) > (MAX_TABLE if msg["t"] == "members" else MAX_PIGGYBACK + 1):
        raise MembershipError("a membership message is {t: ping|ack|members|bye, n: int, "
                              "g: [rumour]}")
    out = []
    for r in msg["g"]:
        if not (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str)
                and 0 < len(r[0]) <= MAX_PEER_CHARS and r[1] in _RANK
                and type(r[2]) is int and 0 <= r[2] < 2**53):
            raise MembershipError("a rumour is [peer, alive|suspect|dead, incarnation]")
        out.append((r[0], r[1], r[2]))
    return msg["t"], msg["n"], out
