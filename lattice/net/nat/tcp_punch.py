"""Birthday probing's sockets: many TCP connections from fresh ports (the primer) and many
dials to random ports (the prober), bounded in rate and count, and the upgrade of the one
that connects into a libp2p connection.

Owns `punch` (the dials of a plain hole punch), `prime` and `probe` (birthday probing),
and `adopt` (a connected socket -> a Noise + Yamux connection in the swarm, as initiator
or responder). The plan and its limits come from
`lattice.core.holepunch` (`Prime`, `Probe`); the driver is `lattice.net.nat.holepunch`.
Must not import latticed.

Why raw sockets: py-libp2p's dials go one at a time through the swarm; a birthday round
needs hundreds of SYNs in flight, each from its own port (the primer: a symmetric NAT
gives every new connection a new external port) or to its own port (the prober: from
our listen port, whose mapping a cone NAT keeps for every destination). A probe that
reaches one of the primer's mappings meets a socket in SYN_SENT: TCP simultaneous open
completes both, and each side upgrades its socket with the Noise role the plan fixed
(the prober initiates). Nothing is retransmitted beyond `_SYN_RETRIES`, and every socket
is closed when the round ends.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import multiaddr
import trio
from cryptography.exceptions import InvalidTag
from libp2p.abc import INetConn
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.security.exceptions import HandshakeFailure
from libp2p.transport.exceptions import UpgradeFailure
from noise.exceptions import (  # type: ignore[import-untyped]
    NoiseHandshakeError,
    NoiseInvalidMessage,
    NoiseMaxNonceError,
    NoiseValidationError,
    NoiseValueError,
)

from lattice.core.holepunch import Addr
from lattice.net.host import PEER_ERRORS
from lattice.net.streams import PeerError

# What a Noise handshake with a peer that sends garbage raises through py-libp2p's
# upgrader, which wraps only its own handshake failures: the noise library's errors and
# the AEAD's InvalidTag come through raw. The peer's fault, every one.
HANDSHAKE_ERRORS: tuple[type[BaseException], ...] = (
    InvalidTag, HandshakeFailure, UpgradeFailure, NoiseHandshakeError, NoiseInvalidMessage,
    NoiseMaxNonceError, NoiseValidationError, NoiseValueError)

log = logging.getLogger("lattice.net.nat.holepunch")

_SYN_RETRIES = 2  # TCP_SYNCNT of the primer's sockets: at most 3 SYNs each
_PROBE_LIFETIME = 0.5  # s a probe waits for an answer (several RTTs) before it is closed
_PORT_RANGE = (1024, 65535)  # where a NAT picks ports for connections from ports >= 1024
_ADOPT_TIMEOUT = 10.0  # s for the Noise and Yamux handshakes on the winning socket

# takes a connected socket over (True), or closes it and says why it could not (False)
Adopt = Callable[[trio.socket.SocketType], Awaitable[bool]]


def _tcp_socket(source: Addr, *, reuse_port: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in source[0] else socket.AF_INET,
                      socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, _SYN_RETRIES)
        s.bind(source)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def _start_connect(s: socket.socket, target: Addr) -> bool:
    """Send the SYN now (a non-blocking connect); False if it failed at once."""
    return s.connect_ex(target) in (0, errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN)


async def _connect_result(sock: trio.socket.SocketType, until: float) -> int | None:
    """Wait (until ``until``) for a non-blocking connect to finish: 0 when it connected,
    else its errno; None when it was still pending at ``until``."""
    with trio.move_on_at(until):
        await trio.lowlevel.wait_writable(sock)
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return None


async def _connected(sock: trio.socket.SocketType, until: float) -> bool:
    return await _connect_result(sock, until) == 0


async def _paced(total: int, rate: float, tick: float = 0.01) -> AsyncIterator[int]:
    """Yield how many to send now, ``total`` in all at ``rate`` a second: bursts each
    ``tick`` (a sleep per SYN would be ruled by timer granularity, not by ``rate``)."""
    start, done = trio.current_time(), 0
    while done < total:
        due = min(total, int((trio.current_time() - start) * rate) + 1)
        if due > done:
            yield due - done
            done = due
        await trio.sleep(tick)


class _Winner:
    """The first socket to connect and be adopted wins, and the rest of the round is
    cancelled; one that fails its handshake leaves the round going."""

    def __init__(self, scope: trio.CancelScope, adopt: Adopt) -> None:
        self.scope = scope
        self.adopt = adopt
        self.busy = False

    async def offer(self, sock: trio.socket.SocketType) -> bool:
        """True when ``sock`` was adopted (it is no longer the caller's to close)."""
        if self.busy:
            return False  # another socket is being adopted; this one closes
        self.busy = True
        adopted = False
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(_ADOPT_TIMEOUT):
                adopted = await self.adopt(sock)
        finally:
            self.busy = False
        if adopted:
            self.scope.cancel()
        return adopted


async def prime(source_ip: str, target: Addr, ports: int, rate: float, until: float,
                adopt: Adopt, *, primed: Callable[[], None],
                stats: dict[str, int]) -> None:
    """The primer: ``ports`` connections to ``target`` from fresh ports, paced at
    ``rate``; ``primed()`` once every SYN has left; the first that completes (a probe
    found its mapping) is handed to ``adopt``; all closed by ``until``. Counts go into
    ``stats`` as they happen (opened, failed, connected)."""
    socks: list[trio.socket.SocketType] = []
    stats.update(opened=0, failed=0, connected=0)
    try:
        async with trio.open_nursery() as nursery:
            winner = _Winner(nursery.cancel_scope, adopt)

            async def watch(sock: trio.socket.SocketType) -> None:
                if await _connected(sock, until) and await winner.offer(sock):
                    socks.remove(sock)  # adopted: no longer ours to close
                    stats["connected"] += 1

            async for burst in _paced(ports, rate):
                for _ in range(burst):
                    try:
                        raw = _tcp_socket((source_ip, 0), reuse_port=False)
                    except OSError:
                        stats["failed"] += 1
                        continue
                    if not _start_connect(raw, target):
                        raw.close()
                        stats["failed"] += 1
                        continue
                    sock = trio.socket.from_stdlib_socket(raw)
                    socks.append(sock)
                    stats["opened"] += 1
                    nursery.start_soon(watch, sock)
            primed()
            await trio.sleep_until(until)
            nursery.cancel_scope.cancel()
    finally:
        for sock in socks:
            sock.close()


async def probe(source: Addr, ips: tuple[str, ...], count: int, rate: float, until: float,
                adopt: Adopt, *, rng: random.Random, stats: dict[str, int]) -> None:
    """The prober: ``count`` dials from ``source`` (our listen port) to random ports at
    ``ips``, paced at ``rate``, each given `_PROBE_LIFETIME` to be answered; the first
    that connects is handed to ``adopt``. Counts go into ``stats`` (sent, failed,
    connected)."""
    stats.update(sent=0, failed=0, connected=0)
    async with trio.open_nursery() as nursery:
        winner = _Winner(nursery.cancel_scope, adopt)

        async def one(target: Addr) -> None:
            try:
                raw = _tcp_socket(source, reuse_port=True)
            except OSError:
                stats["failed"] += 1
                return
            sock = trio.socket.from_stdlib_socket(raw)
            adopted = False
            try:
                if not _start_connect(raw, target):
                    stats["failed"] += 1
                    return
                stats["sent"] += 1
                deadline = min(until, trio.current_time() + _PROBE_LIFETIME)
                if await _connected(sock, deadline) and await winner.offer(sock):
                    adopted = True
                    stats["connected"] += 1
            finally:
                if not adopted:
                    sock.close()

        with trio.move_on_at(until):
            sent = 0
            async for burst in _paced(count, rate):
                for _ in range(burst):
                    nursery.start_soon(one, (ips[sent % len(ips)], rng.randint(*_PORT_RANGE)))
                    sent += 1
            await trio.sleep_until(until)
        nursery.cancel_scope.cancel()


async def punch(source: Addr, targets: tuple[Addr, ...], until: float, adopt: Adopt, *,
                pause: float, stats: dict[str, int]) -> None:
    """Dial every target from ``source`` (our listen port) until one connects or
    ``until``; the connected socket goes to ``adopt``. A dial refused at once (a router
    that rejects) is made again at once: our NAT's entry for it waits for the peer's
    SYN, which must meet a connecting socket of ours (TCP simultaneous open), not our
    listener; any other failure waits ``pause``. A socket per attempt, no library in
    between, so the gap between attempts is microseconds, not a dial's milliseconds."""
    stats.setdefault("attempts", 0)
    stats.setdefault("refused", 0)
    async with trio.open_nursery() as nursery:
        winner = _Winner(nursery.cancel_scope, adopt)

        async def one(target: Addr) -> None:
            while trio.current_time() < until:
                try:
                    raw = _tcp_socket(source, reuse_port=True)
                except OSError:
                    await trio.sleep(pause)
                    continue
                sock = trio.socket.from_stdlib_socket(raw)
                adopted = False
                try:
                    stats["attempts"] += 1
                    if not _start_connect(raw, target):  # the 4-tuple is taken: a
                        await trio.sleep(pause)  # connection of the peer's landed already
                        continue
                    err = await _connect_result(sock, until)
                    if err == 0:
                        adopted = await winner.offer(sock)
                        if adopted:
                            return
                    refused = err == errno.ECONNREFUSED
                    stats["refused"] += refused
                finally:
                    if not adopted:
                        sock.close()
                if not refused:
                    await trio.sleep(pause)

        for target in targets:
            nursery.start_soon(one, target)


def dial_error(e: BaseException) -> str:
    """How a dial failed, from the OSError under py-libp2p's and trio's wrapping: the
    router (or host) answered with a RST or ICMP port unreachable ("refused", both
    ECONNREFUSED), another ICMP error ("unreachable"), or not at all ("timeout")."""
    seen = 0
    todo: list[BaseException] = [e]
    while todo and seen < 16:
        cause = todo.pop()
        seen += 1
        if isinstance(cause, OSError) and cause.errno is not None:
            if cause.errno == errno.ECONNREFUSED:
                return "refused"
            if cause.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES,
                               errno.EPERM):
                return "unreachable"
            if cause.errno == errno.ETIMEDOUT:
                return "timeout"
        if isinstance(cause, BaseExceptionGroup):
            todo.extend(cause.exceptions)
        for nxt in (cause.__cause__, cause.__context__):
            if nxt is not None:
                todo.append(nxt)
    return "unreachable"


async def adopt(node: Any, sock: trio.socket.SocketType, peer_id: str, *,
                initiator: bool) -> INetConn:
    """A connected socket -> a secured, multiplexed connection to ``peer_id`` in the
    swarm, with the Noise role the plan fixed. Raises PeerError (and closes it) when
    the handshake fails or the other end is someone else."""
    pid = ID.from_base58(peer_id)
    raw = RawConnection(TrioTCPStream(trio.SocketStream(sock)), initiator)
    network = node.host.get_network()
    try:
        if initiator:
            return await node.host.upgrade_outbound_connection(raw, pid)
        ip, port = sock.getpeername()[:2]
        where = multiaddr.Multiaddr(f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{port}")
        muxed = await network.upgrade_inbound_raw_conn(raw, where)
    except (*PEER_ERRORS, *HANDSHAKE_ERRORS) as e:
        raise PeerError(f"upgrading the punched connection failed: "
                        f"{type(e).__name__}: {e}") from None
    if muxed.peer_id != pid:
        await muxed.close()
        raise PeerError(f"the punched connection reached {muxed.peer_id}, not {peer_id}")
    for conn in network.get_connections(pid):
        if conn.muxed_conn is muxed:
            return conn
    raise PeerError("the punched connection was not registered")
