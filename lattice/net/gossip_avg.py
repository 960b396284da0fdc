"""`/lattice/gossip-avg/1`: one pairwise, atomic averaging exchange inside a train job.

Owns the protocol driver (offer -> accept | busy -> tensors both ways -> commit -> ack,
and the ``status`` query that settles an exchange whose ack was lost), the
`TensorTransport` seam with its default framed implementation and the `/lattice/bulk/1`
one (`BulkTensorTransport`), `AveragingParty` (one
participant's side: its parameters, when it can take part, what it committed) and the
penalties for peers that send garbage. Spec: proto/gossip-avg.md. Must not import
libp2p: it speaks through `lattice.net.streams`. The math is `lattice.learn.gossip`'s
(`ParamChannel.prepare/receive/commit`, `pair_weights`, `pair_average`), run through a
``compute`` callable (a worker thread in the daemon) so the event loop moves bytes only.

Atomicity (the argument is in the spec, section "Commit point"): nothing is mutated
before the commit point; the *responder's receipt of ``commit``* is the commit point.
The responder applies the average only after reading ``commit``; the initiator applies
only after reading ``ack``, or, when the ack is lost, after the responder answers a
``status`` query with ``committed``. A responder that never read ``commit`` records the
exchange as aborted, so a later query cannot flip it. The one remaining window (the
responder applied, the ack was lost and the responder stays unreachable for
``resolve_timeout``) leaves the initiator with its own parameters; it is counted as
``in_doubt_kept``.

Failure policy: a per-peer exchange catches exactly `PeerError` (the peer vanished,
timed out or broke the protocol) and `InvalidTensor` (it sent a bad tensor: we abort,
and penalize it); both leave our parameters untouched. Anything else is a bug and
propagates.
"""

from __future__ import annotations

import enum
import logging
import math
import secrets
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import trio

from lattice.core.bulk_frames import BulkLimits
from lattice.learn.gossip import Outgoing, ParamChannel, pair_average, pair_weights
from lattice.learn.optim import OuterNesterov
from lattice.learn.validate import InvalidTensor, NormBound
from lattice.net import bulk
from lattice.net.streams import (
    CountingStream,
    PeerError,
    PeerNetwork,
    RemoteProtocolError,
    Stream,
    read_into,
    recv_frame,
    run_both,
    send_frame,
)

log = logging.getLogger("lattice.net.gossip_avg")

PROTOCOL = "/lattice/gossip-avg/1"
VERSION = 1
MAX_CONTROL_BYTES = 64 * 1024
WRITE_CHUNK = 1 << 20
MAX_ITEMS = 16
MAX_NDIM = 32
MAX_NAME_CHARS = 64
MAX_REASON_CHARS = 64
MAX_SAMPLES = 2**53
WIRE_DTYPES = ("float32", "float16", "int8", "int64", "uint32")

T = TypeVar("T")
Compute = Callable[[Callable[[], Any]], Awaitable[Any]]


