"""Bulk tensor transfer, `/lattice/bulk/2`: numpy arrays between two peers at memory
speed, encrypted and authenticated (spec: proto/bulk.md; pure formats:
`lattice.core.bulk_frames`, array specs: `lattice.core.arrays`).

Owns the public face: `send_arrays`, `receive_arrays`, `exchange` (both directions at
once, for a pairwise averaging step) - one session, one key agreement, for a set of up
to 16 arrays - their one-array forms `send_array`, `receive_array`, `exchange_arrays`,
and the standalone push protocol (`serve_bulk` / `push_arrays`). Beside it:
`bulk_session` (one run of the protocol), `bulk_listener` (the side channel's receiving
end, `serve_bulk_listener`), `bulk_config` (settings and the typed errors), all
re-exported here. Must not import libp2p: the control stream is any
`lattice.net.streams.Stream`.

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

from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from lattice.core import bulk_frames as bf
from lattice.core.arrays import WIRE_DTYPES, ArrayFormatError, ArrayLimits, ArraySpec, prepare_array
from lattice.net.bulk_config import DEFAULT_CONFIG as DEFAULT_CONFIG
from lattice.net.bulk_config import DEFAULT_LIMITS as DEFAULT_LIMITS
from lattice.net.bulk_config import BulkAbortedError as BulkAbortedError
from lattice.net.bulk_config import BulkConfig as BulkConfig
from lattice.net.bulk_config import BulkHeaderError as BulkHeaderError
from lattice.net.bulk_config import BulkIntegrityError as BulkIntegrityError
from lattice.net.bulk_config import BulkRejectedError as BulkRejectedError
from lattice.net.bulk_config import BulkStalledError as BulkStalledError
from lattice.net.bulk_config import BulkTruncatedError as BulkTruncatedError
from lattice.net.bulk_config import Progress as Progress
from lattice.net.bulk_listener import BulkAuthError as BulkAuthError
from lattice.net.bulk_listener import BulkListener as BulkListener
from lattice.net.bulk_listener import serve_bulk_listener as serve_bulk_listener
from lattice.net.bulk_session import Check as Check
from lattice.net.bulk_session import Session
from lattice.net.bulk_session import UnreachableChannels as UnreachableChannels
from lattice.net.shaping import ByteBudget
from lattice.net.streams import PeerNetwork, Stream, quietly

PROTOCOL = bf.PROTOCOL


# -- public API -------------------------------------------------------------------------


async def send_arrays(stream: Stream, arrays: Sequence[np.ndarray], *,
                      config: BulkConfig = DEFAULT_CONFIG,
                      on_progress: Progress | None = None) -> None:
    """Send ``arrays`` (1 to `MAX_ARRAYS`, in one session) to the peer at the other end
    of ``stream`` (which runs `receive_arrays`); returns once the peer confirmed it
    received every byte intact. ``on_progress`` counts bytes over all of them."""
    await Session(stream, config, None, sent_progress=on_progress).run(
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
        check = same_as([check_out(o) for o in out])
    result = await Session(stream, config, listener, received_progress=on_progress).run(
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
                   on_progress: Progress | None = None,
                   budget: ByteBudget | None = None,
                   unreachable: UnreachableChannels | None = None) -> list[np.ndarray]:
    """Send ``ours`` and receive the peer's arrays, both directions at once, in one
    session (one key agreement however many arrays); the peer calls `exchange` too.
    ``check`` and ``out`` as for `receive_arrays`; ``on_progress`` reports the inbound
    direction. ``budget``: the volunteer's rate limits for the side channel's bytes
    (`lattice.net.shaping`; bytes on ``stream`` are the stream's to shape).
    ``unreachable``: side-channel offers that failed before, to go straight to the
    stream instead of waiting ``connect_timeout`` again (keep one per daemon)."""
    if out is not None:
        check = same_as([check_out(o) for o in out])
    result = await Session(stream, config, listener, received_progress=on_progress,
                           budget=budget, unreachable=unreachable).run(
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
    check = same_as([(expect[0], tuple(expect[1]))]) if expect is not None else one_array
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
    if out is not None and check_out(out) != (spec.dtype, spec.shape):
        raise ValueError(f"out is {out.dtype.str}{list(out.shape)}, ours is "
                         f"{spec.dtype}{list(spec.shape)}")
    (theirs,) = await exchange(stream, [ours], limits=limits, listener=listener, config=config,
                               check=same_as([(spec.dtype, spec.shape)]),
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
        await quietly(stream.reset)  # shielded; a peer already gone must not hide the cause
        raise
    await stream.close()


async def push_array(network: PeerNetwork, peer_id: str, array: np.ndarray, *,
                     config: BulkConfig = DEFAULT_CONFIG,
                     on_progress: Progress | None = None) -> None:
    """`push_arrays` of one array."""
    await push_arrays(network, peer_id, [array], config=config, on_progress=on_progress)


# -- checks a receiver applies to what it is offered ----------------------------------------


def same_as(expected: list[tuple[str, tuple[int, ...]]]) -> Check:
    def check(specs: list[ArraySpec]) -> None:
        got = [(s.dtype, s.shape) for s in specs]
        if got != expected:
            raise ArrayFormatError(f"expected {_describe(expected)}, offered {_describe(got)}")
    return check


def one_array(specs: list[ArraySpec]) -> None:
    if len(specs) != 1:
        raise ArrayFormatError(f"expected one array, offered {len(specs)}")


def _describe(specs: list[tuple[str, tuple[int, ...]]]) -> str:
    return ", ".join(f"{d}{list(s)}" for d, s in specs[:4]) + (" ..." if len(specs) > 4 else "")


def check_out(out: np.ndarray) -> tuple[str, tuple[int, ...]]:
    if not (isinstance(out, np.ndarray) and out.flags.c_contiguous and out.flags.writeable
            and out.dtype.str in WIRE_DTYPES):
        raise ValueError("out must be a writable C-contiguous little-endian numeric array")
    return out.dtype.str, tuple(int(d) for d in out.shape)
