"""NAT traversal benchmark: relayed then direct connections between two NATed peers.

    sudo .venv/bin/python bench/nat_traversal.py [--mode fast|dcutr] [--attempts 20]
                                                 [--case nat_cone_x_cone ...]

For every case of `lattice.testing.natlab` it builds the testbed, runs a Circuit Relay v2
hop on `relay` (bare py-libp2p 0.8.1, TCP + Noise + Yamux, max_connections_per_peer=1),
and per attempt starts fresh peer processes A and B inside their namespaces: B reserves
a slot on the relay, A reserves too, dials B through the relay, sends a byte through it,
then waits for a direct connection, opens a new stream and checks it runs over the
direct connection and carries 1 MiB. It prints, per case: time to the relayed connection,
to the first byte through the relay, from that byte to the direct connection, and how
many attempts ended direct.

Modes:
  dcutr  py-libp2p's `DCUtRProtocol` service (auto-drive) on both peers;
  fast   `lattice.net.holepunch_prototype` (our coordination over the relayed
         connection, then a simultaneous TCP open upgraded by the swarm).

Only the orchestrator needs root; peers run as `ip netns exec NS python THIS peer ...`.
Timestamps are CLOCK_MONOTONIC, which is shared by all processes on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ECHO = "/bench/echo/1"
RELAY_PORT = 4001
DEFAULT_CASES = ["public_x_cone", "nat_cone_x_cone", "nat_cone_x_symmetric",
                 "nat_symmetric_x_symmetric"]


def emit(**fields: Any) -> None:
    fields.setdefault("t", time.monotonic())
    print(json.dumps(fields), flush=True)


# --- the peer processes (run inside namespaces) --------------------------------------


def _host(seed_hex: str, listen: str) -> Any:
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as x25519_pair
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    kp = create_new_key_pair(bytes.fromhex(seed_hex))
    return new_host(
        key_pair=kp,
        sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=x25519_pair().private_key)},
        muxer_opt={YAMUX_ID: Yamux},
        listen_addrs=[multiaddr.Multiaddr(listen)],
        connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0,
                                           low_watermark=0),
        enable_mDNS=False,
        enable_upnp=False,
    )


def _log_to_stderr(debug: bool) -> None:
    # libp2p installs its own handlers at import; route everything through one handler
    # with monotonic timestamps so logs of different processes line up.
    class Mono(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"{time.monotonic():.3f} {record.name} {record.levelname} {record.getMessage()}"

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Mono())
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    lib = logging.getLogger("libp2p")
    lib.handlers[:] = []
    lib.propagate = True
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("libp2p") and isinstance(lg, logging.Logger):
            lg.handlers[:] = []
            lg.propagate = True
            lg.setLevel(logging.NOTSET)
    lib.setLevel(logging.WARNING)
    if debug:
        for name in ("libp2p.relay.circuit_v2.dcutr", "lattice.net.holepunch_prototype"):
            logging.getLogger(name).setLevel(logging.DEBUG)


async def run_relay(args: argparse.Namespace) -> None:
    import multiaddr
    import trio
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
    from libp2p.relay.circuit_v2.resources import RelayLimits
    from libp2p.tools.anyio_service import background_trio_service

    _log_to_stderr(args.debug)
    listen = f"/ip4/{args.ip}/tcp/{args.port}"
    host = _host(args.seed, listen)
    limits = RelayLimits(duration=600, data=64 * 1024 * 1024, max_circuit_conns=64,
                         max_reservations=64)
    hop = CircuitV2Protocol(host, limits=limits, allow_hop=True)
    async with host.run([multiaddr.Multiaddr(listen)]), background_trio_service(hop):
        emit(ev="ready", peer_id=host.get_id().to_base58(), addr=listen)
        await trio.sleep_forever()


async def _echo(stream: Any) -> None:
    import trio
    from libp2p.network.stream.exceptions import StreamError
    from libp2p.stream_muxer.exceptions import MuxedStreamError

    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except (EOFError, OSError, StreamError, MuxedStreamError, trio.BrokenResourceError,
            trio.ClosedResourceError):
        pass  # the peer went away: the attempt's outcome is judged on A's side
    finally:
        await stream.close()


def _conn_kind(conn: Any) -> str:
    addrs = [str(a) for a in (conn.get_transport_addresses() or [])]
    return "relayed" if any("p2p-circuit" in a for a in addrs) or not addrs else "direct"


def _direct_conn(host: Any, peer: Any) -> Any | None:
    for conn in host.get_network().get_connections(peer):
        if _conn_kind(conn) == "direct":
            return conn
    return None


async def run_peer(args: argparse.Namespace) -> None:
    import multiaddr
    import trio
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
    from libp2p.relay.circuit_v2.transport import CircuitV2Transport
    from libp2p.tools.anyio_service import background_trio_service

    _log_to_stderr(args.debug)
    listen = f"/ip4/{args.ip}/tcp/{args.port}"
    host = _host(args.seed, listen)
    stop = CircuitV2Protocol(host, allow_hop=False)  # the STOP side: accept relayed conns
    transport = CircuitV2Transport(host, stop, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT))
    host.set_stream_handler(ECHO, _echo)
    relay_ma = multiaddr.Multiaddr(args.relay)
    relay_info = info_from_p2p_addr(relay_ma)

    t_start = time.monotonic()
    async with host.run([multiaddr.Multiaddr(listen)]), background_trio_service(stop), \
            trio.open_nursery() as nursery:
        puncher = None
        if args.mode == "dcutr":
            dcutr = DCUtRProtocol(host, dial_timeout=args.dcutr_dial_timeout)
            await nursery.start(_run_service, dcutr)
        elif args.mode == "fast":
            from lattice.net import holepunch_prototype as hp
            puncher = hp.HolePuncher(host, listen_ip=args.ip, listen_port=args.port,
                                     responder_skew=float(os.environ.get("NATLAB_SKEW", "0")))
            await nursery.start(puncher.run)
        if puncher is not None:
            await puncher.connect_relay(relay_info)
        else:
            await host.connect(relay_info)
        stream = await host.new_stream(relay_info.peer_id, [HOP_ID])
        if not await transport.reserve(stream, relay_info.peer_id, nursery):
            emit(ev="error", what="reservation refused")
            return
        reserve_s = time.monotonic() - t_start
        emit(ev="reserved", reserve_s=reserve_s)
        if args.role == "b":
            await trio.sleep_forever()

        peer = ID.from_base58(args.peer)
        circuit = multiaddr.Multiaddr(f"{args.relay}/p2p-circuit/p2p/{args.peer}")
        t0 = time.monotonic()
        await transport.dial(circuit)
        t_relayed = time.monotonic()
        s = await host.new_stream(peer, [ECHO])
        await s.write(b"x")
        assert await s.read(1) == b"x"
        t_byte = time.monotonic()
        emit(ev="relayed", relayed_s=t_relayed - t0, first_byte_s=t_byte - t0,
             via=_stream_kind(host, peer, s))

        direct = None
        with trio.move_on_after(args.wait):
            while (direct := _direct_conn(host, peer)) is None:
                if puncher is not None and peer in puncher.gave_up:
                    break  # both sides agreed a punch cannot work: stay relayed
                await trio.sleep(0.005)
        t_direct = time.monotonic() if direct is not None else None

        # What a user relies on: a *new* stream carries data, over the direct connection
        # when there is one, over the relay otherwise.
        s2 = await host.new_stream(peer, [ECHO])
        payload = os.urandom(1 << 20)
        got = bytearray()

        async def reader() -> None:
            while len(got) < len(payload):
                chunk = await s2.read(65536)
                if not chunk:
                    break
                got.extend(chunk)

        async with trio.open_nursery() as io:
            io.start_soon(reader)
            await s2.write(payload)
        conns = host.get_network().get_connections(peer)
        emit(ev="result", reserve_s=reserve_s, relayed_s=t_relayed - t0, first_byte_s=t_byte - t0,
             direct_s=None if t_direct is None else t_direct - t_byte,
             new_stream_via=_stream_kind(host, peer, s2), data_ok=bytes(got) == payload,
             conns=[_conn_kind(c) for c in conns],
             stats=puncher.stats() if puncher is not None else None)
        await s2.close()
        nursery.cancel_scope.cancel()


def _stream_kind(host: Any, peer: Any, stream: Any) -> str:
    """Which of the swarm's connections to ``peer`` carries ``stream``."""
    for conn in host.get_network().get_connections(peer):
        if conn.muxed_conn is stream.muxed_conn:
            return _conn_kind(conn)
    return "closed"


