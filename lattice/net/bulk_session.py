"""One run of `/lattice/bulk/2` on one control stream (proto/bulk.md, "Session"): the
hellos and key agreement, the verdicts, then the data of every array both ways - over
the side channel or, failing that, as credit-controlled frames on the stream.

Owns `Session` and the checks a receiver applies to offered arrays (`Check`). The public
calls (`lattice.net.bulk`) each run one. Must not import libp2p. Design notes (why a side
channel, why the AEAD runs on the event loop): `lattice.net.bulk`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lattice.core import bulk_frames as bf
from lattice.core.arrays import (
    ArrayFormatError,
    ArrayLimits,
    ArraySpec,
    byte_view,
    empty_like_spec,
    parse_array_spec,
    prepare_array,
)
from lattice.core.bulk_frames import BulkFormatError
from lattice.net.bulk_config import (
    BulkAbortedError,
    BulkConfig,
    BulkHeaderError,
    BulkIntegrityError,
    BulkRejectedError,
    BulkStalledError,
    BulkTruncatedError,
    Progress,
)
from lattice.net.bulk_listener import BulkListener, Expectation
from lattice.net.streams import (
    PeerError,
    RemoteProtocolError,
    Stream,
    StreamClosedError,
    parse_peer_input,
    raise_peer_fault,
    recv_frame,
    send_frame,
)

if TYPE_CHECKING:
    from lattice.net.shaping import ByteBudget

log = logging.getLogger("lattice.net.bulk")


Check = Callable[[list[ArraySpec]], None]
"""Judges the specs a peer offers, all at once; raises `ArrayFormatError` to refuse."""


@contextlib.contextmanager
def _within(seconds: float, what: str) -> Iterator[None]:
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise BulkStalledError(f"no progress for {seconds:g} s while {what}") from None


_SOCKET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class UnreachableChannels:
    """Side-channel offers this sender could not connect to, skipped for ``retry_after``
    seconds. A receiver behind a NAT that drops unsolicited TCP (a symmetric NAT maps
    each destination apart) offers the same unreachable address in every exchange, and
    each attempt would cost ``connect_timeout`` before the stream fallback: in a job,
    every round with that peer. Keyed by the offered addresses, not the peer: a peer
    that moves offers new ones and is tried again. At most ``max_entries`` (a peer
    offering a new address each time evicts the oldest, never grows us)."""

    def __init__(self, retry_after: float = 600.0, max_entries: int = 1024) -> None:
        self.retry_after = retry_after
        self.max_entries = max_entries
        self._until: dict[tuple[tuple[str, int], ...], float] = {}
        self.skipped = 0

    def known(self, addrs: list[tuple[str, int]]) -> bool:
        until = self._until.get(tuple(addrs))
        if until is None:
            return False
        if trio.current_time() >= until:
            del self._until[tuple(addrs)]
            return False
        self.skipped += 1
        return True

    def remember(self, addrs: list[tuple[str, int]]) -> None:
        key = tuple(addrs)
        self._until.pop(key, None)
        while len(self._until) >= self.max_entries:
            del self._until[next(iter(self._until))]  # the oldest
        self._until[key] = trio.current_time() + self.retry_after

    def statistics(self) -> dict[str, int]:
        return {"unreachable_offers": len(self._until), "skipped": self.skipped}


class Session:
    """One run of the protocol on one control stream (proto/bulk.md, "Session")."""

    def __init__(self, stream: Stream, config: BulkConfig, listener: BulkListener | None, *,
                 sent_progress: Progress | None = None,
                 received_progress: Progress | None = None,
                 budget: ByteBudget | None = None,
                 unreachable: UnreachableChannels | None = None) -> None:
        self.stream = stream
        self.unreachable = unreachable
        # the side channel is the one path of job bytes that crosses no stream of ours:
        # its pumps await the volunteer's rate limits themselves (lattice.net.shaping)
        self.budget = budget
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
            expectation: Expectation | None = None
            if peer.send is not None:
                incoming = await self._judge(peer.send, receive, limits, check)
                if (self.listener is not None and self.config.direct
                        and sum(s.nbytes for s in incoming) > 0):
                    expectation = stack.enter_context(self.listener.expect(in_keys))
                addrs = self.listener.addresses \
                    if expectation is not None and self.listener is not None else []
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
        if (verdict.addrs and self.config.direct and sum(sizes)
                and not (self.unreachable is not None and self.unreachable.known(verdict.addrs))):
            conn = await _connect(verdict.addrs, self.config.connect_timeout)
            if conn is None:
                log.info("peer=%s sid=%s side channel %s unreachable; using the stream",
                         self.peer, sid.hex()[:12], verdict.addrs)
                if self.unreachable is not None:
                    self.unreachable.remember(verdict.addrs)
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
                if self.budget is not None:
                    await self.budget.send(len(sealed))
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

    async def _receive_data(self, specs: list[ArraySpec], expectation: Expectation | None,
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
                if self.budget is not None:
                    await self.budget.receive(len(sealed))
            done = await self._open_chunk(aead, number, sealed, dsts[index][start:stop],
                                          done, total)

    async def _open_chunk(self, aead: AESGCM, number: int, sealed: Any, dst: memoryview,
                          done: int, total: int) -> int:
        """Decrypt one received chunk into its place; reports and returns the bytes done."""
        try:
            aead.decrypt_into(bf.nonce(number), sealed, None, dst)
        except InvalidTag:
            raise BulkIntegrityError(f"chunk {number} failed authentication") from None
        done += dst.nbytes
        if self.received_progress is not None:
            await self.received_progress(done, total)
        return done

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
            done = await self._open_chunk(aead, number, sealed, dsts[index][start:stop],
                                          done, total)
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
