"""The NAT testbed behaves like the NATs it claims to be, with plain sockets (no daemon).

These are real-network tests (real time, real kernel NAT): connect timeouts of a couple
of seconds stand for "the packet was dropped", and the router's drop counter confirms it.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
import trio

from lattice.testing import natlab
from lattice.testing.natlab import Node, Testbed

pytestmark = pytest.mark.nat

REFLECT_PORT = 7000
PUNCH_PORT = 40001
# Long enough for a SYN to cross the testbed hundreds of times, short enough to keep the
# failing cases cheap; a punch that works completes in milliseconds.
PUNCH_TIMEOUT = 2.5


def _bound_socket(node: Node, port: int) -> trio.socket.SocketType:
    """A TCP socket in ``node`` bound to ``port``, shareable the way hole punching needs."""
    s = node.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((node.addr, port))
    return trio.socket.from_stdlib_socket(s)


async def _serve_reflector(node: Node, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Tell every TCP client the address it was seen from ("ip:port"), like identify."""
    listener = _bound_socket(node, REFLECT_PORT)
    listener.listen(16)
    task_status.started()
    with listener:
        while True:
            conn, (ip, port) = await listener.accept()
            with conn:
                await conn.send(f"{ip}:{port}".encode())


async def _observed(node: Node, local_port: int, server: Node) -> tuple[str, int]:
    s = _bound_socket(node, local_port)
    with s:
        await s.connect((server.addr, REFLECT_PORT))
        ip, port = (await s.recv(64)).decode().split(":")
    return ip, int(port)


@pytest.fixture(scope="module")
def mixed_tb():
    """A cone-NATed peer (a), a symmetric-NATed peer (b), bootstrap and relay."""
    with Testbed.build("nat_cone_x_symmetric") as tb:
        yield tb


async def test_cone_nat_keeps_one_external_port_for_all_destinations(mixed_tb, nursery):
    a, boot, relay = (mixed_tb.host(n) for n in ("a", "bootstrap", "relay"))
    await nursery.start(_serve_reflector, boot)
    await nursery.start(_serve_reflector, relay)
    seen_by_boot = await _observed(a, 41000, boot)
    seen_by_relay = await _observed(a, 41000, relay)
    assert seen_by_boot == seen_by_relay == (a.gateway.wan_addr, 41000)


async def test_symmetric_nat_maps_each_destination_to_a_new_port(mixed_tb, nursery):
    b, boot, relay = (mixed_tb.host(n) for n in ("b", "bootstrap", "relay"))
    await nursery.start(_serve_reflector, boot)
    await nursery.start(_serve_reflector, relay)
    (ip1, port1), (ip2, port2) = await _observed(b, 41000, boot), await _observed(b, 41000, relay)
    assert ip1 == ip2 == b.gateway.wan_addr
    assert port1 != port2  # random per connection: 1 in ~28k chance of a false failure


async def test_unsolicited_inbound_to_a_natted_host_is_dropped(mixed_tb, nursery):
    a, boot = mixed_tb.host("a"), mixed_tb.host("bootstrap")
    gw = a.gateway
    listener = _bound_socket(a, 42000)
    listener.listen(4)
    before = gw.unsolicited_drops()

    async def dial(host: str) -> bool:
        s = trio.socket.from_stdlib_socket(boot.socket())
        with s, trio.move_on_after(1.0):
            await s.connect((host, 42000))
            return True
        return False

    # To the router's WAN address (no mapping: local INPUT) and, for an attacker on the
    # same segment who routes the LAN prefix via the router, straight to the host (FORWARD).
    boot.run(["ip", "route", "add", gw.lan_net, "via", gw.wan_addr])
    try:
        assert not await dial(gw.wan_addr)
        assert not await dial(a.addr)
    finally:
        boot.run(["ip", "route", "del", gw.lan_net, "via", gw.wan_addr])
    listener.close()
    # Dropped silently, not refused: a RST would have ended connect() at once. SYN
    # retransmissions may add to the count, so at least one per dial.
    assert gw.unsolicited_drops() - before >= 2


