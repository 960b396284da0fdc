"""Bulk tensor transfer, `/lattice/bulk/2`: numpy arrays between two peers at memory
speed, encrypted and authenticated (spec: proto/bulk.md; pure formats:
`lattice.core.bulk_frames`, array specs: `lattice.core.arrays`).

Owns: `send_arrays`, `receive_arrays`, `exchange` (both directions at once, for a
pairwise averaging step) - one session, one key agreement, for a set of up to 16 arrays
- and their one-array forms `send_array`, `receive_array`, `exchange_arrays`; the
side-channel listener (`serve_bulk_listener`), the standalone push protocol
(`serve_bulk` / `push_arrays`) and the typed errors a transfer raises. Must not import
libp2p: the control stream is any `lattice.net.streams.Stream`.

Why a side channel. One py-libp2p TCP+Noise+Yamux stream gives ~170-300 MB/s at 3+ CPU-s
per GiB and resets itself after 5 s without a window update (../shared/PY-LIBP2P.md). So
the Noise stream carries only the control messages: an ephemeral X25519 exchange bound to
the session, the header, and a side-channel offer. The array itself goes over a plain TCP
connection as AES-256-GCM chunks whose keys only the two ends know; AES-NI seals at >3 GB/s
per core, so the cost is one pass of AES and one kernel copy per side. TCP's own flow
control pauses the sender when the reader pauses, with no timer to trip.

Fallback. When the receiver offers no channel or none of its addresses connects (NAT,
relay, a hole-punched connection), the same sealed chunks travel over the control stream.
The receiver's control reader drains the stream as fast as it arrives into a buffer of
`stream_window_bytes`, and the sender may only run that far ahead of what the consumer has
taken (credit frames). So a consumer that pauses - a slow progress callback, a busy
decrypt - holds the sender back on *our* credit, while Yamux keeps seeing prompt reads and
never reaches its 5-second window timeout. (What this cannot survive is the receiving event
loop itself frozen for 5 s; nothing in the daemon does that, math runs in threads.) Big
chunks and a big window matter here: each py-libp2p frame costs ~1 ms of CPU, so 32 KiB
chunks under a window small enough to fit Yamux's initial 256 KiB ran at ~7 MB/s, 1 MiB
chunks under an 8 MiB window at about what a bare stream does.

Why the AEAD runs on the event loop. Each 1 MiB chunk seals or opens in ~0.3 ms, so the
loop never blocks longer than that. A variant pipelining every chunk through a worker
thread (trio.to_thread, 3 rotating buffers) used ~30% more CPU per GiB (0.80 vs 0.60 CPU-s
to send) and moved 256 MiB slower (median 0.98 vs 1.59 GB/s, same 2-core box), because in
a transfer each daemon has about one core of its own and the handoffs are pure cost. The
work per byte is one AEAD pass and one kernel copy per side; nothing else touches it.

Measured (bench/tensor_transfer.py, 256 MiB float32, separate processes, 2 shared cores):
side channel 1.33-1.41 GB/s at ~0.7 CPU-s/GiB per side, next to raw loopback TCP at
1.5-2.2 GB/s, one py-libp2p Yamux stream at ~116 MB/s (6-8 CPU-s/GiB), hivemind 84 MB/s,
Lattica 96 MB/s; the fallback ~87 MB/s. A 10M-float32 pairwise exchange plus average
(bench/pairwise_exchange.py) takes 0.069 s median; hivemind's averager 0.346 s.

Failure policy. Anything the peer causes raises a subclass of `PeerError` (typed below),
after a best-effort `abort` message telling the peer why; the receiver's array is never
returned unless every chunk arrived and authenticated. Our own misuse (an unsupported dtype
to send) raises ValueError. No operation retries: the caller (gossip averaging) picks
another peer. Each transfer leaves the control stream at a frame boundary on success, so
a protocol may run one inside its own exchange and keep using the stream.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lattice.core import bulk_frames as bf
from lattice.core.arrays import (
    WIRE_DTYPES,
    ArrayFormatError,
    ArrayLimits,
    ArraySpec,
    byte_view,
    empty_like_spec,
    parse_array_spec,
    prepare_array,
)
from lattice.core.bulk_frames import BulkFormatError
from lattice.core.netgroups import source_group
from lattice.net.streams import (
    PeerError,
    PeerNetwork,
    RemoteProtocolError,
    Stream,
    StreamClosedError,
    parse_peer_input,
    raise_peer_fault,
    recv_frame,
    send_frame,
)

log = logging.getLogger("lattice.net.bulk")

PROTOCOL = bf.PROTOCOL

Progress = Callable[[int, int], Awaitable[None]]
"""``await on_progress(done_bytes, total_bytes)`` after each chunk; a slow callback
simply pauses the transfer (flow control holds the peer back, nothing times out)."""


# -- errors ---------------------------------------------------------------------------


class BulkHeaderError(RemoteProtocolError):
    """The peer offered an array outside our limits (dtype, shape, size) or not the one we
    expected; we refused it."""


class BulkRejectedError(PeerError):
    """The peer refused the array we offered; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"peer refused the array: {reason}")
        self.reason = reason


