"""The on-disk record format of the state log: framing only, bytes in and bytes out.

Owns how envelopes and equivocation proofs are written to the append-only state log
and how a log is read back, including detecting a torn tail from a crash. Must not
import trio, libp2p, open files or read the clock: the file itself is handled by
`lattice.net.crdt_sync.FileStateLog`, which the daemon owns.

File: `LOG_MAGIC`, then records. Record: 4-byte big-endian payload length, 4-byte
big-endian CRC-32 of the payload, payload = msgpack ``["envelope", raw]`` or
``["proof", raw_a, raw_b]``. A crash can leave a partial record at the end (or, on
some filesystems, garbage after a length): `scan` stops at the first record that is
short or fails its CRC and reports how many bytes were good, so the caller truncates
there. Everything a record holds is validated again by the store when loaded.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from lattice.core.codec import DecodeError, pack, unpack
from lattice.core.state.limits import MAX_ENVELOPE_BYTES

LOG_MAGIC = b"lattice-state-log/1\n"
_HEADER = struct.Struct(">II")
MAX_RECORD_BYTES = 2 * MAX_ENVELOPE_BYTES + 1024  # a proof holds two envelopes

Record = tuple[str, tuple[bytes, ...]]


class LogFormatError(ValueError):
    """The file is not a state log we wrote (refuse to touch it)."""


@dataclass
class ScanResult:
    records: list[Record]
    valid_length: int
    """Bytes from the start of the file through the last good record."""
    dropped_bytes: int
    """Bytes after it (a torn tail); the caller truncates them away."""


def encode_record(record: Record) -> bytes:
    kind, payload = record
    body = pack([kind, *payload])
    if len(body) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def scan(data: bytes) -> ScanResult:
    """Parse a whole log file (bytes). An empty file is an empty log."""
    if not data:
        return ScanResult([], 0, 0)
    if not data.startswith(LOG_MAGIC):
        if LOG_MAGIC.startswith(data):  # crashed while writing the header
            return ScanResult([], 0, len(data))
        raise LogFormatError("not a lattice state log")
    pos = len(LOG_MAGIC)
    records: list[Record] = []
    view = memoryview(data)
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if length > MAX_RECORD_BYTES or end > len(data):
            break
        body = bytes(view[pos + _HEADER.size:end])
        if zlib.crc32(body) != crc:
            break
        record = _decode(body)
        if record is None:
            break
        records.append(record)
        pos = end
    return ScanResult(records, pos, len(data) - pos)


def _decode(body: bytes) -> Record | None:
    try:
        value = unpack(body, max_bytes=MAX_RECORD_BYTES)
    except DecodeError:
        return None
    if (isinstance(value, list) and value and value[0] in ("envelope", "proof")
            and len(value) == (2 if value[0] == "envelope" else 3)
            and all(isinstance(v, bytes) for v in value[1:])):
        return value[0], tuple(value[1:])
    return None
