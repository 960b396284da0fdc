"""The daemon maps only a sealed memfd of the caller's uid, of exactly the manifest's
size, and always closes what it was handed; both sides then see the same memory."""

import fcntl
import os

import numpy as np
import pytest

from lattice.attach.shm import SharedRegionError, create_region, map_region, slot_of


def fd_is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_both_ends_share_the_slot_and_the_daemon_closes_its_fd():
    fd, ours = create_region(16)
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    dup = os.dup(fd)
    theirs = map_region(dup, uid=os.getuid(), nbytes=16)
    assert not fd_is_open(dup)
    slot_of(ours)[:] = [1, 2, 3, 4]
    np.testing.assert_array_equal(slot_of(theirs), [1, 2, 3, 4])
    slot_of(theirs)[0] = 9
    assert slot_of(ours)[0] == 9
    with pytest.raises(OSError):
        os.ftruncate(fd, 4)  # sealed: the daemon's reads can never fault
    os.close(fd)


@pytest.mark.parametrize("case,message", [
    ("other uid", "belongs to uid"),
    ("wrong size", "has 16 bytes; the manifest needs 32"),
    ("unsealed memfd", "sealed against shrinking"),
    ("pipe", "not a regular file"),
    ("file on disk", "memfd"),
])
def test_what_the_daemon_refuses(case, message, tmp_path):
    uid, nbytes, extra = os.getuid(), 16, []
    if case == "other uid":
        fd, _ = create_region(16)
        uid = uid + 1
    elif case == "wrong size":
        fd, _ = create_region(16)
        nbytes = 32
    elif case == "unsealed memfd":
        fd = os.memfd_create("x", os.MFD_CLOEXEC)
        os.ftruncate(fd, 16)
    elif case == "pipe":
        fd, w = os.pipe()
        extra.append(w)
    else:
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 16)
    with pytest.raises(SharedRegionError, match=message):
        map_region(fd, uid=uid, nbytes=nbytes)
    assert not fd_is_open(fd)
    for other in extra:
        os.close(other)
