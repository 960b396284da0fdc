"""The local RPC server: msgpack-RPC over a Unix domain socket.

Owns the socket file (mode 0600; 0660 with `rpc.read_group`), peer-credential checks
(same uid or root: full access; a member of the read group: read access only), file
descriptors passed with requests (SCM_RIGHTS: an attached loop's shared memory; at most
``max_fds`` unclaimed per connection, closed with it), framing limits, the two wire forms (length-prefixed frames, or a plain msgpack-RPC stream as
neovim's clients speak it: told apart by a connection's first byte), dispatch through
the method table with each method's declared access enforced, and streaming
notifications to subscribers.

Failure policy (`serve_rpc`): a misbehaving client gets a typed error or, for bytes that
cannot be framed, a closed connection; it is counted in `RpcStats` and every other
client is unaffected. Client bytes are parsed (framing, then each method's params)
through `parse_peer_input`, so whatever a parser raises on them is the client's error
(a closed connection, or INVALID_PARAMS), never the daemon's. A handler that raises `LatticeError` answers with its code; any
other exception in a handler is a daemon bug: it is logged with its traceback and
answered with INTERNAL so one bad request cannot take the daemon down.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
import struct
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from lattice.api.errors import (
    ErrorCode,
    FrameTooLargeError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    LatticeError,
    MethodNotFoundError,
    OverloadedError,
    ParseError,
    PermissionDeniedError,
)
from lattice.api.framing import (
    NOTIFICATION,
    REQUEST,
    RESPONSE,
    BadFrame,
    Frame,
    FrameDecoder,
    OversizedFrame,
    StreamDecoder,
    Unrecoverable,
    frame,
    is_plain_stream,
)
from lattice.api.methods import METHODS, READ, WRITE, Method
from lattice.core.codec import pack
from lattice.net.streams import RemoteProtocolError, parse_peer_input
from latticed.events import EventBus, Subscription

log = logging.getLogger("latticed.rpc")



@dataclass(frozen=True)
class RpcConfig:
    """The local socket's limits (section ``[rpc]``)."""

    max_frame_bytes: int = 4 << 20
    """Largest accepted local RPC frame; larger requests get FRAME_TOO_LARGE."""
    max_clients: int = 64
    """Concurrent local RPC connections."""
    max_in_flight: int = 32
    """Requests one connection may have in flight at once (OVERLOADED beyond)."""
    read_group: str = ""
    """A group (name or gid) whose members may use the socket with read access only
    (status, peers, jobs list...); the socket becomes mode 0660 with that group. Empty:
    only our uid and root."""
    subscriber_queue: int = 256
    """Events buffered per subscriber before it is marked lagging."""
    max_passed_fds: int = 4
    """File descriptors (an attached loop's shared memory) one connection may have
    passed and not yet used; more are closed."""


