"""Malformed input on the local socket: typed errors or a closed connection, counted,
while the daemon keeps serving everyone else."""

import os
import socket
import struct
import subprocess
import sys

import msgpack
import pytest

import lattice
from lattice.api.framing import frame
from lattice.testing.daemons import wait_for

pytestmark = pytest.mark.integration


class Raw:
    """A hand-rolled client that can send anything."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(str(path))
        self.unpacker = b""

    def send(self, data: bytes):
        self.s.sendall(data)

    def reply(self):
        hdr = self._exact(4)
        if hdr is None:
            return None
        (n,) = struct.unpack(">I", hdr)
        return msgpack.unpackb(self._exact(n), raw=False)

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                return None if not buf else buf
            buf += chunk
        return buf

    def close(self):
        self.s.close()


def error_name(reply):
    assert reply[0] == 1 and reply[3] is None, reply
    return reply[2]["name"]


def test_malformed_requests_get_typed_errors_and_the_daemon_keeps_serving(daemons):
    d = daemons("--log-level", "info")
    d.wait_running()
    bystander = lattice.connect(d.socket)  # another client, connected throughout
    raw = Raw(d.socket)

    body = b"\xc1\xff\x00garbage"
    raw.send(struct.pack(">I", len(body)) + body)
    assert error_name(raw.reply()) == "PARSE_ERROR"

    raw.send(frame({"not": "a request"}))
    assert error_name(raw.reply()) == "INVALID_REQUEST"
    raw.send(frame([0, "id-not-int", "status", {}]))
    assert error_name(raw.reply()) == "INVALID_REQUEST"

    raw.send(frame([0, 1, "no.such.method", {}]))
    r = raw.reply()
    assert r[1] == 1 and error_name(r) == "METHOD_NOT_FOUND"

    raw.send(frame([0, 2, "peers.connect", {"addr": 42}]))
    assert error_name(raw.reply()) == "INVALID_PARAMS"
    raw.send(frame([0, 3, "peers.connect", "positional"]))
    assert error_name(raw.reply()) == "INVALID_PARAMS"
    raw.send(frame([0, 4, "subscribe", {"topics": ["nope"]}]))
    assert error_name(raw.reply()) == "INVALID_ARGUMENT"

    # an oversized frame is refused and skipped: the same connection still works after it
    big = frame([0, 5, "status", {"pad": "x" * (5 << 20)}])
    raw.send(big + frame([0, 6, "status", {}]))
    assert error_name(raw.reply()) == "FRAME_TOO_LARGE"
    ok = raw.reply()
    assert ok[1] == 6 and ok[2] is None and ok[3]["state"] == "running"

    # a truncated frame followed by a hang-up costs only that connection
    raw.send(struct.pack(">I", 100) + b"\x93\x00")
    raw.close()

    # bytes that cannot be a frame header: the connection is closed
    junk = Raw(d.socket)
    junk.send(b"\xff\xff\xff\xffGET / HTTP/1.1\r\n\r\n")
    assert junk.reply() is None
    junk.close()

    st = bystander.status()
    bystander.close()
    assert st["state"] == "running"
    rpc = st["rpc"]
    assert rpc["parse_errors"] == 1 and rpc["invalid_requests"] == 2
    assert rpc["unknown_methods"] == 1 and rpc["invalid_params"] == 2
    assert rpc["oversized_frames"] == 1 and rpc["unrecoverable_streams"] == 1
    assert rpc["internal_errors"] == 0
    assert d.proc.poll() is None


def test_random_bytes_fuzz_never_kills_the_daemon(daemons):
    import random
    d = daemons("--log-level", "warning")
    d.wait_running()
    rng = random.Random(1234)
    for i in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket))
        n = rng.randrange(1, 300)
        payload = bytes(rng.randrange(256) for _ in range(n))
        if i % 2:  # half of them framed correctly, so the body parser is fuzzed too
            payload = struct.pack(">I", n) + payload
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon hung up on bytes that cannot be a frame: that is the point
        s.close()
    with lattice.connect(d.socket) as c:
        st = c.status()
        assert st["state"] == "running" and st["rpc"]["internal_errors"] == 0
        # every fuzz connection is released (the daemon sees their EOFs asynchronously)
        wait_for(lambda: c.status()["rpc"]["connections_open"] == 1, 10,
                 "fuzz connections to be released")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_other_users_are_refused_by_peer_credentials(daemons):
    import shutil
    import tempfile
    sock_dir = tempfile.mkdtemp(prefix="lattice-cred-")  # under /tmp: traversable by all
    os.chmod(sock_dir, 0o711)
    d = daemons("--socket", f"{sock_dir}/d.sock")
    d.socket = type(d.socket)(f"{sock_dir}/d.sock")
    d.wait_running()
    # The 0600 mode alone keeps others out; widen it to prove the credential check holds.
    os.chmod(d.socket, 0o666)
    code = (
        "import os, lattice\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"c = lattice.connect({str(d.socket)!r})\n"
        "try:\n    c.status()\nexcept lattice.LatticeError as e:\n    print(type(e).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "PermissionDeniedError" in r.stdout, r.stderr
    with lattice.connect(d.socket) as c:
        assert c.status()["rpc"]["refused_credentials"] == 1
    d.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)
