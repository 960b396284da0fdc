"""Local RPC framing and message shapes: msgpack-RPC messages, framed or plain.

Messages are msgpack-RPC as neovim uses them: request ``[0, id, method, params]``,
response ``[1, id, error, result]``, notification ``[2, method, params]``. A connection
speaks one of two forms, told apart by its first byte (`is_plain_stream`):

- *framed* (our clients): each message in one frame, a 4-byte big-endian length, then
  the msgpack body. Length prefixes let a receiver refuse an oversized frame *and skip
  it*, so one bad request does not cost the client its connection.
- *plain* (the msgpack-RPC specification, as neovim and its client libraries speak it):
  messages back to back in one msgpack stream. A message over the limit or bytes that
  are not msgpack cannot be skipped in a stream: the connection is closed.

Pure: `FrameDecoder` and `StreamDecoder` are fed bytes and return events.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from lattice.core.codec import DecodeError, check_depth, make_unpacker, pack, unpack

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 4 << 20
# a declared length past this is garbage, not a large request: close instead of skipping
HARD_MAX_FRAME = 1 << 30


def frame(message: Any) -> bytes:
    body = pack(message)
    return HEADER.pack(len(body)) + body


def is_plain_stream(first_byte: int) -> bool:
    """A framed connection starts with a length below 2**24 (first byte 0); a plain
    msgpack-RPC stream starts with an array: fixarray 0x90-0x9f, array16/32 0xdc/0xdd."""
    return 0x90 <= first_byte <= 0x9F or first_byte in (0xDC, 0xDD)


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


class _TooLong(Exception):
    pass


class StreamDecoder:
    """Sans-I/O splitter of a plain msgpack stream, with the same limits as `unpack`:
    one message may not exceed ``max_message`` bytes. A message over it, or bytes that
    are not msgpack, end the stream (`Unrecoverable`). Memory stays bounded by
    ``max_message`` plus one fed chunk (64 KiB)."""

    _CHUNK = 64 * 1024

    def __init__(self, max_message: int = DEFAULT_MAX_FRAME) -> None:
        self.max_message = max_message
        self._unpacker = make_unpacker(max_bytes=max_message + self._CHUNK)
        self._fed = 0
        self._dead = False

    def feed(self, data: bytes) -> list[Frame | Unrecoverable]:
        out: list[Frame | Unrecoverable] = []
        for i in range(0, len(data), self._CHUNK):
            if self._dead:
                break
            chunk = data[i:i + self._CHUNK]
            try:
                self._unpacker.feed(chunk)
                self._fed += len(chunk)
                start = self._unpacker.tell()
                for value in self._unpacker:
                    end = self._unpacker.tell()
                    if end - start > self.max_message:
                        raise _TooLong()
                    check_depth(value)  # the streaming unpacker cannot bound nesting itself
                    out.append(Frame(value))
                    start = end
            except _TooLong:
                self._dead = True
                out.append(Unrecoverable(f"a message exceeds {self.max_message} bytes"))
                break
            except (DecodeError, msgpack.FormatError, msgpack.StackError, ValueError,
                    TypeError) as e:
                self._dead = True
                out.append(Unrecoverable(f"not a msgpack stream: {e}"))
                break
            # what is left buffered is the start of one message: bound it
            if self._fed - self._unpacker.tell() > self.max_message:
                self._dead = True
                out.append(Unrecoverable(f"a message exceeds {self.max_message} bytes"))
        return out