@dataclass
class RpcStats:
    connections_total: int = 0
    connections_open: int = 0
    plain_connections: int = 0
    refused_credentials: int = 0
    refused_access: int = 0
    refused_overloaded: int = 0
    requests: int = 0
    parse_errors: int = 0
    invalid_requests: int = 0
    unknown_methods: int = 0
    invalid_params: int = 0
    oversized_frames: int = 0
    unrecoverable_streams: int = 0
    internal_errors: int = 0
    notifications_sent: int = 0
    fds_received: int = 0
    fds_refused: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Every error answered, by code name (the metrics' RPC errors by code)."""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["errors"] = dict(self.errors)
        return out


class ClientConnection:
    """One local client: what a handler may use (credentials, access, subscriptions).

    ``plain`` connections speak the msgpack-RPC specification's own form: no length
    prefixes, and notification params are an array (``[2, "event", [{...}]]``)."""

    def __init__(self, server: RpcServer, stream: trio.SocketStream, uid: int, pid: int,
                 access: str) -> None:
        self.server = server
        self.stream = stream
        self.uid = uid
        self.pid = pid
        self.access = access
        self.plain = False
        self._send_lock = trio.Lock()
        self.subscriptions: dict[int, Subscription] = {}
        self.nursery: trio.Nursery | None = None
        self.in_flight = 0
        self.fds: deque[int] = deque()  # passed with requests, not yet claimed
        self._closers: list[Callable[[], Any]] = []

    def take_fd(self) -> int | None:
        """The oldest file descriptor this client passed and no handler claimed yet;
        the caller owns (and must close) it."""
        return self.fds.popleft() if self.fds else None

    def on_close(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` when this connection ends (the client went away)."""
        self._closers.append(callback)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        callbacks, self._closers = self._closers, []
        for callback in reversed(callbacks):
            callback()

    async def send(self, message: Any) -> None:
        data = pack(message) if self.plain else frame(message)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def notify(self, event: dict[str, Any]) -> None:
        await self.send([NOTIFICATION, "event", [event] if self.plain else event])

    def start_subscription(self, sub: Subscription) -> None:
        assert self.nursery is not None
        self.subscriptions[sub.id] = sub
        self.nursery.start_soon(self._pump, sub)

    async def _pump(self, sub: Subscription) -> None:
        async for event in sub.receive:
            await self.notify({"subscription": sub.id, **event})
            self.server.stats.notifications_sent += 1
            sub.sent_one()

    def stop_subscription(self, sub_id: int) -> bool:
        sub = self.subscriptions.pop(sub_id, None)
        if sub is None:
            return False
        self.server.bus.unsubscribe(sub)
        sub.pending = 0
        sub.idle.set()
        return True


Handler = Callable[..., Awaitable[Any]]


class SocketInUse(RuntimeError):
    """The socket path is served by another daemon, or is not a socket at all."""


class RpcServer:
    def __init__(self, path: Path, handlers: dict[str, Handler], bus: EventBus, *,
                 max_frame: int, max_clients: int, max_in_flight: int = 32,
                 max_fds: int = 4, read_gid: int | None = None,
                 owner_uids: frozenset[int] | None = None) -> None:
        missing = sorted(set(METHODS) - set(handlers))
        if missing:
            raise RuntimeError(f"no handler for RPC method(s): {', '.join(missing)}")
        extra = sorted(set(handlers) - set(METHODS))
        if extra:
            raise RuntimeError(f"handler(s) for undeclared method(s): {', '.join(extra)}")
        self.path = path
        self.handlers = handlers
        self.bus = bus
        self.max_frame = max_frame
        self.max_clients = max_clients
        self.max_in_flight = max_in_flight
        self.max_fds = max_fds
        self.read_gid = read_gid
        self.stats = RpcStats()
        # who gets write access: our uid and root (injectable for tests)
        self._owner_uids = owner_uids if owner_uids is not None else frozenset({os.getuid(), 0})
        self._inode = -1

    def access_of(self, pid: int, uid: int, gid: int) -> str | None:
        """What a process may do: WRITE for our own uid and root, READ for a member of
        the read group (its primary or a supplementary group), None otherwise."""
        if uid in self._owner_uids:
            return WRITE
        if self.read_gid is not None and (gid == self.read_gid
                                          or self.read_gid in _supplementary_groups(pid)):
            return READ
        return None

    def bind(self) -> trio.socket.SocketType:
        """Create the listening socket, mode 0600, replacing a stale socket file only."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
            if _socket_is_live(path):
                raise SocketInUse(f"another daemon is serving {path}")
            path.unlink()
        # Bind and listen under a temporary name, then rename into place: the path
        # appears only once it accepts connections (a client that sees the file and
        # connects at once must not get ECONNREFUSED from a bound, not yet listening,
        # socket).
        tmp = path.with_name(f".latticed-{os.getpid()}")
        if len(os.fsencode(str(tmp))) > 107:  # sun_path: then without the rename
            tmp = path
        tmp.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is created 0600: no window with wider mode
        try:
            # trio has no synchronous bind; the umask above must cover the bind itself
            sock._sock.bind(str(tmp))  # type: ignore[attr-defined]
        finally:
            os.umask(old_umask)
        try:
            if self.read_gid is not None:  # the read group may connect (for read access)
                os.chown(tmp, -1, self.read_gid)
                os.chmod(tmp, 0o660)
            else:
                os.chmod(tmp, 0o600)
            sock.listen(512)  # bursts of local clients queue instead of getting EAGAIN
            if tmp != path:
                os.rename(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            sock.close()
            raise
        self._inode = path.stat().st_ino
        return sock

    async def serve(self, *, task_status: trio.TaskStatus[RpcServer] = trio.TASK_STATUS_IGNORED) -> None:
        sock = self.bind()
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve_client, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            # only remove the socket file if it is still ours, not a successor's
            try:
                if self.path.stat().st_ino == self._inode:
                    self.path.unlink()
            except FileNotFoundError:
                pass

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        async with stream:
            pid, uid, gid = _peer_credentials(stream.socket)
            self.stats.connections_total += 1
            access = self.access_of(pid, uid, gid)
            if access is None:
                self.stats.refused_credentials += 1
                log.warning("refused local client pid=%s uid=%s: not our uid", pid, uid)
                await _send_error_and_close(stream, PermissionDeniedError(
                    f"uid {uid} may not use this daemon (only uid {os.getuid()} or root"
                    + (f", or read-only the group {self.read_gid}" if self.read_gid is not None
                       else "") + ")"))
                return
            if self.stats.connections_open >= self.max_clients:
                self.stats.refused_overloaded += 1
                await _send_error_and_close(stream, OverloadedError(
                    f"too many local clients (limit rpc.max_clients={self.max_clients})"))
                return
            self.stats.connections_open += 1
            client = ClientConnection(self, stream, uid, pid, access)
            try:
                async with trio.open_nursery() as nursery:
                    client.nursery = nursery
                    await self._read_loop(client, nursery)
                    nursery.cancel_scope.cancel()
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away mid-reply; only its own tasks end
            finally:
                self.stats.connections_open -= 1
                for sub_id in list(client.subscriptions):
                    client.stop_subscription(sub_id)
                client.close()

    async def _read_loop(self, client: ClientConnection, nursery: trio.Nursery) -> None:
        decoder: FrameDecoder | StreamDecoder | None = None
        while True:
            try:
                data = await self._receive(client)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            if decoder is None:
                client.plain = is_plain_stream(data[0])
                if client.plain:
                    self.stats.plain_connections += 1
                decoder = StreamDecoder(self.max_frame) if client.plain \
                    else FrameDecoder(self.max_frame)
            try:
                feed: Callable[[bytes], Sequence[Frame | BadFrame | OversizedFrame | Unrecoverable]] = \
                    decoder.feed
                events = parse_peer_input(feed, data)
            except RemoteProtocolError as e:  # the decoder choked: its buffer is lost
                self.stats.unrecoverable_streams += 1
                log.info("closing local client pid=%s: %s", client.pid, e)
                return
            for event in events:
                if isinstance(event, Frame):
                    self._dispatch(client, event.value, nursery)
                elif isinstance(event, BadFrame):
                    self.stats.parse_errors += 1
                    await _reply_error(client, None, ParseError(f"undecodable frame: {event.reason}"))
                elif isinstance(event, OversizedFrame):
                    self.stats.oversized_frames += 1
                    await _reply_error(client, None, FrameTooLargeError(
                        f"frame of {event.length} bytes exceeds rpc.max_frame_bytes={self.max_frame}"))
                elif isinstance(event, Unrecoverable):
                    self.stats.unrecoverable_streams += 1
                    log.info("closing local client pid=%s: %s", client.pid, event.reason)
                    if client.plain:  # say why before hanging up: no frame to skip here
                        await _reply_error(client, None, ParseError(event.reason))
                    return

    async def _receive(self, client: ClientConnection) -> bytes:
        """The client's next bytes, keeping the descriptors passed with them (SCM_RIGHTS)
        for the handler of the request they came with; beyond ``max_fds`` unclaimed, or
        from a read-only client, they are closed at once. The kernel closes any that do
        not fit the ancillary buffer."""
        data, ancillary, _flags, _addr = await client.stream.socket.recvmsg(
            65536, socket.CMSG_SPACE(self.max_fds * 4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancillary:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                if client.access == WRITE and len(client.fds) < self.max_fds:
                    client.fds.append(fd)
                    self.stats.fds_received += 1
                else:
                    os.close(fd)
                    self.stats.fds_refused += 1
        return data

    def _dispatch(self, client: ClientConnection, msg: Any, nursery: trio.Nursery) -> None:
        if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == REQUEST
                and isinstance(msg[1], int) and not isinstance(msg[1], bool)
                and isinstance(msg[2], str)):
            self.stats.invalid_requests += 1
            msgid = msg[1] if isinstance(msg, list) and len(msg) > 1 and isinstance(msg[1], int) else None
            nursery.start_soon(_reply_error, client, msgid, InvalidRequestError(
                "expected [0, msgid:int, method:str, params:map|array]"))
            return
        _, msgid, name, params = msg
        self.stats.requests += 1
        method = METHODS.get(name)
        if method is None:
            self.stats.unknown_methods += 1
            nursery.start_soon(_reply_error, client, msgid, MethodNotFoundError(
                f"no method {name!r}; api.info lists them"))
            return
        if method.access == WRITE and client.access != WRITE:
            self.stats.refused_access += 1
            nursery.start_soon(_reply_error, client, msgid, PermissionDeniedError(
                f"{name} changes the daemon's state; this connection has read access only"))
            return
        if client.in_flight >= self.max_in_flight:
            nursery.start_soon(_reply_error, client, msgid, OverloadedError(
                f"more than {self.max_in_flight} requests in flight on one connection "
                "(rpc.max_in_flight)"))
            return
        client.in_flight += 1
        nursery.start_soon(self._call, client, msgid, method, params)

    async def _call(self, client: ClientConnection, msgid: int, method: Method, params: Any) -> None:
        try:
            try:
                try:
                    kwargs = parse_peer_input(method.bind, params, keep=(LatticeError,))
                except RemoteProtocolError as e:
                    raise InvalidParamsError(f"{method.name}: {e}") from None
                result = await self.handlers[method.name](client, **kwargs)
            except LatticeError as e:
                if e.code == ErrorCode.INVALID_PARAMS:
                    self.stats.invalid_params += 1
                await _reply_error(client, msgid, e)
                return
            except Exception:  # the RPC boundary: a handler bug must not kill the daemon
                self.stats.internal_errors += 1
                log.exception("handler for %s failed (request %s)", method.name, msgid)
                await _reply_error(client, msgid, InternalError(
                    f"{method.name} failed inside the daemon; see the daemon log"))
                return
            await client.send([RESPONSE, msgid, None, result])
        finally:
            client.in_flight -= 1


async def _reply_error(client: ClientConnection, msgid: int | None, error: LatticeError) -> None:
    client.server.stats.errors[error.code.name] += 1
    # Plain msgpack-RPC clients get Neovim's error shape, [code, message] (pynvim and
    # its kin index it so); our framed clients get the map with name and data.
    wire = ([int(error.code), f"{error.code.name}: {error.message}"] if client.plain
            else error.to_wire())
    await client.send([RESPONSE, msgid, wire, None])


async def _send_error_and_close(stream: trio.SocketStream, error: LatticeError) -> None:
    try:
        await stream.send_all(frame([RESPONSE, None, error.to_wire(), None]))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _supplementary_groups(pid: int) -> set[int]:
    """The supplementary gids of a local process (``Groups:`` of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def _peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (Linux SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def _socket_is_live(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
