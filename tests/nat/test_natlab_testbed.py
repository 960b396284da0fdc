"""The NAT testbed behaves like the NATs it claims to be, with plain sockets (no daemon).

These are real-network tests (real time, real kernel NAT): connect timeouts of a couple
of seconds stand for "the packet was dropped", and the router's drop counter confirms it.
"""

from __future__ import annotations

import ipaddress
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

    # To the router's WAN address (no mapping: local INPUT) and, for an attacker next to
    # the router (its ISP) who routes the LAN prefix to it, straight to the host (FORWARD).
    inet = mixed_tb.internet
    inet.run(["ip", "route", "add", gw.lan_net, "via", gw.wan_addr])
    try:
        assert not await dial(gw.wan_addr)
        assert not await dial(a.addr)
    finally:
        inet.run(["ip", "route", "del", gw.lan_net, "via", gw.wan_addr])
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
    # rejecting routers: only because both SYNs leave within one one-way delay (10 ms)
    # of each other, so each meets the other's mapping already open
    ("nat_cone_x_cone_rst", True),
    ("nat_cone_x_cone_icmp", True),
    ("double_nat_x_cone", True),
    # The symmetric side's SYN leaves from a port nobody announced, so the other NAT
    # drops it as unsolicited; plain simultaneous open cannot work (port prediction could).
    ("nat_cone_x_symmetric", False),
    ("nat_symmetric_x_symmetric", False),
])
async def test_tcp_simultaneous_open_crosses_only_port_preserving_nats(case, expect_direct):
    with Testbed.build(case) as tb:
        assert await _simultaneous_open(tb) is expect_direct


async def _dial(node: Node, target: tuple[str, int], *, port: int = 0,
                timeout: float = 1.0) -> str:
    """"connected", "refused", "unreachable" or "timeout": what a dial from ``node`` met."""
    s = _bound_socket(node, port)
    with s:
        try:
            with trio.move_on_after(timeout):
                await s.connect(target)
                return "connected"
        except ConnectionRefusedError:
            return "refused"
        except OSError:
            return "unreachable"
    return "timeout"


@pytest.mark.parametrize(("case", "met"), [("nat_cone_x_cone", "timeout"),
                                          ("nat_cone_x_cone_rst", "refused"),
                                          ("nat_cone_x_cone_icmp", "refused")])
async def test_routers_drop_or_reject_what_they_do_not_let_in(case, met):
    # ICMP port unreachable in answer to a SYN reads ECONNREFUSED, as a RST does
    with Testbed.build(case) as tb:
        gw = tb.host("a").gateway
        before = gw.unsolicited_drops()
        t0 = trio.current_time()
        assert await _dial(tb.host("bootstrap"), (gw.wan_addr, 42000)) == met
        if met != "timeout":
            assert trio.current_time() - t0 < 0.5  # answered, not waited out
        assert gw.unsolicited_drops() > before


@pytest.mark.parametrize(("case", "from_other_ip", "from_other_port"), [
    ("nat_cone_x_cone", False, False),  # address- and port-dependent filtering
    ("nat_restricted_x_cone", False, True),  # address-dependent
    ("nat_fullcone_x_cone", True, True),  # endpoint-independent
])
async def test_filtering_decides_who_may_open_a_mapped_port(case, from_other_ip, from_other_port,
                                                            nursery):
    with Testbed.build(case) as tb:
        a, boot, relay = tb.host("a"), tb.host("bootstrap"), tb.host("relay")
        await nursery.start(_serve_reflector, boot)
        listener = _bound_socket(a, 43000)
        listener.listen(4)
        with listener:
            mapped = await _observed(a, 43000, boot)  # a talked to boot's reflector port
            assert mapped == (a.public_ip, 43000)
            assert (await _dial(relay, mapped) == "connected") is from_other_ip
            assert (await _dial(boot, mapped, port=43999) == "connected") is from_other_port


async def test_double_nat_maps_through_the_home_router_and_the_carrier(nursery):
    with Testbed.build("double_nat_x_cone") as tb:
        a, boot = tb.host("a"), tb.host("bootstrap")
        home, cgn = a.gateway, tb.carrier("isp")
        assert home.gateway is cgn and a.public_ip == cgn.wan_addr
        assert ipaddress.ip_address(home.wan_addr) in ipaddress.ip_network(cgn.lan_net)
        await nursery.start(_serve_reflector, boot)
        assert await _observed(a, 41000, boot) == (cgn.wan_addr, 41000)  # port kept twice
        assert await _dial(boot, (cgn.wan_addr, 41001), timeout=0.5) == "timeout"


@pytest.mark.parametrize(("case", "hairpin"), [("same_nat", False), ("same_nat_hairpin", True)])
async def test_hairpin_forwards_a_dial_to_our_own_public_address_back_inside(case, hairpin,
                                                                             nursery):
    with Testbed.build(case) as tb:
        a, b, boot = tb.host("a"), tb.host("b"), tb.host("bootstrap")
        await nursery.start(_serve_reflector, boot)
        listener = _bound_socket(b, 44000)
        listener.listen(4)
        with listener:
            mapped = await _observed(b, 44000, boot)  # b's mapping exists now
            assert mapped == (b.public_ip, 44000) == (a.public_ip, 44000)
            assert (await _dial(a, mapped) == "connected") is hairpin
            assert await _dial(a, (b.addr, 44000)) == "connected"  # the LAN always works


async def test_the_internet_delays_what_crosses_it():
    with Testbed.build("public_x_public") as tb:
        boot, relay = tb.host("bootstrap"), tb.host("relay")
        listener = _bound_socket(relay, 45000)
        listener.listen(4)
        with listener:
            t0 = trio.current_time()
            assert await _dial(boot, (relay.addr, 45000)) == "connected"
            rtt = trio.current_time() - t0
    assert rtt >= 2 * tb.spec.delay_ms / 1000 > 0


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
