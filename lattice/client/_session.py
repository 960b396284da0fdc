"""Request ids, response matching and notification buffering: no I/O."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path
from typing import Any

from lattice.api.errors import ErrorCode, LatticeError, PermissionDeniedError, error_from_wire
from lattice.api.framing import NOTIFICATION, REQUEST, RESPONSE, Frame, FrameDecoder, frame
from lattice.api.paths import default_socket

# Responses may be large (state dumps, job lists); the client trusts its own daemon more
# than the daemon trusts clients, but still bounds what it buffers.
CLIENT_MAX_FRAME = 64 << 20
MAX_BUFFERED_NOTIFICATIONS = 10_000


class DaemonNotRunningError(LatticeError):
    """No daemon answers on the socket."""

    code = ErrorCode.NOT_READY

    def __init__(self, socket: Path, reason: str = "") -> None:
        hint = (f"no Lattice daemon is listening on {socket}"
                + (f" ({reason})" if reason else "")
                + ". Start one with `latticed` (or `latticed --socket "
                f"{socket}`), or point at another with --socket / $LATTICE_SOCKET.")
        super().__init__(hint)
        self.socket = socket


class ProtocolViolation(LatticeError):
    """The daemon sent something that is not msgpack-RPC (a bug or a foreign socket)."""


def connect_error(path: Path, error: OSError) -> LatticeError | None:
    """What a failed connect to the daemon's socket means to a user (None: not ours to
    explain). Shared by the blocking and the trio client."""
    if isinstance(error, FileNotFoundError):
        return DaemonNotRunningError(path, "the socket does not exist")
    if isinstance(error, ConnectionRefusedError):
        return DaemonNotRunningError(path, "stale socket: nothing accepts connections")
    if isinstance(error, PermissionError):
        return PermissionDeniedError(
            f"cannot open {path}: permission denied (the daemon runs as another user; "
            "run this as that user or root)")
    return None


def resolve_socket(socket: str | Path | None) -> Path:
    return Path(socket).expanduser() if socket is not None else default_socket()


class RpcSession:
    """Sans-I/O client side of the local RPC: `request()` returns bytes to send;
    `feed()` takes received bytes; `take_response(id)` / `notifications` read results."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._decoder = FrameDecoder(CLIENT_MAX_FRAME)
        self._responses: dict[int, tuple[Any, Any]] = {}
        self.notifications: deque[dict[str, Any]] = deque(maxlen=MAX_BUFFERED_NOTIFICATIONS)
        self.unsolicited_errors: list[LatticeError] = []

    def request(self, method: str, params: dict[str, Any]) -> tuple[int, bytes]:
        msgid = next(self._ids)
        return msgid, frame([REQUEST, msgid, method, params])

    def feed(self, data: bytes) -> None:
        for ev in self._decoder.feed(data):
            if not isinstance(ev, Frame):
                reason = getattr(ev, "reason", f"{type(ev).__name__}")
                raise ProtocolViolation(f"bad frame from daemon: {reason}")
            msg = ev.value
            if not isinstance(msg, list) or not msg:
                raise ProtocolViolation(f"unexpected message from daemon: {msg!r:.200}")
            if msg[0] == RESPONSE and len(msg) == 4:
                _, msgid, error, result = msg
                if msgid is None:  # an error about a frame the daemon could not attribute
                    self.unsolicited_errors.append(error_from_wire(error))
                else:
                    self._responses[msgid] = (error, result)
            elif msg[0] == NOTIFICATION and len(msg) == 3 and isinstance(msg[2], dict):
                self.notifications.append(msg[2])
            else:
                raise ProtocolViolation(f"unexpected message from daemon: {msg!r:.200}")

    def has_response(self, msgid: int) -> bool:
        return msgid in self._responses

    def take_response(self, msgid: int) -> Any:
        error, result = self._responses.pop(msgid)
        if error is not None:
            raise error_from_wire(error)
        return result

    def take_notification(self, subscription: int | None = None) -> dict[str, Any] | None:
        for i, n in enumerate(self.notifications):
            if subscription is None or n.get("subscription") == subscription:
                del self.notifications[i]
                return n
        return None