class BulkAuthError(RemoteProtocolError):
    """A side-channel connection presented the wrong one-time token for the session."""


class BulkIntegrityError(RemoteProtocolError):
    """A chunk failed authentication: tampered, corrupted or misordered on the way."""


class BulkTruncatedError(StreamClosedError):
    """The data ended before the announced size (the peer vanished mid-transfer)."""


class BulkStalledError(PeerError):
    """No progress for `BulkConfig.idle_timeout` seconds."""


class BulkAbortedError(PeerError):
    """The peer aborted the transfer; ``reason`` is what it told us."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"peer aborted the transfer: {reason}")
        self.reason = reason


# -- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class BulkConfig:
    """How we transfer (daemon config section `[bulk]`; what we accept is
    `lattice.core.arrays.ArrayLimits`)."""

    chunk_bytes: int = 1 << 20
    """Plaintext bytes per sealed chunk on the side channel (bf.DIRECT_CHUNK_MIN..MAX)."""
    stream_chunk_bytes: int = 1 << 20
    """Plaintext bytes per sealed chunk on the fallback path (bf.STREAM_CHUNK_MIN..MAX)."""
    stream_window_bytes: int = 8 << 20
    """Fallback credit we grant as receiver: sealed bytes the sender may run ahead of our
    consumer, i.e. what we buffer per inbound transfer while the consumer pauses."""
    direct: bool = True
    """As sender: use the side channel the receiver offers. False forces the fallback."""
    connect_timeout: float = 3.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    """Seconds without any progress (a chunk, a credit, a frame) before BulkStalledError.
    A reader may pause this long; Yamux alone would have reset the stream after 5 s."""


DEFAULT_LIMITS = ArrayLimits()
DEFAULT_CONFIG = BulkConfig()


# -- side-channel listener ------------------------------------------------------------------


class _Expectation:
    """One receiver waiting for its sender's side-channel connection.

    The listener's handler task keeps owning the connection (trio.serve_listeners closes
    it when the handler returns) and waits for `released`, set when the session ends."""

    def __init__(self, token: bytes) -> None:
        self.token = token
        self._ready = trio.Event()
        self.released = trio.Event()
        self._conn: trio.SocketStream | None = None
        self._error: PeerError | None = None

    def deliver(self, conn: trio.SocketStream) -> None:
        self._conn = conn
        self._ready.set()

    def fail(self, error: PeerError) -> None:
        self._error = error
        self._ready.set()

    async def wait(self) -> trio.SocketStream:
        await self._ready.wait()
        if self._error is not None:
            raise self._error
        assert self._conn is not None
        conn, self._conn = self._conn, None
        return conn

    def release(self) -> None:
        self.released.set()


class BulkListener:
    """Handle of a running side-channel listener (from `serve_bulk_listener`).

    A connection must open with the 72-byte channel hello (magic, channel id, token)
    within `hello_timeout`; the first connection naming a pending channel consumes it,
    and a wrong token fails that transfer with BulkAuthError (the token is one-time).
    Connections naming no pending channel are closed. At most ``max_handshakes``
    connections wait for their hello at once, at most ``max_handshakes_per_ip`` from
    one source network (`source_group`: an IPv4 /24, an IPv6 /48), so idle connections
    from one attacker cannot take every slot; the rest are closed at once, counted.
    """

    def __init__(self, addresses: list[tuple[str, int]], *, max_sessions: int,
                 max_handshakes: int, hello_timeout: float,
                 max_handshakes_per_ip: int = 4) -> None:
        self.addresses = addresses
        self._max_sessions = max_sessions
        self._max_handshakes = max_handshakes
        self._max_handshakes_per_ip = max_handshakes_per_ip
        self._hello_timeout = hello_timeout
        self._sessions: dict[bytes, _Expectation] = {}
        self._handshaking = 0
        self._handshaking_from: Counter[str] = Counter()  # source network -> handshakes
        self._counts = {"authenticated": 0, "bad_token": 0, "unknown_session": 0,
                        "bad_hello": 0, "hello_timeouts": 0, "refused_busy": 0,
                        "refused_ip_busy": 0}

    def statistics(self) -> dict[str, Any]:
        return {"addresses": [list(a) for a in self.addresses],
                "pending_sessions": len(self._sessions),
                "max_sessions": self._max_sessions,
                "handshaking": self._handshaking,
                "max_handshakes": self._max_handshakes,
                "max_handshakes_per_ip": self._max_handshakes_per_ip,
                "hello_timeout_s": self._hello_timeout,
                **self._counts}

    @contextlib.contextmanager
    def expect(self, keys: bf.DirectionKeys) -> Iterator[_Expectation | None]:
        """Register an inbound transfer for the duration of the block; yields None when
        the listener is at its limit (the caller then offers no channel)."""
        cid = keys.channel_id
        if len(self._sessions) >= self._max_sessions or cid in self._sessions:
            yield None
            return
        exp = _Expectation(keys.token)
        self._sessions[cid] = exp
        try:
            yield exp
        finally:
            if self._sessions.get(cid) is exp:
                del self._sessions[cid]
            exp.release()

    async def _handle(self, conn: trio.SocketStream) -> None:
        source = _source_of(conn)
        if self._handshaking >= self._max_handshakes:
            self._counts["refused_busy"] += 1
            await conn.aclose()
            return
        if self._handshaking_from[source] >= self._max_handshakes_per_ip:
            self._counts["refused_ip_busy"] += 1
            await conn.aclose()
            return
        self._handshaking += 1
        self._handshaking_from[source] += 1
        try:
            hello = b""
            with trio.move_on_after(self._hello_timeout) as scope:
                hello = await _receive_hello(conn)
            if scope.cancelled_caught:
                self._counts["hello_timeouts"] += 1
        finally:
            self._handshaking -= 1
            self._handshaking_from[source] -= 1
            if not self._handshaking_from[source]:
                del self._handshaking_from[source]
        try:
            cid, token = parse_peer_input(bf.parse_channel_hello, hello)
        except RemoteProtocolError:
            self._counts["bad_hello"] += 1
            await conn.aclose()
            return
        exp = self._sessions.pop(cid, None)
        if exp is None:
            self._counts["unknown_session"] += 1
            await conn.aclose()
            return
        if not bf.token_matches(exp.token, token):
            self._counts["bad_token"] += 1
            exp.fail(BulkAuthError("side-channel connection presented a wrong token"))
            await conn.aclose()
            return
        self._counts["authenticated"] += 1
        exp.deliver(conn)
        await exp.released.wait()  # serve_listeners closes conn when we return


def _source_of(conn: trio.SocketStream) -> str:
    try:
        ip = str(conn.socket.getpeername()[0])
    except (OSError, IndexError):
        ip = None  # gone already: it gets no more than one slot's worth of attention
    return source_group(ip, "?")


async def _receive_hello(conn: trio.SocketStream) -> bytes:
    buf = bytearray()
    while len(buf) < bf.CHANNEL_HELLO_BYTES:
        try:
            part = await conn.receive_some(bf.CHANNEL_HELLO_BYTES - len(buf))
        except (trio.BrokenResourceError, OSError):
            return b""
        if not part:
            return b""
        buf += part
    return bytes(buf)


async def serve_bulk_listener(host: str = "127.0.0.1", port: int = 0, *,
                              advertise: list[tuple[str, int]] | None = None,
                              max_sessions: int = 64, max_handshakes: int = 64,
                              max_handshakes_per_ip: int = 4, hello_timeout: float = 3.0,
                              task_status: trio.TaskStatus[BulkListener] = trio.TASK_STATUS_IGNORED,
                              ) -> None:
    """Listen for side-channel connections until cancelled; `nursery.start` returns the
    `BulkListener` to pass to `receive_array` / `exchange_arrays` / `serve_bulk`.

    ``advertise`` is what receivers offer to senders; by default the bound addresses, which
    requires a concrete ``host`` (with a wildcard bind, say which addresses peers reach).
    Failure policy: a misbehaving connection is closed and counted; accept errors other
    than resource exhaustion (which trio.serve_listeners rides out) propagate.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = [tuple(ln.socket.getsockname()[:2]) for ln in listeners]
    if advertise is None:
        if any(h in ("0.0.0.0", "::") for h, _ in bound):
            raise ValueError("bulk listener bound to a wildcard address: pass advertise=")
        advertise = [(str(h), int(p)) for h, p in bound]
    listener = BulkListener(advertise, max_sessions=max_sessions,
                            max_handshakes=max_handshakes, hello_timeout=hello_timeout,
                            max_handshakes_per_ip=max_handshakes_per_ip)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, listener._handle, listeners)
        task_status.started(listener)


