"""The trio driver of `/lattice/crdt-sync/2`, and the file that persists the state.

Owns the I/O around `lattice.core.state`: running `SyncSession` machines over
`PeerNetwork` streams (a session with each peer as its connection comes up, told by the
network's peer events; accepting inbound sessions, waking writers, the overlay's gossip
tick, periodic anti-entropy, penalizing peers that send invalid envelopes) and
`FileStateLog`, the append-only log in the state dir. Must not import libp2p: it talks
to the network only through `lattice.net.streams.PeerNetwork`, so it runs unchanged
over the real host and `lattice.testing.memnet`.

Failure policy (`serve_crdt_sync`): a session ends quietly when its peer vanishes or
resets (`PeerError`), or stays silent: no hello within ``hello_timeout``, then no
frame (a keepalive at least) within ``idle_timeout``, nor a frame of ours taken off
our hands within it (`SessionTimeout`, counted, no penalty). A peer that breaks the
protocol or sends an envelope proving misbehaviour is reset and put in backoff; so is
one whose input raised anything else while it was handled (`SyncHub.handle` turns it
into `SyncProtocolError` ``internal_error``). What is left is our bug or our disk and
propagates, taking the service (and the daemon's nursery) down.

The log is a separate object the daemon opens (`open_state`): the store calls it
synchronously for every applied envelope, so our own new envelopes are on disk
(fsync) *before* any session can send them. Otherwise a crash right after a send
could make us reuse that sequence number with different content after restart, which
peers would rightly treat as equivocation.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from lattice.core.identity import Identity
from lattice.core.state.envelope import Envelope
from lattice.core.state.limits import MAX_BATCH_BYTES, MAX_FRAME_BYTES, StateLimits
from lattice.core.state.log import LOG_MAGIC, Record, encode_record, scan
from lattice.core.state.schema import Change, Set
from lattice.core.state.store import AuthorBanned, LocalStateError, StateStore
from lattice.core.state.sync import (
    LAZY_FANOUT,
    MESH_DEGREE,
    MESH_HIGH,
    MESH_LOW,
    PROTOCOL_ID,
    SessionRefused,
    SyncHub,
    SyncProtocolError,
    SyncSession,
)
from lattice.net.streams import (
    CONNECTED,
    DISCONNECTED,
    CountingStream,
    PeerError,
    PeerNetwork,
    RemoteProtocolError,
    Stream,
    StreamClosedError,
    quietly,
    recv_frame_or_eof,
    send_frame,
)

log = logging.getLogger("lattice.net.crdt_sync")

PROTOCOL = PROTOCOL_ID
DIAL_RETRY_MAX_S = 60.0
"""A session dial that keeps failing while its peer stays connected is retried at
``session_retry`` doubling up to this (a peer that does not speak sync costs little)."""


@dataclass
class _Liveness:
    """When a session last heard a whole frame, last sent one, and since when it has
    been writing one (`CrdtSync._watchdog`); trio time."""

    heard: float
    sent: float = -float("inf")
    writing_since: float | None = None
    keepalive_due: bool = False

    def __post_init__(self) -> None:
        self.sent = self.heard


class SessionTimeout(PeerError):
    """The remote stayed silent too long (``phase``: hello, idle or write)."""

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"no {phase} progress within {seconds:g} s")
        self.phase = phase


# -- persistence ----------------------------------------------------------------------------

class FileStateLog:
    """Append-only, crash-safe log of envelopes and proofs (`lattice.core.state.log`).

    Our own envelopes are fsynced before `StateStore.apply_local` returns; received
    ones are written without fsync (after a power loss they are fetched again from
    peers). When the file holds much more than the store keeps (snapshots made older
    envelopes useless), it is rewritten: temp file, fsync, atomic rename. After the
    store evicted authors it is rewritten as soon as a MiB (and as much as it keeps)
    is dead, so a restart does not load them again.
    """

    def __init__(self, path: Path, *, compact_min_bytes: int = 4 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.compact_min_bytes = compact_min_bytes
        self._fd: int | None = None
        self._store: StateStore | None = None
        self.size = 0
        self.appended = 0
        self.fsyncs = 0
        self.compactions = 0
        self.dropped_tail_bytes = 0
        self._since_check = 0
        self._evicted = False  # the store evicted authors since our last rewrite

    def open(self) -> list[Record]:
        """Read the log (creating it if absent), cut off a torn tail, and return its
        records. Raises `LogFormatError` if the file is not a state log."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        result = scan(data)
        if result.dropped_bytes:
            log.warning("state log %s: dropping %d bytes of torn tail", self.path,
                        result.dropped_bytes)
            self.dropped_tail_bytes = result.dropped_bytes
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, result.valid_length)
        os.lseek(self._fd, 0, os.SEEK_END)
        self.size = result.valid_length
        if self.size == 0:
            self._write(LOG_MAGIC, durable=True)
        return result.records

    def attach(self, store: StateStore) -> None:
        """Persist everything ``store`` applies from now on."""
        self._store = store
        store.add_envelope_listener(self._on_envelope)
        store.add_ban_listener(self._on_ban)
        store.add_eviction_listener(self._on_evict)
        self._evicted = store.statistics()["evicted"] > 0  # while loading this log

    def _on_envelope(self, env: Envelope, local: bool) -> None:
        self.append(("envelope", (env.raw,)), durable=local)

    def _on_ban(self, author: str, proof: tuple[bytes, bytes]) -> None:
        self.append(("proof", proof), durable=True)

    def _on_evict(self, author: str) -> None:
        self._evicted = True  # rewritten at the next append (the store is mid-receive)

    def append(self, record: Record, *, durable: bool) -> None:
        self._write(encode_record(record), durable=durable)
        self.appended += 1
        self._since_check += 1
        if self._since_check >= 64 or self._evicted:
            self._since_check = 0
            self.maybe_compact()

    def _write(self, data: bytes, *, durable: bool) -> None:
        if self._fd is None:
            raise RuntimeError("state log is not open")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.size += len(data)
        if durable:
            os.fsync(self._fd)
            self.fsyncs += 1

    def maybe_compact(self) -> bool:
        if self._store is None:
            return False
        live = self._store.statistics()["retained_bytes"]
        dead = self.size - live
        if self.size <= max(self.compact_min_bytes, 4 * live) and not (
                self._evicted and dead >= max(1 << 20, live)):
            return False
        self.rewrite(self._store.records())
        return True

    def rewrite(self, records: list[Record]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = LOG_MAGIC + b"".join(encode_record(r) for r in records)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = len(data)
        self.compactions += 1
        self._evicted = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def statistics(self) -> dict[str, Any]:
        return {"path": str(self.path), "bytes": self.size, "appended": self.appended,
                "fsyncs": self.fsyncs, "compactions": self.compactions,
                "dropped_tail_bytes": self.dropped_tail_bytes}


def open_state(identity: Identity, path: Path | None, *, now: float,
               limits: StateLimits = StateLimits(),
               compact_min_bytes: int = 4 * 1024 * 1024
               ) -> tuple[StateStore, FileStateLog | None]:
    """A store loaded from the log at ``path`` (None: in memory only), with the log
    attached so that everything applied from now on is persisted. Call before the
    sync service starts, so state is there at once."""
    store = StateStore(identity, limits=limits)
    if path is None:
        return store, None
    state_log = FileStateLog(path, compact_min_bytes=compact_min_bytes)
    records = state_log.open()
    counts = store.load(records, now)
    if counts:
        log.info("state log %s: %s", path, dict(counts))
    state_log.attach(store)
    state_log.maybe_compact()
    return store, state_log


# -- sync driver ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SyncConfig:
    """Driver settings (daemon config section ``[state]``)."""

    anti_entropy_interval: float = 10.0
    """Mean seconds between reconciliations with one random connected peer (when the
    two hold the same, one fingerprint each way)."""
    gossip_interval: float = 1.0
    """Seconds between overlay ticks: mesh upkeep and announcing what changed to a few
    sessions outside the mesh (gossipsub's heartbeat, 1 s)."""
    session_retry: float = 2.0
    """A session that ended while its peer stays connected is dialed again this long
    after (or when the peer's backoff ends, if it was penalized)."""
    hello_timeout: float = 10.0
    """A session whose peer has not said hello by then ends."""
    idle_timeout: float = 120.0
    """A session whose remote sends no frame for this long (or does not take one of
    ours) ends; with nothing to send we send a keepalive after half of it. Keepalives
    are an idle daemon's cost per connection held (two frames per keepalive period each
    way, with yamux's pings), so the period is long; a peer that vanishes without
    closing is found sooner by SWIM (`lattice.net.membership`)."""
    max_sessions: int = 256
    """Sync sessions at once, in all."""
    backoff_base: float = 5.0
    backoff_max: float = 600.0
    max_batch_bytes: int = MAX_BATCH_BYTES
    mesh_degree: int = MESH_DEGREE
    """Sync sessions each new update is pushed to (the overlay's mesh degree; a graft is
    accepted up to 8). Others hear of it at the next gossip tick and pull what they lack."""
    mesh_low: int = MESH_LOW
    mesh_high: int = MESH_HIGH
    """The mesh is grafted up below ``mesh_low`` and pruned above ``mesh_high`` (both
    widened to include ``mesh_degree``)."""
    lazy_fanout: int = LAZY_FANOUT
    initial_sync_timeout: float = 10.0
    """How long local writes wait for a peer to confirm our own history after a start
    with an identity that may have published before (see `CrdtSync.write`)."""


class CrdtSync:
    """The running sync service (what `serve_crdt_sync` hands back)."""

    def __init__(self, network: PeerNetwork, store: StateStore, config: SyncConfig,
                 clock: Callable[[], float], rng: random.Random) -> None:
        self.network = network
        self.store = store
        self.config = config
        self._clock = clock
        self._rng = rng
        self.hub = SyncHub(store, max_sessions=config.max_sessions,
                           backoff_base=config.backoff_base, backoff_max=config.backoff_max,
                           mesh_degree=config.mesh_degree,
                           mesh_low=min(config.mesh_low, config.mesh_degree),
                           mesh_high=max(config.mesh_high, config.mesh_degree),
                           lazy_fanout=config.lazy_fanout,
                           rng=rng, wake=self._wake)
        self._wakers: dict[int, trio.Event] = {}
        self._dialing: set[str] = set()
        self._connected: set[str] = set()  # from the network's peer events
        self._redial_at: dict[str, float] = {}
        self._dial_failures: dict[str, int] = {}  # failed dials in a row, per peer
        self._redial_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._self_synced = trio.Event()
        self._writable = trio.Event()
        self._deferred: list[list[Change]] = []
        self.deferred_writes = 0
        self.anti_entropy_rounds = 0
        self.failed_dials = 0
        self.timeouts: Counter[str] = Counter()

    # -- public -------------------------------------------------------------------------
    async def connect(self, peer_id: str) -> bool:
        """Start a sync session with ``peer_id`` unless one runs already; False when
        the peer cannot be reached, is in backoff, or is ourselves."""
        if (self._nursery is None or peer_id == self.network.peer_id
                or peer_id in self._dialing or self.hub.has_session(peer_id)
                or self.hub.in_backoff(peer_id, self._clock())):
            return False
        self._dialing.add(peer_id)
        try:
            stream = await self.network.open_stream(peer_id, PROTOCOL)
        except PeerError as e:
            self.failed_dials += 1
            log.debug("peer=%s crdt-sync dial failed: %s", peer_id, e)
            if peer_id in self._connected:
                self._redial_after_failure(peer_id)
            return False
        finally:
            self._dialing.discard(peer_id)
        self._dial_failures.pop(peer_id, None)
        self._nursery.start_soon(self._run_session, stream, True, None)
        return True

    async def wait_self_synced(self) -> None:
        """Wait until a peer has shown that we hold our own latest envelope.

        A peer whose state log was lost or rolled back (disk corruption, a restored
        backup) while its identity survived would reuse sequence numbers it already
        published, which is equivocation and gets its peer id banned. Peers send us our
        own envelopes back like any other author's; once one session's hello shows it
        has nothing of ours that we lack, our next seq is safe to use."""
        await self._self_synced.wait()

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    async def wait_writable(self) -> None:
        """Wait until local writes apply at once (see `write`)."""
        await self._writable.wait()

    def allow_writes(self) -> None:
        """Our next sequence number is safe to use: a peer confirmed our history, the
        identity is new (nothing of ours can exist anywhere), or we waited
        `SyncConfig.initial_sync_timeout` alone. Applies the writes deferred so far."""
        if self._writable.is_set():
            return
        self._writable.set()
        deferred, self._deferred = self._deferred, []
        for changes in deferred:
            try:
                self.store.apply_local(changes, self._clock())
            except (LocalStateError, AuthorBanned) as e:
                log.warning("a write deferred until our history was confirmed failed: %s", e)

    def write(self, changes: list[Change]) -> Envelope | None:
        """Apply local changes (`StateStore.apply_local` with our clock); the new
        envelope is persisted by the attached log and pushed to every session.

        Until `writable`, changes are checked, kept in order and applied once it is
        (returns None): a daemon whose state log was lost or rolled back while its
        identity survived would otherwise reuse sequence numbers it already published,
        which peers treat as equivocation and punish with a ban of its peer id. Callers
        that must see their write applied (the RPC) `wait_writable` first."""
        if not self._writable.is_set():
            self.store.check_local(changes)  # refuse now what would fail later
            self._deferred.append(list(changes))
            self.deferred_writes += 1
            return None
        return self.store.apply_local(changes, self._clock())

    def sync_now(self) -> int:
        """Reconcile with every open session (used after a partition heals or by
        `lattice state sync`); returns how many were asked."""
        n = 0
        for session in list(self.hub.sessions.values()):
            if session.open:
                session.request_recon()
                self._wake(session)
                n += 1
        return n

    def statistics(self) -> dict[str, Any]:
        return {"store": self.store.statistics(),
                "sync": {**self.hub.statistics(), "anti_entropy_rounds": self.anti_entropy_rounds,
                         "failed_dials": self.failed_dials,
                         "timeouts": dict(self.timeouts),
                         "writable": self.writable, "deferred_writes": self.deferred_writes,
                         "sessions_detail": [s.statistics() for s in self.hub.sessions.values()]}}

    # -- internals ----------------------------------------------------------------------
    def _wake(self, session: SyncSession) -> None:
        event = self._wakers.get(id(session))
        if event is not None:
            event.set()

    async def _handle_inbound(self, stream: Stream) -> None:
        if self._closed or self._nursery is None:
            await stream.reset()
            return
        done = trio.Event()
        # The session runs in our nursery (so stopping the service stops it); the
        # network's handler task just waits, because returning would close the stream.
        self._nursery.start_soon(self._run_session, stream, False, done)
        await done.wait()

    async def _run_session(self, raw_stream: Stream, initiator: bool,
                           done: trio.Event | None) -> None:
        peer = raw_stream.remote_peer_id
        try:
            try:
                session = self.hub.open_session(
                    peer, initiator=initiator,
                    session_id=f"{self._rng.getrandbits(64):016x}" if initiator else None,
                    now=self._clock())
            except SessionRefused as e:
                log.debug("peer=%s crdt-sync session refused: %s", peer, e)
                await quietly(raw_stream.reset)
                return
            try:
                await self._serve_session(CountingStream(raw_stream, session), session)
            finally:
                self.hub.close_session(session)
                self._wakers.pop(id(session), None)
                if not self._closed:
                    self._schedule_redial(peer, self._clock() + self.config.session_retry)
        finally:
            if done is not None:
                done.set()

    async def _serve_session(self, stream: CountingStream, session: SyncSession) -> None:
        peer = stream.remote_peer_id
        failure: list[BaseException] = []
        penalized = False
        try:
            async with trio.open_nursery() as nursery:
                async def guarded(loop) -> None:
                    try:
                        await loop(stream, session)
                    except (PeerError, SyncProtocolError) as e:
                        failure.append(e)
                    nursery.cancel_scope.cancel()

                live = _Liveness(trio.current_time())
                nursery.start_soon(guarded, functools.partial(self._write_loop, live=live))
                nursery.start_soon(guarded, functools.partial(self._read_loop, live=live))
                nursery.start_soon(guarded, functools.partial(self._watchdog, live=live))
            error = failure[0] if failure else None
            sid = session.session_id
            if isinstance(error, (SyncProtocolError, RemoteProtocolError)):
                reason = error.reason if isinstance(error, SyncProtocolError) else "malformed"
                backoff = self.hub.penalize(peer, reason, self._clock())
                log.warning("peer=%s sid=%s crdt-sync penalized (%s); backoff %.0f s",
                            peer, sid, error, backoff)
                penalized = True
            elif isinstance(error, SessionTimeout):
                self.timeouts[error.phase] += 1
                log.info("peer=%s sid=%s crdt-sync session ended: %s", peer, sid, error)
            elif error is not None:
                log.debug("peer=%s sid=%s crdt-sync session ended: %r", peer, sid, error)
        finally:
            await quietly(stream.reset if penalized else stream.close)

    async def _watchdog(self, stream: CountingStream, session: SyncSession, *,
                        live: _Liveness) -> None:
        """End the session when the remote is silent (no hello within ``hello_timeout``,
        then no whole frame within ``idle_timeout``: a trickle does not hold us) or does
        not take a frame of ours within ``idle_timeout``; ask for a keepalive when we
        sent nothing for half of it. One task per session that wakes a few times per
        idle period, so a message costs a timestamp, not a cancel scope."""
        idle = self.config.idle_timeout
        while True:
            now = trio.current_time()
            phase, limit = (("idle", idle) if session.hello_received
                            else ("hello", self.config.hello_timeout))
            if now >= live.heard + limit:
                raise SessionTimeout(phase, limit)
            if live.writing_since is not None and now >= live.writing_since + idle:
                raise SessionTimeout("write", idle)
            wake = live.heard + limit
            if live.writing_since is not None:
                wake = min(wake, live.writing_since + idle)
            elif session.open:
                if now >= live.sent + idle / 2:
                    live.keepalive_due = True
                    self._wake(session)
                wake = min(wake, max(live.sent, now) + idle / 2)
            await trio.sleep_until(wake)

    async def _read_loop(self, stream: CountingStream, session: SyncSession, *,
                         live: _Liveness) -> None:
        msg = await recv_frame_or_eof(stream, max_bytes=MAX_FRAME_BYTES)
        me = self.network.peer_id
        while msg is not None:
            live.heard = trio.current_time()
            outcome = self.hub.handle(session, msg, self._clock())
            if session.hello_received and \
                    self.store.seq_of(me) >= session.hello_seqs.get(me, 0):
                self._self_synced.set()
                self.allow_writes()
            for author in outcome.banned:
                log.warning("peer=%s sid=%s author=%s banned: equivocation proof",
                            session.remote_peer, session.session_id, author)
            if session.has_pending():
                self._wake(session)
            msg = await recv_frame_or_eof(stream, max_bytes=MAX_FRAME_BYTES)
        raise StreamClosedError("remote ended the session")

    async def _write_loop(self, stream: CountingStream, session: SyncSession, *,
                          live: _Liveness) -> None:
        while True:
            msg = session.next_message(self.config.max_batch_bytes)
            if msg is None and live.keepalive_due:
                msg = session.keepalive()  # quiet for a while: show we are alive
            if msg is None:
                # No await between the None above and registering the event, so a wake
                # cannot slip in between and be lost.
                event = trio.Event()
                self._wakers[id(session)] = event
                await event.wait()
                continue
            live.keepalive_due = False
            live.writing_since = trio.current_time()
            await send_frame(stream, msg)
            live.writing_since = None
            live.sent = trio.current_time()

    async def _keep_sessions(self) -> None:
        """Keep one session per connected peer: start it as the connection comes up
        (the network's peer events), and dial again when a session ends while the peer
        stays connected (`_schedule_redial`). Only the smaller peer id dials, so two
        peers noticing each other at once do not open two sessions."""
        with self.network.peer_events(buffer=self.config.max_sessions) as events:
            self._resync_connected()  # peers connected before we listened
            async for event in events:
                if event.kind == CONNECTED:
                    self._connected.add(event.peer_id)
                    self._want_session(event.peer_id)
                elif event.kind == DISCONNECTED:
                    self._connected.discard(event.peer_id)
                    self._redial_at.pop(event.peer_id, None)
                    self._dial_failures.pop(event.peer_id, None)
                else:  # lagged: events were dropped, read the truth once
                    self._resync_connected()

    def _resync_connected(self) -> None:
        self._connected = set(self.network.connected_peers())
        for peer in self._connected:
            self._want_session(peer)

    def _want_session(self, peer: str) -> None:
        now = self._clock()
        if self._should_dial(peer, now):
            assert self._nursery is not None
            self._nursery.start_soon(self.connect, peer)
        elif self.hub.in_backoff(peer, now):
            self._schedule_redial(peer, self.hub.backoff_until(peer) or now)

    def _redial_after_failure(self, peer: str) -> None:
        """Connected but the stream failed (a relayed connection closing as a direct
        one takes over, a peer still starting): nothing else would ever start this
        session while the connection stays up, so try again, less often each time.
        The count is kept while connected only (a disconnect drops it)."""
        fails = self._dial_failures[peer] = self._dial_failures.get(peer, 0) + 1
        self._schedule_redial(peer, self._clock() + min(
            self.config.session_retry * 2 ** (fails - 1), DIAL_RETRY_MAX_S))

    def _schedule_redial(self, peer: str, at: float) -> None:
        if peer not in self._connected or self.network.peer_id >= peer:
            return
        at = max(at, self.hub.backoff_until(peer) or at)
        if at < self._redial_at.get(peer, float("inf")):
            self._redial_at[peer] = at
            self._redial_changed.set()

    async def _redial_when_due(self) -> None:
        while True:
            self._redial_changed = trio.Event()
            now = self._clock()
            for peer in [p for p, at in self._redial_at.items() if at <= now]:
                del self._redial_at[peer]
                self._want_session(peer)
            wait = min(self._redial_at.values(), default=now + 3600.0) - now
            with trio.move_on_after(max(wait, 0.0)):
                await self._redial_changed.wait()

    def _should_dial(self, peer: str, now: float) -> bool:
        return (self.network.peer_id < peer and not self.hub.has_session(peer)
                and peer not in self._dialing and not self.hub.in_backoff(peer, now))

    async def _allow_writes_after_timeout(self) -> None:
        with trio.move_on_after(self.config.initial_sync_timeout):
            await self._writable.wait()
            return
        log.info("no peer confirmed our own history within %.0f s; writing anyway",
                 self.config.initial_sync_timeout)
        self.allow_writes()

    async def _anti_entropy_loop(self) -> None:
        interval = self.config.anti_entropy_interval
        while True:
            await trio.sleep(interval * self._rng.uniform(0.5, 1.5))
            session = self.hub.pick_anti_entropy(self._rng, self._clock())
            if session is not None:
                session.request_recon()
                self._wake(session)
                self.anti_entropy_rounds += 1


    async def _gossip_loop(self) -> None:
        interval = self.config.gossip_interval
        while True:
            await trio.sleep(interval * self._rng.uniform(0.9, 1.1))
            self.hub.tick()


async def serve_heartbeat(store: StateStore,
                          member: dict[str, Any] | Callable[[], dict[str, Any]], *,
                          interval: float = 15.0, clock: Callable[[], float] = time.time,
                          sync: CrdtSync | None = None,
                          task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Publish our member record (``member``: name, version, reachability, addrs,
    capabilities; see `lattice.core.state.schema`; a callable is asked at the first
    write) and refresh its heartbeat every ``interval`` seconds until cancelled (0:
    never; daemons take liveness from `lattice.net.membership`, and fall back to the
    heartbeat's age, ``heartbeat_timeout``, only for members it has no news of).

    With ``sync``, the first write waits for `CrdtSync.wait_writable`. A member record
    the schema refuses raises `LocalStateError` before ``task_status.started()`` (a
    config error). If peers hold proof that this identity equivocated, it logs the fact
    and stops writing."""
    if sync is not None:
        await sync.wait_writable()
    fields = {"peer_id": store.peer_id, **(member() if callable(member) else member),
              "started": clock()}
    started = False
    try:
        store.apply_local([Set(f"member/{k}", v) for k, v in fields.items()]
                          + [Set("member/heartbeat", clock())], clock())
        task_status.started()
        started = True
        if interval <= 0:  # liveness comes from the failure detector (issue 16)
            await trio.sleep_forever()
        while True:
            await trio.sleep(interval)
            store.apply_local([Set("member/heartbeat", clock())], clock())
    except AuthorBanned as e:
        log.error("peer=%s %s; start with a new identity to take part again",
                  store.peer_id, e)
        if not started:
            task_status.started()
        await trio.sleep_forever()


async def serve_crdt_sync(network: PeerNetwork, store: StateStore, *,
                          config: SyncConfig = SyncConfig(),
                          clock: Callable[[], float] = time.time,
                          rng: random.Random | None = None,
                          history_is_new: bool = False,
                          task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Replicate ``store`` with every connected peer until cancelled.

    Registers the `PROTOCOL` stream handler, starts sessions with connected peers (and
    with any peer passed to `CrdtSync.connect`), pushes new envelopes, runs
    anti-entropy, and hands back the `CrdtSync` handle via ``task_status``. ``clock``
    gives the wall time used for penalties and views (tests pass ``trio.current_time``).
    ``history_is_new``: the identity was created on this start, so nothing of ours can
    exist elsewhere and local writes apply at once (else see `CrdtSync.write`).
    Failure policy: see the module docstring.
    """
    sync = CrdtSync(network, store, config, clock, rng or random.Random())
    if history_is_new:
        sync.allow_writes()
    async with trio.open_nursery() as nursery:
        sync._nursery = nursery
        network.set_stream_handler(PROTOCOL, sync._handle_inbound)
        if not sync.writable:
            nursery.start_soon(sync._allow_writes_after_timeout)
        nursery.start_soon(sync._keep_sessions)
        nursery.start_soon(sync._redial_when_due)
        nursery.start_soon(sync._anti_entropy_loop)
        nursery.start_soon(sync._gossip_loop)
        task_status.started(sync)
        try:
            await trio.sleep_forever()
        finally:
            sync._closed = True
            sync._nursery = None
