"""Bulk tensor transfer on loopback, side by side (issue 6): one float32 array of --mib MiB
from one process to another, each row with sender and receiver in separate processes.

Rows
  raw        plain loopback TCP, no crypto, no framing: the ceiling
  libp2p     one py-libp2p TCP+Noise+Yamux stream, out of the box (1 MiB writes)
  ours       lattice.net.bulk: control on a libp2p Noise stream, AES-256-GCM side channel
  ours-yamux lattice.net.bulk fallback: the same sealed chunks over the Yamux stream, credits
  hivemind   hivemind P2P (go-libp2p daemon) protobuf stream, as its averager sends tensors
  lattica    Lattica streaming RPC (@rpc_stream)

Each rep is timed by the sender from the first byte until the receiver confirmed it holds
the whole array; CPU is process time of each side (with its child processes, e.g. p2pd),
per GiB moved. The machine is shared: the load average is printed with the table.

    .venv/bin/python bench/tensor_transfer.py [--mib 256] [--reps 5] [--rows raw,ours,...]

Top-level imports are stdlib only: the anchor rows re-run this file under their own venvs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ANCHORS = {"hivemind": HERE / ".venv-hivemind/bin/python",
           "lattica": HERE / ".venv-lattica/bin/python"}
ROWS = ["raw", "libp2p", "ours", "ours-yamux", "hivemind", "lattica"]
SLOW_ROWS = {"libp2p", "ours-yamux", "hivemind", "lattica"}
PROTOCOL = "/bench/tensor/1"


# -- measurement helpers (stdlib) -------------------------------------------------------


def tree_cpu(pid: int | None = None) -> float:
    """CPU seconds (user+system) of a process and all its live descendants."""
    pid = pid or os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                stack.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def payload(nbytes: int):
    import numpy as np
    return np.arange(nbytes // 4, dtype=np.float32)


def check(array, nbytes: int) -> None:
    assert array.size * 4 == nbytes, (array.size, nbytes)
    i = array.size // 3
    assert array[i] == i and array[-1] == array.size - 1, "payload corrupted"


# -- raw TCP ---------------------------------------------------------------------------------


def raw_recv(args) -> None:
    import numpy as np
    import trio

    async def main():
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        emit(addr=list(listeners[0].socket.getsockname()[:2]), cpu=tree_cpu())
        conn = await listeners[0].accept()
        for _ in range(args.reps):
            dst = np.empty(args.nbytes // 4, np.float32)
            view = memoryview(dst.view(np.uint8))
            got = 0
            while got < args.nbytes:
                n = await conn.socket.recv_into(view[got:])
                assert n, "sender vanished"
                got += n
            check(dst, args.nbytes)
            await conn.send_all(b"k")
            emit(cpu=tree_cpu())

    trio.run(main)


def raw_send(args) -> None:
    import trio
    src = payload(args.nbytes)

    async def main():
        conn = await trio.open_tcp_stream(*args.peer)
        view = memoryview(src.view("u1"))
        for _ in range(args.reps):
            t, c = time.perf_counter(), tree_cpu()
            await conn.send_all(view)
            assert await conn.receive_some(1) == b"k"
            emit(secs=time.perf_counter() - t, cpu=tree_cpu() - c)

    trio.run(main)


# -- py-libp2p out of the box ---------------------------------------------------------------


def _libp2p_host():
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as x25519
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
    from libp2p.security.noise.transport import Transport as Noise
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX
    from libp2p.stream_muxer.yamux.yamux import Yamux

    kp = create_new_key_pair()
    host = new_host(key_pair=kp, sec_opt={NOISE: Noise(kp, noise_privkey=x25519().private_key)},
                    muxer_opt={YAMUX: Yamux},
                    connection_config=ConnectionConfig(max_connections_per_peer=1))
    return host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def libp2p_recv(args) -> None:
    import numpy as np
    import trio
    from libp2p.custom_types import TProtocol

    async def main():
        host, listen = _libp2p_host()
        finished = trio.Event()
        count = [0]

        async def handler(stream):
            dst = np.empty(args.nbytes // 4, np.float32)
            view = memoryview(dst.view(np.uint8))
            got = 0
            while got < args.nbytes:
                data = await stream.read(min(args.nbytes - got, 1 << 20))
                assert data, "sender vanished"
                view[got:got + len(data)] = data
                got += len(data)
            check(dst, args.nbytes)
            await stream.write(b"k")
            await stream.close()
            emit(cpu=tree_cpu())
            count[0] += 1
            if count[0] == args.reps:
                finished.set()

        host.set_stream_handler(TProtocol(PROTOCOL), handler)
        async with host.run(listen):
            addr = f"{host.get_addrs()[0]}"
            emit(addr=addr, cpu=tree_cpu())
            await finished.wait()
            await trio.sleep(0.2)

    trio.run(main)


def libp2p_send(args) -> None:
    import multiaddr
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr
    src = payload(args.nbytes)

    async def main():
        host, listen = _libp2p_host()
        async with host.run(listen):
            info = info_from_p2p_addr(multiaddr.Multiaddr(args.peer))
            await host.connect(info)
            view = memoryview(src.view("u1"))
            step = 1 << 20
            for _ in range(args.reps):
                t, c = time.perf_counter(), tree_cpu()
                stream = await host.new_stream(info.peer_id, [TProtocol(PROTOCOL)])
                for off in range(0, args.nbytes, step):
                    await stream.write(bytes(view[off:off + step]))
                assert await stream.read(1) == b"k"
                emit(secs=time.perf_counter() - t, cpu=tree_cpu() - c)
                await stream.close()

    trio.run(main)


# -- ours ------------------------------------------------------------------------------------


def ours_recv(args) -> None:
    sys.path.insert(0, str(ROOT))
    import trio

    from lattice.core.arrays import ArrayLimits
    from lattice.core.identity import Identity
    from lattice.net.bulk import PROTOCOL as BULK
    from lattice.net.bulk import receive_array, serve_bulk_listener
    from lattice.net.host import open_libp2p_node, quiet_libp2p_logging

    async def main():
        quiet_libp2p_logging(40)
        async with open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as node:
            async with trio.open_nursery() as nursery:
                listener = await nursery.start(serve_bulk_listener)
                done = trio.Event()
                count = [0]

                async def handler(stream):
                    array = await receive_array(stream, listener=listener,
                                                limits=ArrayLimits(max_bytes=args.nbytes))
                    check(array, args.nbytes)
                    emit(cpu=tree_cpu())
                    count[0] += 1
                    if count[0] == args.reps:
                        done.set()

                node.set_stream_handler(BULK, handler)
                emit(addr=f"{node.listen_addrs()[0]}/p2p/{node.peer_id}", cpu=tree_cpu())
                await done.wait()
                await trio.sleep(0.2)
                nursery.cancel_scope.cancel()

    trio.run(main)


def ours_send(args, *, direct: bool) -> None:
    sys.path.insert(0, str(ROOT))
    import trio

    from lattice.core.identity import Identity
    from lattice.net.bulk import BulkConfig, push_array
    from lattice.net.host import open_libp2p_node, quiet_libp2p_logging
    src = payload(args.nbytes)

    async def main():
        quiet_libp2p_logging(40)
        async with open_libp2p_node(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as node:
            peer = await node.connect(args.peer)
            config = BulkConfig(direct=direct)
            for _ in range(args.reps):
                t, c = time.perf_counter(), tree_cpu()
                await push_array(node, peer, src, config=config)
                emit(secs=time.perf_counter() - t, cpu=tree_cpu() - c)

    trio.run(main)


# -- hivemind (its venv) ---------------------------------------------------------------------


def hivemind_recv(args) -> None:
    import asyncio

    from hivemind.compression import deserialize_torch_tensor
    from hivemind.p2p import P2P
    from hivemind.proto import runtime_pb2
    from hivemind.utils.streaming import combine_from_streaming

    async def main():
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        finished = asyncio.Event()
        count = [0]

        async def handler(parts, context):
            tensor = deserialize_torch_tensor(combine_from_streaming([p async for p in parts]))
            check(tensor.numpy(), args.nbytes)
            emit(cpu=tree_cpu())
            count[0] += 1
            if count[0] == args.reps:
                finished.set()
            return runtime_pb2.Tensor()

        await p2p.add_protobuf_handler("bench_tensor", handler, runtime_pb2.Tensor,
                                       stream_input=True)
        maddrs = await p2p.get_visible_maddrs()
        emit(addr=str(maddrs[0]), cpu=tree_cpu())
        await finished.wait()
        await asyncio.sleep(0.2)
        await p2p.shutdown()

    asyncio.run(main())


def hivemind_send(args) -> None:
    import asyncio

    import torch
    from hivemind.compression import serialize_torch_tensor
    from hivemind.p2p import P2P, PeerID
    from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE
    from hivemind.proto import runtime_pb2
    from hivemind.utils.asyncio import as_aiter
    from hivemind.utils.streaming import split_for_streaming
    src = torch.from_numpy(payload(args.nbytes))

    async def main():
        p2p = await P2P.create(initial_peers=[args.peer])
        peer_id = PeerID.from_base58(args.peer.rsplit("/p2p/", 1)[1])
        for _ in range(args.reps):
            t, c = time.perf_counter(), tree_cpu()
            parts = split_for_streaming(serialize_torch_tensor(src), DEFAULT_MAX_MSG_SIZE)
            await p2p.call_protobuf_handler(peer_id, "bench_tensor", as_aiter(*parts),
                                            runtime_pb2.Tensor)
            emit(secs=time.perf_counter() - t, cpu=tree_cpu() - c)
        await p2p.shutdown()

    asyncio.run(main())


# -- Lattica (its venv) ----------------------------------------------------------------------


def _lattica_service():
    from lattica import ConnectionHandler, rpc_stream

    class BenchTensor(ConnectionHandler):
        received = []

        @rpc_stream
        def put(self, array):
            check(array, array.nbytes)
            BenchTensor.received.append(array.nbytes)
            emit(cpu=tree_cpu())
            return array.nbytes

    return BenchTensor


def lattica_recv(args) -> None:
    from lattica import Lattica
    service = _lattica_service()
    import socket
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # Lattica reports no visible address for a loopback listener: fix the port
    node = Lattica.builder().with_listen_addrs([f"/ip4/127.0.0.1/tcp/{port}"]).with_mdns(
        False).build()
    service(node)
    emit(addr=f"/ip4/127.0.0.1/tcp/{port}/p2p/{node.peer_id()}", cpu=tree_cpu())
    deadline = time.monotonic() + 600
    while len(service.received) < args.reps and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)


def lattica_send(args) -> None:
    from lattica import Lattica
    service = _lattica_service()
    node = Lattica.builder().with_bootstraps([args.peer]).with_mdns(False).build()
    stub = service(node).get_stub(args.peer.rsplit("/p2p/", 1)[1])
    src = payload(args.nbytes)
    time.sleep(1.0)  # Lattica connects to bootstraps in the background
    for _ in range(args.reps):
        t, c = time.perf_counter(), tree_cpu()
        assert stub.put(src).result(timeout=600) == args.nbytes
        emit(secs=time.perf_counter() - t, cpu=tree_cpu() - c)


# -- orchestration ----------------------------------------------------------------------------


ROLES = {
    ("raw", "recv"): raw_recv, ("raw", "send"): raw_send,
    ("libp2p", "recv"): libp2p_recv, ("libp2p", "send"): libp2p_send,
    ("ours", "recv"): ours_recv, ("ours", "send"): lambda a: ours_send(a, direct=True),
    ("ours-yamux", "recv"): ours_recv, ("ours-yamux", "send"): lambda a: ours_send(a, direct=False),
    ("hivemind", "recv"): hivemind_recv, ("hivemind", "send"): hivemind_send,
    ("lattica", "recv"): lattica_recv, ("lattica", "send"): lattica_send,
}


def _records(proc: subprocess.Popen, timeout: float) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {err.strip().splitlines()[-3:]}")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def run_row(row: str, mib: int, reps: int, timeout: float) -> dict:
    python = str(ANCHORS.get(row, sys.executable))
    if not Path(python).exists():
        return {"row": row, "skipped": "not installed (run bench/anchors/setup.sh)"}
    base = [python, str(Path(__file__).resolve()), "--_row", row, "--mib", str(mib),
            "--reps", str(reps)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    recv = subprocess.Popen(base + ["--_role", "recv"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = recv.stdout.readline()
        if not first.startswith("{"):
            recv.kill()
            _, err = recv.communicate()
            raise RuntimeError(f"receiver did not start: {err.strip().splitlines()[-3:]}")
        ready = json.loads(first)
        peer = ready["addr"] if isinstance(ready["addr"], str) else ":".join(map(str, ready["addr"]))
        send = subprocess.Popen(base + ["--_role", "send", "--_peer", peer],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        sent = _records(send, timeout)
        received = [ready] + _records(recv, 60)
    finally:
        for p in (recv,):
            if p.poll() is None:
                p.kill()
                p.wait()
    gib = mib / 1024
    recv_cpu = [b["cpu"] - a["cpu"] for a, b in zip(received, received[1:])]
    secs = [r["secs"] for r in sent]
    rates = [mib * 2**20 / s / 1e6 for s in secs]
    return {"row": row, "reps": len(secs), "mb_s": statistics.median(rates),
            "mb_s_min": min(rates), "mb_s_max": max(rates),
            "send_cpu_gib": statistics.median(r["cpu"] for r in sent) / gib,
            "recv_cpu_gib": statistics.median(recv_cpu) / gib if recv_cpu else float("nan")}


def table(results: list[dict], mib: int) -> str:
    lines = [f"{mib} MiB float32, loopback, separate processes; "
             f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus",
             f"{'row':<11} {'reps':>4} {'MB/s med':>9} {'(min-max)':>15} "
             f"{'send CPU-s/GiB':>15} {'recv CPU-s/GiB':>15}"]
    for r in results:
        if "skipped" in r or "error" in r:
            lines.append(f"{r['row']:<11} {r.get('skipped') or 'error: ' + r['error']}")
            continue
        lines.append(f"{r['row']:<11} {r['reps']:>4} {r['mb_s']:>9.0f} "
                     f"{'(' + format(r['mb_s_min'], '.0f') + '-' + format(r['mb_s_max'], '.0f') + ')':>15} "
                     f"{r['send_cpu_gib']:>15.2f} {r['recv_cpu_gib']:>15.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--slow-reps", type=int, default=3, help="reps for the slow rows")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_row", help=argparse.SUPPRESS)
    ap.add_argument("--_role", help=argparse.SUPPRESS)
    ap.add_argument("--_peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.nbytes = args.mib << 20
    if args._role:
        peer = args._peer
        if args._row == "raw" and peer:
            host, port = peer.rsplit(":", 1)
            peer = (host, int(port))
        args.peer = peer
        ROLES[(args._row, args._role)](args)
        return
    results = []
    for row in args.rows.split(","):
        reps = min(args.reps, args.slow_reps) if row in SLOW_ROWS else args.reps
        try:
            results.append(run_row(row, args.mib, reps, args.timeout))
        except (RuntimeError, subprocess.TimeoutExpired, KeyError) as e:
            results.append({"row": row, "error": str(e)[:200]})
        print(f"  {row}: done", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1) if args.json else table(results, args.mib))


if __name__ == "__main__":
    main()
