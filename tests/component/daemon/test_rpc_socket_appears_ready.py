"""The socket file appears only once the daemon accepts on it: a client that sees the
file and connects at once (`latticed & lattice status`) is never refused."""

import os
import socket
import stat

from lattice.api.methods import METHODS
from latticed.events import EventBus
from latticed.rpc_server import RpcServer


async def test_the_socket_path_appears_only_when_it_accepts_connections(tmp_path, monkeypatch):
    path = tmp_path / "latticed.sock"
    accepted_before_visible = []
    real_rename = os.rename

    def rename(src, dst):
        # the instant before the socket appears at its path: connecting must work
        assert not path.exists()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(src))
        accepted_before_visible.append(str(dst))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    server = RpcServer(path, {name: None for name in METHODS}, EventBus(4),
                       max_frame=1024, max_clients=1)
    sock = server.bind()
    try:
        assert accepted_before_visible == [str(path)]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["latticed.sock"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))
    finally:
        sock.close()