async def compute_inline(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the event loop (tests, tiny models). The daemon uses a thread."""
    await trio.lowlevel.checkpoint()
    return fn()


def thread_compute(limiter: trio.CapacityLimiter | None = None) -> Compute:
    """Run math in a worker thread, at most ``limiter`` at a time."""
    async def run(fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=limiter)
    return run


class Outcome(str, enum.Enum):
    COMMITTED = "committed"  # both sides applied the average
    BUSY = "busy"            # the peer (or we) could not take part now
    ABORTED = "aborted"      # the peer refused our tensor or aborted; nothing applied
    REJECTED = "rejected"    # we refused the peer's tensor (it is penalized)
    FAILED = "failed"        # the peer vanished, timed out or broke the protocol
    IN_DOUBT_KEPT = "in_doubt_kept"  # ack lost and unresolved: we kept our parameters


class TensorFormatError(RemoteProtocolError):
    """The peer announced arrays outside what we accept (names, dtypes, sizes)."""


@dataclass(frozen=True)
class GossipConfig:
    """Timeouts and limits (daemon config section ``[jobs.gossip]``)."""

    accept_timeout: float = 15.0
    """Initiator: how long to wait for ``accept``/``busy`` (> hold_timeout)."""
    hold_timeout: float = 10.0
    """Responder: how long an offer is held while we finish a training round."""
    step_timeout: float = 30.0
    """Each later step: the tensors, the commit, the ack."""
    resolve_timeout: float = 10.0
    """Initiator: how long to keep asking for the outcome of an exchange whose ack was lost."""
    retry_pause: float = 0.05
    """Mean idle pause before retrying when every candidate was busy."""
    max_payload_bytes: int = 1 << 31
    """Largest tensor payload accepted from a peer (the job's model bounds it too)."""
    outcome_memory: int = 1024
    """Responder outcomes remembered for ``status`` queries."""
    penalty_backoff: float = 60.0
    """A peer that sent garbage is not chosen, nor served, for this long (doubling)."""
    unreachable_backoff: float = 1.0
    """A peer we could not reach is skipped for this long (doubling, up to 30 s)."""


# -- tensor transport ---------------------------------------------------------------------


class TensorTransport(Protocol):
    """Moves a dict of named numpy arrays both ways over a stream; ``name`` identifies
    its wire format in the offer/accept negotiation.

    ``expect`` maps every name the peer must send to its dtype; anything else is refused
    before allocation (raise `RemoteProtocolError`). Returns (theirs, bytes sent, bytes
    received). Both sides call ``exchange`` at the same point of the protocol, and it
    must leave the stream at a frame boundary."""

    name: str

    async def exchange(self, stream: Stream, ours: Mapping[str, np.ndarray], *,
                       expect: Mapping[str, np.dtype], max_bytes: int
                       ) -> tuple[dict[str, np.ndarray], int, int]: ...


class FramedTensorTransport:
    """The default transport: a msgpack header frame listing (name, dtype, shape,
    nbytes), then each array's raw little-endian bytes in 1 MiB writes; the reader
    checks the header against ``expect`` and ``max_bytes`` and reads into a
    preallocated array. Both directions run at once, so neither side's writes wait on
    the other's reads."""

    name = "framed"

    async def exchange(self, stream: Stream, ours: Mapping[str, np.ndarray], *,
                       expect: Mapping[str, np.dtype], max_bytes: int
                       ) -> tuple[dict[str, np.ndarray], int, int]:
        result: dict[str, Any] = {}

        async def send() -> None:
            result["sent"] = await self.send_arrays(stream, ours)

        async def receive() -> None:
            result["theirs"], result["received"] = await self.receive_arrays(
                stream, expect=expect, max_bytes=max_bytes)

        await run_both(send, receive)
        return result["theirs"], result["sent"], result["received"]

    async def send_arrays(self, stream: Stream, arrays: Mapping[str, np.ndarray]) -> int:
        items, views = [], []
        for name, arr in arrays.items():
            a = np.asarray(arr)
            if a.dtype.name not in WIRE_DTYPES:
                raise ValueError(f"cannot send dtype {a.dtype}")  # our bug, not the peer's
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
            items.append([name, a.dtype.name, [int(s) for s in a.shape], int(a.nbytes)])
            views.append(memoryview(a).cast("B"))
        header = {"t": "arrays", "items": items}
        await send_frame(stream, header)
        sent = 0
        for view in views:
            for start in range(0, len(view), WRITE_CHUNK):
                await stream.write(view[start:start + WRITE_CHUNK])
            sent += len(view)
        return sent

    async def receive_arrays(self, stream: Stream, *, expect: Mapping[str, np.dtype] | None,
                             max_bytes: int) -> tuple[dict[str, np.ndarray], int]:
        header = await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES)
        specs = parse_array_header(header, expect=expect, max_bytes=max_bytes)
        out: dict[str, np.ndarray] = {}
        total = 0
        for name, dtype, shape in specs:
            arr = np.empty(shape, dtype=dtype.newbyteorder("<"))
            if arr.nbytes:
                await read_into(stream, memoryview(arr).cast("B"))
            out[name] = arr.astype(dtype, copy=False)
            total += arr.nbytes
        return out, total


class BulkTensorTransport:
    """Big arrays through `/lattice/bulk/1`'s `exchange_arrays` (AES-GCM over a raw TCP
    side channel when the peer offers one, else credit-controlled chunks on the
    stream); headers and small arrays (shapes, scales) framed as above.

    Both sides first swap `arrays` headers; then, for each array in header order, an
    array whose dtype and shape are the same on both sides and that holds at least
    ``min_bulk_bytes`` goes through bulk, any other one as raw bytes on the stream. The
    choice depends only on the two headers, which both sides hold, so they agree."""

    name = "bulk"

    def __init__(self, *, listener: Any = None, config: Any = None, min_bulk_bytes: int = 64 * 1024) -> None:
        self.listener = listener
        self.config = config
        self.min_bulk_bytes = min_bulk_bytes

    async def exchange(self, stream: Stream, ours: Mapping[str, np.ndarray], *,
                       expect: Mapping[str, np.dtype], max_bytes: int
                       ) -> tuple[dict[str, np.ndarray], int, int]:
        arrays = {n: np.ascontiguousarray(a, dtype=np.asarray(a).dtype.newbyteorder("<")) for n, a in ours.items()}
        got: dict[str, Any] = {}

        async def send_header() -> None:
            await send_frame(stream, {"t": "arrays", "items": [
                [n, a.dtype.name, [int(x) for x in a.shape], int(a.nbytes)] for n, a in arrays.items()]})

        async def recv_header() -> None:
            got["specs"] = parse_array_header(await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES),
                                              expect=expect, max_bytes=max_bytes)

        await run_both(send_header, recv_header)
        theirs: dict[str, np.ndarray] = {}
        sent = received = 0
        limits = BulkLimits(max_bytes=max(1, max_bytes))
        kwargs = {"listener": self.listener, **({"config": self.config} if self.config is not None else {})}
        for name, dtype, shape in got["specs"]:
            mine = arrays[name]
            if mine.dtype == dtype and mine.shape == shape and mine.nbytes >= self.min_bulk_bytes:
                arr = await bulk.exchange_arrays(stream, mine, limits=limits, **kwargs)
                theirs[name] = arr.astype(dtype, copy=False)
            else:
                buf = np.empty(shape, dtype=dtype.newbyteorder("<"))
                view = memoryview(mine).cast("B")

                async def write(view: memoryview = view) -> None:
                    for start in range(0, len(view), WRITE_CHUNK):
                        await stream.write(view[start:start + WRITE_CHUNK])

                async def read(buf: np.ndarray = buf) -> None:
                    if buf.nbytes:
                        await read_into(stream, memoryview(buf).cast("B"))

                await run_both(write, read)
                theirs[name] = buf.astype(dtype, copy=False)
            sent += mine.nbytes
            received += theirs[name].nbytes
        return theirs, sent, received


