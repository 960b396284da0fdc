"""Where the DHT's peers are, and where we are: the addresses it learns from answers,
requests and provider records, and the ones it announces as its own.

Owns `Addresses` (a bounded copy of everything learnt, passed on to the host's address
book when it changes), the `AddressBook` seam and its default `MemoryAddressBook`.
Must not import libp2p.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

MAX_OWN_ADDRS = 16


class AddressBook(Protocol):
    """Where the DHT leaves the addresses it learns, so the host can dial found peers
    (the real host's peerstore); memnet ignores addresses."""

    def add_addrs(self, peer_id: str, addrs: Sequence[str]) -> None: ...

    def get_addrs(self, peer_id: str) -> list[str]: ...


class MemoryAddressBook:
    """A bounded LRU address book (the default when the host gives none)."""

    def __init__(self, max_peers: int = 4096, max_addrs: int = 16) -> None:
        self.max_peers = max_peers
        self.max_addrs = max_addrs
        self._addrs: OrderedDict[str, list[str]] = OrderedDict()

    def add_addrs(self, peer_id: str, addrs: Sequence[str]) -> None:
        if not addrs:
            return
        merged = list(dict.fromkeys([*addrs, *self._addrs.get(peer_id, [])]))[:self.max_addrs]
        self._addrs[peer_id] = merged
        self._addrs.move_to_end(peer_id)
        while len(self._addrs) > self.max_peers:
            self._addrs.popitem(last=False)

    def get_addrs(self, peer_id: str) -> list[str]:
        return list(self._addrs.get(peer_id, []))


class Addresses:
    """Our own bounded copy of every address learnt; the host's book (which may be
    costly: multiaddr parsing) only hears about changes. Our own addresses come from
    ``own`` (the host computes them from its listeners), re-read at most once a second:
    every message carries them."""

    def __init__(self, peer_id: str, host_book: AddressBook | None,
                 own: Callable[[], Sequence[str]] | None) -> None:
        self.peer_id = peer_id
        self.host_book = host_book
        self._book = MemoryAddressBook()
        self._own_fn = own or (lambda: [])
        self._own: tuple[float, list[str]] = (-math.inf, [])

    def learn(self, peer_id: str, addrs: Sequence[str]) -> None:
        if not addrs or peer_id == self.peer_id:
            return
        if set(addrs) <= set(self._book.get_addrs(peer_id)):
            return
        self._book.add_addrs(peer_id, list(addrs))
        if self.host_book is not None:
            self.host_book.add_addrs(peer_id, list(addrs))

    def known(self, peer_id: str) -> list[str]:
        addrs = self._book.get_addrs(peer_id)
        if not addrs and self.host_book is not None:
            addrs = self.host_book.get_addrs(peer_id)
        return addrs

    def ours(self) -> list[str]:
        now = trio.current_time()
        if now - self._own[0] >= 1.0:
            self._own = (now, [str(a) for a in self._own_fn()][:MAX_OWN_ADDRS])
        return self._own[1]
