"""Stable integer error codes and the exception class each maps to.

Codes never change meaning once released (clients in other languages rely on them);
new codes are appended. `proto/local-rpc.json` exports this table.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    PARSE_ERROR = 1        # the frame body is not msgpack
    INVALID_REQUEST = 2    # msgpack, but not [0, id, method, params]
    METHOD_NOT_FOUND = 3
    INVALID_PARAMS = 4     # missing, unknown or wrongly typed parameter
    FRAME_TOO_LARGE = 5
    NOT_READY = 6          # the daemon is still starting, or the service is off
    INTERNAL = 7           # a bug in the daemon; the log has the traceback
    PERMISSION_DENIED = 8
    OVERLOADED = 9         # too many clients / requests in flight
    NOT_FOUND = 10
    PEER_UNREACHABLE = 11  # a dial or a peer exchange failed
    TIMEOUT = 12
    INVALID_ARGUMENT = 13  # well-typed but unacceptable (bad multiaddr, bad key...)
    SHUTTING_DOWN = 14
    CONFLICT = 15          # the request conflicts with current state


class LatticeError(Exception):
    """An error the daemon reported (or the client raised on its behalf)."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": int(self.code), "name": self.code.name,
                               "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out


def _error_class(code: ErrorCode, doc: str) -> type[LatticeError]:
    name = "".join(part.capitalize() for part in code.name.split("_"))
    if not name.endswith("Error"):
        name += "Error"
    return type(name, (LatticeError,), {"code": code, "__doc__": doc})


ParseError = _error_class(ErrorCode.PARSE_ERROR, "The frame body was not msgpack.")
InvalidRequestError = _error_class(ErrorCode.INVALID_REQUEST, "Not a msgpack-RPC request.")
MethodNotFoundError = _error_class(ErrorCode.METHOD_NOT_FOUND, "No such method.")
InvalidParamsError = _error_class(ErrorCode.INVALID_PARAMS, "Missing, unknown or mistyped parameter.")
FrameTooLargeError = _error_class(ErrorCode.FRAME_TOO_LARGE, "The frame exceeds the size limit.")
NotReadyError = _error_class(ErrorCode.NOT_READY, "The daemon is starting or the service is off.")
InternalError = _error_class(ErrorCode.INTERNAL, "A daemon bug; see the daemon log.")
PermissionDeniedError = _error_class(ErrorCode.PERMISSION_DENIED, "Not allowed.")
OverloadedError = _error_class(ErrorCode.OVERLOADED, "Too many clients or requests.")
NotFoundError = _error_class(ErrorCode.NOT_FOUND, "No such object.")
PeerUnreachableError = _error_class(ErrorCode.PEER_UNREACHABLE, "A peer could not be reached.")
TimeoutError_ = _error_class(ErrorCode.TIMEOUT, "The operation timed out.")
InvalidArgumentError = _error_class(ErrorCode.INVALID_ARGUMENT, "A well-typed but unacceptable argument.")
ShuttingDownError = _error_class(ErrorCode.SHUTTING_DOWN, "The daemon is stopping.")
ConflictError = _error_class(ErrorCode.CONFLICT, "The request conflicts with the current state.")

ERROR_CLASSES: dict[int, type[LatticeError]] = {
    cls.code: cls for cls in (
        ParseError, InvalidRequestError, MethodNotFoundError, InvalidParamsError,
        FrameTooLargeError, NotReadyError, InternalError, PermissionDeniedError,
        OverloadedError, NotFoundError, PeerUnreachableError, TimeoutError_,
        InvalidArgumentError, ShuttingDownError, ConflictError,
    )
}
assert set(ERROR_CLASSES) == set(ErrorCode), "every code needs a class"


def error_from_wire(error: Any) -> LatticeError:
    """The exception for an error object received from the daemon."""
    if not isinstance(error, dict):
        return InternalError(f"malformed error from daemon: {error!r}")
    code = error.get("code")
    message = str(error.get("message", ""))
    cls = ERROR_CLASSES.get(code) if isinstance(code, int) else None
    if cls is None:
        exc = LatticeError(f"[code {code}] {message}", data=error.get("data"))
        return exc
    return cls(message, data=error.get("data"))
