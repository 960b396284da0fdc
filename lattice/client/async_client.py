"""The trio client (`lattice.open_client()`): the async twin of `lattice.connect()`."""

from __future__ import annotations

import socket as socket_mod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from lattice.api.errors import LatticeError
from lattice.client._methods import METHOD_MAP, params_for
from lattice.client._session import (
    DaemonNotRunningError,
    RpcSession,
    connect_error,
    resolve_socket,
)


class AsyncClient:
    """Concurrent calls are fine: one reader task routes responses by request id."""

    def __init__(self, stream: trio.SocketStream, socket_path: Path) -> None:
        self._stream = stream
        self.socket_path = socket_path
        self._session = RpcSession()
        self._send_lock = trio.Lock()
        self._arrived = trio.Condition()  # notified after every chunk is fed
        self._closed: BaseException | None = None

    async def _reader(self) -> None:
        try:
            while True:
                try:
                    chunk = await self._stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                async with self._arrived:
                    if not chunk:
                        # the daemon may have said why it hung up (permission, overload)
                        errors = self._session.unsolicited_errors
                        self._closed = errors.pop(0) if errors else DaemonNotRunningError(
                            self.socket_path, "the daemon closed the connection")
                    else:
                        try:
                            self._session.feed(chunk)
                        except LatticeError as e:  # hand protocol errors to every waiter
                            self._closed = e
                    self._arrived.notify_all()
                if self._closed is not None:
                    return
        finally:
            async with self._arrived:
                if self._closed is None:
                    self._closed = DaemonNotRunningError(self.socket_path, "client closed")
                self._arrived.notify_all()

    async def call(self, method: str, **params: Any) -> Any:
        msgid, data = self._session.request(method, params)
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise DaemonNotRunningError(self.socket_path, f"connection lost: {e}") from None
        async with self._arrived:
            while not self._session.has_response(msgid):
                if self._closed is not None:
                    raise self._closed
                await self._arrived.wait()
        return self._session.take_response(msgid)

    async def next_event(self, subscription: int) -> dict[str, Any]:
        async with self._arrived:
            while True:
                ev = self._session.take_notification(subscription)
                if ev is not None:
                    ev.pop("subscription", None)
                    return ev
                if self._closed is not None:
                    raise self._closed
                await self._arrived.wait()

    def __getattr__(self, name: str) -> Any:
        if name not in METHOD_MAP:
            raise AttributeError(name)

        async def method(*args: Any, **kwargs: Any) -> Any:
            rpc, params = params_for(name, args, kwargs)
            return await self.call(rpc, **params)

        method.__name__ = name
        return method

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def peers(self) -> list[dict[str, Any]]:
        return await self.call("peers.list")

    async def connect_peer(self, addr: str, timeout: float = 10.0) -> dict[str, Any]:
        return await self.call("peers.connect", addr=addr, timeout=timeout)

    async def api_info(self) -> dict[str, Any]:
        return await self.call("api.info")

    @asynccontextmanager
    async def subscribe(self, topics: list[str] | tuple[str, ...] = ("peers", "daemon")
                        ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """``async with client.subscribe([...]) as events: async for ev in events: ...``
        (a dedicated connection, so other calls are not held up by the stream)."""
        async with open_client(self.socket_path) as sub_client:
            result = await sub_client.call("subscribe", topics=list(topics))
            sub_id = result["subscription"]

            async def events() -> AsyncIterator[dict[str, Any]]:
                while True:
                    try:
                        yield await sub_client.next_event(sub_id)
                    except DaemonNotRunningError:
                        return

            yield events()


async def _connect_unix(path: Path) -> trio.SocketStream:
    sock = trio.socket.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    try:
        await sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as e:
        sock.close()
        raise (connect_error(path, e) or e) from None
    return trio.SocketStream(sock)


@asynccontextmanager
async def open_client(socket: str | Path | None = None) -> AsyncIterator[AsyncClient]:
    """``async with lattice.open_client() as client: await client.status()``"""
    path = resolve_socket(socket)
    stream = await _connect_unix(path)
    client = AsyncClient(stream, path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            try:
                yield client
            finally:
                # Close before cancelling: an await inside the cancelled scope would raise
                # Cancelled, which the nursery absorbs — silently eating the body's error.
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader task never fails on its own, so a group holds the caller's one
        # exception: hand it back as itself (users catch LatticeError, not groups).
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