async def _run_service(service: Any, *, task_status: Any) -> None:
    from libp2p.tools.anyio_service import background_trio_service

    async with background_trio_service(service):
        task_status.started()
        import trio
        await trio.sleep_forever()


# --- the orchestrator (root, host namespace) -----------------------------------------


def _spawn(node: Any, argv: list[str], log: Path) -> subprocess.Popen[str]:
    return node.popen([sys.executable, str(Path(__file__).resolve()), *argv],
                      stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def _expect(proc: subprocess.Popen[str], ev: str, timeout: float) -> dict[str, Any]:
    import select

    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {ev!r} within {timeout} s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited (rc={proc.wait()}) before {ev!r}")
        msg = json.loads(line)
        if msg.get("ev") == "error":
            raise RuntimeError(msg["what"])
        if msg.get("ev") == ev:
            return msg


def run_case(case: str, mode: str, attempts: int, wait: float, logdir: Path,
             debug: bool, unknown_dst: str, extra: list[str]) -> list[dict[str, Any]]:
    import dataclasses

    from lattice.core.identity import Identity
    from lattice.testing.natlab import Testbed
    from lattice.testing.natlab import case as natlab_case

    results = []
    spec = dataclasses.replace(natlab_case(case), unknown_dst=unknown_dst)
    with Testbed.build(spec) as tb:
        relay_node, a_node, b_node = tb.host("relay"), tb.host("a"), tb.host("b")
        relay_id = Identity.generate()
        relay = _spawn(relay_node, ["relay", "--seed", relay_id.seed.hex(), "--ip",
                                    relay_node.addr, "--port", str(RELAY_PORT)]
                       + (["--debug"] if debug else []), logdir / f"{case}-relay.log")
        ready = _expect(relay, "ready", 30)
        relay_ma = f"{ready['addr']}/p2p/{ready['peer_id']}"
        for n in range(attempts):
            a_id, b_id = Identity.generate(), Identity.generate()
            port_a, port_b = 20000 + 2 * n, 30000 + 2 * n
            common = ["--relay", relay_ma, "--mode", mode, "--wait", str(wait), *extra] + (
                ["--debug"] if debug else [])
            b = _spawn(b_node, ["peer", "--role", "b", "--seed", b_id.seed.hex(), "--ip",
                                b_node.addr, "--port", str(port_b), *common],
                       logdir / f"{case}-{mode}-{n}-b.log")
            a = None
            try:
                _expect(b, "reserved", 30)
                a = _spawn(a_node, ["peer", "--role", "a", "--seed", a_id.seed.hex(), "--ip",
                                    a_node.addr, "--port", str(port_a), "--peer", b_id.peer_id,
                                    *common], logdir / f"{case}-{mode}-{n}-a.log")
                _expect(a, "reserved", 30)
                res = _expect(a, "result", wait + 60)
            except (TimeoutError, RuntimeError, json.JSONDecodeError) as e:
                res = {"error": str(e)}
            finally:
                for p in (a, b):
                    if p is not None and p.poll() is None:
                        p.terminate()
                for p in (a, b):
                    if p is not None:
                        try:
                            p.wait(timeout=5)
                        except subprocess.TimeoutExpired:
                            p.kill()
            res["attempt"] = n
            results.append(res)
            print(f"  {case} {mode} #{n}: {json.dumps(res)}", file=sys.stderr, flush=True)
    return results


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return f"{1000 * statistics.median(values):7.0f} / {1000 * p90:7.0f}"


def report(case: str, mode: str, results: list[dict[str, Any]]) -> str:
    ok = [r for r in results if "error" not in r]
    direct = [r for r in ok if r.get("direct_s") is not None]
    data_ok = sum(1 for r in ok if r.get("data_ok"))
    return (f"{case:<27} {mode:<6} {_ms([r['reserve_s'] for r in ok]):>17} "
            f"{_ms([r['relayed_s'] for r in ok]):>17} "
            f"{_ms([r['first_byte_s'] for r in ok]):>17} "
            f"{_ms([r['direct_s'] for r in direct]):>17}   "
            f"{len(direct):>2}/{len(results):<2}     {data_ok:>2}/{len(results):<2}"
            f"  errors={len(results) - len(ok)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    for name in ("relay", "peer"):
        p = sub.add_parser(name)
        p.add_argument("--seed", required=True)
        p.add_argument("--ip", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--debug", action="store_true")
        if name == "peer":
            p.add_argument("--role", choices=["a", "b"], required=True)
            p.add_argument("--relay", required=True)
            p.add_argument("--peer")
            p.add_argument("--mode", choices=["dcutr", "fast", "none"], default="fast")
            p.add_argument("--wait", type=float, default=10.0)
            p.add_argument("--dcutr-dial-timeout", type=int, default=10)
    parser.add_argument("--mode", choices=["dcutr", "fast"], default="fast")
    parser.add_argument("--case", action="append")
    parser.add_argument("--attempts", type=int, default=20)
    parser.add_argument("--wait", type=float, default=None,
                        help="seconds to wait for a direct connection (fast 10, dcutr 60)")
    parser.add_argument("--logdir", default="/tmp/natbench")
    parser.add_argument("--debug", action="store_true", help="DCUtR/holepunch debug logs")
    parser.add_argument("--dcutr-dial-timeout", type=int, default=10,
                        help="DCUtRProtocol(dial_timeout=...) in dcutr mode (library default 10)")
    parser.add_argument("--json", help="also write every attempt's result to this file")
    parser.add_argument("--unknown-dst", choices=["blackhole", "unreachable"],
                        default="blackhole", help="what the testbed's internet does with "
                        "packets to addresses it does not hold (e.g. LAN addresses)")
    args = parser.parse_args()

    import trio

    if args.cmd == "relay":
        trio.run(run_relay, args)
        return 0
    if args.cmd == "peer":
        trio.run(run_peer, args)
        return 0

    from lattice.testing.natlab import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"nat_traversal: {reason}", file=sys.stderr)
        return 2
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    wait = args.wait if args.wait is not None else (60.0 if args.mode == "dcutr" else 10.0)
    lines = []
    everything: dict[str, list[dict[str, Any]]] = {}
    for case in args.case or DEFAULT_CASES:
        extra = ["--dcutr-dial-timeout", str(args.dcutr_dial_timeout)]
        results = run_case(case, args.mode, args.attempts, wait, logdir, args.debug,
                           args.unknown_dst, extra)
        lines.append(report(case, args.mode, results))
        everything[case] = results
    print(f"\nNAT traversal, py-libp2p {_libp2p_version()}, times in ms (median / p90); "
          f"direct = after the first relayed byte; logs in {logdir}")
    print(f"{'case':<27} {'mode':<6} {'start->reserved':>17} {'relayed conn':>17} {'first byte':>17} "
          f"{'direct after':>17}   direct   new-stream-data")
    for line in lines:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))
    return 0


def _libp2p_version() -> str:
    from importlib.metadata import version

    return version("libp2p")


if __name__ == "__main__":
    sys.exit(main())
