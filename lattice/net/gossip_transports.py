"""How the tensor payload of one `/lattice/gossip-avg/2` exchange crosses the stream
(proto/gossip-avg.md, "Transports"): the `TensorTransport` seam, its default
`FramedTensorTransport` (an ``arrays`` header, then raw bytes) and
`BulkTensorTransport` (one `/lattice/bulk/2` session for the whole payload). Each refuses
what it was not told to expect before allocating. Must not import libp2p.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from lattice.core.arrays import (
    ArrayFormatError,
    ArrayLimits,
    ArraySpec,
    byte_view,
    empty_like_spec,
    prepare_array,
)
from lattice.core.gossip_messages import MAX_CONTROL_BYTES, array_item, parse_array_header
from lattice.net import bulk
from lattice.net.streams import Stream, parse_peer_input, read_into, recv_frame, run_both, send_frame

WRITE_CHUNK = 1 << 20


class TensorTransport(Protocol):
    """Moves a dict of named numpy arrays both ways over a stream; ``name`` identifies
    its wire format in the offer/accept negotiation.

    ``expect`` maps every name the peer must send to its dtype; anything else is refused
    before allocation (raise `RemoteProtocolError`: parse headers with
    `parse_peer_input`). Returns (theirs, bytes sent, bytes
    received). Both sides call ``exchange`` at the same point of the protocol, and it
    must leave the stream at a frame boundary."""

    name: str

    async def exchange(self, stream: Stream, ours: Mapping[str, np.ndarray], *,
                       expect: Mapping[str, np.dtype], max_bytes: int
                       ) -> tuple[dict[str, np.ndarray], int, int]: ...


class FramedTensorTransport:
    """The default transport: a msgpack header frame listing ``[name, spec]`` per array
    (`lattice.core.arrays.ArraySpec`), then each array's raw little-endian bytes in
    1 MiB writes; the reader checks the header against ``expect`` and ``max_bytes`` and
    reads into a preallocated array. Both directions run at once, so neither side's
    writes wait on the other's reads."""

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
            spec, view = prepare_array(arr)
            items.append(array_item(name, spec))
            views.append(view)
        await send_frame(stream, {"t": "arrays", "items": items})
        sent = 0
        for view in views:
            for start in range(0, len(view), WRITE_CHUNK):
                await stream.write(view[start:start + WRITE_CHUNK])
            sent += len(view)
        return sent

    async def receive_arrays(self, stream: Stream, *, expect: Mapping[str, np.dtype] | None,
                             max_bytes: int) -> tuple[dict[str, np.ndarray], int]:
        header = await recv_frame(stream, max_bytes=MAX_CONTROL_BYTES)
        specs = parse_peer_input(parse_array_header, header, expect=expect, max_bytes=max_bytes)
        out: dict[str, np.ndarray] = {}
        total = 0
        for name, spec in specs:
            arr = empty_like_spec(spec)
            if arr.nbytes:
                await read_into(stream, byte_view(arr))
            out[name] = arr
            total += arr.nbytes
        return out, total


class BulkTensorTransport:
    """The payload through one `/lattice/bulk/2` session (`lattice.net.bulk.exchange`):
    AES-GCM over a raw TCP side channel when the peer offers one, else credit-controlled
    chunks on this stream. Every array of the payload goes in that one session (one key
    agreement per exchange), in the order of their names, which both sides know from
    the job's codec: the receiver checks each array's dtype against ``expect`` and the
    whole against ``max_bytes`` before allocating."""

    name = "bulk"

    def __init__(self, *, listener: Any = None, config: Any = None, budget: Any = None) -> None:
        self.listener = listener
        self.config = config
        self.budget = budget  # lattice.net.shaping.ByteBudget of the side channel
        # offers we could not reach (a peer behind a symmetric NAT): not retried each round
        self.unreachable = bulk.UnreachableChannels()

    async def exchange(self, stream: Stream, ours: Mapping[str, np.ndarray], *,
                       expect: Mapping[str, np.dtype], max_bytes: int
                       ) -> tuple[dict[str, np.ndarray], int, int]:
        names = sorted(expect)
        if sorted(ours) != names:
            raise ValueError(f"payload {sorted(ours)} is not {names}")  # our bug

        def check(specs: list[ArraySpec]) -> None:
            got = [s.numpy_dtype for s in specs]
            if got != [np.dtype(expect[n]) for n in names]:
                raise ArrayFormatError(f"arrays of {[str(d) for d in got]}, expected "
                                       f"{[str(np.dtype(expect[n])) for n in names]}")

        kwargs = {"listener": self.listener, "budget": self.budget,
                  "unreachable": self.unreachable,
                  **({"config": self.config} if self.config is not None else {})}
        theirs = await bulk.exchange(stream, [ours[n] for n in names],
                                     limits=ArrayLimits(max_bytes=max(1, max_bytes)),
                                     check=check, **kwargs)
        sent = sum(int(np.asarray(ours[n]).nbytes) for n in names)
        return dict(zip(names, theirs)), sent, sum(a.nbytes for a in theirs)