# -- public API -------------------------------------------------------------------------


async def send_arrays(stream: Stream, arrays: Sequence[np.ndarray], *,
                      config: BulkConfig = DEFAULT_CONFIG,
                      on_progress: Progress | None = None) -> None:
    """Send ``arrays`` (1 to `MAX_ARRAYS`, in one session) to the peer at the other end
    of ``stream`` (which runs `receive_arrays`); returns once the peer confirmed it
    received every byte intact. ``on_progress`` counts bytes over all of them."""
    await _Session(stream, config, None, sent_progress=on_progress).run(
        outgoing=list(arrays), receive=False, limits=DEFAULT_LIMITS, check=None, out=None)


async def receive_arrays(stream: Stream, *, limits: ArrayLimits = DEFAULT_LIMITS,
                         listener: BulkListener | None = None,
                         config: BulkConfig = DEFAULT_CONFIG,
                         check: Check | None = None,
                         out: Sequence[np.ndarray] | None = None,
                         on_progress: Progress | None = None) -> list[np.ndarray]:
    """Receive the arrays the peer sends with `send_arrays`.

    With a ``listener`` the peer is offered the side channel; without, or when it cannot
    connect, the data comes over ``stream`` itself. Every spec must pass ``limits`` (per
    array and in total) and then ``check(specs)``, which raises `ArrayFormatError` to
    refuse. Returns fresh, writable arrays that authenticated chunk by chunk, or ``out``
    filled in place (which implies their dtypes and shapes). Reusing ``out`` across
    exchanges saves the page faults of fresh buffers (~0.1 s per 256 MiB); when this
    raises, ``out`` holds garbage and must not be used.
    """
    if out is not None:
        check = _same_as([_check_out(o) for o in out])
    result = await _Session(stream, config, listener, received_progress=on_progress).run(
        outgoing=None, receive=True, limits=limits, check=check,
        out=list(out) if out is not None else None)
    assert result is not None
    return result


