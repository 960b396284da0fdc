"""Circuit Relay v2 for others (the HOP side) and for us (STOP): py-libp2p's relay with
the fixes we need, patched over private methods of one py-libp2p version.

Owns `CircuitRelay` and `check_libp2p_version`. This is the only module that overrides
py-libp2p internals; it refuses to run on a py-libp2p version it was not written for
(`UnsupportedLibp2pError`, raised by `check_libp2p_version` when the connectivity
manager starts), because an upgrade that renames or reshapes one of them would fail
silently or mid-circuit instead. Must not import latticed.

Why a subclass over private methods (issue 12 asks for none unless unavoidable): py-
libp2p's `CircuitV2Protocol` has no hook to gate the hop service, cap circuits or own a
circuit's byte pump; its HOP handler and pump are the bugs we fix. The alternative is a
hop and stop side of our own, which would still have to make a relayed stream a swarm
connection through the same internals (and re-implement reservations and vouchers).
So the overrides stay here, in one module, pinned to one version.

Private py-libp2p API used (0.8.1): `CircuitV2Protocol._handle_reserve`,
`._handle_connect` (the hop's message handlers, reused behind our one-message-per-stream
HOP handler and circuit cap), overrides of `._handle_hop_stream` and `._relay_data`
(and its `_active_relays` registry), `.resource_manager.get_reservation`.
tests/nat/test_nat_relay_loopback.py exercises each of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import trio
from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol, _is_relayed_stream
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.constants import MAX_READ_LEN

from lattice.net.host import PEER_ERRORS
from lattice.net.libp2p_version import installed_libp2p
from lattice.net.nat_config import NatConfig
from lattice.net.shaping import ByteBudget, Unlimited

log = logging.getLogger("lattice.net.nat")

# The py-libp2p versions whose private relay methods this module was written against.
SUPPORTED_LIBP2P = ("0.8.1",)
_HOP_READ_TIMEOUT = 10.0
_HOP_READ_ERRORS: tuple[type[BaseException], ...] = (
    trio.TooSlowError, ProtobufDecodeError, ValueError, *PEER_ERRORS)
_PUMP_ERRORS: tuple[type[BaseException], ...] = (EOFError, *PEER_ERRORS)


class UnsupportedLibp2pError(RuntimeError):
    """The installed py-libp2p is not one `CircuitRelay` was written for."""


def check_libp2p_version(installed: str | None = None) -> str:
    """The installed py-libp2p version, or `UnsupportedLibp2pError` saying what to do."""
    if installed is None:
        installed = installed_libp2p()
    if installed not in SUPPORTED_LIBP2P:
        raise UnsupportedLibp2pError(
            f"py-libp2p {installed} is installed, but lattice.net.nat.relay_hop overrides "
            f"private relay methods of py-libp2p {', '.join(SUPPORTED_LIBP2P)} only; install "
            f"libp2p=={SUPPORTED_LIBP2P[-1]} (pyproject.toml pins it) or port relay_hop.py")
    return installed


class CircuitRelay(CircuitV2Protocol):
    """py-libp2p's Circuit Relay v2, with what we need around it.

    - The HOP handler reads one message per stream (as rust-libp2p does) and is gated:
      refused unless `serving`. py-libp2p's own handler loops on the stream and logs an
      ERROR every time a client closes it.
    - A cap on circuits through us at once (py-libp2p only caps them per reservation).
    - `on_relayed_inbound(peer)` after an accepted relayed connection is tagged relayed
      (py-libp2p tags it only after the swarm's "connected" notification).
    - Our own byte pump (`_relay_data`): py-libp2p's cleans up by *peer id*, so the end
      of one circuit closed another circuit of the same peer; and it checked the
      duration limit only when bytes arrived, so an idle circuit outlived it. It goes
      through the volunteer's transfer budget (`lattice.net.shaping`: rate limits,
      data cap), and no circuit opens while that budget refuses transfers.
    """

    def __init__(self, host: Any, config: NatConfig,
                 on_relayed_inbound: Callable[[str], None],
                 budget: ByteBudget | None = None) -> None:
        super().__init__(host, limits=config.relay_limits(), allow_hop=True)
        self.serving = False
        self.max_circuits = config.relay_max_circuits
        self.on_relayed_inbound = on_relayed_inbound
        self.active_circuits = 0
        self.circuits_total = 0
        self.bytes_relayed = 0
        self.budget: ByteBudget = budget if budget is not None else Unlimited()
        self.circuits_cut = {"duration": 0, "bytes": 0}
        self._pumps: dict[frozenset[int], list[trio.CancelScope]] = {}  # per circuit
        self.refused = {"not_serving": 0, "circuit_limit": 0, "relayed": 0, "malformed": 0,
                        "transfers_paused": 0, "failed": 0}
        self._reserved: dict[ID, None] = {}

    def active_reservations(self) -> int:
        live = [p for p in self._reserved if self.resource_manager.get_reservation(p) is not None]
        self._reserved = dict.fromkeys(live)
        return len(live)

    def statistics(self) -> dict[str, Any]:
        return {"active": self.serving, "reservations": self.active_reservations(),
                "circuits": self.active_circuits, "circuits_total": self.circuits_total,
                "bytes_relayed": self.bytes_relayed, "circuits_cut": dict(self.circuits_cut),
                "refused": dict(self.refused)}

    async def _refuse(self, stream: Any, code: StatusCode, reason: str) -> None:
        self.refused[reason] += 1
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS,
                                                         status=to_proto_status(code)))
            await stream.close()
        except PEER_ERRORS:
            pass

    async def _handle_hop_stream(self, stream: Any) -> None:
        if not self.serving:
            await self._refuse(stream, StatusCode.PERMISSION_DENIED, "not_serving")
            return
        if _is_relayed_stream(stream):  # spec: no hops over relayed connections
            await self._refuse(stream, StatusCode.PERMISSION_DENIED, "relayed")
            return
        try:
            with trio.fail_after(_HOP_READ_TIMEOUT):
                msg = await read_delimited_msg(stream, HopMessage)
        except _HOP_READ_ERRORS:
            await self._refuse(stream, StatusCode.MALFORMED_MESSAGE, "malformed")
            return
        try:
            await self._handle_one(stream, msg)
        except PEER_ERRORS:
            pass  # the peer went away meanwhile
        except AttributeError as e:
            # py-libp2p's handlers catch everything themselves, but its RESERVE error
            # path (a reserving peer gone before the reservation is read back) calls a
            # NetStream method that does not exist; raised here, it would end the host's
            # service and the daemon with it. The request fails; we carry on.
            log.info("peer=%s relay request failed: %r", stream.muxed_conn.peer_id, e)
            self.refused["failed"] += 1
            try:
                await stream.reset()
            except PEER_ERRORS:
                pass

    async def _handle_one(self, stream: Any, msg: Any) -> None:
        if msg.type == HopMessage.RESERVE:
            # A reservation is for the peer on this connection (as go- and rust-libp2p
            # read it); py-libp2p would take a `peer` field naming anyone.
            msg.ClearField("peer")
            # noted first: py-libp2p's handler lingers 0.1 s after answering
            self._reserved[stream.muxed_conn.peer_id] = None
            if len(self._reserved) > 2 * self.limits.max_reservations:
                self.active_reservations()  # prune the refused and the expired
            await self._handle_reserve(stream, msg)
            try:
                await stream.close()
            except PEER_ERRORS:
                pass
        elif msg.type == HopMessage.CONNECT:
            await self._handle_connect(stream, msg)
        else:
            await self._refuse(stream, StatusCode.UNEXPECTED_MESSAGE, "malformed")

    async def _handle_connect(self, stream: Any, msg: Any) -> None:
        if self.active_circuits >= self.max_circuits:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuit_limit")
            return
        if self.budget.refusal() is not None:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "transfers_paused")
            return
        self.active_circuits += 1
        self.circuits_total += 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self.active_circuits -= 1

    async def _relay_data(self, src_stream: Any, dst_stream: Any, peer_id: ID,
                          deadline: float | None = None,
                          circuit_data_limit: list[int] | None = None) -> None:
        """One direction of a circuit, called by py-libp2p's `_handle_connect` (twice,
        in one nursery). ``deadline`` is on time.monotonic(); ``circuit_data_limit`` is
        the shared [bytes left] of both directions. When this direction ends, for any
        reason, both streams are reset and the other direction is cancelled (a local
        reset does not wake py-libp2p's pending read on the same stream)."""
        key = frozenset((id(src_stream), id(dst_stream)))
        scopes = self._pumps.setdefault(key, [])
        scope = trio.CancelScope()
        scopes.append(scope)
        try:
            with scope:
                await self._pump(src_stream, dst_stream, deadline, circuit_data_limit)
        except _PUMP_ERRORS:
            pass  # one end went away: the circuit is over
        finally:
            for other in scopes:
                other.cancel()
            scopes.remove(scope)
            if not scopes:
                del self._pumps[key]
            with trio.CancelScope(shield=True):
                for s in (src_stream, dst_stream):
                    try:
                        await s.reset()
                    except _PUMP_ERRORS:
                        pass
            for k, (a, b) in list(self._active_relays.items()):
                if a in (src_stream, dst_stream) or b in (src_stream, dst_stream):
                    del self._active_relays[k]

    async def _pump(self, src_stream: Any, dst_stream: Any, deadline: float | None,
                    circuit_data_limit: list[int] | None) -> None:
        # time.monotonic(), not trio's clock: py-libp2p computes ``deadline`` with it
        while True:
            left = math.inf if deadline is None else deadline - time.monotonic()
            data = b""
            with trio.move_on_after(max(0.0, left)):
                data = await src_stream.read(MAX_READ_LEN)
            if deadline is not None and not data and time.monotonic() >= deadline:
                self.circuits_cut["duration"] += 1
                return
            if not data:
                return
            if circuit_data_limit is not None:
                if len(data) > circuit_data_limit[0]:
                    self.circuits_cut["bytes"] += 1
                    return
                circuit_data_limit[0] -= len(data)
            await self.budget.receive(len(data))
            await self.budget.send(len(data))
            await dst_stream.write(data)
            self.bytes_relayed += len(data)

    async def handle_incoming_connection(self, stream: Any, remote_peer_id: bytes) -> None:
        await super().handle_incoming_connection(stream, remote_peer_id)
        self.on_relayed_inbound(ID(remote_peer_id).to_base58())