def parse_array_header(header: Any, *, expect: Mapping[str, np.dtype] | None,
                       max_bytes: int) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """Validate an ``arrays`` header; raises TensorFormatError before any allocation."""
    if not isinstance(header, dict) or header.get("t") != "arrays":
        raise TensorFormatError("expected an 'arrays' header")
    items = header.get("items")
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise TensorFormatError(f"'items' must be a list of at most {MAX_ITEMS}")
    out, names, total = [], set(), 0
    for item in items:
        if not (isinstance(item, list) and len(item) == 4):
            raise TensorFormatError("each item is [name, dtype, shape, nbytes]")
        name, dtype_name, shape, nbytes = item
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or name in names:
            raise TensorFormatError("bad or duplicate array name")
        if dtype_name not in WIRE_DTYPES:
            raise TensorFormatError(f"dtype {str(dtype_name)[:16]!r} not accepted")
        dtype = np.dtype(dtype_name)
        if expect is not None and (name not in expect or np.dtype(expect[name]) != dtype):
            raise TensorFormatError(f"unexpected array {name!r} of {dtype_name}")
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
                and all(type(s) is int and 0 <= s <= max_bytes for s in shape)):
            raise TensorFormatError("bad shape")
        size = math.prod(shape) * dtype.itemsize
        if type(nbytes) is not int or nbytes != size:
            raise TensorFormatError("nbytes does not match dtype and shape")
        total += size
        if total > max_bytes:
            raise TensorFormatError(f"arrays exceed {max_bytes} bytes")
        names.add(name)
        out.append((name, dtype, tuple(shape)))
    if expect is not None and names != set(expect):
        raise TensorFormatError(f"arrays {sorted(names)}, expected {sorted(expect)}")
    return out


# -- one participant's side ---------------------------------------------------------------


class _Held:
    """An offer we hold while our training round finishes."""

    __slots__ = ("xid", "go", "state")

    def __init__(self, xid: str) -> None:
        self.xid = xid
        self.go = trio.Event()
        self.state = "waiting"  # -> "go" (we take part) | "expired" (answer busy)


