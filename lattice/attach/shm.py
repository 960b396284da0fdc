"""Shared memory between an attached loop and its daemon (proto/attach.md).

Owns both ends of the hand-off: the loop creates a sealed memfd holding its parameters
as float32 (`create_region`: two slots, the loop's and a spare one) and passes the
descriptor with its `attach.open` request over the Unix socket (SCM_RIGHTS); the daemon
checks what it received and maps it (`map_region`). Nothing is ever in the file system,
so nothing leaks when either side dies: the memory goes when the last mapping does.

The daemon maps only a memfd sealed against shrinking and growing (``F_SEAL_SHRINK``,
``F_SEAL_GROW``), owned by the caller's uid (SO_PEERCRED) and of exactly the size the
manifest needs: a loop can then never make the daemon's reads fault (a file shrunk
under a mapping raises SIGBUS in the reader). Linux only. Must not import trio.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat

import numpy as np

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


class SharedRegionError(ValueError):
    """A descriptor the daemon will not map: not a sealed memfd of the caller's, or of
    the wrong size."""


def create_region(nbytes: int, name: str = "lattice-attach") -> tuple[int, mmap.mmap]:
    """(memfd, its shared mapping) of ``nbytes``, sealed so that its size is fixed.
    The caller passes the fd to the daemon and may close it afterwards."""
    if nbytes <= 0:
        raise ValueError("a shared region needs at least one byte")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
        region = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, region


def map_region(fd: int, *, uid: int, nbytes: int) -> mmap.mmap:
    """Map a descriptor a local client passed us, after checking that it is a regular
    memfd owned by ``uid``, sealed against resizing, of exactly ``nbytes``. Closes
    ``fd`` in every case (the mapping keeps the memory). Raises SharedRegionError."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SharedRegionError("the descriptor is not a regular file (a memfd)")
        if st.st_uid != uid:
            raise SharedRegionError(f"the shared memory belongs to uid {st.st_uid}, "
                                    f"not to the caller's uid {uid}")
        if st.st_size != nbytes:
            raise SharedRegionError(f"the shared memory has {st.st_size} bytes; the "
                                    f"manifest needs {nbytes}")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise SharedRegionError("the descriptor is not a memfd (it cannot be sealed)") from None
        if seals & REQUIRED_SEALS != REQUIRED_SEALS:
            raise SharedRegionError("the memfd must be sealed against shrinking and growing "
                                    "(F_SEAL_SHRINK | F_SEAL_GROW)")
        # MAP_POPULATE: fault every page in now, not in the middle of the first sync
        return mmap.mmap(fd, nbytes, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                         mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def slot_of(region: mmap.mmap) -> np.ndarray:
    """The region as flat float32 (its two slots back to back), indexed by both sides
    with the manifest's offsets."""
    return np.frombuffer(region, dtype=np.float32)
