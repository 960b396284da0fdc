"""The state store: every author's document, validated, merged into views.

Owns the per-author replication rules: which envelope comes next for an author, what
a gap, a replay and an equivocation are, what gets applied, what is kept for
forwarding, and the change events of the merged views. Must not import trio, libp2p,
sockets or read the clock: ``now`` is passed in and persistence is a listener the
caller attaches (`add_envelope_listener`).

Theory of operation
-------------------
Each author has one pycrdt document that only it writes. A local change becomes a
pycrdt update, sealed in an `Envelope` with the author's next ``seq`` (1, 2, 3, ...).
Every peer applies an author's envelopes in ``seq`` order, so every peer's copy of
that document is the same function of the same sequence, and the *merge* across
authors happens at read time (`lattice.core.state.views`). The replication summary is
``{author: highest seq}``; what a peer lacks is exactly the envelopes above its number.

A received envelope is, in order:

1. decoded and its signature checked (`open_envelope`): else rejected;
2. ignored if its author is banned (proven equivocation);
3. for ``seq`` at or below what we have: a *replay* if it says the same (same signed
   digest), an *equivocation* if it differs — two different signed envelopes for one
   seq are a proof the author forked its history; we ban the author and keep the two
   envelopes as the proof, which peers forward so every honest peer bans it too
   (otherwise peers that saw different forks would diverge forever). So is an
   envelope for ``seq + 1`` whose ``prev`` is not the digest of our ``seq``: it builds
   on a history we do not have. Below our last snapshot we no longer hold the
   envelope: *stale*, a no-op;
4. buffered if it is a delta beyond ``seq + 1`` (bounded), applied when the gap fills;
5. applied to a *copy* of the author's document, and the result checked: complete
   (no pending Yjs items), within the author's byte quota, and holding only records
   the author may hold (`schema.check_content`). Only then does the copy replace the
   document: a rejected envelope never touches the state.

Snapshots bound what we keep. An author's log of deltas grows with every heartbeat,
while the document itself stays small (Yjs collapses overwritten map entries). So once
its retained envelopes reach ``max(snapshot_min_bytes, 2 x content size)`` the author
seals a *snapshot*: an envelope whose update builds a fresh document holding the full
content. Every peer replaces the author's document with it and drops the envelopes
before it; a peer further behind than the snapshot jumps straight to it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lattice.core.codec import canonical
from lattice.core.identity import Identity
from lattice.core.state import views
from lattice.core.state.document import (
    StateDoc,
    UpdateError,
    apply_checked,
    read_content,
    write_delta,
    write_snapshot,
)
from lattice.core.state.envelope import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    Envelope,
    EnvelopeError,
    check_signature,
    open_envelope,
    proves_equivocation,
    seal,
)
from lattice.core.state.limits import MAX_AUTHOR_BYTES, MAX_ENVELOPE_BYTES, StateLimits
from lattice.core.state.quota import Allowance
from lattice.core.state.schema import (
    Change,
    OutOfBounds,
    apply_changes,
    check_content,
    empty_content,
)

ACCEPTED = "accepted"
BUFFERED = "buffered"
REPLAYED = "replayed"
STALE = "stale"
REJECTED = "rejected"
REFUSED = "refused"
IGNORED = "ignored"


class LocalStateError(ValueError):
    """A local change the rules forbid (bad path, a record we may not hold, too big)."""


class AuthorBanned(LocalStateError):
    """Peers hold proof that this identity forked its own history (equivocation), so
    its writes are void everywhere; only a new identity can write again."""


@dataclass
class ReceiveResult:
    """What `StateStore.receive` did with one envelope.

    ``penalize`` is True when the envelope proves the *sender* misbehaved (bad
    signature, out-of-bounds content, an author equivocating to us directly): the sync
    driver disconnects and backs off. Refusals for local resource limits never blame
    the sender.
    """

    status: str
    reason: str | None = None
    author: str | None = None
    seq: int | None = None
    accepted: list[Envelope] = field(default_factory=list)
    penalize: bool = False
    proof: tuple[bytes, bytes] | None = None
    detail: str | None = None


@dataclass(frozen=True)
class ChangeEvent:
    """A merged-view path whose value changed; ``value`` is None when it was removed."""

    path: str
    value: Any
    author: str


class _Quota(ValueError):
    reason = "quota"


class _OverBudget(Exception):
    """Accepting the envelope would exceed the state budget (a refusal, not a fault)."""


class _Author:
    __slots__ = ("doc", "content", "seq", "retained", "retained_bytes", "gap", "gap_bytes")

    def __init__(self) -> None:
        self.doc: StateDoc | None = None
        self.content: dict[str, dict[str, Any]] = empty_content()
        self.seq = 0
        self.retained: list[Envelope] = []  # contiguous, from the last snapshot (or seq 1)
        self.retained_bytes = 0
        self.gap: dict[int, Envelope] = {}
        self.gap_bytes = 0

    @property
    def tip(self) -> Envelope | None:
        return self.retained[-1] if self.retained else None

    def envelope_at(self, seq: int) -> Envelope | None:
        if not self.retained:
            return None
        base = self.retained[0].seq
        if base <= seq <= self.seq:
            return self.retained[seq - base]
        return None

    def envelopes_after(self, seq: int) -> list[Envelope]:
        if seq >= self.seq or not self.retained:
            return []
        base = self.retained[0].seq
        # A peer behind our base gets everything we hold: retained[0] is then a
        # snapshot (or seq 1), which it can apply from any earlier state.
        return self.retained[max(0, seq + 1 - base):]


class StateStore:
    """All authors' documents as seen by this peer (see the module docstring)."""

    def __init__(self, identity: Identity, *, limits: StateLimits = StateLimits(),
                 client_id: int | None = None) -> None:
        self.identity = identity
        # The Yjs client id our writes carry. Fresh per process: if a state dir is lost,
        # a restarted peer must not reuse (client, clock) pairs it already published.
        self._client_id = (client_id if client_id is not None
                           else int.from_bytes(os.urandom(6), "big") >> 1)
        self.peer_id = identity.peer_id
        self.limits = limits
        self._authors: dict[str, _Author] = {}
        self._banned: dict[str, tuple[bytes, bytes]] = {}
        self._gap_bytes = 0
        self._held_bytes = 0  # retained bytes of every author but us: the budget's use
        self._connected: frozenset[str] = frozenset()
        self._room_blocked_until = -float("inf")
        self._views = views.Views(max_jobs_per_author=limits.max_jobs_per_author)
        self._changed_paths: set[str] = set()  # view paths to announce (`_emit`)
        self._subscribers: list[Callable[[ChangeEvent], None]] = []
        self._envelope_listeners: list[Callable[[Envelope, bool], None]] = []
        self._ban_listeners: list[Callable[[str, tuple[bytes, bytes]], None]] = []
        self._eviction_listeners: list[Callable[[str], None]] = []
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()

    # -- hooks ----------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[ChangeEvent], None]) -> Callable[[], None]:
        """Call ``callback`` with every change of a merged view; returns an unsubscribe
        function. Callbacks run synchronously inside receive/apply_local and must not
        block (the daemon puts events on a bounded channel)."""
        if len(self._subscribers) >= self.limits.max_subscribers:
            raise LocalStateError(f"more than {self.limits.max_subscribers} subscribers")
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def add_envelope_listener(self, callback: Callable[[Envelope, bool], None]) -> None:
        """Call ``callback(envelope, local)`` for every envelope applied, before the
        call that applied it returns (persistence and push hang off this; ``local`` is
        True for our own new writes, which must be durable before anyone sees them)."""
        self._envelope_listeners.append(callback)

    def add_ban_listener(self, callback: Callable[[str, tuple[bytes, bytes]], None]) -> None:
        """Call ``callback(author, proof)`` when an author is banned for equivocating."""
        self._ban_listeners.append(callback)

    def add_eviction_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(author)`` when an author is evicted to make room (its
        envelopes are gone from the store; the log drops them at its next rewrite)."""
        self._eviction_listeners.append(callback)

    def set_liveness(self, liveness: views.Liveness | None) -> None:
        """Take members' ``alive`` and ``age`` from ``liveness`` (the failure detector,
        `lattice.core.membership`) where it has news of them; else from the age of
        their heartbeat, as before."""
        self._views.liveness = liveness

    def set_connected(self, peers: Iterable[str]) -> None:
        """The peers we run sync sessions with: their authors are never evicted."""
        self._connected = frozenset(peers)

    # -- local writes ---------------------------------------------------------------------
    def check_local(self, changes: Iterable[Change]) -> None:
        """Raise what `apply_local` would raise for these changes now, applying nothing."""
        self._proposed(list(changes))

    def _proposed(self, changes: list[Change]) -> tuple[_Author, dict[str, dict[str, Any]]]:
        """Our author state and its content with ``changes`` applied (not stored)."""
        if self.peer_id in self._banned:
            raise AuthorBanned("this peer id was banned for equivocating; its writes are void")
        st = self._authors.get(self.peer_id) or _Author()
        try:
            content = apply_changes(st.content, changes)
            check_content(self.peer_id, content)
        except (OutOfBounds, ValueError) as e:
            raise LocalStateError(str(e)) from None
        return st, content

    def apply_local(self, changes: Iterable[Change], now: float) -> Envelope | None:
        """Apply changes to our own document; returns the sealed envelope to replicate,
        or None when the changes leave the content as it was.

        Raises LocalStateError for a change the rules forbid (nothing is applied)."""
        changes = list(changes)
        st, content = self._proposed(changes)
        if content == st.content:
            return None
        size = len(canonical(content))
        snapshot = st.retained_bytes >= max(self.limits.snapshot_min_bytes, 2 * size)
        try:
            env = self._seal(st, content, changes, snapshot)
            if not snapshot and st.retained_bytes + len(env.raw) > MAX_AUTHOR_BYTES:
                env = self._seal(st, content, changes, True)
        except ValueError as e:  # a value over MAX_VALUE_BYTES
            raise LocalStateError(str(e)) from None
        if len(env.raw) > MAX_ENVELOPE_BYTES:
            raise LocalStateError(
                f"{env.kind} of {len(env.raw)} bytes exceeds {MAX_ENVELOPE_BYTES}; "
                "write less at once or delete old records")
        # The same path as a received envelope: what we send is what peers accept.
        self._integrate(st, env, local=True, now=now)
        self._authors[self.peer_id] = st
        self._counts["accepted_local"] += 1
        self._emit(self.peer_id, now)
        return env

    def _seal(self, st: _Author, content: dict[str, dict[str, Any]], changes: list[Change], snapshot: bool
              ) -> Envelope:
        prev = st.tip.digest if st.tip is not None else b""
        if snapshot:
            update = write_snapshot(content, self._client_id)
            return seal(self.identity, st.seq + 1, KIND_SNAPSHOT, update, prev)
        update = write_delta(st.doc, changes, self._client_id)
        return seal(self.identity, st.seq + 1, KIND_DELTA, update, prev)

    # -- receiving ------------------------------------------------------------------------
    def receive(self, raw: bytes, now: float, *, sender: str | None = None,
                allowance: Allowance | None = None) -> ReceiveResult:
        """Validate and apply one envelope from ``sender`` (None: from our own log),
        charging what it adds to the sender's ``allowance`` (`quota.Allowance`)."""
        try:
            # The signature is checked below, once we know this is not a duplicate:
            # under flooding most arrivals are, and Ed25519 dominates the cost.
            env = open_envelope(raw, verify_signature=False)
        except EnvelopeError as e:
            return self._reject(e.reason, None, None, penalize=True, detail=str(e))
        return self._receive(env, now, sender, allowance)

    def _receive(self, env: Envelope, now: float, sender: str | None,
                 allowance: Allowance | None) -> ReceiveResult:
        author, seq = env.author, env.seq
        if author in self._banned:
            self._counts["ignored_banned"] += 1
            return ReceiveResult(IGNORED, "banned", author, seq)
        st = self._authors.get(author)
        known = None
        if st is not None:
            known = st.envelope_at(seq) if seq <= st.seq else st.gap.get(seq)
        if known is not None and known.digest == env.digest \
                and known.signature == env.signature:
            # The very envelope we verified before (Ed25519 signatures are deterministic,
            # so honest copies are byte-identical): no need to verify it again.
            self._counts["replayed"] += 1
            return ReceiveResult(REPLAYED, None, author, seq)
        try:
            check_signature(env)
        except EnvelopeError as e:
            return self._reject(e.reason, author, seq, penalize=True, detail=str(e))
        if known is not None and known.digest == env.digest:
            self._counts["replayed"] += 1  # same statement, another valid signature
            return ReceiveResult(REPLAYED, None, author, seq)
        if known is not None:
            return self._equivocation(known, env, sender, now)
        if st is not None and seq <= st.seq:
            self._counts["stale"] += 1  # older than our last snapshot of this author
            return ReceiveResult(STALE, None, author, seq)
        # Admission (local policy, proto/crdt-sync.md "Quotas"): refusals blame nobody.
        new_author = st is None and author != sender
        nbytes = len(env.raw)
        if allowance is not None and (
                reason := allowance.refusal(now, new_author=new_author, nbytes=nbytes)) is not None:
            return self._refuse(reason, author, seq)
        if st is None:
            if len(self._authors) >= self.limits.max_authors and \
                    not self._make_room(now, author, slots=1):
                return self._refuse("too_many_authors", author, seq)
            st = _Author()
        if seq > st.seq + 1 and not env.is_snapshot:
            if (len(st.gap) >= self.limits.max_gap_per_author
                    or self._gap_bytes + len(env.raw) > self.limits.max_gap_bytes):
                return self._refuse("gap_overflow", author, seq)
            st.gap[seq] = env
            st.gap_bytes += len(env.raw)
            self._gap_bytes += len(env.raw)
            self._authors[author] = st
            self._counts["buffered"] += 1
            if allowance is not None:
                allowance.charge(new_author=new_author, nbytes=nbytes)
            return ReceiveResult(BUFFERED, None, author, seq)
        tip = st.tip
        if seq == st.seq + 1 and tip is not None and env.prev != tip.digest:
            return self._equivocation(tip, env, sender, now)
        try:
            self._integrate(st, env, local=False, now=now)
        except (UpdateError, OutOfBounds, _Quota) as e:
            return self._reject(e.reason, author, seq, penalize=True, detail=str(e))
        except _OverBudget:
            self._emit(author, now)  # authors evicted on the way, if any
            return self._refuse("state_budget", author, seq)
        if allowance is not None:
            allowance.charge(new_author=new_author, nbytes=nbytes)
        self._authors[author] = st
        self._counts["accepted"] += 1
        accepted = [env]
        while (nxt := st.gap.pop(st.seq + 1, None)) is not None:
            self._drop_gap_bytes(st, len(nxt.raw))
            tip = st.tip
            if tip is not None and nxt.prev != tip.digest:
                self._emit(author, now)
                self._equivocation(tip, nxt, None, now)
                return ReceiveResult(ACCEPTED, "equivocation", author, seq, accepted=accepted,
                                     proof=(tip.raw, nxt.raw))
            try:
                self._integrate(st, nxt, local=False, now=now)
            except (UpdateError, OutOfBounds, _Quota) as e:
                # its sender is gone by now; count it, the gap stays until a valid one
                self._rejected[e.reason] += 1
                break
            except _OverBudget:
                self._refused["state_budget"] += 1
                break
            self._counts["accepted"] += 1
            accepted.append(nxt)
        self._emit(author, now)
        return ReceiveResult(ACCEPTED, None, author, seq, accepted=accepted)

    def _integrate(self, st: _Author, env: Envelope, *, local: bool, now: float) -> None:
        """Apply ``env`` to a copy of the author's document and commit it if valid;
        raises UpdateError, OutOfBounds or _Quota (invalid) or _OverBudget (no room
        left) and leaves ``st`` unchanged."""
        if env.is_snapshot:
            base, retained_bytes = None, len(env.raw)
        else:
            base, retained_bytes = st.doc, st.retained_bytes + len(env.raw)
        if retained_bytes > MAX_AUTHOR_BYTES:
            raise _Quota(f"author {env.author} would hold {retained_bytes} bytes "
                         f"> {MAX_AUTHOR_BYTES} without a snapshot")
        doc = apply_checked(base, env.update, scan=not local)  # ours: pycrdt wrote it
        content = read_content(doc)
        check_content(env.author, content)
        growth = retained_bytes - st.retained_bytes if env.author != self.peer_id else 0
        if growth > 0 and self._held_bytes + growth > self.limits.max_state_bytes and \
                not self._make_room(now, env.author, nbytes=growth):
            raise _OverBudget
        # commit (registering the author first, so listeners see a consistent store)
        self._authors[env.author] = st
        self._held_bytes += growth if env.author != self.peer_id else 0
        self._changed_paths.update(self._views.update(env.author, st.content, content))
        st.doc, st.content, st.seq = doc, content, env.seq
        if env.is_snapshot:
            st.retained = [env]
            self._counts["snapshots"] += 1
        else:
            st.retained.append(env)
        st.retained_bytes = retained_bytes
        for stale_seq in [s for s in st.gap if s <= env.seq]:
            self._drop_gap_bytes(st, len(st.gap.pop(stale_seq).raw))
        for listener in self._envelope_listeners:
            listener(env, local)

    def _drop_gap_bytes(self, st: _Author, n: int) -> None:
        st.gap_bytes -= n
        self._gap_bytes -= n

    def receive_proof(self, first: bytes, second: bytes, now: float, *,
                      sender: str | None = None) -> ReceiveResult:
        """An equivocation proof: two different envelopes an author signed for one seq."""
        try:
            a, b = open_envelope(first), open_envelope(second)
        except EnvelopeError as e:
            return self._reject(e.reason, None, None, penalize=True)
        if not proves_equivocation(a, b):
            return self._reject("bad_proof", a.author, a.seq, penalize=True)
        if a.author in self._banned:
            self._counts["replayed"] += 1
            return ReceiveResult(REPLAYED, None, a.author, a.seq)
        self._ban(a.author, (a.raw, b.raw), now)
        return ReceiveResult(ACCEPTED, "equivocation", a.author, a.seq, proof=(a.raw, b.raw))

    def _equivocation(self, known: Envelope, env: Envelope, sender: str | None,
                      now: float) -> ReceiveResult:
        proof = (known.raw, env.raw)
        self._rejected["equivocation"] += 1
        self._ban(env.author, proof, now)
        # Only the author itself is to blame: a forwarder could not know of the fork.
        return ReceiveResult(REJECTED, "equivocation", env.author, env.seq,
                             penalize=sender == env.author, proof=proof)

    def _ban(self, author: str, proof: tuple[bytes, bytes], now: float) -> None:
        st = self._authors.pop(author, None)
        self._banned[author] = proof
        self._counts["banned"] += 1
        if st is not None:
            self._gap_bytes -= st.gap_bytes
            self._held_bytes -= st.retained_bytes if author != self.peer_id else 0
            self._changed_paths.update(self._views.update(author, st.content, None))
            self._emit(author, now)
        for listener in self._ban_listeners:
            listener(author, proof)

    def _make_room(self, now: float, incoming: str, *, nbytes: int = 0, slots: int = 0
                   ) -> bool:
        """Evict unreferenced authors until ``nbytes`` more fit the state budget and
        ``slots`` more authors fit ``max_authors``; False, evicting nobody, when even
        evicting every unreferenced author would not do. Authors holding only
        out-of-order envelopes go first, then the largest."""
        if now < self._room_blocked_until:
            return False  # a full store under a flood: one futile search a second
        keep = {self.peer_id, incoming} | self._connected
        referenced = self._views.referenced(keep, now, self.limits.heartbeat_timeout)
        candidates = sorted(
            (a for a in self._authors if a not in referenced and a not in keep),
            key=lambda a: (self._authors[a].seq > 0, -self._authors[a].retained_bytes, a))
        need_bytes = self._held_bytes + nbytes - self.limits.max_state_bytes
        need_slots = len(self._authors) + slots - self.limits.max_authors
        chosen = []
        for author in candidates:
            if need_bytes <= 0 and need_slots <= 0:
                break
            chosen.append(author)
            need_bytes -= self._authors[author].retained_bytes
            need_slots -= 1
        if need_bytes > 0 or need_slots > 0:
            self._room_blocked_until = now + 1.0
            return False
        for author in chosen:
            self._evict(author)
        return True

    def _evict(self, author: str) -> None:
        st = self._authors.pop(author)
        self._gap_bytes -= st.gap_bytes
        self._held_bytes -= st.retained_bytes
        self._counts["evicted"] += 1
        self._counts["evicted_bytes"] += st.retained_bytes
        if st.seq > 0:
            self._changed_paths.update(self._views.update(author, st.content, None))
        for listener in self._eviction_listeners:
            listener(author)

    def _reject(self, reason: str, author: str | None, seq: int | None, *, penalize: bool,
                detail: str | None = None) -> ReceiveResult:
        self._rejected[reason] += 1
        return ReceiveResult(REJECTED, reason, author, seq, penalize=penalize, detail=detail)

    def _refuse(self, reason: str, author: str, seq: int) -> ReceiveResult:
        self._refused[reason] += 1
        return ReceiveResult(REFUSED, reason, author, seq)

    def load(self, records: Iterable[tuple[str, tuple[bytes, ...]]], now: float) -> Counter[str]:
        """Re-apply records from our log (``("envelope", (raw,))`` or
        ``("proof", (a, b))``); every one is validated again, so a corrupted or edited
        log cannot inject anything. Returns counts by status."""
        out: Counter[str] = Counter()
        for kind, payload in records:
            if kind == "envelope":
                out[self.receive(payload[0], now).status] += 1
            elif kind == "proof":
                out[self.receive_proof(payload[0], payload[1], now).status] += 1
            else:
                out["unknown"] += 1
        return out

    # -- replication ----------------------------------------------------------------------
    def summary(self) -> dict[str, int]:
        """``{author: highest seq we applied}``."""
        return {a: st.seq for a, st in self._authors.items() if st.seq > 0}

    def tips(self) -> dict[str, tuple[int, bytes]]:
        """``{author: (highest seq, digest of that envelope)}``: a summary that also
        reveals two peers holding different envelopes for the same seq (a fork)."""
        return {a: (st.seq, st.tip.digest) for a, st in self._authors.items()
                if st.seq > 0 and st.tip is not None}

    def seq_of(self, author: str) -> int:
        st = self._authors.get(author)
        return st.seq if st is not None else 0

    def envelopes_after(self, author: str, seq: int) -> list[Envelope]:
        st = self._authors.get(author)
        return st.envelopes_after(seq) if st is not None else []

    def missing_for(self, summary: dict[str, int], *, max_bytes: int | None = None
                    ) -> list[Envelope]:
        """The envelopes a peer with ``summary`` lacks, authors in sorted order, each
        author's in seq order; stops after ``max_bytes`` (at least one envelope)."""
        out: list[Envelope] = []
        total = 0
        for author in sorted(self._authors):
            for env in self._authors[author].envelopes_after(summary.get(author, 0)):
                if max_bytes is not None and out and total + len(env.raw) > max_bytes:
                    return out
                out.append(env)
                total += len(env.raw)
        return out

    def banned(self) -> dict[str, tuple[bytes, bytes]]:
        """``{author: (envelope, envelope)}``: the proofs of every banned author."""
        return dict(self._banned)

    def records(self) -> list[tuple[str, tuple[bytes, ...]]]:
        """Everything worth persisting, for rewriting a compacted log."""
        out: list[tuple[str, tuple[bytes, ...]]] = []
        for author in sorted(self._authors):
            out.extend(("envelope", (env.raw,)) for env in self._authors[author].retained)
        out.extend(("proof", proof) for _, proof in sorted(self._banned.items()))
        return out

    # -- views ----------------------------------------------------------------------------
    def contents(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every (non-banned) author's content; treat as read-only."""
        return {a: st.content for a, st in self._authors.items() if st.seq > 0}

    def get(self, path: str, now: float) -> Any:
        """The merged-view value at ``path`` (`views.Views.resolve`); raises StatePathError."""
        return self._views.resolve(path, now, self.limits.heartbeat_timeout)

    def members(self, now: float) -> dict[str, dict[str, Any]]:
        return self._views.members(now, self.limits.heartbeat_timeout)

    def jobs(self) -> dict[str, dict[str, Any]]:
        """Every job shown (views are cached: treat them as read-only)."""
        return self._views.jobs()

    def models(self) -> dict[str, dict[str, Any]]:
        return self._views.models()

    def counters(self) -> dict[str, int]:
        return self._views.counters()

    def own_content(self) -> dict[str, dict[str, Any]]:
        st = self._authors.get(self.peer_id)
        return st.content if st is not None else empty_content()

    def _emit(self, author: str, now: float) -> None:
        """Announce the view paths changed since the last call (``author`` wrote)."""
        paths, self._changed_paths = self._changed_paths, set()
        if not self._subscribers:
            return
        for path in sorted(paths):
            try:
                value = self._views.resolve(path, now, self.limits.heartbeat_timeout)
            except views.StatePathError:
                value = None
            event = ChangeEvent(path, value, author)
            for callback in list(self._subscribers):
                callback(event)

    def statistics(self) -> dict[str, Any]:
        return {
            "authors": len(self._authors),
            "banned": len(self._banned),
            "own_seq": self.seq_of(self.peer_id),
            "retained_envelopes": sum(len(st.retained) for st in self._authors.values()),
            "retained_bytes": sum(st.retained_bytes for st in self._authors.values()),
            "held_bytes": self._held_bytes,
            "max_state_bytes": self.limits.max_state_bytes,
            "max_authors": self.limits.max_authors,
            "gap_envelopes": sum(len(st.gap) for st in self._authors.values()),
            "gap_bytes": self._gap_bytes,
            "views": self._views.statistics(),
            **{k: self._counts[k] for k in (
                "accepted", "accepted_local", "replayed", "stale", "buffered", "snapshots",
                "ignored_banned", "evicted", "evicted_bytes")},
            "rejected": dict(self._rejected),
            "refused": dict(self._refused),
        }