class AveragingParty:
    """One participant of one job, as the averaging protocol sees it.

    Holds the parameters (through ``participant``: a `lattice.learn.simulate.Participant`,
    i.e. trainer, channel, outer optimizer), the roster, and when the participant can
    take part: never while it trains (an offer is then *held* until the round ends, at
    most ``hold_timeout``), one exchange at a time, never after it finished. The runner
    trains only through `train`, so parameters change only there and in a committed
    exchange."""

    def __init__(self, job_id: str, me: str, roster: list[str], participant: Any, *,
                 weighting: str = "uniform", bound: NormBound | None = NormBound(),
                 compute: Compute = compute_inline) -> None:
        self.job_id = job_id
        self.me = me
        self.roster = frozenset(roster) - {me}
        self.participant = participant
        self.weighting = weighting
        self.bound = bound
        self.compute = compute
        self.training = False
        self.closed = False
        self.exchange: str | None = None
        self.held: _Held | None = None
        self.mixed = False  # averaged since the current round started
        self._idle = trio.Event()
        self._idle.set()
        self._mixed_event = trio.Event()
        self.stats: Counter[str] = Counter()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.partners: set[str] = set()

    # parameters ---------------------------------------------------------------------------
    @property
    def params(self) -> np.ndarray:
        return self.participant.trainer.params

    @property
    def samples(self) -> int:
        return int(self.participant.trainer.samples_seen)

    @property
    def channel(self) -> ParamChannel:
        return self.participant.channel

    def expected_payload(self) -> dict[str, np.dtype]:
        return {**self.channel.codec.payload_dtypes, "shape": np.dtype(np.int64)}

    def max_payload_bytes(self, config: GossipConfig) -> int:
        # any codec's payload for this model is at most ~2x the float32 parameters
        return min(config.max_payload_bytes, 2 * self.params.nbytes + 4096)

    # coordination -------------------------------------------------------------------------
    def busy_reason(self) -> str | None:
        if self.closed:
            return "finished"
        if self.exchange is not None or self.held is not None:
            return "exchange"
        return None

    def begin(self, xid: str) -> None:
        if self.exchange is not None:
            raise AssertionError(f"exchange {self.exchange} still running")  # our bug
        self.exchange = xid
        self._idle = trio.Event()

    def end(self) -> None:
        self.exchange = None
        self._idle.set()

    async def wait_idle(self) -> None:
        while self.exchange is not None:
            await self._idle.wait()

    @asynccontextmanager
    async def exclusive(self, why: str) -> AsyncIterator[None]:
        """Hold the exchange slot: no average swaps the parameters until the block ends
        (a checkpoint reads them consistently under it)."""
        await self.wait_idle()
        self.begin(why)
        try:
            yield
        finally:
            self.end()

    async def train(self, fn: Callable[[], T]) -> T:
        """Run one training round (``fn``, through ``compute``); offers arriving
        meanwhile are held and served as soon as it returns."""
        async with self.training_round():
            return await self.compute(fn)

    @asynccontextmanager
    async def training_round(self) -> AsyncIterator[None]:
        """A training round that runs elsewhere for the duration of the block (an
        attached loop in the user's process): offers are held meanwhile and served as
        soon as it ends, exactly as during `train`."""
        await self.wait_idle()
        self.new_round()
        self.training = True
        try:
            yield
        finally:
            self.training = False
            self._release_held()

    def new_round(self) -> None:
        """A round starts: whether a peer averaged with us (`mixed`) counts afresh."""
        self.mixed = False
        self._mixed_event = trio.Event()

    def _release_held(self) -> None:
        held, self.held = self.held, None
        if held is not None and held.state == "waiting" and not self.closed:
            held.state = "go"
            self.begin(held.xid)  # reserved for the held offer: no one slips in first
            held.go.set()

    def note_mixed(self) -> None:
        self.mixed = True
        self._mixed_event.set()

    async def wait_mixed(self) -> None:
        await self._mixed_event.wait()

    def close(self) -> None:
        """Take part in no more exchanges (finished training, cancelled, stopped)."""
        self.closed = True
        held, self.held = self.held, None
        if held is not None and held.state == "waiting":
            held.state = "expired"
            held.go.set()

    # the math (pure, run through compute) ------------------------------------------------
    def _mix(self, out: Outgoing, payload: dict[str, np.ndarray], peer_samples: int
             ) -> np.ndarray:
        """Validate the peer's payload and compute the average; mutates nothing.
        Raises InvalidTensor."""
        theirs = self.channel.receive(payload, self.params, self.bound)
        w_own, w_peer = pair_weights(self.samples, peer_samples, self.weighting)
        return pair_average(out.estimate, theirs, w_own, w_peer)

    def _apply(self, out: Outgoing, average: np.ndarray) -> None:
        """The commit: adopt the average (through the outer step, if any)."""
        outer: OuterNesterov | None = self.participant.outer
        self.participant.trainer.params = outer.step(average) if outer is not None else average
        self.channel.commit(out)

    def statistics(self) -> dict[str, Any]:
        return {"job": self.job_id, **self.stats, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "partners": len(self.partners)}


# -- peer health --------------------------------------------------------------------------


