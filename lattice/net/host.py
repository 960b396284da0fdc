"""The py-libp2p host behind our `PeerNetwork` interface.

Owns: building a TCP + Noise + Yamux host from our `Identity` (the only combination
PY-LIBP2P.md found sound), adapting libp2p streams to `lattice.net.streams.Stream`,
connection events, RTT measurement and the per-connection view `lattice peers` shows.
Everything libp2p-specific stays here; protocol drivers see `PeerNetwork` only.

Sharp edges handled here (measured, PY-LIBP2P.md):
- `ConnectionConfig(max_connections_per_peer=1)`: dials take ~9 ms instead of 252 ms.
- libp2p configures logging at import; `quiet_libp2p_logging` reattaches ours.
- Dials to non-loopback addresses leave from the listen port (`ListenPortTCP`), so what
  a peer observes of a connection we made is the NAT mapping others can punch to
  (lattice.net.nat, docs/natlab.md).
- A relayed connection is tagged with its `/p2p-circuit` address only after the
  "connected" notification: `connections()` asks the live connections, not the event.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux as _yamux
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP
from libp2p.utils.address_validation import expand_wildcard_address

from lattice.core.identity import Identity
from lattice.net.streams import (
    ADDED,
    CONNECTED,
    DISCONNECTED,
    PeerError,
    PeerEvent,
    PeerEventHub,
    PeerEvents,
    StreamClosedError,
    StreamHandler,
    read_exactly,
)
from lattice.net.yamux_credit import release_credit_like_go_yamux

log = logging.getLogger("lattice.net.host")

# py-libp2p's Yamux sends a WINDOW_UPDATE frame after nearly every read (one more
# encrypted write per message received); go-yamux releases credit once half the window
# is consumed. Our protocols exchange many small messages, where those frames were ~15%
# of a daemon's busy CPU (lattice.net.yamux_credit).
release_credit_like_go_yamux()

YAMUX_PING_INTERVAL_S = 300  # an int: py-libp2p declares it one
"""py-libp2p's Yamux pings each connection from both ends every 30 s (`RTT_MEASURE_
INTERVAL`, read at each round): four frames per connection held, which was most of what
an idle daemon's connections cost it (issue 16). The RTT it keeps is only shown
(`peers.list`), and the connection stays warm in NAT tables through the sync session's
keepalives (one each way a minute, `[sync] idle_timeout`), so every 5 min is enough."""
if hasattr(_yamux, "RTT_MEASURE_INTERVAL"):
    _yamux.RTT_MEASURE_INTERVAL = YAMUX_PING_INTERVAL_S

YAMUX_SWEEP_INTERVAL_S = 120.0
"""py-libp2p's Yamux wakes every 30 s on each connection to forget streams that closed
(`_STALE_STREAM_SWEEP_INTERVAL`, read at each round): with 30 connections that is a
wakeup a second of an idle daemon. Our protocols keep their streams (sync sessions,
SWIM links) and close few, so sweeping every 2 min holds little longer."""
if hasattr(_yamux, "_STALE_STREAM_SWEEP_INTERVAL"):
    _yamux._STALE_STREAM_SWEEP_INTERVAL = YAMUX_SWEEP_INTERVAL_S

# What a libp2p stream or dial raises when the remote vanished or misbehaved.
_LIBP2P_PEER_ERRORS: tuple[type[BaseException], ...] = (
    StreamError, MuxedStreamError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
)
try:  # swarm dial failures
    from libp2p.network.exceptions import SwarmException
    _LIBP2P_PEER_ERRORS += (SwarmException,)
except ImportError:  # pragma: no cover - libp2p layout differs
    pass
try:
    from libp2p.protocol_muxer.exceptions import MultiselectClientError, MultiselectError
    _LIBP2P_PEER_ERRORS += (MultiselectClientError, MultiselectError)
except ImportError:  # pragma: no cover
    pass
try:
    from libp2p.host.exceptions import StreamFailure
    _LIBP2P_PEER_ERRORS += (StreamFailure,)
except ImportError:  # pragma: no cover
    pass

PEER_ERRORS = _LIBP2P_PEER_ERRORS + (PeerError,)


class DialError(PeerError):
    """A dial failed; the message says why in words a user can act on."""


class BadDialTarget(DialError):
    """What was given to dial is not a dialable address or peer id (or is ourselves):
    the caller's mistake, not the network's."""


class ListenError(ValueError):
    """A listen address cannot be served (malformed, taken, or not on this host)."""


# Failures py-libp2p logs at ERROR that are routine on a live network: a peer that
# crashed or closed mid-handshake, a dial to a stale address, a stream to a peer that
# went away. Each also reaches us as an exception that we handle and count, so the ERROR
# line only alarms volunteers reading their logs. (logger, message prefix, and a
# substring the message must also hold where the prefix alone would hide real errors)
ROUTINE_LIBP2P_FAILURES: tuple[tuple[str, str, str], ...] = (
    ("libp2p.network.swarm", "fail to upgrade mux for peer", ""),
    ("libp2p.host.basic_host", "Failed to open stream to peer", ""),
    ("libp2p.protocol_muxer.multiselect_client", "MultiselectClient handshake: ", ""),
    ("libp2p.stream_muxer.yamux.yamux", "Error in handle_incoming for peer",
     ": ConnectionClosedError: "),
    ("libp2p.transport.tcp.tcp", "Failed to open TCP stream", ""),
    # the same refused or unreachable dial, from the listen-port-bound dial used for
    # hole punching: it wraps the OSError, so the library calls it "unexpected"
    ("libp2p.transport.tcp.tcp", "Unexpected error opening TCP stream", ": Failed to connect "),
    # a connection that completes its handshake while the host is shutting down
    ("libp2p.network.swarm", "[ADDCONN_FAIL] add_conn failed for peer",
     "Cannot schedule task after service has stopped"),
)


class RoutineFailureFilter(logging.Filter):
    """Demotes `ROUTINE_LIBP2P_FAILURES` to DEBUG: dropped unless we log at DEBUG, and
    counted either way (`demoted`)."""

    def __init__(self, patterns: list[tuple[str, str]], level: int) -> None:
        super().__init__()
        self.patterns = patterns
        self.level = level
        self.demoted = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if not (isinstance(msg, str) and any(msg.startswith(prefix)
                                              and detail in record.getMessage()
                                              for prefix, detail in self.patterns)):
            return True
        self.demoted += 1
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.level <= logging.DEBUG


def quiet_libp2p_logging(level: int) -> list[RoutineFailureFilter]:
    """libp2p sets handlers at import time; route its records through ours instead, keep
    its chattiest loggers (DHT, DCUtR, UPnP) at WARNING unless we debug, and demote its
    routine failures to DEBUG. Returns the filters (their ``demoted`` counts)."""
    root = logging.getLogger("libp2p")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.propagate = True
    root.setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("libp2p.") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)  # some set INFO on themselves at import
    filters = []
    for name in sorted({n for n, _, _ in ROUTINE_LIBP2P_FAILURES}):
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RoutineFailureFilter)]:
            logger.removeFilter(old)  # called again (tests): one filter per logger
        f = RoutineFailureFilter([(p, d) for n, p, d in ROUTINE_LIBP2P_FAILURES if n == name],
                                 level)
        logger.addFilter(f)
        filters.append(f)
    return filters


class Libp2pStream:
    """Adapts a libp2p `INetStream` to our `Stream` (EOF is b"", resets are PeerError)."""

    def __init__(self, stream: INetStream, protocol: str) -> None:
        self._s = stream
        self.protocol = protocol
        self.remote_peer_id = stream.muxed_conn.peer_id.to_base58()

    async def read(self, max_bytes: int) -> bytes:
        try:
            return await self._s.read(max_bytes)
        except EOFError:
            return b""
        except _LIBP2P_PEER_ERRORS as e:
            raise StreamClosedError(f"stream from {self.remote_peer_id[-8:]} failed: {e}") from None

    async def write(self, data: bytes | memoryview) -> None:
        try:
            await self._s.write(bytes(data))
        except _LIBP2P_PEER_ERRORS as e:
            raise StreamClosedError(f"stream to {self.remote_peer_id[-8:]} failed: {e}") from None

    async def close_write(self) -> None:
        try:
            await self._s.close_write()  # type: ignore[attr-defined]  # NetStream has it; INetStream omits it
        except _LIBP2P_PEER_ERRORS:
            pass  # the remote is gone; nothing left to flush

    async def close(self) -> None:
        try:
            await self._s.close()
        except _LIBP2P_PEER_ERRORS:
            pass

    async def reset(self) -> None:
        try:
            await self._s.reset()
        except _LIBP2P_PEER_ERRORS:
            pass


@dataclass
class _Conn:
    direction: str
    addrs: list[str]
    relayed: bool
    since: float


class _Notifee(INotifee):
    def __init__(self, node: Libp2pNode) -> None:
        self._node = node

    async def opened_stream(self, network: Any, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: Any, stream: INetStream) -> None:
        pass

    async def connected(self, network: Any, conn: INetConn) -> None:
        self._node._on_connected(conn)

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        self._node._on_disconnected(conn)

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


def _direction(conn: INetConn) -> str:
    d = getattr(conn, "direction", None)
    name = getattr(d, "name", str(d)).lower()
    return name if name in ("inbound", "outbound") else "unknown"


def _conn_addrs(conn: INetConn) -> list[str]:
    try:
        addrs = conn.get_transport_addresses()
    except _LIBP2P_PEER_ERRORS:
        addrs = []
    if not addrs:
        remote = None
        muxed = getattr(conn, "muxed_conn", None)
        if muxed is not None and hasattr(muxed, "get_remote_address"):
            remote = muxed.get_remote_address()
        if remote:
            host, port = remote
            proto = "ip6" if ":" in host else "ip4"
            return [f"/{proto}/{host}/tcp/{port}"]
    return [str(a) for a in addrs]


class Libp2pNode:
    """A running libp2p host: implements `PeerNetwork` plus what the daemon shows."""

    def __init__(self, host: Any, identity: Identity) -> None:
        self.host = host
        self.identity = identity
        self.events = PeerEventHub()
        self._conns: dict[str, _Conn] = {}
        self.stream_retries = 0  # streams opened on a second try (see open_stream)
        # (when, listen addrs, what they expand to): interfaces are not re-read each call
        self._dialable: tuple[float, list[str], list[str]] = (-float("inf"), [], [])
        self._rtt_ms: dict[str, float] = {}
        self._measuring: set[str] = set()
        self._reach: Callable[[str], Awaitable[Any]] | None = None  # see set_peer_router

    def set_peer_router(self, reach: Callable[[str], Awaitable[Any]] | None) -> None:
        """``reach(peer_id)`` connects to a peer we have no connection to, by whatever
        way there is (lattice.net.nat: its known addresses, else through a relay);
        `open_stream` calls it first. Without one, only known addresses are dialed, and
        a peer behind a NAT is out of reach unless it dialed us."""
        self._reach = reach

    # -- PeerNetwork -------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        async def _handle(stream: INetStream) -> None:
            wrapped = Libp2pStream(stream, protocol)
            try:
                await handler(wrapped)
            except PeerError as e:
                log.debug("peer=%s protocol=%s exchange ended: %s",
                          wrapped.remote_peer_id, protocol, e)
            finally:
                await wrapped.close()

        self.host.set_stream_handler(protocol, _handle)

    async def open_stream(self, peer_id: str, protocol: str, *, route: bool = True) -> Libp2pStream:
        """A new stream to ``peer_id``, connecting to it first if need be: with ``route``
        through the peer router (`set_peer_router`) when there is one. When opening fails
        while a connection to the peer is still up, it is tried once more: under load we
        saw negotiation fail on a connection that was reset meanwhile, with another one
        to the same peer healthy. A failed dial is not retried here."""
        pid = ID.from_base58(peer_id)
        if route and self._reach is not None and not self.host.get_network().connections.get(pid):
            try:
                await self._reach(peer_id)
            except PeerError as e:
                raise PeerError(f"cannot open {protocol} to {peer_id}: {e}") from None
        try:
            s = await self.host.new_stream(pid, [protocol])
        except _LIBP2P_PEER_ERRORS as e:
            if not self.host.get_network().connections.get(pid):
                raise PeerError(f"cannot open {protocol} to {peer_id}: {e}") from None
            self.stream_retries += 1
            log.debug("peer=%s opening %s failed on a live connection (%s); once more",
                      peer_id, protocol, e)
            try:
                s = await self.host.new_stream(pid, [protocol])
            except _LIBP2P_PEER_ERRORS as e:
                raise PeerError(f"cannot open {protocol} to {peer_id}: {e}") from None
        return Libp2pStream(s, protocol)

    def connected_peers(self) -> list[str]:
        return sorted(p.to_base58() for p in self.host.get_connected_peers())

    def peer_events(self, *, buffer: int = 64) -> PeerEvents:
        return self.events.subscribe(buffer)

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` (`lattice.net.connmgr` trims)."""
        try:
            await self.host.disconnect(ID.from_base58(peer_id))
        except (OSError, ValueError, KeyError) as e:  # already gone, or not a peer id
            raise PeerError(f"disconnect {peer_id}: {e}") from e

    # -- address book (lattice.net.dht.AddressBook) ------------------------------------
    def add_addrs(self, peer_id: str, addrs: Sequence[str], ttl: float = 3600.0) -> None:
        """Remember addresses a protocol learned so `open_stream` can dial the peer;
        a peer's malformed addresses are skipped, not raised."""
        good = []
        for a in addrs:
            try:
                good.append(multiaddr.Multiaddr(a.split("/p2p/")[0] if "/p2p/" in a else a))
            except (ValueError, TypeError, KeyError, multiaddr.exceptions.Error):
                continue
        if good:
            try:
                pid = ID.from_base58(peer_id)
            except (ValueError, KeyError):
                return
            self.host.get_peerstore().add_addrs(pid, good, int(ttl))

    def get_addrs(self, peer_id: str) -> list[str]:
        try:
            return [str(a) for a in self.host.get_peerstore().addrs(ID.from_base58(peer_id))]
        except (ValueError, KeyError):  # a bad id; PeerStoreError (a KeyError): unknown
            return []

    # -- addresses and dialing ------------------------------------------------------
    def listen_addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_transport_addrs()]

    def advertised_addrs(self) -> list[str]:
        """`dialable_addrs` with our peer id: what to hand another node to bootstrap off."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.dialable_addrs()]

    def dialable_addrs(self) -> list[str]:
        """Our listen addresses as another host can dial them: a wildcard (0.0.0.0, ::)
        becomes this host's interface addresses, loopback and link-local left out unless
        nothing else is there (dialing 0.0.0.0 reaches the dialer's own host). Interfaces
        are re-read at most every 10 s. This is what the DHT, mDNS and the bulk side
        channel announce."""
        now, listen = time.monotonic(), self.listen_addrs()
        since, was, dialable = self._dialable
        if listen != was or now - since >= 10.0:
            dialable = _expand_wildcards(listen)
            self._dialable = (now, listen, dialable)
        return list(dialable)

    def observed_addrs(self) -> list[str]:
        mgr = getattr(self.host, "_observed_addr_manager", None) or getattr(
            self.host, "observed_addr_manager", None)
        if mgr is None or not hasattr(mgr, "addrs"):
            return []
        try:
            return sorted({str(a) for a in mgr.addrs()})
        except (TypeError, AttributeError):
            return []

    async def connect(self, addr: str, *, timeout: float = 10.0) -> str:
        """Dial ``addr`` (must end in /p2p/<peer id>); return the peer id."""
        try:
            maddr = multiaddr.Multiaddr(addr)
            info = info_from_p2p_addr(maddr)
        except (ValueError, TypeError, KeyError, multiaddr.exceptions.Error) as e:
            raise BadDialTarget(
                f"not a dialable multiaddr: {addr!r} ({e}); expected e.g. "
                "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...") from None
        peer_id = info.peer_id.to_base58()
        if peer_id == self.peer_id:
            raise BadDialTarget("that address is this daemon itself")
        self._forget_dial_failures(info.peer_id)
        with trio.move_on_after(timeout) as scope:
            try:
                await self.host.connect(info)
            except _LIBP2P_PEER_ERRORS as e:
                raise DialError(f"dial {addr} failed: {_reason(e)}") from None
        if scope.cancelled_caught:
            raise DialError(f"dial {addr} timed out after {timeout:g} s")
        return peer_id

    def _forget_dial_failures(self, peer_id: ID) -> None:
        # The swarm refuses to redial a peer whose addresses all failed recently
        # ("negative cache"), even after it came back. Our callers (bootstrap keeper,
        # a user's `peers connect`) decide when to retry, so an explicit dial clears it.
        cache = getattr(self.host.get_network(), "_negative_peer_cache", None)
        if cache is not None and hasattr(cache, "evict"):
            cache.evict(str(peer_id))

    async def measure_rtt(self, peer_id: str, *, timeout: float = 5.0) -> float | None:
        """Round-trip time in ms: the fastest of 3 echoes of 32 random bytes on one
        `/ipfs/ping/1.0.0` stream (the first pays for stream setup, the min does not),
        or None when the peer does not answer. Our own loop, not py-libp2p's
        PingService: its stream reuse calls a bool (`is_closed()`) and raised TypeError.

        A stream can end under us while the peer stays connected: the first ping of a
        peer reached through a relay often runs on the relayed connection just as it is
        retired for a direct one (3 of 20 NAT bench attempts). Echoes that came back
        before that still count; with none yet, a second stream is tried."""
        if peer_id in self._measuring:
            return self._rtt_ms.get(peer_id)
        self._measuring.add(peer_id)
        samples: list[float] = []
        try:
            with trio.move_on_after(timeout):
                for _ in range(2):
                    try:
                        await self._echo(peer_id, samples)
                        break
                    except PeerError:
                        if samples or not self.live_connections(peer_id):
                            break
        finally:
            self._measuring.discard(peer_id)
        if not samples:
            return None
        self._rtt_ms[peer_id] = best = min(samples)
        return best

    async def _echo(self, peer_id: str, samples: list[float], echoes: int = 3) -> None:
        """Ping ``echoes`` times on one new stream, appending each RTT to ``samples``."""
        stream = await self.open_stream(peer_id, PING_PROTOCOL)
        try:
            for _ in range(echoes):
                payload = os.urandom(32)
                t = time.perf_counter()
                await stream.write(payload)
                if await read_exactly(stream, 32) != payload:
                    raise StreamClosedError(f"{peer_id[-8:]} echoed other bytes than sent")
                samples.append((time.perf_counter() - t) * 1000.0)
        finally:
            await stream.close()

    def listen_endpoint(self) -> tuple[str, int] | None:
        """(ip, port) of our TCP listener (ip may be 0.0.0.0), once listening."""
        return _listen_endpoint(self.host)

    def live_connections(self, peer_id: str) -> list[INetConn]:
        try:
            return list(self.host.get_network().get_connections(ID.from_base58(peer_id)))
        except (ValueError, KeyError):
            return []

    def remote_ip(self, peer_id: str) -> str | None:
        """Where ``peer_id``'s connection comes from, for quotas per network: the IP of a
        direct connection, else ``relay:<relay peer id>`` for a relayed one, else None."""
        conns = self.live_connections(peer_id)
        for conn in conns:
            addr = remote_address(conn)
            if addr is not None:
                return addr[0]
        for conn in conns:
            for a in _conn_addrs(conn):
                head, circuit, _ = a.partition("/p2p-circuit")
                if circuit and "/p2p/" in head:
                    return "relay:" + head.rsplit("/p2p/", 1)[1]
        return None

    def connection_kind(self, peer_id: str) -> str | None:
        """"direct" if any connection to the peer is direct, "relayed" if all go through
        a relay, None when not connected."""
        conns = self.live_connections(peer_id)
        if not conns:
            return None
        return "relayed" if all(is_relayed(c) for c in conns) else "direct"

    def connections(self) -> list[dict[str, Any]]:
        out = []
        for peer_id, c in sorted(self._conns.items()):
            conns = self.live_connections(peer_id)
            direct = [x for x in conns if not is_relayed(x)]
            kind = "relayed" if conns and not direct else ("direct" if conns else
                                                              ("relayed" if c.relayed else "direct"))
            addrs = _conn_addrs(direct[0]) if direct else (_conn_addrs(conns[0]) if conns else c.addrs)
            out.append({
                "peer_id": peer_id,
                "addrs": addrs,
                "direction": c.direction,
                "connection": kind,
                "rtt_ms": self.rtt_ms(peer_id),
            })
        return out

    def rtt_ms(self, peer_id: str) -> float | None:
        """The peer's round-trip time in ms: the muxer's own (yamux pings every
        connection every `YAMUX_PING_INTERVAL_S`, one frame each way: it stays current
        at no cost of ours; issue 16), else the echo `measure_rtt` took on connect, else
        None."""
        for conn in sorted(self.live_connections(peer_id), key=is_relayed):  # direct first
            muxer_rtt = getattr(conn.muxed_conn, "rtt", lambda: 0.0)()
            if muxer_rtt > 0:
                return float(muxer_rtt) * 1000.0
        return self._rtt_ms.get(peer_id)

    # -- events -------------------------------------------------------------------
    def _on_connected(self, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id.to_base58()
        addrs = _conn_addrs(conn)
        relayed = any("p2p-circuit" in a for a in addrs)
        first = peer_id not in self._conns
        self._conns[peer_id] = _Conn(_direction(conn), addrs, relayed, time.time())
        # a second connection to a connected peer (a punched direct one) is no news to
        # those who count peers, but it is to the hole puncher (lattice.net.nat)
        self.events.publish(PeerEvent(CONNECTED if first else ADDED, peer_id,
                                      _direction(conn), addrs[0] if addrs else "", relayed))

    def _on_disconnected(self, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id.to_base58()
        if self.host.get_network().connections.get(conn.muxed_conn.peer_id):
            return  # another connection to the same peer is still up
        c = self._conns.pop(peer_id, None)
        self._rtt_ms.pop(peer_id, None)
        if c is not None:
            self.events.publish(PeerEvent(DISCONNECTED, peer_id, c.direction,
                                          c.addrs[0] if c.addrs else "", c.relayed))


def is_relayed(conn: INetConn) -> bool:
    """True for a connection through a Circuit Relay v2 hop. py-libp2p tags an inbound
    relayed connection only after its "connected" notification, so ask when needed."""
    try:
        addrs = conn.get_transport_addresses() or []
    except _LIBP2P_PEER_ERRORS:
        return False
    return any("p2p-circuit" in str(a) for a in addrs)


def local_address(conn: INetConn) -> tuple[str, int] | None:
    """Our end (ip, port) of a direct TCP connection, or None (relayed, or py-libp2p's
    layering changed: Yamux -> secure session -> Noise framing -> raw conn -> socket)."""
    obj: Any = getattr(conn, "muxed_conn", conn)
    for attr in ("secured_conn", "conn", "read_writer", "read_write_closer", "stream",
                 "stream", "socket"):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    try:
        ip, port = obj.getsockname()[:2]
    except (OSError, AttributeError, TypeError, ValueError):
        return None
    return (str(ip), int(port))


def remote_address(conn: INetConn) -> tuple[str, int] | None:
    """The far end (ip, port) of a direct TCP connection as our socket sees it."""
    muxed = getattr(conn, "muxed_conn", conn)
    try:
        remote = muxed.get_remote_address()  # type: ignore[union-attr]  # the muxed conn has it; INetConn omits it
    except _LIBP2P_PEER_ERRORS:
        return None
    if not remote or is_relayed(conn):
        return None
    return (str(remote[0]), int(remote[1]))


def _listen_endpoint(host: Any) -> tuple[str, int] | None:
    for a in host.get_transport_addrs():
        text = str(a)
        if "p2p-circuit" in text:
            continue
        try:
            return (a.value_for_protocol("ip4"), int(a.value_for_protocol("tcp")))
        except (ValueError, TypeError, multiaddr.exceptions.Error):
            continue
    return None


class ListenPortTCP(TCP):
    """TCP whose dials to non-loopback addresses leave from our listen port.

    Why: a peer (or relay) then observes the NAT mapping of the very port we listen on,
    which is the address hole punching needs (docs/natlab.md). Both sockets set
    SO_REUSEPORT (py-libp2p's listener does already). When the 4-tuple is taken (a
    connection or TIME_WAIT to the same peer address from that port) the dial falls
    back to an ephemeral port. Loopback stays ephemeral: nothing to observe there, and
    two local daemons dialing each other at the same instant would otherwise merge into
    one TCP connection with two Noise initiators.
    """

    def __init__(self) -> None:
        super().__init__()
        self.source: tuple[str, int] | None = None  # set once the listener is up
        self.source_fallbacks = 0

    def _source_for(self, maddr: multiaddr.Multiaddr) -> tuple[str, int] | None:
        if self.source is None:
            return None
        try:
            dest = ipaddress.ip_address(maddr.value_for_protocol("ip4"))
        except (ValueError, TypeError, multiaddr.exceptions.Error):
            return None  # ip6 / dns: not ours to bind
        src_ip = ipaddress.ip_address(self.source[0])
        if dest.is_loopback or (src_ip.is_loopback and not dest.is_loopback):
            return None
        return self.source

    async def dial(self, maddr: multiaddr.Multiaddr) -> Any:
        source = self._source_for(maddr)
        if source is not None:
            try:
                return await self.dial_with_source(maddr, source)
            except OpenConnectionError as e:
                if _os_errno(e) not in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
                    raise
                self.source_fallbacks += 1
        return await super().dial(maddr)


def _os_errno(e: BaseException) -> int | None:
    """The errno of the OSError under py-libp2p's (nested) OpenConnectionError."""
    cause: BaseException | None = e
    for _ in range(5):
        if isinstance(cause, OSError):
            return cause.errno
        if cause is None:
            return None
        cause = cause.__cause__
    return None


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if "Connection refused" in text or isinstance(e, ConnectionRefusedError):
        return "connection refused (is a daemon listening there?)"
    return text.splitlines()[0][:300]


def build_host(identity: Identity, listen: list[str], *, max_connections: int = 256) -> Any:
    key_pair = create_new_key_pair(identity.seed)
    security = {NOISE_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)}
    host = new_host(
        key_pair=key_pair,
        sec_opt=security,
        muxer_opt={TProtocol(YAMUX_ID): Yamux},
        listen_addrs=[multiaddr.Multiaddr(a) for a in listen],
        # min_connections/low_watermark 0: libp2p's auto-connector would otherwise dial
        # up to 200 peerstore entries on its own; we decide whom to connect to.
        connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0,
                                           low_watermark=0, max_connections=max_connections,
                                           high_watermark=max_connections),
        enable_mDNS=False,  # lattice.net.mdns starts it after the node is up
        enable_upnp=False,  # lattice.net.nat.upnp does UPnP when configured (no 1 s stall)
        transports=[ListenPortTCP()],
    )
    # One attempt per dial: the swarm's own retries (3, with backoff) made a dial to a
    # dead address take seconds; retry policy belongs to the caller (bootstrap keeper).
    # (the Swarm has retry_config; libp2p's INetworkService does not declare it)
    host.get_network().retry_config = RetryConfig(max_retries=0)  # type: ignore[attr-defined]
    return host


