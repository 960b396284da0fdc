"""Pure formats of `/lattice/bulk/2`: control messages, chunk geometry, the key
schedule and the side-channel hello (proto/bulk.md is the spec). Array specs and what a
receiver accepts are `lattice.core.arrays`'.

Owns: what a bulk transfer looks like on the wire. Every function here is pure: it
neither reads the clock nor does I/O, so the net driver (`lattice.net.bulk`) and the
tests share one definition. Must not import trio, libp2p or sockets.

Theory of operation, in short: both sides send a HELLO carrying an ephemeral X25519 key
and the specs of the arrays they will send (if any): one session carries every array of
an exchange, so there is one key agreement per exchange. The session id is a hash of
both hellos (in canonical order), so it is bound to both ephemeral keys; the control
stream is already Noise-authenticated, so those keys are authenticated by riding on it.
HKDF-SHA256 over the X25519 secret, salted with the session id, gives each direction its
own AES-256-GCM key and its own one-time side-channel token. A direction's arrays are
cut into chunks in order and the chunks numbered across them; because a key is used for
one direction of one session, that number is a safe nonce, and since the specs fix the
chunk count and sizes, a receiver knows exactly which bytes to expect: reordering,
replay, truncation and tampering all show up as a failed tag or a short read.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lattice.core.arrays import ArraySpec
from lattice.core.codec import canonical

PROTOCOL = "/lattice/bulk/2"
VERSION = 2

TAG_BYTES = 16  # AES-GCM tag appended to every sealed chunk
KEY_BYTES = 32
SESSION_ID_BYTES = 32
TOKEN_BYTES = 32

CHANNEL_ID_BYTES = 32

# The first bytes a sender writes on a side-channel connection.
CHANNEL_MAGIC = b"LTBULK\x00\x01"
CHANNEL_HELLO_BYTES = len(CHANNEL_MAGIC) + CHANNEL_ID_BYTES + TOKEN_BYTES

# Control messages are small; data frames on the fallback path carry one sealed chunk.
CONTROL_MAX_BYTES = 64 * 1024
FRAME_OVERHEAD = 64  # msgpack map keys and lengths around a data frame's payload

# Chunk sizes a receiver accepts: the scratch buffer it allocates is one sealed chunk.
DIRECT_CHUNK_MIN = 4 * 1024
DIRECT_CHUNK_MAX = 16 * 1024 * 1024
STREAM_CHUNK_MIN = 1024
STREAM_CHUNK_MAX = 1024 * 1024

MAX_ADDRS = 8
MAX_ARRAYS = 16  # arrays one side sends in one session
MAX_REASON_CHARS = 300
MODES = ("direct", "stream")


class BulkFormatError(ValueError):
    """Bytes or a message from the peer that do not follow proto/bulk.md, or a header
    outside our limits. The driver turns it into a `RemoteProtocolError`."""


# -- chunk geometry -----------------------------------------------------------------


def chunk_count(nbytes: int, chunk: int) -> int:
    return (nbytes + chunk - 1) // chunk


def total_chunks(sizes: Sequence[int], chunk: int) -> int:
    """Chunks of one direction: each array's own, arrays in order (empty ones have none)."""
    return sum(chunk_count(n, chunk) for n in sizes)


