"""The daemon's event bus: topics fanned out to bounded per-subscriber queues.

A subscriber that stops reading loses events, never memory: when its queue is full,
events are dropped and counted, and the next event it does get is preceded by a
``{"topic": "lagged", "dropped": N}`` marker so it knows to re-read state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import trio


@dataclass
class Subscription:
    id: int
    topics: frozenset[str]
    send: trio.MemorySendChannel[dict[str, Any]]
    receive: trio.MemoryReceiveChannel[dict[str, Any]]
    dropped: int = 0
    pending: int = 0  # queued or being written to the client
    idle: trio.Event = field(default_factory=trio.Event)

    def sent_one(self) -> None:
        """The pump wrote one event out."""
        self.pending -= 1
        if self.pending == 0:
            self.idle.set()


class EventBus:
    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self.published = 0
        self.dropped = 0

    def subscribe(self, topics: list[str]) -> Subscription:
        send, receive = trio.open_memory_channel[dict[str, Any]](self.queue_size)
        sub = Subscription(next(self._ids), frozenset(topics), send, receive)
        sub.idle.set()
        self._subs[sub.id] = sub
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.id, None) is not None:
            sub.send.close()

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        self.published += 1
        message = {"topic": topic, **event}
        for sub in list(self._subs.values()):
            if topic in sub.topics:
                self.deliver(sub, message)

    def deliver(self, sub: Subscription, message: dict[str, Any]) -> None:
        """Queue one message for one subscriber (used for per-subscriber snapshots)."""
        try:
            if sub.dropped:
                sub.send.send_nowait({"topic": "lagged", "dropped": sub.dropped})
                self._queued(sub)
                sub.dropped = 0
            sub.send.send_nowait(message)
            self._queued(sub)
        except trio.WouldBlock:
            sub.dropped += 1
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._subs.pop(sub.id, None)

    @staticmethod
    def _queued(sub: Subscription) -> None:
        if sub.pending == 0:
            sub.idle = trio.Event()
        sub.pending += 1

    async def wait_drained(self) -> None:
        """Until every subscriber has been sent what was published so far (used at
        shutdown so clients see the 'stopping' event)."""
        for sub in list(self._subs.values()):
            await sub.idle.wait()

    @property
    def subscribers(self) -> int:
        return len(self._subs)
