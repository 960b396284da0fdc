"""Traffic shaping and metering: the one seam through which the volunteer's transfer
limits (upload and download rates, the transfer schedule, the monthly data cap) reach
the bytes, and where bytes are counted by protocol.

Owns `ByteBudget` (what transfer code awaits: ``send(n)`` before writing ``n`` bytes,
``receive(n)`` after reading them, and ``refusal()``: why no new transfer may start
now), `TransfersPausedError`, `Traffic` (bytes by label and direction) and
`GovernedNetwork`, a `PeerNetwork` wrapper that meters every stream by protocol and
puts the streams of the shaped protocols (job transfers: gossip averaging, blobs, bulk
pushes) through the budget. Bytes that cross no stream of ours go through
`GovernedNetwork.budget_for(label)`: the bulk side channel's pumps and the relay's.
State sync and the DHT are metered, never shaped nor refused: the daemon stays in the
network whatever the limits. The daemon's implementation of the budget is
`latticed.governor.Governor`. Must not import libp2p.

A pause takes effect at the start of a transfer: a stream of a shaped protocol is
refused while `ByteBudget.refusal` says why (an outbound open raises
`TransfersPausedError`, an inbound one is reset), and one already running finishes
(at the rate limit), so the data cap overshoots by at most the transfers in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

from lattice.core.bulk_frames import PROTOCOL as BULK_PROTOCOL
from lattice.core.gossip_messages import PROTOCOL as GOSSIP_PROTOCOL
from lattice.net.blob import PROTOCOL as BLOB_PROTOCOL
from lattice.net.streams import (
    PeerError,
    PeerEvents,
    PeerNetwork,
    Stream,
    StreamHandler,
    StreamWrapper,
)

JOB_PROTOCOLS = frozenset({GOSSIP_PROTOCOL, BLOB_PROTOCOL, BULK_PROTOCOL})
"""The protocols that move a job's bulk bytes: shaped by default."""
READ_SLICE = 256 * 1024
"""Largest read a shaped stream makes: at a download limit of R bytes/s a read waits at
most READ_SLICE / R for its tokens, which must stay under py-libp2p's 5 s Yamux window
timeout (PY-LIBP2P.md), hence the lowest download limit the config accepts."""


class TransfersPausedError(PeerError):
    """The volunteer's limits stop transfers now (outside the transfer schedule, the
    monthly data cap spent). Raised where a job transfer would start; to a protocol
    driver it is like a peer it cannot reach for now: the exchange is skipped, nobody
    is penalized."""


class ByteBudget(Protocol):
    """The volunteer's transfer limits, as transfer code sees them."""

    def refusal(self) -> str | None:
        """Why no new transfer may start now (None: they may)."""
        ...

    async def send(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent (upload rate), counting them."""
        ...

    async def receive(self, nbytes: int) -> None:
        """Count ``nbytes`` just received and wait as the download rate requires
        (the wait holds the next read back, so the sender slows down)."""
        ...


class Unlimited:
    """No limits (tests, a daemon with none configured)."""

    def refusal(self) -> str | None:
        return None

    async def send(self, nbytes: int) -> None:
        return None

    async def receive(self, nbytes: int) -> None:
        return None


class Traffic:
    """Bytes by (label, direction ``in`` | ``out``); labels are protocol ids or the
    names given to `GovernedNetwork.budget_for`."""

    def __init__(self) -> None:
        self.bytes: Counter[tuple[str, str]] = Counter()
        self.refused: Counter[str] = Counter()

    def statistics(self) -> dict[str, Any]:
        by_label: dict[str, dict[str, int]] = {}
        for (label, direction), n in sorted(self.bytes.items()):
            by_label.setdefault(label, {"in": 0, "out": 0})[direction] = n
        return {"bytes": by_label, "refused": dict(self.refused)}


class MeteredBudget:
    """``budget``, counting what passes through it under ``label`` in ``traffic``."""

    def __init__(self, budget: ByteBudget, traffic: Traffic, label: str) -> None:
        self._budget = budget
        self._traffic = traffic
        self._label = label

    def refusal(self) -> str | None:
        return self._budget.refusal()

    async def send(self, nbytes: int) -> None:
        self._traffic.bytes[(self._label, "out")] += nbytes
        await self._budget.send(nbytes)

    async def receive(self, nbytes: int) -> None:
        self._traffic.bytes[(self._label, "in")] += nbytes
        await self._budget.receive(nbytes)


class MeteredStream(StreamWrapper):
    """``stream``, its bytes counted (and, with a budget, shaped)."""

    def __init__(self, stream: Stream, budget: MeteredBudget, shaped: bool) -> None:
        super().__init__(stream)
        self._budget = budget
        self._shaped = shaped

    async def read(self, max_bytes: int) -> bytes:
        data = await self._stream.read(min(max_bytes, READ_SLICE) if self._shaped else max_bytes)
        if data:
            await self._budget.receive(len(data))
        return data

    async def write(self, data: bytes | memoryview) -> None:
        await self._budget.send(len(data))
        await self._stream.write(data)


class GovernedNetwork:
    """A `PeerNetwork` whose streams are metered by protocol, and those of ``shaped``
    protocols also shaped by ``budget`` and refused while it says so (see the module
    docstring)."""

    def __init__(self, network: PeerNetwork, budget: ByteBudget | None = None, *,
                 shaped: Iterable[str] = JOB_PROTOCOLS) -> None:
        self.network = network
        self.budget: ByteBudget = budget if budget is not None else Unlimited()
        self.shaped = frozenset(shaped)
        self.traffic = Traffic()
        self._unlimited = Unlimited()

    @property
    def peer_id(self) -> str:
        return self.network.peer_id

    def budget_for(self, label: str) -> MeteredBudget:
        """The budget for bytes that cross no stream of ours (a side channel, a relayed
        circuit), metered under ``label``."""
        return MeteredBudget(self.budget, self.traffic, label)

    def _wrap(self, stream: Stream) -> MeteredStream:
        shaped = stream.protocol in self.shaped
        budget = self.budget if shaped else self._unlimited
        return MeteredStream(stream, MeteredBudget(budget, self.traffic, stream.protocol), shaped)

    def _refusal(self, protocol: str) -> str | None:
        if protocol not in self.shaped:
            return None
        why = self.budget.refusal()
        if why is not None:
            self.traffic.refused[protocol] += 1
        return why

    async def open_stream(self, peer_id: str, protocol: str, *, route: bool = True) -> Stream:
        why = self._refusal(protocol)
        if why is not None:
            raise TransfersPausedError(f"transfers paused: {why}")
        return self._wrap(await self.network.open_stream(peer_id, protocol, route=route))

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        async def governed(stream: Stream) -> None:
            if self._refusal(protocol) is not None:
                try:
                    await stream.reset()
                except PeerError:
                    pass  # gone already: nothing to refuse
                return
            await handler(self._wrap(stream))

        self.network.set_stream_handler(protocol, governed)

    def connected_peers(self) -> list[str]:
        return self.network.connected_peers()

    async def disconnect(self, peer_id: str) -> None:
        await self.network.disconnect(peer_id)

    def peer_events(self, *, buffer: int = 64) -> PeerEvents:
        return self.network.peer_events(buffer=buffer)

    def statistics(self) -> dict[str, Any]:
        return {**self.traffic.statistics(), "shaped": sorted(self.shaped)}