@asynccontextmanager
async def open_libp2p_node(identity: Identity, listen: list[str], *,
                           max_connections: int = 256) -> AsyncIterator[Libp2pNode]:
    """Run a host listening on ``listen``; yields the node (`PeerNetwork`)."""
    try:
        maddrs = [multiaddr.Multiaddr(a) for a in listen]
    except (ValueError, multiaddr.exceptions.Error) as e:
        raise ListenError(f"bad listen address: {e}") from None
    host = build_host(identity, listen, max_connections=max_connections)
    node = Libp2pNode(host, identity)
    host.get_network().register_notifee(_Notifee(node))
    listening = False
    async with host.run(maddrs):
        # py-libp2p logs a listener that failed (port taken, address not ours) and runs
        # on without it: a daemon nobody can dial. Refuse to start instead.
        listening = len(host.get_transport_addrs()) >= len(maddrs)
        if listening:
            for t in host.get_network().transport_manager.get_transports():
                if isinstance(t, ListenPortTCP):
                    t.source = _listen_endpoint(host)
            # py-libp2p's auto-connector dials every peer in the peerstore until it
            # holds (low + high water) / 2 = 128 connections: a full mesh at any size
            # we run, fighting lattice.net.connmgr. Connections are ours to manage.
            await host.get_network().auto_connector.stop()
            try:
                yield node
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await host.close()
    if not listening:  # raised here, outside the host's nurseries: a plain exception
        raise ListenError(
            f"cannot listen on {', '.join(listen)}: address in use or not an address of "
            "this host (the log above has the system's reason)")


def is_unspecified(addr: str) -> bool:
    """True for a multiaddr on 0.0.0.0 or ::, which no peer can dial."""
    parts = addr.split("/")
    return len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] in ("0.0.0.0", "::")


def _expand_wildcards(listen_addrs: list[str]) -> list[str]:
    wide: list[str] = []
    local: list[str] = []
    for a in listen_addrs:
        if not is_unspecified(a):
            wide.append(a)
            continue
        try:
            expanded = [str(e) for e in expand_wildcard_address(multiaddr.Multiaddr(a))]
        except (ValueError, TypeError, KeyError, multiaddr.exceptions.Error):
            continue
        for e in expanded:
            if is_unspecified(e):
                continue
            ip = ipaddress.ip_address(e.split("/")[2])
            (local if ip.is_loopback or ip.is_link_local else wide).append(e)
    return list(dict.fromkeys(wide or local))