class PeerHealth:
    """Who not to choose (or serve) for a while: penalized senders of garbage, and
    peers we could not reach (exponential backoff, reset on success)."""

    def __init__(self, config: GossipConfig) -> None:
        self.config = config
        self._penalized: dict[str, tuple[float, float]] = {}  # peer -> (until, backoff)
        self._unreachable: dict[str, tuple[float, float]] = {}
        self.penalties: Counter[str] = Counter()  # reason -> count
        self.penalized_peers: Counter[str] = Counter()

    def penalize(self, peer: str, reason: str, now: float) -> None:
        _, last = self._penalized.get(peer, (0.0, self.config.penalty_backoff / 2))
        backoff = min(last * 2, 3600.0)
        self._penalized[peer] = (now + backoff, backoff)
        self.penalties[reason] += 1
        self.penalized_peers[peer] += 1
        log.warning("peer=%s gossip-avg penalized (%s); ignored for %.0f s", peer, reason, backoff)

    def unreachable(self, peer: str, now: float) -> None:
        _, last = self._unreachable.get(peer, (0.0, self.config.unreachable_backoff / 2))
        backoff = min(last * 2, 30.0)
        self._unreachable[peer] = (now + backoff, backoff)

    def reachable(self, peer: str) -> None:
        self._unreachable.pop(peer, None)

    def is_penalized(self, peer: str, now: float) -> bool:
        until = self._penalized.get(peer)
        return until is not None and now < until[0]

    def blocked(self, peer: str, now: float) -> bool:
        if self.is_penalized(peer, now):
            return True
        until = self._unreachable.get(peer)
        return until is not None and now < until[0]

    def statistics(self) -> dict[str, Any]:
        return {"penalties": dict(self.penalties), "penalized_peers": dict(self.penalized_peers),
                "unreachable": len(self._unreachable)}


# -- messages ---------------------------------------------------------------------------------


def _xid() -> str:
    return secrets.token_hex(16)


def _is_id(v: Any, max_chars: int = 128) -> bool:
    return isinstance(v, str) and 0 < len(v) <= max_chars and v.isascii() and v.isprintable()


def _expect(msg: Any, kinds: tuple[str, ...], xid: str | None) -> dict[str, Any]:
    if not isinstance(msg, dict) or msg.get("t") not in kinds:
        raise RemoteProtocolError(f"expected one of {kinds}, got {str(msg)[:80]}")
    if xid is not None and msg.get("xid") != xid:
        raise RemoteProtocolError("message for another exchange id")
    return msg


def _samples_of(msg: dict[str, Any]) -> int:
    samples = msg.get("samples")
    if type(samples) is not int or not 0 <= samples <= MAX_SAMPLES:
        raise RemoteProtocolError("samples must be an integer in [0, 2^53]")
    return samples


def _reason(msg: dict[str, Any]) -> str:
    r = msg.get("reason")
    return r[:MAX_REASON_CHARS] if isinstance(r, str) else "?"


# -- the service ------------------------------------------------------------------------------