def chunk_spans(sizes: Sequence[int], chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """(chunk number, array index, start, stop) for every chunk of one direction: the
    number runs across the arrays (and is the chunk's nonce), [start, stop) is within
    its array. A generator: a peer's choice of tiny chunks costs no memory."""
    number = 0
    for index, nbytes in enumerate(sizes):
        for i in range(chunk_count(nbytes, chunk)):
            start, stop = chunk_span(i, nbytes, chunk)
            yield number, index, start, stop
            number += 1


def chunk_span(index: int, nbytes: int, chunk: int) -> tuple[int, int]:
    """[start, stop) of plaintext chunk ``index`` in the array's bytes."""
    start = index * chunk
    return start, min(start + chunk, nbytes)


def nonce(index: int) -> bytes:
    """96-bit GCM nonce: the chunk index (unique because each key seals one array)."""
    return index.to_bytes(12, "big")


def check_chunk(mode: str, chunk: int) -> None:
    lo, hi = (DIRECT_CHUNK_MIN, DIRECT_CHUNK_MAX) if mode == "direct" else (
        STREAM_CHUNK_MIN, STREAM_CHUNK_MAX)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not lo <= chunk <= hi:
        raise BulkFormatError(f"{mode} chunk size {chunk!r} outside [{lo}, {hi}]")


# -- key schedule ---------------------------------------------------------------------


class EphemeralKey:
    """One X25519 key pair, used for exactly one session."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self._private = private or X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> EphemeralKey:
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def exchange(self, peer_public: bytes) -> bytes:
        if peer_public == self.public:
            # A reflected hello: both "directions" would share keys and nonces.
            raise BulkFormatError("peer echoed our ephemeral key")
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as e:  # wrong length or a low-order point (all-zero secret)
            raise BulkFormatError(f"bad ephemeral key: {e}") from None


def session_id(hello_a: dict[str, Any], hello_b: dict[str, Any]) -> bytes:
    """SHA-256 over both hellos in canonical byte order: both sides compute the same id
    without agreeing on who is "first", and it commits to both keys and headers."""
    a, b = sorted((canonical(hello_a), canonical(hello_b)))
    h = hashlib.sha256(b"lattice/bulk/2 session")
    for part in (a, b):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


@dataclass(frozen=True)
class DirectionKeys:
    """What the data one side sends travels under: the AEAD key, and the side-channel
    connection's id (names the registration at the receiver's listener; one per
    direction, so both ends of an exchange may share a listener) and one-time token."""

    data_key: bytes
    channel_id: bytes
    token: bytes


def _hkdf(shared: bytes, sid: bytes, label: bytes, sender_epk: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=sid,
                info=b"lattice/bulk/2 " + label + b" " + sender_epk).derive(shared)


def direction_keys(shared: bytes, sid: bytes, sender_epk: bytes) -> DirectionKeys:
    """Keys for the direction whose sender owns ``sender_epk`` (so the two directions of
    an exchange never share a key, and chunk-index nonces never repeat under one key)."""
    return DirectionKeys(
        data_key=_hkdf(shared, sid, b"data", sender_epk, KEY_BYTES),
        channel_id=_hkdf(shared, sid, b"channel", sender_epk, CHANNEL_ID_BYTES),
        token=_hkdf(shared, sid, b"token", sender_epk, TOKEN_BYTES),
    )


def channel_hello(keys: DirectionKeys) -> bytes:
    return CHANNEL_MAGIC + keys.channel_id + keys.token


def parse_channel_hello(data: bytes) -> tuple[bytes, bytes]:
    """(channel id, token) from a side-channel hello, or BulkFormatError."""
    if len(data) != CHANNEL_HELLO_BYTES or not data.startswith(CHANNEL_MAGIC):
        raise BulkFormatError("not a bulk side-channel hello")
    body = data[len(CHANNEL_MAGIC):]
    return body[:CHANNEL_ID_BYTES], body[CHANNEL_ID_BYTES:]


def token_matches(expected: bytes, presented: bytes) -> bool:
    return hmac.compare_digest(expected, presented)


# -- control messages -------------------------------------------------------------------


def hello(epk: bytes, specs: Sequence[ArraySpec] | None) -> dict[str, Any]:
    return {"t": "hello", "v": VERSION, "epk": epk,
            "send": None if specs is None else [s.to_wire() for s in specs]}


@dataclass(frozen=True)
class Hello:
    epk: bytes
    send: list[Any] | None  # the peer's array specs as sent (None: it sends nothing)
    wire: dict[str, Any]  # as received: the session id is computed over it


def parse_hello(obj: Any) -> Hello:
    """A peer's hello, checked for structure only: the session id is computed over it
    before we decide (`lattice.core.arrays.parse_array_spec`) whether to accept its
    arrays."""
    _expect_type(obj, "hello", {"t", "v", "epk", "send"})
    if obj["v"] != VERSION or type(obj["v"]) is not int:
        raise BulkFormatError(f"unsupported bulk version {str(obj['v'])[:16]!r}")
    epk = obj["epk"]
    if not isinstance(epk, bytes) or len(epk) != 32:
        raise BulkFormatError("epk must be 32 bytes")
    send = obj["send"]
    if send is not None and (not isinstance(send, list) or not 0 < len(send) <= MAX_ARRAYS):
        raise BulkFormatError(f"send must be nil or a list of 1 to {MAX_ARRAYS} array specs")
    return Hello(epk, send, obj)


def accept(addrs: list[tuple[str, int]], window: int) -> dict[str, Any]:
    return {"t": "accept", "addrs": [[h, p] for h, p in addrs], "window": window}


def reject(reason: str) -> dict[str, Any]:
    return {"t": "reject", "reason": reason[:MAX_REASON_CHARS]}


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    addrs: list[tuple[str, int]]
    window: int
    reason: str


def parse_verdict(obj: Any) -> Verdict:
    if isinstance(obj, dict) and obj.get("t") == "reject":
        _expect_type(obj, "reject", {"t", "reason"})
        return Verdict(False, [], 0, _reason(obj["reason"]))
    _expect_type(obj, "accept", {"t", "addrs", "window"})
    addrs = obj["addrs"]
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
        raise BulkFormatError(f"addrs must be a list of at most {MAX_ADDRS}")
    out = []
    for a in addrs:
        if (not isinstance(a, list) or len(a) != 2 or not isinstance(a[0], str)
                or not 0 < len(a[0]) <= 255 or not isinstance(a[1], int)
                or isinstance(a[1], bool) or not 0 < a[1] < 65536):
            raise BulkFormatError(f"bad side-channel address {a!r}")
        out.append((a[0], a[1]))
    window = obj["window"]
    if not isinstance(window, int) or isinstance(window, bool) or not (
            STREAM_CHUNK_MIN + TAG_BYTES <= window <= 64 * STREAM_CHUNK_MAX):
        raise BulkFormatError(f"bad credit window {window!r}")
    return Verdict(True, out, window, "")


def start(mode: str, chunk: int) -> dict[str, Any]:
    return {"t": "start", "mode": mode, "chunk": chunk}


def parse_start(obj: Any) -> tuple[str, int]:
    _expect_type(obj, "start", {"t", "mode", "chunk"})
    mode, chunk = obj["mode"], obj["chunk"]
    if mode not in MODES:
        raise BulkFormatError(f"unknown transfer mode {mode!r}")
    check_chunk(mode, chunk)
    return mode, chunk


def data(index: int, sealed: bytes) -> dict[str, Any]:
    return {"t": "data", "i": index, "c": sealed}


def parse_data(obj: Any, expected_index: int, expected_len: int) -> bytes:
    _expect_type(obj, "data", {"t", "i", "c"})
    if obj["i"] != expected_index:
        raise BulkFormatError(f"data chunk {obj['i']!r} out of order, expected {expected_index}")
    sealed = obj["c"]
    if not isinstance(sealed, bytes) or len(sealed) != expected_len:
        raise BulkFormatError(f"data chunk {expected_index} has the wrong length")
    return sealed


def credit(consumed: int) -> dict[str, Any]:
    return {"t": "credit", "n": consumed}


def parse_credit(obj: Any, sent: int) -> int:
    _expect_type(obj, "credit", {"t", "n"})
    n = obj["n"]
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= sent:
        raise BulkFormatError(f"credit {n!r} for chunks never sent (sent {sent})")
    return n


DONE: dict[str, Any] = {"t": "done"}


def abort(reason: str) -> dict[str, Any]:
    return {"t": "abort", "reason": reason[:MAX_REASON_CHARS]}


def parse_abort(obj: Any) -> str:
    _expect_type(obj, "abort", {"t", "reason"})
    return _reason(obj["reason"])


def message_type(obj: Any) -> str:
    kind = obj.get("t") if isinstance(obj, dict) else None
    if not isinstance(kind, str):
        raise BulkFormatError("control message must be a map with a string 't'")
    return kind


def _expect_type(obj: Any, t: str, keys: set[str]) -> None:
    if not isinstance(obj, dict) or obj.get("t") != t:
        got = obj.get("t") if isinstance(obj, dict) else type(obj).__name__
        raise BulkFormatError(f"expected {t!r} message, got {got!r}")
    if set(obj) != keys:
        raise BulkFormatError(f"{t!r} message must have exactly {sorted(keys)}")


def _reason(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_REASON_CHARS:
        raise BulkFormatError("reason must be a short string")
    return value