async def _punch(me: Node, target: tuple[str, int]) -> trio.socket.SocketType | None:
    """Listen on PUNCH_PORT and dial ``target`` from it, as a libp2p host would.

    Whichever gives a connection to ``target`` first wins: our connect() (simultaneous
    open, or the peer's listener accepted) or our listener (the peer's SYN arrived
    before ours left; only possible where nothing filters inbound traffic).
    """
    got: list[trio.socket.SocketType] = []
    listener = _bound_socket(me, PUNCH_PORT)
    listener.listen(4)
    with listener, trio.move_on_after(PUNCH_TIMEOUT) as timeout:
        async with trio.open_nursery() as race:

            async def accept() -> None:
                while True:
                    conn, addr = await listener.accept()
                    if addr[:2] != target:
                        conn.close()
                        continue
                    got.append(conn)
                    race.cancel_scope.cancel()
                    return

            async def connect() -> None:
                s = _bound_socket(me, PUNCH_PORT)
                try:
                    await s.connect(target)
                except OSError:  # refused, or the 4-tuple is taken by an accepted conn
                    s.close()
                    return
                got.append(s)
                race.cancel_scope.cancel()

            race.start_soon(accept)
            race.start_soon(connect)
    return None if timeout.cancelled_caught else got[0]


async def _simultaneous_open(tb: Testbed) -> bool:
    """Both peers learn their public endpoint from bootstrap, then dial each other at once."""
    a, b, boot = tb.host("a"), tb.host("b"), tb.host("bootstrap")
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_reflector, boot)
        ext_a = await _observed(a, PUNCH_PORT, boot)
        ext_b = await _observed(b, PUNCH_PORT, boot)
        conns: dict[str, trio.socket.SocketType | None] = {}

        async def punch(me: Node, target: tuple[str, int]) -> None:
            conns[me.name] = await _punch(me, target)

        async with trio.open_nursery() as punches:
            punches.start_soon(punch, a, ext_b)
            punches.start_soon(punch, b, ext_a)
        nursery.cancel_scope.cancel()
    if conns["a"] is None or conns["b"] is None:
        assert conns["a"] is conns["b"] is None, "one side connected, the other did not"
        return False
    with conns["a"], conns["b"]:
        await conns["a"].send(b"punched")
        assert await conns["b"].recv(16) == b"punched"
    return True


@pytest.mark.parametrize(("case", "expect_direct"), [
    ("public_x_cone", True),
    ("firewalled_x_cone", True),
    ("nat_cone_x_cone", True),
    # The symmetric side's SYN leaves from a port nobody announced, so the other NAT
    # drops it as unsolicited; plain simultaneous open cannot work (port prediction could).
    ("nat_cone_x_symmetric", False),
    ("nat_symmetric_x_symmetric", False),
])
async def test_tcp_simultaneous_open_crosses_only_port_preserving_nats(case, expect_direct):
    with Testbed.build(case) as tb:
        assert await _simultaneous_open(tb) is expect_direct


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_teardown_removes_everything_even_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed.build("nat_cone_x_cone") as tb:
            created = set(tb.namespaces())
            sleeper = tb.host("a").popen(["sleep", "60"])
            assert created <= _netns_names()
            raise RuntimeError("boom")
    assert created and not created & _netns_names()
    assert sleeper.poll() is not None
    assert tb.prefix not in {r.prefix for r in natlab.list_runs()}


def test_down_all_removes_runs_whose_owner_died_but_not_live_ones():
    dead = subprocess.Popen(["true"])
    dead.wait()
    crashed = Testbed.create("public_x_cone", owner_pid=dead.pid)
    with Testbed.build("public_x_cone") as live:
        removed = set(natlab.down_all())
        assert set(crashed.namespaces()) <= removed
        assert not set(live.namespaces()) & removed
        assert set(live.namespaces()) <= _netns_names()
    assert not set(crashed.namespaces()) & _netns_names()


def test_natlab_command_brings_a_case_up_and_down(capsys):
    prefix = "nl" + os.urandom(3).hex()
    assert natlab.main(["up", "nat_cone_x_cone", "--prefix", prefix]) == 0
    try:
        shown = capsys.readouterr().out
        assert f"{prefix}-a " in shown and "ip netns exec" in shown
        natlab.main(["list"])
        assert f"{prefix}  manual" in capsys.readouterr().out
    finally:
        assert natlab.main(["down", prefix]) == 0
    assert not any(ns.startswith(prefix) for ns in _netns_names())