async def exchange(stream: Stream, ours: Sequence[np.ndarray], *,
                   limits: ArrayLimits = DEFAULT_LIMITS,
                   listener: BulkListener | None = None,
                   config: BulkConfig = DEFAULT_CONFIG,
                   check: Check | None = None,
                   out: Sequence[np.ndarray] | None = None,
                   on_progress: Progress | None = None) -> list[np.ndarray]:
    """Send ``ours`` and receive the peer's arrays, both directions at once, in one
    session (one key agreement however many arrays); the peer calls `exchange` too.
    ``check`` and ``out`` as for `receive_arrays`; ``on_progress`` reports the inbound
    direction."""
    if out is not None:
        check = _same_as([_check_out(o) for o in out])
    result = await _Session(stream, config, listener, received_progress=on_progress).run(
        outgoing=list(ours), receive=True, limits=limits, check=check,
        out=list(out) if out is not None else None)
    assert result is not None
    return result


async def send_array(stream: Stream, array: np.ndarray, *, config: BulkConfig = DEFAULT_CONFIG,
                     on_progress: Progress | None = None) -> None:
    """`send_arrays` of one array."""
    await send_arrays(stream, [array], config=config, on_progress=on_progress)


async def receive_array(stream: Stream, *, limits: ArrayLimits = DEFAULT_LIMITS,
                        listener: BulkListener | None = None,
                        config: BulkConfig = DEFAULT_CONFIG,
                        expect: tuple[str, tuple[int, ...]] | None = None,
                        out: np.ndarray | None = None,
                        on_progress: Progress | None = None) -> np.ndarray:
    """`receive_arrays` of one array; ``expect=(dtype_str, shape)`` refuses anything
    else (``out`` implies its own)."""
    check = _same_as([(expect[0], tuple(expect[1]))]) if expect is not None else _one
    (array,) = await receive_arrays(stream, limits=limits, listener=listener, config=config,
                                    check=check, out=None if out is None else [out],
                                    on_progress=on_progress)
    return array


async def exchange_arrays(stream: Stream, ours: np.ndarray, *,
                          limits: ArrayLimits = DEFAULT_LIMITS,
                          listener: BulkListener | None = None,
                          config: BulkConfig = DEFAULT_CONFIG,
                          out: np.ndarray | None = None,
                          on_progress: Progress | None = None) -> np.ndarray:
    """`exchange` of one array each way, the peer's of the same dtype and shape as
    ``ours`` (a model both sides hold)."""
    spec, _ = prepare_array(ours)
    if out is not None and _check_out(out) != (spec.dtype, spec.shape):
        raise ValueError(f"out is {out.dtype.str}{list(out.shape)}, ours is "
                         f"{spec.dtype}{list(spec.shape)}")
    (theirs,) = await exchange(stream, [ours], limits=limits, listener=listener, config=config,
                               check=_same_as([(spec.dtype, spec.shape)]),
                               out=None if out is None else [out], on_progress=on_progress)
    return theirs


ArrayHandler = Callable[[str, list[np.ndarray]], Awaitable[None]]


def serve_bulk(network: PeerNetwork, on_arrays: ArrayHandler, *,
               listener: BulkListener | None = None, limits: ArrayLimits = DEFAULT_LIMITS,
               config: BulkConfig = DEFAULT_CONFIG) -> None:
    """Accept pushed arrays on `/lattice/bulk/2`: each push is received (side channel
    when a listener is given) and passed to ``await on_arrays(peer_id, arrays)``."""

    async def handler(stream: Stream) -> None:
        arrays = await receive_arrays(stream, limits=limits, listener=listener, config=config)
        await on_arrays(stream.remote_peer_id, arrays)

    network.set_stream_handler(PROTOCOL, handler)


