"""The `/lattice/crdt-sync/2` protocol as a sans-I/O state machine.

Owns what a sync session says and when: message shapes and their validation, the
per-session view of what the remote has, what to send next, the bounded-degree overlay
that disseminates new envelopes, and the penalty/backoff bookkeeping for peers that
send invalid envelopes. Must not import trio, libp2p, sockets or read the clock: the
driver (`lattice.net.crdt_sync`) feeds it decoded frames and ``now``, calls
`SyncHub.tick` every gossip interval, and writes whatever `SyncSession.next_message`
returns.

Theory of operation (proto/crdt-sync.md has the normative text)
---------------------------------------------------------------
A session is one stream between two peers; both ends run the same machine. The
dialer sends ``hello`` (a fresh session id, what it holds of the two session authors,
the fingerprint of everything it holds, the authors it has banned); the acceptor
answers with its own ``hello`` under the same id. Where the fingerprints differ the
dialer starts a *reconciliation* (`lattice.core.state.reconcile`): ranges of the
author key space are compared by fingerprint, split where they differ, and listed
where small, so catching up costs what differs, not what is held. Each side sends the
other what it learns the other lacks: an author is marked *dirty* on a session and the
writer turns dirty authors into ``envelopes`` messages from `StateStore` (no queue of
envelopes exists: the store is the buffer, and a slow peer gets a bigger batch later).

Dissemination is gossipsub-like (Vyzovitis et al., "GossipSub", 2020): each peer keeps
a *mesh* of `MESH_DEGREE` sessions (``mesh`` messages graft and prune, so it is
symmetric), pushes every new envelope, its own or relayed, eagerly to its mesh, and
once per gossip interval *announces* (``have``) the authors that changed to
`LAZY_FANOUT` other sessions; a peer that lacks an announced envelope asks for it
(``want``), as does one that received an envelope beyond a gap. So each peer receives
each envelope about mesh-degree times, whatever the size of the network. Received
envelopes raise ``remote_known``, so nothing is echoed back. Anti-entropy is a
reconciliation with one random session (`request_recon`); a full ``summary`` exchange
remains for tools. Equivocation proofs travel as ``proof`` messages until every peer
has banned the author.

An invalid envelope (bad signature, out-of-bounds content, ...) or a malformed message
ends the session with `SyncProtocolError` and a penalty: the peer is not dialed or
accepted again until its backoff (doubling per offence) expires. `SyncHub.handle` is
the boundary of everything a received message runs (decoding, validation, the store,
its listeners): any other exception raised there was caused by the peer's input
(a bug of ours it found) and becomes `SyncProtocolError` ``internal_error``, counted
and penalized like any other, so no input can take the daemon down. Only `OSError`
(our own disk, under the state log) still propagates.

A session that has nothing to send for a while sends a *keepalive*: an ``envelopes``
message with no items, so the remote can tell an idle peer from a hung one and end
sessions that stay silent (`lattice.net.crdt_sync`).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

from lattice.core.state import reconcile
from lattice.core.state.envelope import Envelope
from lattice.core.state.limits import (
    MAX_BATCH_BYTES,
    MAX_ITEMS_PER_MESSAGE,
    MAX_RANGES_PER_MESSAGE,
    MAX_SEQ,
    MAX_SUMMARY_ENTRIES,
)
from lattice.core.state.quota import Allowance
from lattice.core.state.reconcile import TIP_BYTES, TipIndex
from lattice.core.state.store import BUFFERED, REPLAYED, StateStore

PROTOCOL_ID = "/lattice/crdt-sync/2"
PROTOCOL_VERSION = 2
MAX_SESSION_ID_CHARS = 64
MAX_SESSIONS_PER_PEER = 2  # one each way when two peers dial each other at once
MESH_DEGREE = 6
"""Sessions each new envelope is pushed to (gossipsub's D): with a random mesh of this
degree an update reaches a connected network in O(log N) hops with high probability,
and each peer receives it about this many times, whatever N."""
MESH_LOW = 4
MESH_HIGH = 8
"""Below `MESH_LOW` mesh sessions a tick grafts more, up to `MESH_DEGREE`; a graft is
accepted up to `MESH_HIGH` and above it a tick prunes back to `MESH_DEGREE`
(gossipsub's D_lo / D_hi; its D_hi of 12 would let each peer receive every envelope
up to 12 times, so ours is lower)."""
LAZY_FANOUT = 6
"""Non-mesh sessions each changed author is announced to per tick (gossipsub's
D_lazy): they repair what the mesh missed without receiving the envelope twice."""


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


def _check_seqs(value: Any, what: str) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > MAX_SUMMARY_ENTRIES or not all(
            isinstance(a, str) and len(a) <= 128 and type(s) is int and 0 <= s <= MAX_SEQ
            for a, s in value.items()):
        _fail("malformed", f"{what} maps at most {MAX_SUMMARY_ENTRIES} author ids to seqs")
    return value


def encode_summary(store: StateStore) -> dict[str, list[Any]]:
    return {a: [seq, digest[:TIP_BYTES]] for a, (seq, digest) in store.tips().items()}


def _check_authors(value: Any) -> set[str]:
    if not isinstance(value, list) or len(value) > MAX_SUMMARY_ENTRIES or not all(
            isinstance(a, str) and len(a) <= 128 for a in value):
        _fail("malformed", "banned must be a list of author ids")
    return set(value)


def _check_root(value: Any) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and type(value[0]) is int
            and 0 <= value[0] <= MAX_SUMMARY_ENTRIES and isinstance(value[1], bytes)
            and len(value[1]) == 8):
        _fail("malformed", "root is [count, 8-byte fingerprint]")
    return value[0], int.from_bytes(value[1], "big")


class SyncSession:
    """One session with one peer (see the module docstring)."""

    def __init__(self, store: StateStore, *, remote_peer: str, initiator: bool,
                 session_id: str | None, index: TipIndex | None = None,
                 allowance: Allowance | None = None) -> None:
        if initiator and not session_id:
            raise ValueError("the dialer chooses the session id")
        self.store = store
        self.index = index if index is not None else _index_of(store)
        self.remote_peer = remote_peer
        self.allowance = allowance
        """What the remote may still add to our store (shared by its sessions)."""
        self.initiator = initiator
        self.session_id = session_id
        self.remote_known: dict[str, int] = {}
        """Per author, a seq the remote is known to hold (it may hold more)."""
        self.remote_banned: set[str] = set()
        self.hello_seqs: dict[str, int] = {}
        """What the remote held of us and of itself when the session opened."""
        self.eager = False
        """In our mesh: new envelopes are pushed here at once (`SyncHub`)."""
        self._hello_sent = False
        self._hello_received = False
        self._remote_root: tuple[int, int] | None = None
        self._dirty: set[str] = set()
        self._proofs: set[str] = set()
        self._announce: dict[str, int] = {}
        self._want: dict[str, int] = {}
        self._recon_out: list[list[Any]] = []
        self._mesh_out: bool | None = None
        self._ask_summary = False
        self._owe_summary = False
        self.refused_since_summary = False
        """We refused some of the remote's envelopes (a quota) since we last offered it
        a reconciliation or our summary: the next anti-entropy round should be with it."""
        self.envelopes_sent = 0
        self.envelopes_received = 0
        self.duplicates_received = 0
        self.keepalives_sent = 0
        self.recon_ranges_sent = 0
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

    def push(self, env: Envelope) -> None:
        """Send ``env`` eagerly. Where we know nothing of what the remote holds of its
        author we assume everything before it, so a push never resends an author's
        history; a remote that lacks more asks for it (``want``)."""
        if env.author not in self.remote_known:
            self.remote_known[env.author] = env.seq - 1
        self._dirty.add(env.author)

    def announce(self, author: str, seq: int) -> None:
        if self.remote_known.get(author, 0) < seq:
            self._announce[author] = max(seq, self._announce.get(author, 0))

    def set_mesh(self, on: bool) -> None:
        """Graft (``on``) or prune the session, and tell the remote."""
        if self.eager != on:
            self.eager = on
            self._mesh_out = on

    def mark_proof(self, author: str) -> None:
        self._dirty.discard(author)
        if author not in self.remote_banned:
            self._proofs.add(author)

    def request_summary(self) -> None:
        """Ask the remote for its whole summary (and send ours with the reply)."""
        if self._hello_received:
            self._ask_summary = True

    def request_recon(self) -> None:
        """Anti-entropy: compare everything held, at a cost that grows with what differs."""
        if self._hello_received:
            count, fp = self.index.fingerprint(0, 0)
            self._recon_out.append([0, 0, reconcile.MODE_FINGERPRINT,
                                    reconcile.encode_fingerprint(count, fp)])
            self.refused_since_summary = False

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
        handler = self._HANDLERS.get(kind)
        if handler is None:
            _fail("malformed", f"unknown message type {kind[:32]!r}")
        return handler(self, msg, now)

    def _on_hello(self, msg: dict[str, Any]) -> Outcome:
        if self._hello_received:
            _fail("unexpected", "second hello")
        if msg.get("v") != PROTOCOL_VERSION:
            _fail("version", f"protocol version {msg.get('v')!r}")
        summary = _check_summary(msg.get("summary"))
        root = _check_root(msg.get("root"))
        self.remote_banned = _check_authors(msg.get("banned"))
        # The hello names what the remote holds of the two of us (absent: nothing).
        for author in {self.store.peer_id, self.remote_peer}:
            summary.setdefault(author, (0, b""))
        self._learn_tips(summary)
        self.hello_seqs = {a: seq for a, (seq, _) in summary.items()}
        self._hello_received = True
        self._remote_root = root
        if self.initiator and root != self.index.fingerprint(0, 0):
            self._recon_out.extend(self._answer_fingerprint(0, 0, root))
        for author in self.store.banned():
            self.mark_proof(author)
        return Outcome()

    def _learn_tips(self, tips: dict[str, tuple[int, bytes]], *, replace: bool = False
                    ) -> dict[str, int]:
        """Take ``tips`` as what the remote holds of those authors (seq 0: nothing) and
        mark dirty what it lacks. Returns, for the authors where it holds more than us
        or a different envelope at our seq (a fork: we send ours so that it can prove
        it, and ask for its own), the seq we hold to build on.

        Envelopes we sent may cross the message that says what the remote held, so
        what we know is only raised, unless ``replace`` (the remote's whole summary,
        which we asked for: its word wins)."""
        behind: dict[str, int] = {}
        banned = self.store.banned()
        for author, (claimed, tip) in tips.items():
            seq = claimed if replace else max(claimed, self.remote_known.get(author, 0))
            self.remote_known[author] = seq
            if author in banned:
                continue
            mine = self.index.get(author)
            if mine is None:
                if claimed > 0:
                    behind[author] = 0
            elif claimed == mine[0] and tip and tip != mine[1]:
                self.remote_known[author] = claimed - 1
                self._dirty.add(author)
                behind[author] = claimed - 1
            elif seq < mine[0]:
                self._dirty.add(author)
            elif claimed > mine[0]:
                behind[author] = self.store.seq_of(author)
        return behind

    def _on_envelopes(self, msg: dict[str, Any], now: float) -> Outcome:
        items = msg.get("items")
        if not isinstance(items, list) or len(items) > MAX_ITEMS_PER_MESSAGE \
                or not all(isinstance(i, bytes) for i in items):
            _fail("malformed", f"items must be a list of at most {MAX_ITEMS_PER_MESSAGE} "
                  "envelopes")
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
            elif result.status == REPLAYED:
                self.duplicates_received += 1
            if result.proof is not None:
                out.banned.append(result.author or "")
            if result.author is not None and result.seq is not None:
                # whatever the outcome, the remote holds this envelope: never echo it
                known = self.remote_known.get(result.author, 0)
                self.remote_known[result.author] = max(known, result.seq)
                if result.status == BUFFERED:  # a gap: ask for what precedes it
                    self._want[result.author] = self.store.seq_of(result.author)
        return out

    def _on_summary(self, msg: dict[str, Any], now: float) -> Outcome:
        reply = msg.get("reply")
        if not isinstance(reply, bool):
            _fail("malformed", "summary needs a boolean 'reply'")
        # The remote's own word replaces our guesses: anything it lacks is resent.
        summary = _check_summary(msg.get("summary"))
        for author in self.index.tips_in(0, 0):
            summary.setdefault(author, (0, b""))
        self._learn_tips(summary, replace=True)
        if not reply:
            self._owe_summary = True
        return Outcome()

    def _on_have(self, msg: dict[str, Any], now: float) -> Outcome:
        banned = self.store.banned()
        for author, seq in _check_seqs(msg.get("tips"), "have").items():
            self.remote_known[author] = max(self.remote_known.get(author, 0), seq)
            mine = self.store.seq_of(author)
            if mine < seq and author not in banned:
                self._want[author] = mine
        return Outcome()

    def _on_want(self, msg: dict[str, Any], now: float) -> Outcome:
        for author, seq in _check_seqs(msg.get("seqs"), "want").items():
            self.remote_known[author] = seq
            if self.store.seq_of(author) > seq:
                self._dirty.add(author)
        return Outcome()

    def _on_mesh(self, msg: dict[str, Any], now: float) -> Outcome:
        on = msg.get("on")
        if not isinstance(on, bool):
            _fail("malformed", "mesh needs a boolean 'on'")
        self.eager = on  # the hub may prune it again if its mesh is full (`SyncHub.handle`)
        return Outcome()

    def _on_recon(self, msg: dict[str, Any], now: float) -> Outcome:
        ranges = msg.get("ranges")
        if not isinstance(ranges, list) or len(ranges) > MAX_RANGES_PER_MESSAGE:
            _fail("malformed", f"ranges must be a list of at most {MAX_RANGES_PER_MESSAGE}")
        budget = MAX_SUMMARY_ENTRIES
        for value in ranges:
            try:
                depth, index, mode, payload = reconcile.check_range(value, budget)
            except reconcile.RangeError as e:
                _fail("malformed", f"recon: {e}")
            if mode != reconcile.MODE_FINGERPRINT:
                budget -= len(payload)
            if mode == reconcile.MODE_FINGERPRINT:
                self._recon_out.extend(self._answer_fingerprint(depth, index, payload))
            elif mode == reconcile.MODE_LIST:
                theirs = dict(payload)
                for author in self.index.tips_in(depth, index):
                    theirs.setdefault(author, (0, b""))
                behind = self._learn_tips(theirs)
                if behind:
                    self._recon_out.append([depth, index, reconcile.MODE_BEHIND, behind])
            else:  # MODE_BEHIND: the remote holds these seqs; send it what follows
                for author, seq in payload.items():
                    self.remote_known[author] = seq
                    if self.store.seq_of(author) > seq:
                        self._dirty.add(author)
            if budget < 0:
                _fail("malformed", f"recon lists more than {MAX_SUMMARY_ENTRIES} authors")
        return Outcome()

    def _answer_fingerprint(self, depth: int, index: int, theirs: tuple[int, int]
                            ) -> list[list[Any]]:
        mine = self.index.fingerprint(depth, index)
        if mine == theirs:
            return []
        if mine[0] <= reconcile.LEAF_AUTHORS or depth == reconcile.MAX_DEPTH:
            tips = self.index.tips_in(depth, index)
            return [[depth, index, reconcile.MODE_LIST,
                     {a: [seq, tip] for a, (seq, tip) in tips.items()}]]
        out = []
        for child in range(index * reconcile.FANOUT, (index + 1) * reconcile.FANOUT):
            count, fp = self.index.fingerprint(depth + 1, child)
            out.append([depth + 1, child, reconcile.MODE_FINGERPRINT,
                        reconcile.encode_fingerprint(count, fp)])
        return out

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

    _HANDLERS: ClassVar[dict[str, Callable[[SyncSession, dict[str, Any], float], Outcome]]] = {
        "envelopes": _on_envelopes, "summary": _on_summary, "proof": _on_proof,
        "recon": _on_recon, "have": _on_have, "want": _on_want, "mesh": _on_mesh,
    }

    # -- outputs --------------------------------------------------------------------------
    def has_pending(self) -> bool:
        if not self._hello_sent:
            return self.initiator or self._hello_received
        return self._hello_received and bool(
            self._ask_summary or self._owe_summary or self._proofs or self._dirty
            or self._recon_out or self._want or self._announce
            or self._mesh_out is not None)

    def next_message(self, max_bytes: int = MAX_BATCH_BYTES) -> dict[str, Any] | None:
        """The next message to send, or None when the remote is up to date."""
        sid = self.session_id
        if not self._hello_sent:
            if not (self.initiator or self._hello_received):
                return None  # the acceptor learns the session id from the dialer's hello
            self._hello_sent = True
            ours = {a: [t[0], t[1]] for a in (self.store.peer_id, self.remote_peer)
                    if (t := self.index.get(a)) is not None}
            count, fp = self.index.fingerprint(0, 0)
            return {"t": "hello", "sid": sid, "v": PROTOCOL_VERSION, "summary": ours,
                    "root": reconcile.encode_fingerprint(count, fp),
                    "banned": sorted(self.store.banned())}
        if not self._hello_received:
            return None
        if self._mesh_out is not None:
            on, self._mesh_out = self._mesh_out, None
            return {"t": "mesh", "sid": sid, "on": on}
        if self._owe_summary or self._ask_summary:
            reply = self._owe_summary
            self._owe_summary = self._ask_summary = False
            self.refused_since_summary = False
            return {"t": "summary", "sid": sid, "summary": encode_summary(self.store),
                    "reply": reply}
        if self._recon_out:
            ranges: list[list[Any]] = []
            entries = 0
            while self._recon_out and len(ranges) < MAX_RANGES_PER_MESSAGE:
                size = len(self._recon_out[0][3]) if self._recon_out[0][2] else 0
                if ranges and entries + size > MAX_SUMMARY_ENTRIES:
                    break
                ranges.append(self._recon_out.pop(0))
                entries += size
            self.recon_ranges_sent += len(ranges)
            return {"t": "recon", "sid": sid, "ranges": ranges}
        if self._want:
            want = dict(list(self._want.items())[:MAX_SUMMARY_ENTRIES])
            for author in want:
                del self._want[author]
            return {"t": "want", "sid": sid, "seqs": want}
        banned = self.store.banned()
        while self._proofs:
            author = self._proofs.pop()
            if author in banned and author not in self.remote_banned:
                self.remote_banned.add(author)
                return {"t": "proof", "sid": sid, "envelopes": list(banned[author])}
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
        if items:
            return self._envelopes(items)
        if self._announce:
            have = {a: s for a, s in self._announce.items()
                    if self.remote_known.get(a, 0) < s}
            self._announce = {}
            if have:
                return {"t": "have", "sid": sid, "tips": have}
        return None

    def keepalive(self) -> dict[str, Any] | None:
        """An empty ``envelopes`` message that tells the remote we are alive (None
        before the hellos were exchanged)."""
        if not self.open:
            return None
        self.keepalives_sent += 1
        return {"t": "envelopes", "sid": self.session_id, "items": []}

    def _envelopes(self, items: list[bytes]) -> dict[str, Any]:
        self.envelopes_sent += len(items)
        return {"t": "envelopes", "sid": self.session_id, "items": items}

    def statistics(self) -> dict[str, Any]:
        return {
            "sid": self.session_id, "peer": self.remote_peer, "initiator": self.initiator,
            "open": self.open, "mesh": self.eager, "dirty_authors": len(self._dirty),
            "envelopes_sent": self.envelopes_sent, "envelopes_received": self.envelopes_received,
            "duplicates_received": self.duplicates_received,
            "recon_ranges_sent": self.recon_ranges_sent,
            "keepalives_sent": self.keepalives_sent,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
        }


def _index_of(store: StateStore) -> TipIndex:
    """A `TipIndex` of ``store`` as it is now (a session without a hub: tests, tools)."""
    index = TipIndex()
    for author, (seq, digest) in store.tips().items():
        index.set(author, seq, digest)
    return index


@dataclass
class _Penalty:
    offences: int
    until: float
    last_reason: str


class SyncHub:
    """All sync sessions of one peer, the overlay that disseminates new envelopes, the
    tip index every session reconciles against, and penalties.

    ``wake(session)`` is called whenever a session gained something to send; the
    driver uses it to wake that session's writer.
    """

    def __init__(self, store: StateStore, *, max_sessions: int = 256,
                 backoff_base: float = 5.0, backoff_max: float = 600.0,
                 max_penalized: int = 4096, mesh_degree: int = MESH_DEGREE,
                 mesh_low: int = MESH_LOW, mesh_high: int = MESH_HIGH,
                 lazy_fanout: int = LAZY_FANOUT,
                 rng: random.Random | None = None,
                 wake: Callable[[SyncSession], None] = lambda session: None) -> None:
        if not (1 <= mesh_low <= mesh_degree <= mesh_high):
            raise ValueError("mesh degrees need 1 <= low <= degree <= high")
        self.store = store
        self.mesh_degree, self.mesh_low, self.mesh_high = mesh_degree, mesh_low, mesh_high
        self.lazy_fanout = lazy_fanout
        self._rng = rng or random.Random()
        self._handling: SyncSession | None = None  # the session whose message we apply
        self.max_sessions = max_sessions
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_penalized = max_penalized
        self.wake = wake
        self.sessions: dict[int, SyncSession] = {}
        self.index = _index_of(store)
        self._recent: dict[str, int] = {}
        """Authors that changed since the last tick (announced lazily at the next)."""
        self._penalties: dict[str, _Penalty] = {}
        self._allowances: OrderedDict[str, Allowance] = OrderedDict()
        """Per remote peer, kept across its sessions (a reconnect does not refill
        them), the least recently used forgotten beyond ``max_penalized`` peers."""
        self.sessions_opened = 0
        self.sessions_refused = 0
        self.internal_errors = 0
        """Exceptions other than protocol errors that a peer's input raised (our bugs)."""
        self.grafts = 0
        self.prunes = 0
        self.announced = 0
        self.penalties: dict[str, int] = {}
        self._closed_bytes_sent = 0
        self._closed_bytes_received = 0
        self._closed_duplicates = 0
        store.add_envelope_listener(self._on_envelope)
        store.add_ban_listener(self._on_ban)
        store.add_eviction_listener(self.index.remove)

    def handle(self, session: SyncSession, msg: Any, now: float) -> Outcome:
        """Apply one message ``session`` received (see `SyncSession.handle`); envelopes it
        brings are not pushed back to it."""
        self._handling = session
        was_open, was_eager = session.open, session.eager
        try:
            outcome = session.handle(msg, now)
        except (SyncProtocolError, OSError):
            raise
        except Exception as e:  # the boundary of peer input: see the module docstring
            self.internal_errors += 1
            raise SyncProtocolError("internal_error",
                                    f"{type(e).__name__} handling a message: {e}") from e
        finally:
            self._handling = None
        if session.eager and not was_eager and self._mesh_size() > self.mesh_high:
            session.set_mesh(False)  # a graft beyond D_hi: prune it back at once
            self.prunes += 1
        if session.open and not was_open and self._mesh_size() < self.mesh_degree \
                and not session.eager:
            self._graft(session)
        return outcome

    def _mesh_size(self) -> int:
        return sum(1 for s in self.sessions.values() if s.eager)

    def _graft(self, session: SyncSession) -> None:
        session.set_mesh(True)
        self.grafts += 1
        self.wake(session)

    def _on_envelope(self, env: Envelope, local: bool) -> None:
        self.index.set(env.author, env.seq, env.digest)
        self._recent[env.author] = env.seq
        for session in self.sessions.values():
            # Sessions not open yet reconcile after their hellos.
            if session.eager and session.open and session is not self._handling \
                    and session.remote_known.get(env.author, 0) < env.seq:
                session.push(env)
                self.wake(session)

    def _on_ban(self, author: str, proof: tuple[bytes, bytes]) -> None:
        self.index.remove(author)
        for session in self.sessions.values():
            session.mark_proof(author)
            self.wake(session)

    def tick(self) -> None:
        """Once per gossip interval: keep the mesh between its low and high degree and
        announce what changed since the last tick to a few sessions outside it."""
        open_sessions = [s for s in self.sessions.values() if s.open]
        mesh = [s for s in open_sessions if s.eager]
        if len(mesh) < self.mesh_low:
            spare = [s for s in open_sessions if not s.eager]
            for session in self._rng.sample(spare, min(len(spare),
                                                        self.mesh_degree - len(mesh))):
                self._graft(session)
        elif len(mesh) > self.mesh_high:
            for session in self._rng.sample(mesh, len(mesh) - self.mesh_degree):
                session.set_mesh(False)
                self.prunes += 1
                self.wake(session)
        if not self._recent:
            return
        lazy = [s for s in open_sessions if not s.eager]
        for author, seq in self._recent.items():
            lacking = [s for s in lazy if s.remote_known.get(author, 0) < seq]
            for session in (lacking if len(lacking) <= self.lazy_fanout
                            else self._rng.sample(lacking, self.lazy_fanout)):
                session.announce(author, seq)
                self.announced += 1
                self.wake(session)
        self._recent.clear()

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
                              session_id=session_id, index=self.index,
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
            self._closed_duplicates += session.duplicates_received
            self._peers_changed()

    def _peers_changed(self) -> None:
        self.store.set_connected({s.remote_peer for s in self.sessions.values()})
        # their own authors are never evicted

    def has_session(self, peer: str) -> bool:
        return any(s.remote_peer == peer for s in self.sessions.values())

    def mesh_peers(self) -> set[str]:
        """The peers we push new envelopes to (the connection manager keeps them)."""
        return {s.remote_peer for s in self.sessions.values() if s.eager}

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
            "mesh": self._mesh_size(),
            "sessions_opened": self.sessions_opened,
            "sessions_refused": self.sessions_refused,
            "grafts": self.grafts, "prunes": self.prunes, "announced": self.announced,
            "penalized_peers": len(self._penalties),
            "penalties": dict(self.penalties),
            "internal_errors": self.internal_errors,
            "duplicates_received": self._closed_duplicates
            + sum(s.duplicates_received for s in self.sessions.values()),
            "bytes_sent": self._closed_bytes_sent
            + sum(s.bytes_sent for s in self.sessions.values()),
            "bytes_received": self._closed_bytes_received
            + sum(s.bytes_received for s in self.sessions.values()),
        }
