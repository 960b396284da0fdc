"""The blocking client (`lattice.connect()`), for scripts, notebooks and the CLI."""

from __future__ import annotations

import socket as socket_mod
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lattice.client._methods import METHOD_MAP, params_for
from lattice.client._session import (
    DaemonNotRunningError,
    RpcSession,
    connect_error,
    resolve_socket,
)


class Client:
    """A connection to the local daemon. Use as a context manager or call `close()`."""

    def __init__(self, socket: str | Path | None = None, *, timeout: float | None = 60.0) -> None:
        self.socket_path = resolve_socket(socket)
        self.timeout = timeout
        self._sock = _open(self.socket_path, timeout)
        self._session = RpcSession()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, **params: Any) -> Any:
        """Call any RPC method by name (see `api_info()` for the table)."""
        return self.call_passing_fds(method, (), **params)

    def call_passing_fds(self, method: str, fds: Sequence[int], **params: Any) -> Any:
        """`call`, passing open file descriptors with the request (SCM_RIGHTS; how
        `attach.open` hands over shared memory). The daemon gets its own copies: ours
        stay open."""
        msgid, data = self._session.request(method, params)
        try:
            if fds:
                sent = socket_mod.send_fds(self._sock, [data], list(fds))
                self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)
            while not self._session.has_response(msgid):
                self._receive()
        except (BrokenPipeError, ConnectionResetError) as e:
            self._raise_close_reason()
            raise DaemonNotRunningError(self.socket_path, f"connection lost: {e}") from None
        return self._session.take_response(msgid)

    def _raise_close_reason(self) -> None:
        """The daemon may have said why it hung up (permission, overload) before closing."""
        try:
            self._sock.settimeout(0.5)
            while chunk := self._sock.recv(1 << 16):
                self._session.feed(chunk)
        except OSError:
            pass
        if self._session.unsolicited_errors:
            raise self._session.unsolicited_errors.pop(0)

    def _receive(self) -> None:
        try:
            chunk = self._sock.recv(1 << 16)
        except TimeoutError:
            raise TimeoutError(f"the daemon did not answer within {self.timeout} s") from None
        if not chunk:
            self._raise_close_reason()
            raise DaemonNotRunningError(self.socket_path, "the daemon closed the connection")
        self._session.feed(chunk)
        if self._session.unsolicited_errors:
            raise self._session.unsolicited_errors.pop(0)

    def subscribe(self, topics: list[str] | tuple[str, ...] = ("peers", "daemon"),
                  *, timeout: float | None = None) -> Subscription:
        """Stream events on a dedicated connection: ``for event in client.subscribe(...)``."""
        return Subscription(self.socket_path, list(topics), timeout)

    def __getattr__(self, name: str) -> Any:
        if name not in METHOD_MAP:
            raise AttributeError(name)

        def method(*args: Any, **kwargs: Any) -> Any:
            rpc, params = params_for(name, args, kwargs)
            return self.call(rpc, **params)

        method.__name__ = name
        return method

    # explicit signatures for the common calls (help() and IDEs see these)
    def status(self) -> dict[str, Any]:
        return self.call("status")

    def peers(self) -> list[dict[str, Any]]:
        return self.call("peers.list")

    def connect_peer(self, addr: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.call("peers.connect", addr=addr, timeout=timeout)

    def api_info(self) -> dict[str, Any]:
        return self.call("api.info")


class Subscription:
    """An event stream; iterate it, and `close()` (or use `with`) when done."""

    def __init__(self, socket_path: Path, topics: list[str], timeout: float | None) -> None:
        self._client = Client(socket_path, timeout=timeout)
        result = self._client.call("subscribe", topics=topics)
        self.id: int = result["subscription"]
        self.topics = result["topics"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            event = self._client._session.take_notification(self.id)
            if event is not None:
                event.pop("subscription", None)
                return event
            try:
                self._client._receive()
            except DaemonNotRunningError:
                raise StopIteration from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(path: Path, timeout: float | None) -> socket_mod.socket:
    s = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        _connect_patiently(s, path, timeout)
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as e:
        s.close()
        raise (connect_error(path, e) or e) from None
    return s


def _connect_patiently(s: socket_mod.socket, path: Path, timeout: float | None) -> None:
    """A Unix socket whose accept backlog is full fails at once with EAGAIN instead of
    waiting; a busy daemon is not a dead one, so retry until the timeout."""
    deadline = time.monotonic() + (timeout if timeout is not None else 60.0)
    delay = 0.001
    while True:
        try:
            s.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon on {path} is not accepting connections") from None
            time.sleep(delay)  # no readiness event exists for a full backlog
            delay = min(delay * 2, 0.05)


def connect(socket: str | Path | None = None, *, timeout: float | None = 60.0) -> Client:
    """A blocking client for the daemon on ``socket`` (default: `$LATTICE_SOCKET`, else
    `<state dir>/latticed.sock`). Raises `DaemonNotRunningError` if none answers."""
    return Client(socket, timeout=timeout)