async def push_arrays(network: PeerNetwork, peer_id: str, arrays: Sequence[np.ndarray], *,
                      config: BulkConfig = DEFAULT_CONFIG,
                      on_progress: Progress | None = None) -> None:
    """Open `/lattice/bulk/2` to ``peer_id`` and send ``arrays`` (see `serve_bulk`)."""
    stream = await network.open_stream(peer_id, PROTOCOL)
    try:
        await send_arrays(stream, arrays, config=config, on_progress=on_progress)
        await stream.close_write()
    except BaseException:
        await stream.reset()
        raise
    await stream.close()


async def push_array(network: PeerNetwork, peer_id: str, array: np.ndarray, *,
                     config: BulkConfig = DEFAULT_CONFIG,
                     on_progress: Progress | None = None) -> None:
    """`push_arrays` of one array."""
    await push_arrays(network, peer_id, [array], config=config, on_progress=on_progress)


# -- the session ----------------------------------------------------------------------------


Check = Callable[[list[ArraySpec]], None]
"""Judges the specs a peer offers, all at once; raises `ArrayFormatError` to refuse."""


def _same_as(expected: list[tuple[str, tuple[int, ...]]]) -> Check:
    def check(specs: list[ArraySpec]) -> None:
        got = [(s.dtype, s.shape) for s in specs]
        if got != expected:
            raise ArrayFormatError(f"expected {_describe(expected)}, offered {_describe(got)}")
    return check


def _one(specs: list[ArraySpec]) -> None:
    if len(specs) != 1:
        raise ArrayFormatError(f"expected one array, offered {len(specs)}")


def _describe(specs: list[tuple[str, tuple[int, ...]]]) -> str:
    return ", ".join(f"{d}{list(s)}" for d, s in specs[:4]) + (" ..." if len(specs) > 4 else "")


def _check_out(out: np.ndarray) -> tuple[str, tuple[int, ...]]:
    if not (isinstance(out, np.ndarray) and out.flags.c_contiguous and out.flags.writeable
            and out.dtype.str in WIRE_DTYPES):
        raise ValueError("out must be a writable C-contiguous little-endian numeric array")
    return out.dtype.str, tuple(int(d) for d in out.shape)


@contextlib.contextmanager
def _within(seconds: float, what: str) -> Iterator[None]:
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise BulkStalledError(f"no progress for {seconds:g} s while {what}") from None


_SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class _Session:
    """One run of the protocol on one control stream (proto/bulk.md, "Session")."""

    def __init__(self, stream: Stream, config: BulkConfig, listener: BulkListener | None, *,
                 sent_progress: Progress | None = None,
                 received_progress: Progress | None = None) -> None:
        self.stream = stream
        self.config = config
        self.listener = listener
        self.sent_progress = sent_progress
        self.received_progress = received_progress
        self._write_lock = trio.StrictFIFOLock()
        # what the protocol allows a sender to choose, not what we would choose
        self._max_frame = bf.STREAM_CHUNK_MAX + bf.TAG_BYTES + bf.FRAME_OVERHEAD
        self.peer = stream.remote_peer_id[-8:]
        # outbound progress, updated by the control reader
        self._acked = 0
        self._peer_done = False
        self._changed = trio.Event()
        # inbound: start and data frames, handed from the control reader to the receiver
        self._in_send: trio.MemorySendChannel[Any] | None = None
        self._in_recv: trio.MemoryReceiveChannel[Any] | None = None
        self._credited = 0
        self._in_window = 0
        self._sent = 0
        # Listening for the peer's `abort` after it has nothing else to send, until we
        # send our own `done` (cancelled just before, so no frame is half-read).
        self._abort_watch = trio.CancelScope()
        self._done_sent = False
        self._out: list[np.ndarray] | None = None

    async def _send(self, message: dict[str, Any]) -> None:
        async with self._write_lock:
            await send_frame(self.stream, message)

    async def _recv(self) -> Any:
        return await recv_frame(self.stream, max_bytes=self._max_frame)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, outgoing: list[np.ndarray] | None, receive: bool,
                  limits: ArrayLimits, check: Check | None,
                  out: list[np.ndarray] | None) -> list[np.ndarray] | None:
        self._out = out
        try:
            return await self._run(outgoing, receive, limits, check)
        except (BulkAbortedError, BulkRejectedError, BulkHeaderError):
            raise  # the peer already knows (it aborted, or a reject went out)
        except PeerError as e:
            # Tell the peer why, so it fails fast with a reason instead of a timeout.
            with trio.move_on_after(1.0):
                try:
                    await self._send(bf.abort(str(e)))
                except PeerError:
                    pass
            raise

    async def _run(self, outgoing: list[np.ndarray] | None, receive: bool,
                   limits: ArrayLimits, check: Check | None) -> list[np.ndarray] | None:
        specs: list[ArraySpec] | None = None
        srcs: list[memoryview] = []
        if outgoing is not None:
            if not 0 < len(outgoing) <= bf.MAX_ARRAYS:
                raise ValueError(f"a session sends 1 to {bf.MAX_ARRAYS} arrays")  # our bug
            specs, srcs = map(list, zip(*(prepare_array(a) for a in outgoing)))
        key = bf.EphemeralKey()
        our_hello = bf.hello(key.public, specs)
        with _within(self.config.handshake_timeout, "waiting for the peer's hello"):
            await self._send(our_hello)
            peer = parse_peer_input(bf.parse_hello, await self._recv_control())
        shared = parse_peer_input(key.exchange, peer.epk)
        sid = parse_peer_input(bf.session_id, our_hello, peer.wire)
        out_keys = bf.direction_keys(shared, sid, key.public)
        in_keys = bf.direction_keys(shared, sid, peer.epk)

        with contextlib.ExitStack() as stack:
            incoming: list[ArraySpec] | None = None
            expectation: _Expectation | None = None
            if peer.send is not None:
                incoming = await self._judge(peer.send, receive, limits, check)
                if (self.listener is not None and self.config.direct
                        and sum(s.nbytes for s in incoming)):
                    expectation = stack.enter_context(self.listener.expect(in_keys))
                addrs = self.listener.addresses if expectation is not None else []
                await self._send(bf.accept(addrs, self.config.stream_window_bytes))
            elif receive:
                raise RemoteProtocolError("peer offered no array")
            verdict = None
            if specs is not None:
                with _within(self.config.handshake_timeout, "waiting for the peer's verdict"):
                    verdict = parse_peer_input(bf.parse_verdict, await self._recv_control())
                if not verdict.accepted:
                    raise BulkRejectedError(verdict.reason)

            result: list[np.ndarray] = []
            if incoming is not None:
                depth = self._window_chunks(self.config.stream_window_bytes,
                                            bf.STREAM_CHUNK_MIN) + 2
                self._in_send, self._in_recv = trio.open_memory_channel(depth)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_control, specs is not None, incoming)
                    if specs is not None:
                        assert verdict is not None
                        nursery.start_soon(self._send_data, specs, srcs, verdict, sid, out_keys)
                    if incoming is not None:
                        nursery.start_soon(self._receive_data, incoming, expectation, in_keys,
                                           result)
            except BaseExceptionGroup as group:
                raise_peer_fault(group)
            log.debug("peer=%s sid=%s bulk session done: sent %s, received %s", self.peer,
                      sid.hex()[:12], specs, incoming)
            return result if incoming is not None else None

    async def _recv_control(self) -> Any:
        msg = await self._recv()
        if isinstance(msg, dict) and msg.get("t") == "abort":
            raise BulkAbortedError(parse_peer_input(bf.parse_abort, msg))
        return msg

    async def _judge(self, offered: list[Any], receive: bool, limits: ArrayLimits,
                     check: Check | None) -> list[ArraySpec]:
        """Accept the peer's array specs (each within ``limits``, their sum too, then
        ``check``) or send `reject` and raise BulkHeaderError."""
        try:
            if not receive:
                raise BulkFormatError("not expecting an array on this stream")
            specs = [parse_peer_input(parse_array_spec, o, limits) for o in offered]
            total = sum(s.nbytes for s in specs)
            if total > limits.max_bytes:
                raise ArrayFormatError(f"arrays of {total} bytes exceed limit {limits.max_bytes}")
            if check is not None:
                check(specs)
        except (BulkFormatError, ArrayFormatError, RemoteProtocolError) as e:
            await self._send(bf.reject(str(e)))
            raise BulkHeaderError(str(e)) from None
        return specs

    @staticmethod
    def _window_chunks(window_bytes: int, chunk: int) -> int:
        return max(1, window_bytes // (chunk + bf.TAG_BYTES))

    # -- control reader ------------------------------------------------------------------

    async def _read_control(self, sending: bool, incoming: list[ArraySpec] | None) -> None:
        """Demultiplex the control stream until it has nothing more to tell us: the
        peer's `done` (if we send) and its `start` plus all data frames (if we receive).
        Then, while we still owe our `done`, only an `abort` may come; we listen for it
        (so a sender that gives up frees a receiver parked in its progress callback)
        until `_receive_data` cancels the watch just before sending `done`. Reading thus
        stops at a frame boundary, and the stream stays usable for the caller."""
        need_done = sending
        need_inbound = incoming is not None
        expected_chunks: int | None = None
        got_chunks = 0
        while need_done or need_inbound:
            try:
                msg = await self._recv()
            except StreamClosedError:
                if need_inbound and expected_chunks is not None:
                    raise BulkTruncatedError(
                        f"control stream ended after {got_chunks} of {expected_chunks} "
                        "chunks") from None
                raise
            t = parse_peer_input(bf.message_type, msg)
            if t == "abort":
                raise BulkAbortedError(parse_peer_input(bf.parse_abort, msg))
            if t == "credit" and sending and not self._peer_done:
                self._acked = max(self._acked, parse_peer_input(bf.parse_credit, msg, self._sent))
                self._notify()
            elif t == "done" and need_done:
                need_done = False
                self._peer_done = True
                self._notify()
            elif t == "start" and need_inbound and expected_chunks is None:
                assert incoming is not None and self._in_send is not None
                mode, chunk = parse_peer_input(bf.parse_start, msg)
                expected_chunks = (bf.total_chunks([a.nbytes for a in incoming], chunk)
                                   if mode == "stream" else 0)
                if mode == "direct":
                    need_inbound = False
                self._in_window = self._window_chunks(self.config.stream_window_bytes, chunk)
                self._in_send.send_nowait(("start", mode, chunk))
                if expected_chunks == 0:
                    need_inbound = False
            elif t == "data" and need_inbound and expected_chunks is not None:
                assert self._in_send is not None
                got_chunks += 1
                # The peer may only run `window` chunks ahead of what we credited; the
                # channel is sized for that, so this never blocks (or starves the reads
                # our own outbound direction depends on).
                if got_chunks > self._credited + self._in_window:
                    raise RemoteProtocolError("peer sent data beyond the credit we granted")
                self._in_send.send_nowait(msg)
                if got_chunks == expected_chunks:
                    need_inbound = False
            else:
                raise RemoteProtocolError(f"unexpected {t!r} message in bulk session")
        if incoming is not None and not self._done_sent:
            with self._abort_watch:
                msg = await self._recv()
                if parse_peer_input(bf.message_type, msg) == "abort":
                    raise BulkAbortedError(parse_peer_input(bf.parse_abort, msg))
                raise RemoteProtocolError(f"unexpected {msg.get('t')!r} after the data")

    # -- sending -------------------------------------------------------------------------

    async def _send_data(self, specs: list[ArraySpec], srcs: list[memoryview],
                         verdict: bf.Verdict, sid: bytes, keys: bf.DirectionKeys) -> None:
        aead = AESGCM(keys.data_key)
        sizes = [spec.nbytes for spec in specs]
        conn = None
        if verdict.addrs and self.config.direct and sum(sizes):
            conn = await _connect(verdict.addrs, self.config.connect_timeout)
            if conn is None:
                log.info("peer=%s sid=%s side channel %s unreachable; using the stream",
                         self.peer, sid.hex()[:12], verdict.addrs)
        if conn is not None:
            async with conn:
                what = "waiting for the receiver's confirmation"
                try:
                    await conn.send_all(bf.channel_hello(keys))
                    await self._send(bf.start("direct", self.config.chunk_bytes))
                    await self._pump_direct(conn, aead, srcs, sizes)
                except _SOCKET_ERRORS as e:
                    # A receiver that fails closes the channel and sends `abort` with the
                    # reason over the control stream; its word (abort or done) decides.
                    what = f"waiting for the receiver's verdict after the side channel failed ({e})"
                await self._wait_done(what)
        else:
            await self._send(bf.start("stream", self.config.stream_chunk_bytes))
            await self._pump_stream(aead, srcs, sizes, verdict.window)
            await self._wait_done("waiting for the receiver's confirmation")

    async def _wait_done(self, what: str) -> None:
        with _within(self.config.idle_timeout, what):
            while not self._peer_done:
                await self._changed.wait()

    async def _pump_direct(self, conn: trio.SocketStream, aead: AESGCM,
                           srcs: list[memoryview], sizes: list[int]) -> None:
        chunk = self.config.chunk_bytes
        scratch = memoryview(bytearray(chunk + bf.TAG_BYTES))
        total, done = sum(sizes), 0
        for number, index, start, stop in bf.chunk_spans(sizes, chunk):
            sealed = scratch[:stop - start + bf.TAG_BYTES]
            aead.encrypt_into(bf.nonce(number), srcs[index][start:stop], None, sealed)
            with _within(self.config.idle_timeout, "sending on the side channel"):
                await conn.send_all(sealed)
            done += stop - start
            if self.sent_progress is not None:
                await self.sent_progress(done, total)

    async def _pump_stream(self, aead: AESGCM, srcs: list[memoryview], sizes: list[int],
                           window_bytes: int) -> None:
        chunk = self.config.stream_chunk_bytes
        window = self._window_chunks(window_bytes, chunk)
        total, done = sum(sizes), 0
        for number, index, start, stop in bf.chunk_spans(sizes, chunk):
            with _within(self.config.idle_timeout, "waiting for credit"):
                while number - self._acked >= window:
                    await self._changed.wait()
            sealed = aead.encrypt(bf.nonce(number), srcs[index][start:stop], None)
            self._sent = number + 1
            with _within(self.config.idle_timeout, "sending on the stream"):
                await self._send(bf.data(number, sealed))
            done += stop - start
            if self.sent_progress is not None:
                await self.sent_progress(done, total)

    # -- receiving -----------------------------------------------------------------------

    async def _receive_data(self, specs: list[ArraySpec], expectation: _Expectation | None,
                            keys: bf.DirectionKeys, result: list[np.ndarray]) -> None:
        assert self._in_recv is not None
        with _within(self.config.idle_timeout, "waiting for the sender to start"):
            _, mode, chunk = await self._in_recv.receive()
        arrays = self._out if self._out is not None else [empty_like_spec(s) for s in specs]
        dsts = [byte_view(a) for a in arrays]
        sizes = [s.nbytes for s in specs]
        aead = AESGCM(keys.data_key)
        if mode == "direct":
            if expectation is None:
                raise RemoteProtocolError("peer chose the side channel we did not offer")
            with _within(self.config.idle_timeout, "waiting for the side channel"):
                conn = await expectation.wait()
            async with conn:
                await self._pump_in_direct(conn, aead, dsts, sizes, chunk)
        else:
            await self._pump_in_stream(aead, dsts, sizes, chunk)
        self._done_sent = True
        self._abort_watch.cancel()
        await self._send(bf.DONE)
        result.extend(arrays)

    async def _pump_in_direct(self, conn: trio.SocketStream, aead: AESGCM,
                              dsts: list[memoryview], sizes: list[int], chunk: int) -> None:
        sock = conn.socket
        scratch = memoryview(bytearray(chunk + bf.TAG_BYTES))
        total, done = sum(sizes), 0
        for number, index, start, stop in bf.chunk_spans(sizes, chunk):
            sealed = scratch[:stop - start + bf.TAG_BYTES]
            filled = 0
            with _within(self.config.idle_timeout, "receiving on the side channel"):
                while filled < len(sealed):
                    try:
                        n = await sock.recv_into(sealed[filled:])
                    except OSError as e:
                        raise BulkTruncatedError(f"side channel failed: {e}") from None
                    if n == 0:
                        raise BulkTruncatedError(
                            f"side channel ended at byte {done + filled} of {total}")
                    filled += n
            try:
                aead.decrypt_into(bf.nonce(number), sealed, None, dsts[index][start:stop])
            except InvalidTag:
                raise BulkIntegrityError(f"chunk {number} failed authentication") from None
            done += stop - start
            if self.received_progress is not None:
                await self.received_progress(done, total)

    async def _pump_in_stream(self, aead: AESGCM, dsts: list[memoryview], sizes: list[int],
                              chunk: int) -> None:
        assert self._in_recv is not None
        count = bf.total_chunks(sizes, chunk)
        # Credit in quarter windows: the sender never idles, and credit frames stay rare.
        batch = max(1, self._window_chunks(self.config.stream_window_bytes, chunk) // 4)
        total, done = sum(sizes), 0
        for number, index, start, stop in bf.chunk_spans(sizes, chunk):
            with _within(self.config.idle_timeout, "receiving on the stream"):
                msg = await self._in_recv.receive()
            sealed = parse_peer_input(bf.parse_data, msg, number, stop - start + bf.TAG_BYTES)
            try:
                aead.decrypt_into(bf.nonce(number), sealed, None, dsts[index][start:stop])
            except InvalidTag:
                raise BulkIntegrityError(f"chunk {number} failed authentication") from None
            done += stop - start
            if self.received_progress is not None:
                await self.received_progress(done, total)
            if number + 1 < count and number + 1 - self._credited >= batch:
                self._credited = number + 1
                await self._send(bf.credit(number + 1))


_CONNECT_STAGGER = 0.25  # s between attempts, as in happy eyeballs (RFC 8305)


async def _connect(addrs: list[tuple[str, int]], timeout: float) -> trio.SocketStream | None:
    """The first of ``addrs`` that connects within ``timeout`` (all tried concurrently,
    each started a little after the previous, so the receiver's order is a preference
    and an unreachable first address costs a stagger, not a timeout), or None."""
    winner: list[trio.SocketStream] = []

    async def attempt(host: str, port: int, delay: float, nursery: trio.Nursery) -> None:
        await trio.sleep(delay)
        try:
            conn = await trio.open_tcp_stream(host, port)
        except OSError as e:
            log.debug("bulk side channel %s:%d: %s", host, port, e)
            return
        if winner:
            await conn.aclose()
            return
        winner.append(conn)
        nursery.cancel_scope.cancel()

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for n, (host, port) in enumerate(addrs):
                nursery.start_soon(attempt, host, port, n * _CONNECT_STAGGER, nursery)
    return winner[0] if winner else None


