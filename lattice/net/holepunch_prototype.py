"""PROTOTYPE, not wired into the daemon: fast TCP hole punching over py-libp2p 0.8.1.

A study for issue 4 (bench/nat_traversal.py, docs/natlab.md). To be replaced by
`lattice/net/holepunch.py` (driver) over a sans-I/O core; it exists to prove which
py-libp2p calls work and how fast. Must not import latticed.

Why not py-libp2p's `DCUtRProtocol`: it reaches a direct connection ~10 s after the
relayed one although its exchange takes ~70 ms. Its auto-drive loop looks for relayed
connections every 2 s, then `_try_unilateral_upgrade` dials the peer's *LAN* addresses
(learned from identify) inside `move_on_after(dial_timeout=10)`; from another LAN they
are unreachable, so it waits out the 10 s before sending CONNECT.

What this does (timeline, B = the peer holding the relay reservation, which accepted the
relayed connection; A = the peer that dialed through the relay):

  B: relayed conn accepted -> open /lattice/holepunch-proto/0 over it (no polling)
  B -> A  CONNECT {id, addrs: B's observed public addrs, nat}     (t0)
  A -> B  CONNECT {id, addrs: A's ...,                  nat}     (RTT = now - t0)
  B -> A  SYNC {id};  B sleeps RTT/2 then dials;  A dials on receipt of SYNC
  both dial FROM their listen port (SO_REUSEPORT): TCP simultaneous open

Decisions that make it work every time:
- Observed addresses are real observations: we dial the relay from the listen port
  (`Swarm.dial_addr(addr, peer, source)`), so identify's observed address is the NAT
  mapping of the very port we punch from. If observers saw that port changed, the NAT
  is port-randomizing ("symmetric"): say so and skip the punch (it cannot work with
  plain simultaneous open), instead of burning seconds of doomed dials.
- Noise roles are fixed so every TCP outcome agrees: B upgrades as the *initiator*
  (`Swarm.dial_addr`), A as the *responder* (`Swarm.dial_addr_as_responder`). A may be
  public, so B's SYN can land on A's listener, which upgrades it as inbound = responder:
  consistent. (DCUtR assigns the opposite roles; with a public A and B's SYN first, both
  sides end up responders and the handshake hangs: measured, 2/3 punches lost.)
  B is never reachable unsolicited (it needed a relay), so A's SYN only ever reaches
  B's connecting socket. Because of this flip the protocol id is ours, not /libp2p/dcutr.
- Bounded: exchange 2 s, each round 1.2 s, at most 2 rounds; then stay relayed.

Private py-libp2p attribute used: `host._observed_addr_manager` (observed addresses).
"""

from __future__ import annotations

import logging
import os
import struct
import time
from typing import Any

import multiaddr
import trio

from libp2p.abc import INetConn, INotifee
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from lattice.core.codec import DecodeError, pack, unpack

log = logging.getLogger("lattice.net.holepunch_prototype")

PROTOCOL_ID = "/lattice/holepunch-proto/0"
MAX_MESSAGE = 4096
MAX_ADDRS = 8
EXCHANGE_TIMEOUT = 2.0  # CONNECT/CONNECT/SYNC over the relay
ROUND_TIMEOUT = 1.2  # a lost first SYN is retransmitted after 1 s
MAX_ROUNDS = 2
_LEN = struct.Struct(">I")


class HolePunchProtocolError(Exception):
    """The peer sent something that is not this protocol."""


def is_relayed(conn: INetConn) -> bool:
    addrs = conn.get_transport_addresses() or []
    return any("p2p-circuit" in str(a) for a in addrs)


def direct_conn(host: Any, peer: ID) -> INetConn | None:
    for conn in host.get_network().get_connections(peer):
        if (conn.get_transport_addresses() or []) and not is_relayed(conn):
            return conn
    return None


async def _write(stream: Any, msg: dict[str, Any]) -> None:
    data = pack(msg)
    await stream.write(_LEN.pack(len(data)) + data)


