"""The state directory: its lock and the node identity file.

One daemon per state dir: an exclusive `flock` on `latticed.lock`, held for the life of
the process (the kernel drops it if we crash, so there is nothing stale to clean up).
The identity key is created on first start with mode 0600 and reused afterwards.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lattice.core.identity import (
    Identity,
    IdentityFileError,
    decode_identity_file,
    encode_identity_file,
)

LOCK_FILE = "latticed.lock"
IDENTITY_FILE = "identity.key"


class StateDirError(RuntimeError):
    """The state dir cannot be used; the message says why and what to do."""


class StateDirLocked(StateDirError):
    pass


def prepare(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise StateDirError(f"cannot create state dir {state_dir}: {e.strerror}") from None
    if not os.access(state_dir, os.W_OK):
        raise StateDirError(f"state dir {state_dir} is not writable by uid {os.getuid()}")


def acquire_lock(state_dir: Path) -> int:
    """Lock the state dir for this process; returns the fd to keep open."""
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirLocked(
            f"another latticed (pid {holder}) is already using state dir {state_dir}; "
            "stop it first, or give this one its own --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def load_or_create_identity(state_dir: Path) -> tuple[Identity, bool]:
    """(identity, created). A corrupt or foreign identity file is an error, never
    silently replaced: the peer id is what the network knows us by."""
    path = state_dir / IDENTITY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        identity = Identity.generate()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, encode_identity_file(identity))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return identity, True
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, 0o600)  # tighten a key someone loosened; the key stays valid
    try:
        return decode_identity_file(data, path), False
    except IdentityFileError as e:
        raise StateDirError(f"{e}; move it away to create a new identity") from None
