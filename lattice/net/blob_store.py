"""The local blob store of `/lattice/blob/1` (proto/blob.md, "The local store"): blobs
by id (the SHA-256 of their bytes), complete ones as files named by id, downloads in
progress as partial files, bounded in total size and by the free space it must leave
on its disk (the volunteer's ``keep_free_gb``).

Owns `BlobStore`, blob ids (`blob_id`, `is_blob_id`) and the store's errors. Blocking
file I/O: callers run the big operations off the event loop. Must not import libp2p.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

from lattice.core.governor import disk_refusal

_ID_RE = re.compile(r"[0-9a-f]{64}")


def is_blob_id(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def blob_id(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobError(Exception):
    """A local blob-store problem (not a peer's fault)."""


class BlobNotFound(BlobError, KeyError):
    """No such blob here, and (for a fetch) no provider delivered it."""


class BlobStoreFull(BlobError):
    """Storing this blob would exceed the store's byte limit, or leave less free disk
    than the store must keep free."""


class BlobStore:
    """Blobs by id: files in ``root`` (or in memory when ``root`` is None).

    Complete blobs are ``<root>/<id>``; partial downloads ``<root>/partial/<id>``. A blob
    is written to a temp file, fsynced and renamed, so a crash leaves no torn blob.
    Methods do blocking file I/O: call the big ones (`put`, `finish_partial`) off the
    event loop. ``keep_free_bytes``: a write that would leave less free space on the
    store's disk is refused (``free_bytes`` reads it; default: statvfs of ``root``)."""

    def __init__(self, root: Path | str | None, *, max_bytes: int = 4 << 30,
                 keep_free_bytes: int = 0,
                 free_bytes: Callable[[], int] | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.max_bytes = max_bytes
        self.keep_free_bytes = keep_free_bytes
        self._free_bytes = free_bytes or self._statvfs_free
        self.refused_disk = 0
        self._memory: dict[str, bytes] = {}
        self._partial_memory: dict[str, bytearray] = {}
        self._sizes: dict[str, int] = {}
        if self.root is not None:
            (self.root / "partial").mkdir(parents=True, exist_ok=True)
            for entry in self.root.iterdir():
                if entry.is_file() and is_blob_id(entry.name):
                    self._sizes[entry.name] = entry.stat().st_size
                elif entry.is_file() and entry.name.startswith(".tmp-"):
                    entry.unlink()  # a put interrupted by a crash

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def has(self, bid: str) -> bool:
        return bid in self._sizes

    def size(self, bid: str) -> int | None:
        return self._sizes.get(bid)

    def ids(self) -> list[str]:
        return sorted(self._sizes)

    def _statvfs_free(self) -> int:
        if self.root is None:
            return 1 << 62  # in memory: no disk to fill
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _reserve(self, n: int, new: int | None = None) -> None:
        """Room for a blob of ``n`` bytes, ``new`` of them (default: all) not on disk yet."""
        if self.used_bytes + n > self.max_bytes:
            raise BlobStoreFull(f"storing {n} bytes would exceed the limit of {self.max_bytes}")
        if self.keep_free_bytes:
            why = disk_refusal(self._free_bytes(), n if new is None else new, self.keep_free_bytes)
            if why is not None:
                self.refused_disk += 1
                raise BlobStoreFull(why)

    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store ``data``; returns its id (idempotent)."""
        bid = blob_id(data)
        if bid in self._sizes:
            return bid
        self._reserve(len(data))
        if self.root is None:
            self._memory[bid] = bytes(data)
        else:
            tmp = self.root / f".tmp-{secrets.token_hex(8)}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / bid)
        self._sizes[bid] = len(data)
        return bid

    def read(self, bid: str, offset: int, length: int) -> bytes:
        size = self._sizes.get(bid)
        if size is None:
            raise BlobNotFound(bid)
        end = min(size, offset + length)
        if self.root is None:
            return self._memory[bid][offset:end]
        with open(self.root / bid, "rb") as f:
            f.seek(offset)
            return f.read(max(0, end - offset))

    def get(self, bid: str) -> bytes:
        size = self._sizes.get(bid)
        if size is None:
            raise BlobNotFound(bid)
        return self.read(bid, 0, size)

    def delete(self, bid: str) -> None:
        if self._sizes.pop(bid, None) is None:
            return
        if self.root is None:
            self._memory.pop(bid, None)
        else:
            (self.root / bid).unlink(missing_ok=True)

    # partial downloads ----------------------------------------------------------------------
    def partial_size(self, bid: str) -> int:
        if self.root is None:
            return len(self._partial_memory.get(bid, b""))
        path = self.root / "partial" / bid
        return path.stat().st_size if path.exists() else 0

    def append_partial(self, bid: str, offset: int, data: bytes) -> None:
        if offset != self.partial_size(bid):
            raise BlobError(f"partial {bid[:12]} is at {self.partial_size(bid)}, not {offset}")
        self._reserve(offset + len(data), len(data))
        if self.root is None:
            self._partial_memory.setdefault(bid, bytearray()).extend(data)
            return
        with open(self.root / "partial" / bid, "ab") as f:
            f.write(data)

    def discard_partial(self, bid: str) -> None:
        if self.root is None:
            self._partial_memory.pop(bid, None)
        else:
            (self.root / "partial" / bid).unlink(missing_ok=True)

    def finish_partial(self, bid: str) -> bool:
        """Verify the partial download against its id and make it a blob; False (and the
        partial is discarded) when the bytes do not hash to the id."""
        if self.root is None:
            data = bytes(self._partial_memory.pop(bid, b""))
            if blob_id(data) != bid:
                return False
            self._memory[bid] = data
            self._sizes[bid] = len(data)
            return True
        path = self.root / "partial" / bid
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != bid:
            path.unlink(missing_ok=True)
            return False
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(path, self.root / bid)
        self._sizes[bid] = (self.root / bid).stat().st_size
        return True

    def statistics(self) -> dict[str, Any]:
        return {"blobs": len(self._sizes), "bytes": self.used_bytes, "max_bytes": self.max_bytes,
                "keep_free_bytes": self.keep_free_bytes, "refused_disk": self.refused_disk}