async def _read_exactly(stream: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise HolePunchProtocolError("stream ended mid-message")
        buf += chunk
    return buf


async def _read(stream: Any, expect: str) -> dict[str, Any]:
    (n,) = _LEN.unpack(await _read_exactly(stream, 4))
    if n > MAX_MESSAGE:
        raise HolePunchProtocolError(f"message of {n} bytes")
    try:
        msg = unpack(await _read_exactly(stream, n), max_bytes=MAX_MESSAGE)
    except DecodeError as e:
        raise HolePunchProtocolError(str(e)) from None
    if not isinstance(msg, dict) or msg.get("type") != expect:
        raise HolePunchProtocolError(f"expected {expect}, got {msg!r:.100}")
    return msg


def _decode_addrs(raw: Any) -> list[multiaddr.Multiaddr]:
    out = []
    for b in list(raw or [])[:MAX_ADDRS]:
        try:
            a = multiaddr.Multiaddr(b)
        except (ValueError, TypeError, multiaddr.exceptions.Error):
            continue
        if "p2p-circuit" not in str(a):
            out.append(a)
    return out


class _Notifee(INotifee):
    def __init__(self, puncher: HolePuncher) -> None:
        self._p = puncher

    async def connected(self, network: Any, conn: INetConn) -> None:
        self._p._on_connected(conn)

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, maddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, maddr: Any) -> None:
        pass


