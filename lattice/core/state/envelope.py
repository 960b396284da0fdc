"""Signed envelopes: one author's pycrdt update, signed, kept byte-exact for forwarding.

Owns the envelope format, its signature and its validation (shape, size, author id,
signature). Must not import trio, libp2p or read the clock.

An envelope is a msgpack map::

    {"v": 1, "author": <peer id>, "seq": <int >= 1>, "kind": "delta" | "snapshot",
     "prev": <digest of the author's envelope seq-1, b"" for seq 1>,
     "update": <pycrdt update bytes>, "sig": <64-byte Ed25519 signature>}

``prev`` chains an author's envelopes: a peer holding a different envelope for
``seq - 1`` than the one this one builds on has proof that the author forked its
history (equivocation), even if the two forks never meet at the same seq.

The signature covers ``SIGNATURE_DOMAIN + codec.canonical(<the map without "sig">)``,
so a signature made for an envelope can never be replayed as another kind of signed
message, and re-encoding the map does not change what is signed. The bytes we received
(`Envelope.raw`) are what we store and forward: a third party relays an author's
update without being able to change it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from lattice.core.codec import DecodeError, canonical, pack, unpack
from lattice.core.identity import Identity, InvalidPeerId, public_key_from_peer_id, verify
from lattice.core.state.limits import MAX_ENVELOPE_BYTES, MAX_SEQ

ENVELOPE_VERSION = 1
SIGNATURE_DOMAIN = b"lattice/crdt-sync/1 envelope\x00"
KIND_DELTA = "delta"
KIND_SNAPSHOT = "snapshot"
KINDS = (KIND_DELTA, KIND_SNAPSHOT)
_FIELDS = frozenset({"v", "author", "seq", "kind", "prev", "update", "sig"})
DIGEST_SIZE = 32


class EnvelopeError(ValueError):
    """Bytes that are not a valid envelope. ``reason`` is the statistics key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, eq=False)
class Envelope:
    author: str
    seq: int
    kind: str
    prev: bytes
    update: bytes
    signature: bytes
    raw: bytes
    """The encoded envelope exactly as sealed or received."""
    digest: bytes
    """SHA-256 of the signed body: two envelopes with equal digests say the same thing
    (even if encoded differently), so a re-send is a replay, not an equivocation."""

    @property
    def is_snapshot(self) -> bool:
        return self.kind == KIND_SNAPSHOT


def _body(author: str, seq: int, kind: str, prev: bytes, update: bytes) -> dict[str, Any]:
    return {"v": ENVELOPE_VERSION, "author": author, "seq": seq, "kind": kind, "prev": prev,
            "update": update}


def signed_bytes(author: str, seq: int, kind: str, prev: bytes, update: bytes) -> bytes:
    return SIGNATURE_DOMAIN + canonical(_body(author, seq, kind, prev, update))


def _prev_ok(seq: int, prev: Any) -> bool:
    return isinstance(prev, bytes) and len(prev) == (0 if seq == 1 else DIGEST_SIZE)


def seal(identity: Identity, seq: int, kind: str, update: bytes, prev: bytes = b"") -> Envelope:
    """Sign one of our own updates; ``prev`` is the digest of our envelope ``seq - 1``."""
    if kind not in KINDS or not (1 <= seq <= MAX_SEQ) or not _prev_ok(seq, prev):
        raise ValueError(f"bad envelope kind {kind!r}, seq {seq} or prev")
    author = identity.peer_id
    message = signed_bytes(author, seq, kind, prev, update)
    sig = identity.sign(message)
    raw = pack({**_body(author, seq, kind, prev, update), "sig": sig})
    return Envelope(author, seq, kind, prev, update, sig, raw, hashlib.sha256(message).digest())


def open_envelope(raw: bytes, *, verify_signature: bool = True) -> Envelope:
    """Decode and verify an envelope; raises EnvelopeError with a statistics reason:
    ``oversized``, ``malformed``, ``bad_author`` or ``bad_signature``.

    With ``verify_signature=False`` the signature is not checked (call `check_signature`
    before trusting it): the store uses this to drop duplicates of envelopes it already
    verified without paying for a second Ed25519 verification."""
    if not isinstance(raw, (bytes, bytearray)):
        raise EnvelopeError("malformed", "an envelope is msgpack bytes")
    raw = bytes(raw)
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError("oversized", f"{len(raw)} bytes > {MAX_ENVELOPE_BYTES}")
    try:
        m = unpack(raw, max_bytes=MAX_ENVELOPE_BYTES)
    except DecodeError as e:
        raise EnvelopeError("malformed", str(e)) from None
    if not isinstance(m, dict) or set(m) != _FIELDS:
        raise EnvelopeError("malformed", "not an envelope map")
    author, seq, kind, update, sig = m["author"], m["seq"], m["kind"], m["update"], m["sig"]
    prev = m["prev"]
    if m["v"] != ENVELOPE_VERSION:
        raise EnvelopeError("malformed", f"envelope version {m['v']!r}")
    if (type(seq) is not int or not (1 <= seq <= MAX_SEQ) or kind not in KINDS
            or not isinstance(update, bytes) or not isinstance(sig, bytes)
            or not _prev_ok(seq, prev)):
        raise EnvelopeError("malformed", "bad field types")
    if not isinstance(author, str):
        raise EnvelopeError("bad_author", "author is not a string")
    try:
        public_key_from_peer_id(author)
    except InvalidPeerId:
        raise EnvelopeError("bad_author", f"{author[:64]!r} is not an Ed25519 peer id") from None
    message = signed_bytes(author, seq, kind, prev, update)
    if verify_signature and not verify(author, message, sig):
        raise EnvelopeError("bad_signature", f"author={author} seq={seq}")
    return Envelope(author, seq, kind, prev, update, sig, raw, hashlib.sha256(message).digest())


def check_signature(env: Envelope) -> None:
    """Raise EnvelopeError ``bad_signature`` unless the author signed ``env``."""
    message = signed_bytes(env.author, env.seq, env.kind, env.prev, env.update)
    if not verify(env.author, message, env.signature):
        raise EnvelopeError("bad_signature", f"author={env.author} seq={env.seq}")


def proves_equivocation(a: Envelope, b: Envelope) -> bool:
    """True when two verified envelopes show their author forked its history: two
    different envelopes for one seq, or one that does not build on the other's seq."""
    if a.author != b.author:
        return False
    if a.seq == b.seq:
        return a.digest != b.digest
    first, second = (a, b) if a.seq < b.seq else (b, a)
    return second.seq == first.seq + 1 and second.prev != first.digest
