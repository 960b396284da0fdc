"""Local RPC framing and message shapes (msgpack-RPC messages in length-prefixed frames).

Messages are msgpack-RPC as neovim uses them: request ``[0, id, method, params]``,
response ``[1, id, error, result]``, notification ``[2, method, params]``. Each travels
in one frame: a 4-byte big-endian length, then the msgpack body. Length prefixes let a
receiver refuse an oversized frame *and skip it*, so one bad request does not cost the
client its connection. Pure: `FrameDecoder` is fed bytes and returns events.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from lattice.core.codec import DecodeError, pack, unpack

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 4 << 20
# a declared length past this is garbage, not a large request: close instead of skipping
HARD_MAX_FRAME = 1 << 30


def frame(message: Any) -> bytes:
    body = pack(message)
    return HEADER.pack(len(body)) + body


@dataclass
class Frame:
    value: Any


@dataclass
class BadFrame:
    """A frame whose body is not msgpack; the stream stays in sync."""
    reason: str


@dataclass
class OversizedFrame:
    length: int


@dataclass
class Unrecoverable:
    """Bytes that cannot be a frame header at all; close the connection."""
    reason: str


class FrameDecoder:
    """Sans-I/O frame splitter with a size limit. Oversized frames are skipped, not
    buffered: memory stays bounded by ``max_frame``."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._skip = 0

    def feed(self, data: bytes) -> list[Frame | BadFrame | OversizedFrame | Unrecoverable]:
        out: list[Frame | BadFrame | OversizedFrame | Unrecoverable] = []
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > HARD_MAX_FRAME:
                out.append(Unrecoverable(f"frame header declares {length} bytes"))
                self._buf.clear()
                return out
            if length > self.max_frame:
                out.append(OversizedFrame(length))
                have = len(self._buf) - HEADER.size
                if have >= length:
                    del self._buf[:HEADER.size + length]
                    continue
                self._skip = length - have
                self._buf.clear()
                break
            if len(self._buf) < HEADER.size + length:
                break
            body = bytes(self._buf[HEADER.size:HEADER.size + length])
            del self._buf[:HEADER.size + length]
            try:
                out.append(Frame(unpack(body, max_bytes=self.max_frame)))
            except DecodeError as e:
                out.append(BadFrame(str(e)))
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
