"""A volunteer's daemon: identity, lock, clean stops, bootstrap connections kept up."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

import lattice
from lattice.testing.daemons import run_cli, wait_for

pytestmark = pytest.mark.integration


def test_identity_is_created_0600_once_and_reused(daemons, tmp_path):
    d = daemons()
    first = d.wait_running()
    key = d.state_dir / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.state_dir.stat().st_mode) == 0o700
    assert d.stop() == 0
    again = daemons(state_dir=d.state_dir)
    assert again.wait_running()["peer_id"] == first["peer_id"]


def test_print_peer_id_creates_the_identity_the_daemon_then_uses(daemons, tmp_path):
    # what an operator (or the compose testnet's bootstrap node) runs to write a
    # /p2p/<id> bootstrap address before the daemon is up
    state = tmp_path / "fresh"
    out = subprocess.run([sys.executable, "-m", "latticed", "--state-dir", str(state),
                          "--print-peer-id"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    peer_id = out.stdout.strip()
    assert peer_id.startswith("12D3KooW")
    assert stat.S_IMODE((state / "identity.key").stat().st_mode) == 0o600
    assert daemons(state_dir=state).wait_running()["peer_id"] == peer_id


def test_second_daemon_on_same_state_dir_refuses_and_first_keeps_serving(daemons):
    first = daemons()
    pid = first.wait_running()["peer_id"]
    second = daemons(state_dir=first.state_dir)
    assert second.proc.wait(20) == 1
    assert "already using state dir" in second.log_text()
    with first.client() as c:
        assert c.status()["peer_id"] == pid  # socket and identity untouched


def test_a_taken_listen_port_or_a_served_socket_is_exit_1_with_the_reason(daemons, tmp_path):
    first = daemons()
    first.wait_running()
    with socket.socket() as other_program:  # py-libp2p alone would run on, deaf
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        port = other_program.getsockname()[1]
        taken = daemons("--listen", f"/ip4/127.0.0.1/tcp/{port}")
        assert taken.proc.wait(20) == 1
    assert "cannot start: cannot listen on" in taken.log_text()
    served = daemons("--socket", str(first.socket))  # another daemon serves this socket
    assert served.proc.wait(20) == 1
    assert "cannot start: another daemon is serving" in served.log_text()
    assert first.client().status()["state"] == "running"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_within_5s(daemons, sig):
    d = daemons()
    d.wait_running()
    with d.client() as c:
        events = c.subscribe(["daemon"])
        assert next(events)["event"] == "snapshot"
        t0 = time.monotonic()
        d.proc.send_signal(sig)
        assert next(events)["state"] == "stopping"
        events.close()
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5.0
    assert not d.socket.exists(), "the socket file is removed on a clean stop"


def test_a_signal_while_the_daemon_is_still_starting_stops_it_within_5s(daemons):
    # the socket answers (state "starting") before libp2p is imported, which takes
    # about a second: a stop then must not wait for the import to finish
    d = daemons()
    wait_for(lambda: d.socket.exists(), 20, "the socket")
    with d.client() as c:
        state = c.status()["state"]
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5.0, f"stopping from {state!r} took too long"
    assert not d.socket.exists()


def test_status_and_peers_through_library_and_cli(daemons):
    a, b = daemons(), daemons()
    a.wait_running()
    b.wait_running()
    r = run_cli("peers", "connect", a.addr(), socket=b.socket)
    assert r.returncode == 0, r.stderr
    assert a.peer_id() in r.stdout

    r = run_cli("status", "--json", socket=a.socket)
    st = json.loads(r.stdout)
    assert st["state"] == "running" and st["peers"] == 1 and st["version"]
    assert st["listen_addrs"][0].startswith("/ip4/127.0.0.1/tcp/")
    assert run_cli("status", socket=a.socket).stdout.startswith("peer id")

    with a.client() as c:
        (p,) = c.peers()
    assert p["peer_id"] == b.peer_id() and p["direction"] == "inbound"
    assert p["connection"] == "direct" and p["addrs"][0].startswith("/ip4/127.0.0.1/")
    with b.client() as c:
        (p,) = wait_for(lambda: [x for x in c.peers() if x["rtt_ms"] is not None], 10, "an RTT")
    assert p["direction"] == "outbound" and 0 < p["rtt_ms"] < 1000
    table = run_cli("peers", socket=b.socket).stdout
    assert "PEER ID" in table and a.peer_id() in table and "direct" in table


def test_connect_to_nothing_gives_a_clear_reason(daemons):
    d = daemons()
    d.wait_running()
    with d.client() as c:
        with pytest.raises(lattice.LatticeError) as e:
            c.connect_peer("/ip4/127.0.0.1/tcp/1/p2p/" + c.status()["peer_id"])
        assert "this daemon itself" in str(e.value)
        with pytest.raises(lattice.LatticeError) as e:
            c.connect_peer("not-a-multiaddr")
        assert type(e.value).__name__ == "InvalidArgumentError"
    other = "12D3KooWHSXNwKrT2cFFNvCehHD9V9NYvfyenZsWeBiWy4csEYdT"
    r = run_cli("peers", "connect", f"/ip4/127.0.0.1/tcp/1/p2p/{other}", "--timeout", "3",
                socket=d.socket)
    assert r.returncode == 1 and "failed" in r.stderr


def test_bootstrap_peer_is_redialed_after_it_restarts(daemons):
    boot = daemons()
    boot.wait_running()
    boot_addr = boot.addr()
    # a restarted bootstrap keeps its identity; pin its port so the address stays valid
    port = boot_addr.split("/tcp/")[1].split("/")[0]
    assert boot.stop() == 0
    boot = daemons("--listen", f"/ip4/127.0.0.1/tcp/{port}", state_dir=boot.state_dir)
    boot.wait_running()
    node = daemons("--bootstrap", boot_addr)
    node.wait_running()
    with node.client() as c:
        with c.subscribe(["peers"]) as events:
            snap = next(events)
            if not snap["peers"]:
                assert next(events)["event"] == "connected"
            assert boot.stop() == 0
            assert next(events)["event"] == "disconnected"
            boot2 = daemons("--listen", f"/ip4/127.0.0.1/tcp/{port}", state_dir=boot.state_dir)
            boot2.wait_running()
            ev = next(events)
            assert ev["event"] == "connected" and ev["peer_id"] == boot_addr.rsplit("/", 1)[1]


def test_cli_without_a_daemon_says_how_to_start_one(tmp_path):
    r = run_cli("status", socket=tmp_path / "none.sock")
    assert r.returncode == 1
    assert "no Lattice daemon is listening" in r.stderr and "latticed" in r.stderr
    r = run_cli("peers", "--json", socket=tmp_path / "none.sock")
    assert r.returncode == 1 and r.stdout == ""


def test_async_client_mirrors_the_blocking_one(daemons):
    import trio

    d = daemons()
    d.wait_running()

    async def main():
        async with lattice.open_client(d.socket) as c:
            st, peers = await c.status(), await c.peers()
            info = await c.api_info()
            with pytest.raises(lattice.LatticeError) as e:
                await c.call("no.such.method")
            async with c.subscribe(["daemon"]) as events:
                async for ev in events:
                    assert ev == {"topic": "daemon", "event": "snapshot", "state": "running"}
                    break
            return st, peers, info, e.value

    st, peers, info, err = trio.run(main)
    assert st["state"] == "running" and peers == []
    assert {m["name"] for m in info["methods"]} >= {"status", "peers.list", "peers.connect"}
    assert type(err).__name__ == "MethodNotFoundError" and err.code == 3


def test_localnet_brings_up_n_nodes_and_stops_them_on_sigterm(tmp_path):
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "lattice.cli", "localnet", "--nodes", "3",
                             "--base-dir", str(tmp_path / "net")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(3)]
    assert [l.split()[:2] for l in lines] == [["node", "0"], ["node", "1"], ["node", "2"]]
    sockets = [l.split()[3] for l in lines]
    with lattice.connect(sockets[0]) as c:
        wait_for(lambda: len(c.peers()) == 2, 20, "node 0 to see both others")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert "stopped 3 daemons cleanly" in proc.stderr.read()
    assert not any(os.path.exists(s) for s in sockets)


def _stderr_line_with(proc, text: str, timeout: float) -> str:
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(deadline - time.monotonic()):
            line = proc.stderr.readline()
            if text in line:
                return line
            assert line, f"localnet ended without printing {text!r}"
    raise AssertionError(f"localnet printed no {text!r} within {timeout} s")


def test_localnet_reports_a_dead_node_and_keeps_the_rest_running(tmp_path):
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "lattice.cli", "localnet", "--nodes", "3",
                             "--base-dir", str(tmp_path / "net")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sockets = [proc.stdout.readline().split()[3] for _ in range(3)]
    with lattice.connect(sockets[0]) as c:
        wait_for(lambda: len(c.peers()) == 2, 20, "node 0 to see both others")
    with lattice.connect(sockets[2]) as c:
        victim = c.status()["pid"]
    os.kill(victim, signal.SIGKILL)  # as a developer watching churn would
    line = _stderr_line_with(proc, "exited", 20)
    assert "node 2 exited with code -9" in line and "2 still running" in line
    with lattice.connect(sockets[0]) as c:  # the others keep serving
        wait_for(lambda: len(c.peers()) == 1, 20, "node 0 to notice node 2 is gone")
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 1  # a node did not stop cleanly
    assert "non-zero exits: {2: -9}" in proc.stderr.read()


def test_localnet_demo_shows_the_nodes_finding_each_other_then_stops(tmp_path):
    r = run_cli("localnet", "--nodes", "3", "--demo", "--base-dir", str(tmp_path / "net"),
                timeout=60)
    assert r.returncode == 0, r.stderr
    assert "network up: node 0 sees all 2 others" in r.stdout
    assert "stopped 3 daemons cleanly" in r.stderr