class HolePuncher:
    """Upgrade relayed connections to direct ones. Run with ``await nursery.start(p.run)``."""

    def __init__(self, host: Any, *, listen_ip: str, listen_port: int, auto: bool = True,
                 responder_skew: float = 0.0) -> None:
        self.host = host
        self.source = (listen_ip, listen_port)
        self.auto = auto
        # Study knob: delay A's dial after SYNC, to provoke B's SYN arriving first.
        self.responder_skew = responder_skew
        self._nursery: trio.Nursery | None = None
        self._busy: set[ID] = set()
        self.events: list[tuple[float, str]] = []
        self.gave_up: set[ID] = set()  # peers we agreed not to punch (a NAT is symmetric)

    def _note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))
        log.debug("%s", what)

    def stats(self) -> list[tuple[float, str]]:
        return list(self.events)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(PROTOCOL_ID, self._handle)
        self.host.get_network().register_notifee(_Notifee(self))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- reaching the relay from the listen port ------------------------------------

    async def connect_relay(self, relay: PeerInfo) -> INetConn:
        """Dial the relay from our listen port, so its observation of us is punchable."""
        self.host.get_peerstore().add_addrs(relay.peer_id, relay.addrs, 3600)
        net = self.host.get_network()
        errors = []
        for addr in relay.addrs:
            try:
                return await net.dial_addr(addr, relay.peer_id, self.source)
            except Exception as e:  # noqa: BLE001 - prototype: py-libp2p raises many kinds
                errors.append(f"{addr}: {e}")
        raise ConnectionError(f"relay {relay.peer_id} unreachable: {errors}")

    def nat_view(self) -> tuple[str, list[multiaddr.Multiaddr]]:
        """(nat kind, addresses worth punching to) from what observers saw of our port."""
        mgr = getattr(self.host, "_observed_addr_manager", None)
        port = str(self.source[1])
        observed = [] if mgr is None else [
            a for a in mgr.addrs(min_observers=1) if "p2p-circuit" not in str(a)]
        same_port = [a for a in observed if a.value_for_protocol("tcp") == port]
        listen = [a for a in self.host.get_transport_addrs() if "p2p-circuit" not in str(a)]
        listen_ips = {a.value_for_protocol("ip4") for a in listen}
        if not observed:
            return "unknown", listen[:MAX_ADDRS]
        if not same_port:
            return "symmetric", []
        if all(a.value_for_protocol("ip4") in listen_ips for a in same_port):
            return "public", same_port[:MAX_ADDRS]
        return "cone", same_port[:MAX_ADDRS]

    # -- triggering -----------------------------------------------------------------

    def _on_connected(self, conn: INetConn) -> None:
        if self.auto and self._nursery is not None:
            self._nursery.start_soon(self._maybe_punch, conn)

    async def _maybe_punch(self, conn: INetConn) -> None:
        # CircuitV2Protocol tags the swarm connection with its circuit address only after
        # the upgrade returns, i.e. after this notification: give it a few scheduler ticks.
        for _ in range(100):
            if is_relayed(conn):
                break
            await trio.sleep(0.001)
        else:
            return
        if getattr(getattr(conn, "direction", None), "name", "").lower() == "inbound":
            await self.punch(conn.muxed_conn.peer_id)

    # -- B: accepted the relayed connection, initiates ------------------------------

    async def punch(self, peer: ID) -> bool:
        if peer in self._busy or direct_conn(self.host, peer) is not None:
            return direct_conn(self.host, peer) is not None
        self._busy.add(peer)
        try:
            for attempt in range(MAX_ROUNDS):
                outcome = await self._punch_once(peer, attempt)
                if outcome is not None:
                    return outcome
            return False
        finally:
            self._busy.discard(peer)

    async def _punch_once(self, peer: ID, attempt: int) -> bool | None:
        """True: direct. False: hopeless (stay relayed). None: worth another round."""
        nonce = os.urandom(8)
        stream = await self.host.new_stream(peer, [PROTOCOL_ID])
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT):
                nat, ours = self.nat_view()
                t0 = time.monotonic()
                await _write(stream, {"type": "connect", "id": nonce, "attempt": attempt,
                                      "nat": nat, "addrs": [a.to_bytes() for a in ours]})
                resp = await _read(stream, "connect")
                rtt = time.monotonic() - t0
                theirs = _decode_addrs(resp.get("addrs"))
                if not ours or not theirs:
                    await _write(stream, {"type": "cancel", "id": nonce})
                    self._note(f"skip: nat={nat} theirs_nat={resp.get('nat')}")
                    self.gave_up.add(peer)
                    return False
                await _write(stream, {"type": "sync", "id": nonce})
            self._note(f"rtt={rtt * 1000:.1f}ms nat={nat}/{resp.get('nat')} "
                       f"ours={[str(a) for a in ours]} theirs={[str(a) for a in theirs]}")
            await trio.sleep(rtt / 2)
            if await self._dial_all(peer, theirs, as_responder=False):
                return True
            return None
        except (trio.TooSlowError, HolePunchProtocolError) as e:
            self._note(f"exchange failed: {e!r}")
            return None
        finally:
            await stream.close()

    # -- A: dialed through the relay, responds ---------------------------------------

    async def _handle(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT):
                msg = await _read(stream, "connect")
                theirs = _decode_addrs(msg.get("addrs"))
                nat, ours = self.nat_view()
                await _write(stream, {"type": "connect", "id": msg.get("id"), "nat": nat,
                                      "addrs": [a.to_bytes() for a in ours]})
                if not ours or not theirs:
                    self.gave_up.add(peer)  # the initiator will cancel: nothing to punch
                sync = await _read(stream, "sync")
                if sync.get("id") != msg.get("id"):
                    raise HolePunchProtocolError("sync for another attempt")
            self._note(f"sync received nat={nat}/{msg.get('nat')} "
                       f"theirs={[str(a) for a in theirs]}")
            if self.responder_skew:
                await trio.sleep(self.responder_skew)
            await self._dial_all(peer, theirs, as_responder=True)
        except (trio.TooSlowError, HolePunchProtocolError) as e:
            self._note(f"exchange ended: {e!r}")  # includes "cancel": no punch
        finally:
            await stream.close()

    # -- the punch ------------------------------------------------------------------

    async def _dial_all(self, peer: ID, addrs: list[multiaddr.Multiaddr], *,
                        as_responder: bool) -> bool:
        net = self.host.get_network()
        t0 = time.monotonic()
        failures = 0

        async def dial(addr: multiaddr.Multiaddr) -> None:
            nonlocal failures
            # Retry at once on errors: a SYN refused before the peer's SYN opened its
            # NAT, or EADDRNOTAVAIL because our listener already accepted the peer's SYN
            # (that connection becomes the direct one; the loop then sees it and stops).
            while direct_conn(self.host, peer) is None:
                try:
                    if as_responder:
                        await net.dial_addr_as_responder(addr, peer, self.source)
                    else:
                        await net.dial_addr(addr, peer, self.source)
                    return
                except Exception:  # noqa: BLE001 - prototype: any failure means retry
                    failures += 1
                    await trio.sleep(0.02)

        with trio.move_on_after(ROUND_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for a in addrs:
                    nursery.start_soon(dial, a)
                while direct_conn(self.host, peer) is None:
                    await trio.sleep(0.002)
                nursery.cancel_scope.cancel()
        ok = direct_conn(self.host, peer) is not None
        self._note(f"punch {'ok' if ok else 'failed'} in {1000 * (time.monotonic() - t0):.0f} ms "
                   f"as_responder={as_responder} failed_dials={failures}")
        return ok
