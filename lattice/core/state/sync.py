"""The `/lattice/crdt-sync/1` protocol as a sans-I/O state machine.

Owns what a sync session says and when: message shapes and their validation, the
per-session view of what the remote has, what to send next, and the penalty/backoff
bookkeeping for peers that send invalid envelopes. Must not import trio, libp2p,
sockets or read the clock: the driver (`lattice.net.crdt_sync`) feeds it decoded
frames and ``now``, and writes whatever `SyncSession.next_message` returns.

Theory of operation (proto/crdt-sync.md has the normative text)
---------------------------------------------------------------
A session is one stream between two peers; both ends run the same machine. The
dialer sends ``hello`` (a fresh session id, its summary ``{author: seq}`` and the
authors it has banned); the acceptor answers with its own ``hello`` under the same id.
From then on each side knows what the other has (`remote_known`) and sends it what it
lacks: an author whose envelopes changed is marked *dirty* on a session, and the
writer turns dirty authors into ``envelopes`` messages from `StateStore` (no queue of
envelopes exists, so nothing can pile up: the store is the buffer, and a slow peer
just gets a bigger batch later). Our own writes are marked on every session; an
envelope received from a peer is forwarded to at most `FORWARD_FANOUT` open sessions
that may lack it, chosen at random (push gossip). Forwarding to every session would
cost O(N^2) messages per write when N peers are all connected to each other, which
is the common case, where each has it from the author already. Each side also tells
the other which peers it runs sessions with (``peers``, in ``hello`` and ``summary``
and with envelopes whenever it changed): the author pushes its own writes to all of
those, so they are never forwarding targets for its envelopes, nor is the author
itself. In a full mesh nothing is forwarded at all. Received envelopes raise
``remote_known``, so nothing is echoed back. Anti-entropy is a ``summary`` request,
answered with a ``summary`` reply; each side then sends what the other lacks, which
repairs anything a crossing or a dropped stream lost. Equivocation proofs travel as
``proof`` messages until every peer has banned the author.

An invalid envelope (bad signature, out-of-bounds content, ...) or a malformed message
ends the session with `SyncProtocolError` and a penalty: the peer is not dialed or
accepted again until its backoff (doubling per offence) expires. `SyncHub.handle` is
the boundary of everything a received message runs (decoding, validation, the store,
its listeners): any other exception raised there was caused by the peer's input
(a bug of ours it found) and becomes `SyncProtocolError` ``internal_error``, counted
and penalized like any other, so no input can take the daemon down. Only `OSError`
(our own disk, under the state log) still propagates.

A session that has nothing to send for a while sends a *keepalive*: an ``envelopes``
message with no items (valid in every version), so the remote can tell an idle peer
from a hung one and end sessions that stay silent (`lattice.net.crdt_sync`).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from lattice.core.state.envelope import Envelope
from lattice.core.state.limits import (
    MAX_BATCH_BYTES,
    MAX_ITEMS_PER_MESSAGE,
    MAX_SEQ,
    MAX_SUMMARY_ENTRIES,
)
from lattice.core.state.quota import Allowance
from lattice.core.state.store import StateStore

PROTOCOL_ID = "/lattice/crdt-sync/1"
PROTOCOL_VERSION = 1
MAX_SESSION_ID_CHARS = 64
MAX_SESSIONS_PER_PEER = 2  # one each way when two peers dial each other at once
FORWARD_FANOUT = 6
"""Sessions a received envelope is forwarded to (as gossipsub's mesh degree D): with
random choices at every hop, an update reaches all of a connected network with high
probability, and anti-entropy repairs the rest."""


class SyncProtocolError(ValueError):
    """The remote broke the sync protocol; ``reason`` is the penalty/statistics key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SessionRefused(Exception):
    """We will not run a session with this peer now (backoff, or too many sessions)."""


@dataclass
class Outcome:
    """What handling one message did: envelopes applied and authors banned."""

    accepted: list[Envelope] = field(default_factory=list)
    banned: list[str] = field(default_factory=list)


def _fail(reason: str, detail: str) -> NoReturn:
    raise SyncProtocolError(reason, detail)


TIP_BYTES = 8
"""A summary names each author's highest seq and the first bytes of that envelope's
digest: enough to notice two peers holding different envelopes for the same seq."""


def _check_summary(value: Any) -> dict[str, tuple[int, bytes]]:
    if not isinstance(value, dict) or len(value) > MAX_SUMMARY_ENTRIES:
        _fail("malformed", "summary must be a map of at most "
              f"{MAX_SUMMARY_ENTRIES} authors")
    out = {}
    for author, entry in value.items():
        if (not isinstance(author, str) or len(author) > 128 or not isinstance(entry, list)
                or len(entry) != 2 or type(entry[0]) is not int
                or not (1 <= entry[0] <= MAX_SEQ) or not isinstance(entry[1], bytes)
                or len(entry[1]) != TIP_BYTES):
            _fail("malformed", "summary maps author ids to [seq, tip]")
        out[author] = (entry[0], entry[1])
    return out


def encode_summary(store: StateStore) -> dict[str, list[Any]]:
    return {a: [seq, digest[:TIP_BYTES]] for a, (seq, digest) in store.tips().items()}


def _check_peers(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or len(value) > MAX_SUMMARY_ENTRIES or not all(
            isinstance(p, str) and len(p) <= 128 for p in value):
        _fail("malformed", "peers must be a list of peer ids")
    return frozenset(value)


def _check_authors(value: Any) -> set[str]:
    if not isinstance(value, list) or len(value) > MAX_SUMMARY_ENTRIES or not all(
            isinstance(a, str) and len(a) <= 128 for a in value):
        _fail("malformed", "banned must be a list of author ids")
    return set(value)


class SyncSession:
    """One session with one peer (see the module docstring)."""

    def __init__(self, store: StateStore, *, remote_peer: str, initiator: bool,
                 session_id: str | None,
                 our_peers: Callable[[], tuple[int, list[str]]] = lambda: (0, []),
                 allowance: Allowance | None = None) -> None:
        if initiator and not session_id:
            raise ValueError("the dialer chooses the session id")
        self.store = store
        self.remote_peer = remote_peer
        self.allowance = allowance
        """What the remote may still add to our store (shared by its sessions)."""
        self._our_peers = our_peers
        """(version, the peers we run sessions with): told to the remote when it changed."""
        self._peers_told = -1
        self.remote_peers: frozenset[str] = frozenset()
        """The peers the remote last said it runs sessions with (it pushes its own
        writes to all of them)."""
        self.initiator = initiator
        self.session_id = session_id
        self.remote_known: dict[str, int] = {}
        self.remote_banned: set[str] = set()
        self.hello_seqs: dict[str, int] = {}
        """What the remote held when the session opened (from its hello)."""
        self._hello_sent = False
        self._hello_received = False
        self._dirty: set[str] = set()
        self._proofs: set[str] = set()
        self._ask_summary = False
        self._owe_summary = False
        self.refused_since_summary = False
        """We refused some of the remote's envelopes (a quota) since we last sent it
        our summary: the next anti-entropy round should be with it."""
        self.envelopes_sent = 0
        self.envelopes_received = 0
        self.keepalives_sent = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def open(self) -> bool:
        return self._hello_sent and self._hello_received

    @property
    def hello_received(self) -> bool:
        return self._hello_received

    # -- inputs ---------------------------------------------------------------------------
    def mark_dirty(self, author: str) -> None:
        self._dirty.add(author)

    def mark_proof(self, author: str) -> None:
        self._dirty.discard(author)
        if author not in self.remote_banned:
            self._proofs.add(author)

    def request_summary(self) -> None:
        """Anti-entropy: ask the remote for its summary (and send ours with the reply)."""
        if self._hello_received:
            self._ask_summary = True

    def handle(self, msg: Any, now: float) -> Outcome:
        """Process one received message. Raises SyncProtocolError if the remote broke
        the protocol or sent an envelope that proves it misbehaved."""
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
            _fail("malformed", "a message is a map with a type 't'")
        kind = msg["t"]
        sid = msg.get("sid")
        if not isinstance(sid, str) or not (1 <= len(sid) <= MAX_SESSION_ID_CHARS):
            _fail("malformed", "missing session id")
        if self.session_id is None:
            self.session_id = sid
        elif sid != self.session_id:
            _fail("malformed", f"session id {sid!r} in session {self.session_id}")
        if kind == "hello":
            return self._on_hello(msg)
        if not self._hello_received:
            _fail("unexpected", f"{kind!r} before hello")
        if kind == "envelopes":
            return self._on_envelopes(msg, now)
        if kind == "summary":
            return self._on_summary(msg)
        if kind == "proof":
            return self._on_proof(msg, now)
        _fail("malformed", f"unknown message type {kind[:32]!r}")
        raise AssertionError  # unreachable

    def _on_hello(self, msg: dict[str, Any]) -> Outcome:
        if self._hello_received:
            _fail("unexpected", "second hello")
        if msg.get("v") != PROTOCOL_VERSION:
            _fail("version", f"protocol version {msg.get('v')!r}")
        summary = _check_summary(msg.get("summary"))
        self._learn_summary(summary)
        self.hello_seqs = {a: seq for a, (seq, _) in summary.items()}
        self.remote_banned = _check_authors(msg.get("banned"))
        self._learn_peers(msg)
        self._hello_received = True
        for author in self.store.banned():
            self.mark_proof(author)
        return Outcome()

    def _learn_peers(self, msg: dict[str, Any]) -> None:
        if "peers" in msg:  # optional: a peer that never says is forwarded to as before
            self.remote_peers = _check_peers(msg["peers"])

    def _learn_summary(self, summary: dict[str, tuple[int, bytes]]) -> None:
        self.remote_known = {a: seq for a, (seq, _) in summary.items()}
        for author, (seq, digest) in self.store.tips().items():
            remote = summary.get(author)
            if remote is not None and remote[0] == seq and remote[1] != digest[:TIP_BYTES]:
                # Same seq, different envelope: the author forked. Send ours so the
                # remote can verify the fork itself and send back the proof.
                self.remote_known[author] = seq - 1
            self._dirty.add(author)

    def _on_envelopes(self, msg: dict[str, Any], now: float) -> Outcome:
        items = msg.get("items")
        if not isinstance(items, list) or len(items) > MAX_ITEMS_PER_MESSAGE \
                or not all(isinstance(i, bytes) for i in items):
            _fail("malformed", f"items must be a list of at most {MAX_ITEMS_PER_MESSAGE} "
                  "envelopes")
        self._learn_peers(msg)
        out = Outcome()
        for raw in items:
            self.envelopes_received += 1
            result = self.store.receive(raw, now, sender=self.remote_peer,
                                        allowance=self.allowance)
            if result.penalize:
                _fail(result.reason or "invalid", f"envelope from {self.remote_peer}: "
                      f"{result.detail or result.reason}")
            out.accepted.extend(result.accepted)
            if result.status == "refused":
                self.refused_since_summary = True
            if result.proof is not None:
                out.banned.append(result.author or "")
            if result.author is not None and result.seq is not None:
                # whatever the outcome, the remote holds this envelope: never echo it
                known = self.remote_known.get(result.author, 0)
                self.remote_known[result.author] = max(known, result.seq)
        return out

    def _on_summary(self, msg: dict[str, Any]) -> Outcome:
        reply = msg.get("reply")
        if not isinstance(reply, bool):
            _fail("malformed", "summary needs a boolean 'reply'")
        # The remote's own word replaces our guesses: anything it lacks is resent.
        self._learn_summary(_check_summary(msg.get("summary")))
        self._learn_peers(msg)
        if not reply:
            self._owe_summary = True
        return Outcome()

    def _on_proof(self, msg: dict[str, Any], now: float) -> Outcome:
        pair = msg.get("envelopes")
        if not isinstance(pair, list) or len(pair) != 2 \
                or not all(isinstance(e, bytes) for e in pair):
            _fail("malformed", "a proof is two envelopes")
        result = self.store.receive_proof(pair[0], pair[1], now, sender=self.remote_peer)
        if result.penalize:
            _fail(result.reason or "bad_proof", f"proof from {self.remote_peer}")
        out = Outcome()
        if result.author is not None:
            self.remote_banned.add(result.author)
            self._proofs.discard(result.author)
            if result.status == "accepted":
                out.banned.append(result.author)
        return out

    # -- outputs --------------------------------------------------------------------------
    def has_pending(self) -> bool:
        if not self._hello_sent:
            return self.initiator or self._hello_received
        return self._hello_received and bool(
            self._ask_summary or self._owe_summary or self._proofs or self._dirty)

    def next_message(self, max_bytes: int = MAX_BATCH_BYTES) -> dict[str, Any] | None:
        """The next message to send, or None when the remote is up to date."""
        if not self._hello_sent:
            if not (self.initiator or self._hello_received):
                return None  # the acceptor learns the session id from the dialer's hello
            self._hello_sent = True
            return self._with_peers({"t": "hello", "sid": self.session_id,
                                     "v": PROTOCOL_VERSION, "summary": encode_summary(self.store),
                                     "banned": sorted(self.store.banned())}, always=True)
        if not self._hello_received:
            return None
        if self._owe_summary or self._ask_summary:
            reply = self._owe_summary
            self._owe_summary = self._ask_summary = False
            self.refused_since_summary = False
            return self._with_peers({"t": "summary", "sid": self.session_id,
                                     "summary": encode_summary(self.store), "reply": reply},
                                    always=True)
        banned = self.store.banned()
        while self._proofs:
            author = self._proofs.pop()
            if author in banned and author not in self.remote_banned:
                self.remote_banned.add(author)
                return {"t": "proof", "sid": self.session_id, "envelopes": list(banned[author])}
        items: list[bytes] = []
        size = 0
        for author in sorted(self._dirty):
            pending = self.store.envelopes_after(author, self.remote_known.get(author, 0))
            for env in pending:
                if items and (size + len(env.raw) > max_bytes
                              or len(items) >= MAX_ITEMS_PER_MESSAGE):
                    return self._envelopes(items)
                items.append(env.raw)
                size += len(env.raw)
                self.remote_known[author] = env.seq
            self._dirty.discard(author)
        return self._envelopes(items) if items else None

    def keepalive(self) -> dict[str, Any] | None:
        """An empty ``envelopes`` message that tells the remote we are alive (None
        before the hellos were exchanged)."""
        if not self.open:
            return None
        self.keepalives_sent += 1
        return self._with_peers({"t": "envelopes", "sid": self.session_id, "items": []})

    def _envelopes(self, items: list[bytes]) -> dict[str, Any]:
        self.envelopes_sent += len(items)
        return self._with_peers({"t": "envelopes", "sid": self.session_id, "items": items})

    def _with_peers(self, msg: dict[str, Any], always: bool = False) -> dict[str, Any]:
        version, peers = self._our_peers()
        if always or version != self._peers_told:
            msg["peers"] = [p for p in peers if p != self.remote_peer]
            self._peers_told = version
        return msg

    def statistics(self) -> dict[str, Any]:
        return {
            "sid": self.session_id, "peer": self.remote_peer, "initiator": self.initiator,
            "open": self.open, "dirty_authors": len(self._dirty),
            "envelopes_sent": self.envelopes_sent, "envelopes_received": self.envelopes_received,
            "keepalives_sent": self.keepalives_sent,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
        }


@dataclass
class _Penalty:
    offences: int
    until: float
    last_reason: str


class SyncHub:
    """All sync sessions of one peer, fan-out of new envelopes, and penalties.

    ``wake(session)`` is called whenever a session gained something to send; the
    driver uses it to wake that session's writer.
    """

    def __init__(self, store: StateStore, *, max_sessions: int = 256,
                 backoff_base: float = 5.0, backoff_max: float = 600.0,
                 max_penalized: int = 4096, forward_fanout: int = FORWARD_FANOUT,
                 rng: random.Random | None = None,
                 wake: Callable[[SyncSession], None] = lambda session: None) -> None:
        self.store = store
        self.forward_fanout = forward_fanout
        self._rng = rng or random.Random()
        self._handling: SyncSession | None = None  # the session whose message we apply
        self.max_sessions = max_sessions
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_penalized = max_penalized
        self.wake = wake
        self.sessions: dict[int, SyncSession] = {}
        self._peers: tuple[int, list[str]] = (0, [])  # (version, peers we have sessions with)
        self._penalties: dict[str, _Penalty] = {}
        self._allowances: OrderedDict[str, Allowance] = OrderedDict()
        """Per remote peer, kept across its sessions (a reconnect does not refill
        them), the least recently used forgotten beyond ``max_penalized`` peers."""
        self.sessions_opened = 0
        self.sessions_refused = 0
        self.internal_errors = 0
        """Exceptions other than protocol errors that a peer's input raised (our bugs)."""
        self.penalties: dict[str, int] = {}
        self._closed_bytes_sent = 0
        self._closed_bytes_received = 0
        store.add_envelope_listener(self._on_envelope)
        store.add_ban_listener(self._on_ban)

    def handle(self, session: SyncSession, msg: Any, now: float) -> Outcome:
        """Apply one message ``session`` received (see `SyncSession.handle`); envelopes it
        brings are not forwarded back to it."""
        self._handling = session
        try:
            return session.handle(msg, now)
        except (SyncProtocolError, OSError):
            raise
        except Exception as e:  # the boundary of peer input: see the module docstring
            self.internal_errors += 1
            raise SyncProtocolError("internal_error",
                                    f"{type(e).__name__} handling a message: {e}") from e
        finally:
            self._handling = None

    def _on_envelope(self, env: Envelope, local: bool) -> None:
        if local:
            targets = list(self.sessions.values())
        else:
            # Sessions not open yet learn everything from the remote's hello summary;
            # the author, and the peers it said it runs sessions with, have it from the
            # author itself.
            from_author: set[str] = {env.author}
            for s in self.sessions.values():
                if s.remote_peer == env.author:
                    from_author |= s.remote_peers
            lacking = [s for s in self.sessions.values()
                       if s.open and s is not self._handling
                       and s.remote_peer not in from_author
                       and s.remote_known.get(env.author, 0) < env.seq]
            targets = (lacking if len(lacking) <= self.forward_fanout
                       else self._rng.sample(lacking, self.forward_fanout))
        for session in targets:
            session.mark_dirty(env.author)
            self.wake(session)

    def _on_ban(self, author: str, proof: tuple[bytes, bytes]) -> None:
        for session in self.sessions.values():
            session.mark_proof(author)
            self.wake(session)

    def in_backoff(self, peer: str, now: float) -> bool:
        p = self._penalties.get(peer)
        return p is not None and now < p.until

    def backoff_until(self, peer: str) -> float | None:
        """When the peer's backoff ends (None: it has no penalty on record)."""
        p = self._penalties.get(peer)
        return p.until if p is not None else None

    def open_session(self, remote_peer: str, *, initiator: bool, session_id: str | None,
                     now: float) -> SyncSession:
        """Register a new session or raise SessionRefused."""
        if self.in_backoff(remote_peer, now):
            self.sessions_refused += 1
            raise SessionRefused(f"peer {remote_peer} is in backoff")
        same_peer = sum(1 for s in self.sessions.values() if s.remote_peer == remote_peer)
        if len(self.sessions) >= self.max_sessions or same_peer >= MAX_SESSIONS_PER_PEER:
            self.sessions_refused += 1
            raise SessionRefused("too many sync sessions")
        session = SyncSession(self.store, remote_peer=remote_peer, initiator=initiator,
                              session_id=session_id, our_peers=lambda: self._peers,
                              allowance=self._allowance(remote_peer, now))
        self.sessions[id(session)] = session
        self.sessions_opened += 1
        self._peers_changed()
        return session

    def _allowance(self, peer: str, now: float) -> Allowance:
        allowance = self._allowances.pop(peer, None)
        if allowance is None:
            limits = self.store.limits
            allowance = Allowance(authors_per_s=limits.peer_authors_per_s,
                                  authors_burst=limits.peer_authors_burst,
                                  bytes_per_s=limits.peer_bytes_per_s,
                                  bytes_burst=limits.peer_bytes_burst, now=now)
        self._allowances[peer] = allowance
        while len(self._allowances) > self.max_penalized:
            self._allowances.popitem(last=False)
        return allowance

    def close_session(self, session: SyncSession) -> None:
        if self.sessions.pop(id(session), None) is not None:
            self._closed_bytes_sent += session.bytes_sent
            self._closed_bytes_received += session.bytes_received
            self._peers_changed()

    def _peers_changed(self) -> None:
        peers = sorted({s.remote_peer for s in self.sessions.values()})
        if peers != self._peers[1]:
            self._peers = (self._peers[0] + 1, peers)
            self.store.set_connected(peers)  # their own authors are never evicted

    def has_session(self, peer: str) -> bool:
        return any(s.remote_peer == peer for s in self.sessions.values())

    def penalize(self, peer: str, reason: str, now: float) -> float:
        """Record an offence; returns the backoff (seconds) before we talk to it again."""
        p = self._penalties.get(peer)
        offences = 1 if p is None else p.offences + 1
        backoff: float = min(self.backoff_base * 2 ** (offences - 1), self.backoff_max)
        self._penalties[peer] = _Penalty(offences, now + backoff, reason)
        self.penalties[reason] = self.penalties.get(reason, 0) + 1
        if len(self._penalties) > self.max_penalized:
            # forget the peer whose backoff ends first (bounded memory beats long grudges)
            oldest = min(self._penalties, key=lambda k: self._penalties[k].until)
            del self._penalties[oldest]
        return backoff

    def pick_anti_entropy(self, rng: random.Random, now: float) -> SyncSession | None:
        """A random open session; first one whose envelopes we refused (a quota) and
        whose allowance has refilled since, so what we turned away is offered again.
        A peer that keeps its allowance empty (a flood) is not preferred."""
        candidates = [s for s in self.sessions.values() if s.open]
        due = [s for s in candidates if s.refused_since_summary
               and (s.allowance is None or s.allowance.refilled(now))]
        pool = due or candidates
        return rng.choice(pool) if pool else None

    def statistics(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "sessions_opened": self.sessions_opened,
            "sessions_refused": self.sessions_refused,
            "penalized_peers": len(self._penalties),
            "penalties": dict(self.penalties),
            "internal_errors": self.internal_errors,
            "bytes_sent": self._closed_bytes_sent
            + sum(s.bytes_sent for s in self.sessions.values()),
            "bytes_received": self._closed_bytes_received
            + sum(s.bytes_received for s in self.sessions.values()),
        }
