"""Peer identities: Ed25519 keys, libp2p-compatible peer ids, signatures.

Owns the mapping key -> peer id so that pure code (records, CRDT updates, job specs)
can verify "signed by peer X" without libp2p. Must not import trio or libp2p.

A libp2p peer id for an Ed25519 key is the identity multihash of the protobuf
``PublicKey{Type=Ed25519, Data=<32 bytes>}``, written in base58btc
(libp2p specs, peer-ids/peer-ids.md).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

_B58_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}
# protobuf PublicKey{Type: Ed25519 (=1), Data: 32 bytes}
_ED25519_PB_PREFIX = b"\x08\x01\x12\x20"
# multihash: identity code 0x00, length 36
_IDENTITY_MH_PREFIX = b"\x00\x24"

SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32


class InvalidPeerId(ValueError):
    """A string is not a peer id we can verify signatures for."""


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return (b"1" * pad + bytes(reversed(out))).decode("ascii")


def b58decode(text: str) -> bytes:
    raw = text.encode("ascii", errors="strict")
    n = 0
    for c in raw:
        try:
            n = n * 58 + _B58_INDEX[c]
        except KeyError:
            raise InvalidPeerId(f"not base58: {text!r}") from None
    pad = len(raw) - len(raw.lstrip(b"1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * pad + body


def peer_id_bytes_from_public_key(public_key: bytes) -> bytes:
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise InvalidPeerId("an Ed25519 public key is 32 bytes")
    return _IDENTITY_MH_PREFIX + _ED25519_PB_PREFIX + public_key


def peer_id_from_public_key(public_key: bytes) -> str:
    return b58encode(peer_id_bytes_from_public_key(public_key))


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Recover the Ed25519 key embedded in an identity-multihash peer id."""
    try:
        raw = b58decode(peer_id)
    except (UnicodeEncodeError, InvalidPeerId):
        raise InvalidPeerId(f"not a peer id: {peer_id!r}") from None
    prefix = _IDENTITY_MH_PREFIX + _ED25519_PB_PREFIX
    if len(raw) != len(prefix) + PUBLIC_KEY_SIZE or not raw.startswith(prefix):
        raise InvalidPeerId(f"not an Ed25519 peer id: {peer_id!r}")
    return raw[len(prefix):]


def verify(peer_id: str, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` over ``message`` was made by ``peer_id``'s key."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
        key.verify(signature, message)
    except (InvalidPeerId, InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """This node's signing key. ``seed`` is the 32-byte Ed25519 private key."""

    seed: bytes

    @classmethod
    def generate(cls, rng: random.Random | None = None) -> Identity:
        """A fresh key from the OS; from ``rng`` for reproducible tests only (a seeded
        `random.Random` is not a source of secret keys)."""
        return cls(rng.randbytes(32) if rng is not None else os.urandom(32))

    @property
    def _key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @cached_property  # derived from the key on every stream open otherwise (~0.13 ms)
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


IDENTITY_FILE_MAGIC = b"lattice-ed25519-v1\n"


class IdentityFileError(ValueError):
    """The identity file exists but is not one we wrote (refuse to overwrite it)."""


def encode_identity_file(identity: Identity) -> bytes:
    return IDENTITY_FILE_MAGIC + identity.seed.hex().encode() + b"\n"


def decode_identity_file(data: bytes, path: Path | str = "<identity>") -> Identity:
    if not data.startswith(IDENTITY_FILE_MAGIC):
        raise IdentityFileError(f"{path}: not a lattice identity file")
    body = data[len(IDENTITY_FILE_MAGIC):].strip()
    try:
        seed = bytes.fromhex(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise IdentityFileError(f"{path}: corrupt identity file") from None
    if len(seed) != 32:
        raise IdentityFileError(f"{path}: corrupt identity file (key length)")
    return Identity(seed)
