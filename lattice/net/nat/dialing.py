"""Reaching a peer by id: directly at addresses we know for it, else through a relay.

Owns `PeerDialer.connect` (what `lattice peers connect` and every service's
`open_stream` use for a peer we hold no connection to) and relayed dialing over a
Circuit Relay v2 CONNECT (`host.connect()` cannot dial `/p2p-circuit` addresses,
PY-LIBP2P.md). Must not import latticed.

Failure policy: a failed dial raises `DialError` with every reason a user can act on;
a relay that answers garbage is a `RemoteProtocolError` for that relay only.
"""

from __future__ import annotations

from typing import Any

import multiaddr
import trio
from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p.abc import INetConn
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from lattice.net.host import PEER_ERRORS, BadDialTarget, DialError
from lattice.net.nat.reservations import (
    RelayDirectory,
    RelayRefused,
    ReservationKeeper,
    hop_status,
    split_p2p,
)
from lattice.net.nat.tcp_punch import HANDSHAKE_ERRORS
from lattice.net.streams import PeerError, RemoteProtocolError

_RELAY_ANSWER_TIMEOUT = 10.0


class PeerDialer:
    """Dials peers by id or circuit address; counts relayed dials."""

    def __init__(self, node: Any, directory: RelayDirectory, keeper: ReservationKeeper) -> None:
        self.node = node
        self.me = node.peer_id
        self.directory = directory
        self.keeper = keeper
        self.relayed_dials = 0

    async def connect(self, target: str, *, timeout: float = 10.0) -> str:
        """Connect to ``target``: a multiaddr (also ``.../p2p-circuit/p2p/<id>``), or a
        peer id (``12D3KooW...`` or ``/p2p/<id>``), reached directly at addresses we know
        for it, else through a relay (ours, or ones it advertised). Returns the peer id;
        raises `DialError` with the reasons."""
        target = target.strip()
        if "/p2p-circuit" in target:
            return await self._dial_circuit(target, timeout)
        if target.startswith("/p2p/"):
            target = target[len("/p2p/"):]
        if target.startswith("/"):
            return await self.node.connect(target, timeout=timeout)
        try:
            pid = ID.from_base58(target)
        except (ValueError, KeyError) as e:
            raise BadDialTarget(f"not a dialable multiaddr or peer id: {target!r} ({e})") from None
        peer = pid.to_base58()
        if peer == self.me:
            raise BadDialTarget("that is this daemon itself")
        if self.node.live_connections(peer):
            return peer
        errors: list[str] = []
        known = self.node.get_addrs(peer)
        direct = [multiaddr.Multiaddr(a) for a in known if "/p2p-circuit" not in a]
        relays = [split_p2p(a.split("/p2p-circuit")[0])[1] for a in known if "/p2p-circuit" in a]
        relays += list(self.keeper.reservations)
        relays += [p for p, _ in self.directory.candidates(trio.current_time())]
        relays = list(dict.fromkeys(r for r in relays if r and r not in (peer, self.me)))

        async def via_direct(cancel: trio.CancelScope) -> None:
            # Known addresses may be LAN addresses of another network, which hang until
            # a timeout: so this races the relays instead of going first.
            try:
                await self.node.host.connect(PeerInfo(pid, direct))
            except PEER_ERRORS as e:
                errors.append(f"direct: {e}")
                return
            cancel.cancel()

        async def via_relays(cancel: trio.CancelScope) -> None:
            for relay in relays:
                try:
                    await self.dial_via(relay, pid)
                except PeerError as e:
                    errors.append(f"via {relay[-8:]}: {e}")
                    continue
                cancel.cancel()
                return

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                if direct:
                    nursery.start_soon(via_direct, nursery.cancel_scope)
                nursery.start_soon(via_relays, nursery.cancel_scope)
        if self.node.live_connections(peer):
            return peer
        if not direct and not relays:
            raise DialError(f"no address or relay known for {peer}: {self._no_relay()}")
        reasons = "; ".join(errors[-4:]) or f"timed out after {timeout:g} s"
        if not relays:
            reasons += f"; {self._no_relay()}"
        raise DialError(f"cannot reach {peer}: {reasons}")

    def _no_relay(self) -> str:
        """Why there is no relay to try, for a user who must fix it."""
        return ("no relay known: no peer we know serves as one (a relay must be publicly "
                "reachable: a public address, a port forward or UPnP; set "
                "relay.service = \"on\" on such a daemon, or bootstrap from one)")

    async def _dial_circuit(self, target: str, timeout: float) -> str:
        relay_part, _, dest = target.partition("/p2p-circuit")
        _, dest_id = split_p2p(dest)
        base, relay_id = split_p2p(relay_part)
        try:
            pid, rid = ID.from_base58(dest_id), ID.from_base58(relay_id)
        except (ValueError, KeyError) as e:
            raise BadDialTarget(f"not a circuit address: {target!r} ({e})") from None
        with trio.move_on_after(timeout):
            if rid.to_base58() not in self.node.connected_peers():
                if not base:
                    raise DialError(f"not connected to relay {relay_id} and no address for it")
                await self.node.connect(relay_part, timeout=timeout)
            try:
                await self.dial_via(rid.to_base58(), pid)
            except DialError:
                raise
            except PeerError as e:
                raise DialError(f"relayed dial {target} failed: {e}") from None
            return pid.to_base58()
        raise DialError(f"relayed dial {target} timed out after {timeout:g} s")

    async def dial_via(self, relay: str, target: ID) -> INetConn:
        """A relayed connection to ``target`` through ``relay`` (we must be connected to
        the relay). py-libp2p's `host.connect` cannot dial `/p2p-circuit` addresses."""
        self.relayed_dials += 1
        if relay not in self.node.connected_peers():
            addr = self.directory.address_of(relay, trio.current_time())
            if addr is None:
                raise PeerError("not connected to the relay")
            await self.node.connect(addr, timeout=5.0)
        try:
            stream = await self.node.host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL_ID])
        except PEER_ERRORS as e:
            raise PeerError(f"no relay service: {e}") from None
        try:
            with trio.fail_after(_RELAY_ANSWER_TIMEOUT):
                await write_delimited_msg(stream, HopMessage(
                    type=HopMessage.CONNECT, peer=CircuitPeerId(id=target.to_bytes())))
                resp = await read_delimited_msg(stream, HopMessage)
            status = hop_status(resp)
            if status != StatusCode.OK:
                raise RelayRefused(status)
            circuit = multiaddr.Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{target.to_base58()}")
            raw = RawConnection(stream=stream, initiator=True,
                                connection_type=ConnectionType.RELAYED, addresses=[circuit])
            return await self.node.host.upgrade_outbound_connection(raw, target)
        except BaseException as e:
            with trio.CancelScope(shield=True):
                try:
                    await stream.reset()
                except PEER_ERRORS:
                    pass
            if isinstance(e, (ProtobufDecodeError, ValueError)):
                raise RemoteProtocolError(f"bad relay answer: {e}") from None
            if isinstance(e, HANDSHAKE_ERRORS):
                raise RemoteProtocolError(f"the relayed handshake failed: "
                                          f"{type(e).__name__}: {e}") from None
            if isinstance(e, trio.TooSlowError):
                raise PeerError(f"relay did not answer in {_RELAY_ANSWER_TIMEOUT:g} s") from None
            if isinstance(e, PEER_ERRORS) and not isinstance(e, PeerError):
                raise PeerError(f"relayed connection failed: {e}") from None
            raise