class GossipAverager:
    """The running `/lattice/gossip-avg/1` service (what `serve_gossip_avg` hands back)."""

    def __init__(self, network: PeerNetwork, config: GossipConfig, transport: TensorTransport) -> None:
        self.network = network
        self.config = config
        self.transport = transport
        # what we can speak, preferred first; "framed" always works
        self.transports: dict[str, TensorTransport] = {transport.name: transport}
        self.transports.setdefault("framed", FramedTensorTransport())
        self.health = PeerHealth(config)
        self._parties: dict[str, AveragingParty] = {}
        # (initiator, xid) -> "pending" | "committed" | "aborted", oldest first
        self._outcomes: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    # registry -----------------------------------------------------------------------------
    def register(self, party: AveragingParty) -> None:
        self._parties[party.job_id] = party

    def unregister(self, job_id: str) -> None:
        party = self._parties.pop(job_id, None)
        if party is not None:
            party.close()

    # initiator ------------------------------------------------------------------------------
    async def average_once(self, party: AveragingParty, candidates: Callable[[], list[str]], *,
                           patience: float, rng: Any) -> str:
        """AD-PSGD style: average with one random live candidate; busy -> try another;
        when all are busy, wait idle for a jittered pause (so others can reach us) and
        retry until ``patience`` runs out. Returns "served" (a peer averaged with us
        meanwhile), "committed" or "skipped"."""
        await party.wait_idle()  # an offer held during training is served first
        if party.mixed:
            return "served"
        deadline = trio.current_time() + patience
        while True:
            now = trio.current_time()
            peers = [p for p in candidates() if p != party.me and not self.health.blocked(p, now)]
            rng.shuffle(peers)
            for peer in peers:
                await party.wait_idle()
                if party.mixed:
                    return "served"
                if await self.initiate(party, peer) == Outcome.COMMITTED:
                    return "committed"
            if party.mixed:
                return "served"
            if trio.current_time() >= deadline or not peers:
                party.stats["skipped"] += 1
                return "skipped"
            with trio.move_on_after(rng.uniform(0.5, 1.5) * self.config.retry_pause):
                await party.wait_mixed()
            await party.wait_idle()
            if party.mixed:
                return "served"

    async def initiate(self, party: AveragingParty, peer: str) -> Outcome:
        """One exchange with ``peer``, us initiating. Never raises for the peer's faults."""
        if party.busy_reason() is not None or party.training:
            return Outcome.BUSY
        xid = _xid()
        party.begin(xid)
        try:
            outcome = await self._initiate(party, peer, xid)
        finally:
            party.end()
        self.counts[f"initiated_{outcome.value}"] += 1
        party.stats[outcome.value] += 1
        return outcome

    async def _initiate(self, party: AveragingParty, peer: str, xid: str) -> Outcome:
        cfg = self.config
        try:
            raw = await self.network.open_stream(peer, PROTOCOL)
        except PeerError as e:
            log.debug("peer=%s xid=%s gossip-avg unreachable: %s", peer, xid, e)
            self.health.unreachable(peer, trio.current_time())
            return Outcome.FAILED
        stream = CountingStream(raw)
        commit_sent = False
        out: Outgoing | None = None
        average: np.ndarray | None = None
        try:
            with trio.fail_after(cfg.accept_timeout):
                await send_frame(stream, {"t": "offer", "v": VERSION, "job": party.job_id, "xid": xid,
                                          "samples": party.samples, "codec": party.channel.codec.spec,
                                          "transports": list(self.transports)})
                reply = _expect(await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES),
                                ("accept", "busy"), xid)
            self.health.reachable(peer)
            if reply["t"] == "busy":
                await _quietly(stream.close)
                return Outcome.BUSY
            peer_samples = _samples_of(reply)
            transport = self.transports.get(reply.get("transport", "framed"))
            if transport is None:
                raise RemoteProtocolError(f"accepted with a transport we did not offer: {str(reply.get('transport'))[:32]}")
            try:
                out, average = await self._trade(stream, party, transport, peer_samples)
            except InvalidTensor as e:
                await self._refuse(stream, party, peer, xid, e)
                return Outcome.REJECTED
            commit_sent = True  # from here on the responder may have applied
            with trio.fail_after(cfg.step_timeout):
                await send_frame(stream, {"t": "commit", "xid": xid})
                final = _expect(await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES),
                                ("ack", "abort"), xid)
            if final["t"] == "abort":
                log.info("peer=%s xid=%s gossip-avg aborted by peer: %s", peer, xid, _reason(final))
                await _quietly(stream.close)
                return Outcome.ABORTED
            await self._commit(party, out, average)
            party.partners.add(peer)
            await _quietly(stream.close)
            return Outcome.COMMITTED
        except (PeerError, trio.TooSlowError) as e:
            await _quietly(stream.reset)
            if isinstance(e, RemoteProtocolError):
                self.health.penalize(peer, "protocol", trio.current_time())
            if not commit_sent:
                log.debug("peer=%s xid=%s gossip-avg failed before commit: %r", peer, xid, e)
                return Outcome.FAILED
            assert out is not None and average is not None
            log.info("peer=%s xid=%s gossip-avg ack lost (%r); asking for the outcome", peer, xid, e)
            if await self._resolve(party, peer, xid):
                await self._commit(party, out, average)
                party.partners.add(peer)
                self.counts["resolved_committed"] += 1
                return Outcome.COMMITTED
            self.counts["resolved_aborted"] += 1
            return Outcome.ABORTED
        finally:
            party.bytes_sent += stream.bytes_sent
            party.bytes_received += stream.bytes_received

    async def _resolve(self, party: AveragingParty, peer: str, xid: str) -> bool:
        """Ask the responder whether it applied ``xid``; True only on ``committed``."""
        delay = 0.05
        with trio.move_on_after(self.config.resolve_timeout):
            while True:
                try:
                    stream = await self.network.open_stream(peer, PROTOCOL)
                    try:
                        await send_frame(stream, {"t": "status", "v": VERSION, "job": party.job_id,
                                                  "xid": xid})
                        reply = _expect(await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES),
                                        ("outcome",), xid)
                    finally:
                        await _quietly(stream.close)
                    outcome = reply.get("outcome")
                    if outcome == "committed":
                        return True
                    if outcome in ("aborted", "unknown"):
                        return False
                    # "pending": the responder has not finished reading the old stream yet
                except PeerError as e:
                    log.debug("peer=%s xid=%s status query failed: %r", peer, xid, e)
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.counts["in_doubt_kept"] += 1
        party.stats[Outcome.IN_DOUBT_KEPT.value] += 1
        log.warning("peer=%s xid=%s gossip-avg outcome unknown after %.0f s; keeping our parameters",
                    peer, xid, self.config.resolve_timeout)
        return False

    async def _commit(self, party: AveragingParty, out: Outgoing, average: np.ndarray) -> None:
        # Shielded: once the commit is decided, a cancellation must not leave it half-done.
        with trio.CancelScope(shield=True):
            await party.compute(lambda: party._apply(out, average))
        party.stats["exchanges"] += 1

    async def _refuse(self, stream: CountingStream, party: AveragingParty, peer: str, xid: str,
                      error: InvalidTensor) -> None:
        self.rejected[error.reason] += 1
        party.stats[f"rejected_{error.reason}"] += 1
        self.health.penalize(peer, f"invalid_tensor:{error.reason}", trio.current_time())
        with trio.move_on_after(self.config.step_timeout):
            await _quietly_send(stream, {"t": "abort", "xid": xid, "reason": f"invalid_tensor:{error.reason}"})
        await _quietly(stream.reset)

    # responder ------------------------------------------------------------------------------
    async def handle(self, raw: Stream) -> None:
        """The stream handler: one offer (an exchange) or one status query per stream."""
        peer = raw.remote_peer_id
        stream = CountingStream(raw)
        try:
            with trio.fail_after(self.config.step_timeout):
                first = _expect(await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES),
                                ("offer", "status"), None)
            if first.get("v") != VERSION or not _is_id(first.get("job")) or not _is_id(first.get("xid"), 64):
                raise RemoteProtocolError("bad version, job or exchange id")
            if first["t"] == "status":
                state = self._outcomes.get((peer, first["xid"]), "unknown")
                await send_frame(stream, {"t": "outcome", "xid": first["xid"], "outcome": state})
                await _quietly(stream.close)
                return
            await self._respond(stream, peer, first)
        except (PeerError, trio.TooSlowError) as e:
            if isinstance(e, RemoteProtocolError):
                self.health.penalize(peer, "protocol", trio.current_time())
            log.debug("peer=%s gossip-avg inbound ended: %r", peer, e)
            await _quietly(stream.reset)

    async def _respond(self, stream: CountingStream, peer: str, offer: dict[str, Any]) -> None:
        cfg = self.config
        xid = offer["xid"]
        peer_samples = _samples_of(offer)
        party = self._parties.get(offer["job"])
        reason = None
        if party is None:
            reason = "unknown_job"
        elif peer not in party.roster:
            reason = "not_participant"
        elif self.health.is_penalized(peer, trio.current_time()):
            reason = "penalized"
        elif offer.get("codec") != party.channel.codec.spec:
            reason = "codec_mismatch"
        else:
            reason = party.busy_reason()
        transport = self._pick_transport(offer)
        if reason is None and transport is None:
            reason = "transport"
        if reason is None and party is not None and party.training:
            # hold the offer until our round ends (the initiator waits up to accept_timeout)
            held = party.held = _Held(xid)
            with trio.move_on_after(cfg.hold_timeout):
                await held.go.wait()
            if held.state != "go":
                held.state = "expired"
                if party.held is held:
                    party.held = None
                reason = "training"
        elif reason is None and party is not None:
            party.begin(xid)
        if reason is not None:
            self.counts[f"busy_{reason}"] += 1
            await send_frame(stream, {"t": "busy", "xid": xid, "reason": reason})
            await _quietly(stream.close)
            return
        assert party is not None and transport is not None
        key = (peer, xid)
        self._remember(key, "pending")
        try:
            outcome = await self._respond_exchange(stream, party, peer, xid, peer_samples, transport)
        finally:
            if self._outcomes.get(key) == "pending":
                self._outcomes[key] = "aborted"
            party.end()
            party.bytes_sent += stream.bytes_sent
            party.bytes_received += stream.bytes_received
        self.counts[f"responded_{outcome.value}"] += 1
        party.stats[outcome.value] += 1

    def _pick_transport(self, offer: dict[str, Any]) -> TensorTransport | None:
        """Our preferred transport among those the initiator offered (absent: framed)."""
        offered = offer.get("transports", ["framed"])
        if not isinstance(offered, list):
            raise RemoteProtocolError("'transports' must be a list")
        names = [n for n in offered[:8] if isinstance(n, str)]
        return next((t for n, t in self.transports.items() if n in names), None)

    async def _trade(self, stream: CountingStream, party: AveragingParty,
                     transport: TensorTransport, peer_samples: int,
                     ) -> tuple[Outgoing, np.ndarray]:
        """Both sides' middle: prepare ours, swap payloads over ``transport``, mix.
        Returns (what we prepared, the average); raises InvalidTensor when the peer's
        payload fails validation."""
        out = await party.compute(lambda: party.channel.prepare(party.params))
        with trio.fail_after(self.config.step_timeout):
            payload, _, _ = await transport.exchange(
                stream, out.payload, expect=party.expected_payload(),
                max_bytes=party.max_payload_bytes(self.config))
        average = await party.compute(lambda: party._mix(out, payload, peer_samples))
        return out, average

    async def _respond_exchange(self, stream: CountingStream, party: AveragingParty, peer: str,
                                xid: str, peer_samples: int, transport: TensorTransport) -> Outcome:
        cfg = self.config
        key = (peer, xid)
        try:
            await send_frame(stream, {"t": "accept", "xid": xid, "samples": party.samples,
                                      "transport": transport.name})
            try:
                out, average = await self._trade(stream, party, transport, peer_samples)
            except InvalidTensor as e:
                self._outcomes[key] = "aborted"
                await self._refuse(stream, party, peer, xid, e)
                return Outcome.REJECTED
            with trio.fail_after(cfg.step_timeout):
                decision = _expect(await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES),
                                   ("commit", "abort"), xid)
            if decision["t"] == "abort":
                self._outcomes[key] = "aborted"
                log.info("peer=%s xid=%s gossip-avg aborted by initiator: %s", peer, xid, _reason(decision))
                await _quietly(stream.close)
                return Outcome.ABORTED
            # The commit point: we apply, remember it, then acknowledge.
            await self._commit(party, out, average)
            self._outcomes[key] = "committed"
            party.partners.add(peer)
            party.note_mixed()
            try:
                with trio.fail_after(cfg.step_timeout):
                    await send_frame(stream, {"t": "ack", "xid": xid})
                await _quietly(stream.close)
            except (PeerError, trio.TooSlowError) as e:
                # the initiator will ask (status) on a new stream
                log.info("peer=%s xid=%s gossip-avg ack not delivered: %r", peer, xid, e)
            return Outcome.COMMITTED
        except (PeerError, trio.TooSlowError) as e:
            if self._outcomes.get(key) == "pending":
                self._outcomes[key] = "aborted"
            if isinstance(e, RemoteProtocolError):
                self.health.penalize(peer, "protocol", trio.current_time())
            log.debug("peer=%s xid=%s gossip-avg responder failed: %r", peer, xid, e)
            await _quietly(stream.reset)
            return Outcome.FAILED

    def _remember(self, key: tuple[str, str], state: str) -> None:
        self._outcomes[key] = state
        self._outcomes.move_to_end(key)
        while len(self._outcomes) > self.config.outcome_memory:
            self._outcomes.popitem(last=False)

    def statistics(self) -> dict[str, Any]:
        return {
            **self.counts,
            "rejected": dict(self.rejected),
            "jobs": len(self._parties),
            "outcomes_remembered": len(self._outcomes),
            **self.health.statistics(),
        }


async def _quietly(action: Callable[[], Awaitable[Any]]) -> None:
    """Close or reset a stream whose peer may already be gone, even while cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await action()
        except PeerError:
            pass  # already closed by the other side: nothing left to release


async def _quietly_send(stream: Stream, message: dict[str, Any]) -> None:
    try:
        await send_frame(stream, message)
    except PeerError:
        pass  # best effort: the exchange is over either way


async def serve_gossip_avg(network: PeerNetwork, *, config: GossipConfig = GossipConfig(),
                           transport: TensorTransport | None = None,
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `/lattice/gossip-avg/1` until cancelled; hands back the `GossipAverager`.

    Parties register per job (`GossipAverager.register`); offers for other jobs are
    answered ``busy``. Inbound exchanges run in the network's handler tasks."""
    averager = GossipAverager(network, config, transport or FramedTensorTransport())
    network.set_stream_handler(PROTOCOL, averager.handle)
    task_status.started(averager)
    try:
        await trio.sleep_forever()
    finally:
        for job_id in list(averager._parties):
            averager.unregister(job_id)
