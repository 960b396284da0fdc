"""Range fingerprints of author tips: reconciliation whose cost grows with differences.

Owns `TipIndex`, the per-store index the sync machine uses for anti-entropy and the
catch-up after a session opens, and the shape and validation of its wire ranges. Must
not import trio, libp2p or read the clock.

Exchanging a whole summary ``{author: [seq, tip]}`` costs O(authors) each time, even
when two peers hold the same thing, which is nearly always. Instead (range-based set
reconciliation, as Negentropy: Meyer, "Range-Based Set Reconciliation", 2023) every
author is placed in a 64-bit key space by the hash of its id, and a *range* of that
space (a node of a 16-ary tree: ``depth`` hex digits of the key prefix, ``index``) is
described by the count and the sum (mod 2^64) of its authors' tip hashes. Peers that
agree exchange one range; where a range differs it is split into its 16 children, and
a range holding few authors is listed in full. The bytes exchanged grow with the number
of differing authors times the tree's depth, not with the authors held.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Any

FANOUT_BITS = 4
FANOUT = 1 << FANOUT_BITS
MAX_DEPTH = 6
"""16^6 = 16.7 M leaves: below the protocol's 8192 authors a leaf almost never holds
more than one."""
LEAF_AUTHORS = 8
"""A differing range with at most this many of our authors is listed, not split."""
KEY_BITS = 64
MASK = (1 << KEY_BITS) - 1
TIP_BYTES = 8

MODE_FINGERPRINT = 0
"""``[count, fp]``: what the sender holds in the range."""
MODE_LIST = 1
"""``{author: [seq, tip]}``: everything the sender holds in the range; answered with
`MODE_BEHIND` for what the receiver lacks."""
MODE_BEHIND = 2
"""``{author: seq}`` (seq 0: not held): where the sender is behind the receiver's list."""


def author_key(author: str) -> int:
    return int.from_bytes(hashlib.sha256(author.encode()).digest()[:8], "big")


def tip_hash(author: str, seq: int, tip: bytes) -> int:
    h = hashlib.sha256(b"%s\x00%d\x00%s" % (author.encode(), seq, tip[:TIP_BYTES]))
    return int.from_bytes(h.digest()[:8], "big")


def range_bounds(depth: int, index: int) -> tuple[int, int]:
    """The keys [lo, hi) of range (depth, index)."""
    shift = KEY_BITS - FANOUT_BITS * depth
    return index << shift, (index + 1) << shift


def in_range(key: int, depth: int, index: int) -> bool:
    return (key >> (KEY_BITS - FANOUT_BITS * depth)) == index if depth else True


class TipIndex:
    """The tips of one store's authors, keyed and summed for range reconciliation.

    ``set(author, seq, tip)`` on every new tip, ``remove(author)`` on eviction or ban;
    every range's (count, sum) is kept incrementally (MAX_DEPTH + 1 dict updates a
    change), and a range's authors come from a sorted key list."""

    def __init__(self) -> None:
        self._tips: dict[str, tuple[int, bytes, int, int]] = {}  # seq, tip, key, hash
        self._keys: list[tuple[int, str]] = []
        self._ranges: dict[tuple[int, int], list[int]] = {}  # (depth, index) -> [n, sum]

    def __len__(self) -> int:
        return len(self._tips)

    def set(self, author: str, seq: int, tip: bytes) -> None:
        old = self._tips.get(author)
        if old is not None and old[0] == seq and old[1] == tip[:TIP_BYTES]:
            return
        key = old[2] if old is not None else author_key(author)
        h = tip_hash(author, seq, tip)
        if old is None:
            bisect.insort(self._keys, (key, author))
            self._add(key, 1, h)
        else:
            self._add(key, 0, (h - old[3]) & MASK)
        self._tips[author] = (seq, tip[:TIP_BYTES], key, h)

    def remove(self, author: str) -> None:
        old = self._tips.pop(author, None)
        if old is None:
            return
        key = old[2]
        i = bisect.bisect_left(self._keys, (key, author))
        del self._keys[i]
        self._add(key, -1, (-old[3]) & MASK)

    def _add(self, key: int, dn: int, dh: int) -> None:
        for depth in range(MAX_DEPTH + 1):
            node = (depth, key >> (KEY_BITS - FANOUT_BITS * depth) if depth else 0)
            agg = self._ranges.get(node)
            if agg is None:
                agg = self._ranges[node] = [0, 0]
            agg[0] += dn
            agg[1] = (agg[1] + dh) & MASK
            if agg[0] == 0:
                del self._ranges[node]

    def fingerprint(self, depth: int, index: int) -> tuple[int, int]:
        """(count, sum of tip hashes mod 2^64) of the range."""
        agg = self._ranges.get((depth, index))
        return (agg[0], agg[1]) if agg is not None else (0, 0)

    def tips_in(self, depth: int, index: int) -> dict[str, tuple[int, bytes]]:
        lo, hi = range_bounds(depth, index)
        i = bisect.bisect_left(self._keys, (lo, ""))
        out = {}
        while i < len(self._keys) and self._keys[i][0] < hi:
            author = self._keys[i][1]
            seq, tip = self._tips[author][:2]
            out[author] = (seq, tip)
            i += 1
        return out

    def get(self, author: str) -> tuple[int, bytes] | None:
        t = self._tips.get(author)
        return (t[0], t[1]) if t is not None else None


def encode_fingerprint(count: int, fp: int) -> list[Any]:
    return [count, fp.to_bytes(8, "big")]


class RangeError(ValueError):
    pass


def check_range(value: Any, max_entries: int) -> tuple[int, int, int, Any]:
    """Validate one wire range ``[depth, index, mode, payload]``; returns it with the
    payload decoded (fingerprint: (count, int); list: {author: (seq, tip)}; behind:
    {author: seq}). Every author named must lie in the range."""
    if not isinstance(value, list) or len(value) != 4 or not all(
            type(v) is int for v in value[:3]):
        raise RangeError("a range is [depth, index, mode, payload]")
    depth, index, mode, payload = value
    if not (0 <= depth <= MAX_DEPTH and 0 <= index < FANOUT ** depth):
        raise RangeError("range out of the key space")
    if mode == MODE_FINGERPRINT:
        if not (isinstance(payload, list) and len(payload) == 2 and type(payload[0]) is int
                and 0 <= payload[0] <= max_entries and isinstance(payload[1], bytes)
                and len(payload[1]) == 8):
            raise RangeError("a fingerprint is [count, 8 bytes]")
        return depth, index, mode, (payload[0], int.from_bytes(payload[1], "big"))
    if mode not in (MODE_LIST, MODE_BEHIND):
        raise RangeError(f"unknown range mode {mode}")
    if not isinstance(payload, dict) or len(payload) > max_entries:
        raise RangeError(f"a range lists at most {max_entries} authors")
    out: dict[str, Any] = {}
    for author, entry in payload.items():
        if not isinstance(author, str) or len(author) > 128:
            raise RangeError("author ids are strings")
        if mode == MODE_LIST:
            if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int
                    and entry[0] >= 1 and isinstance(entry[1], bytes)
                    and len(entry[1]) == TIP_BYTES):
                raise RangeError("a listed author is [seq, tip]")
            out[author] = (entry[0], entry[1])
        else:
            if type(entry) is not int or entry < 0:
                raise RangeError("a behind entry is a seq >= 0")
            out[author] = entry
        if not in_range(author_key(author), depth, index):
            raise RangeError("author outside its range")
    return depth, index, mode, out
