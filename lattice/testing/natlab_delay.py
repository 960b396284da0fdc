"""A delay line for natlab's internet router: every forwarded packet waits ``--ms``
milliseconds, as it would between two homes on the real internet.

Why: this kernel has no sch_netem, and with sub-millisecond RTTs the timing a hole
punch depends on cannot be studied (a SYN that must cross another inside one one-way
delay has microseconds). The router's nftables forward chain queues packets to this
process (NFQUEUE, ``bypass``: while it is not running packets pass undelayed); it holds
each packet's verdict for the delay, then accepts it. Pure standard library (netlink
by hand), so `tools/natlab` stays runnable without a virtualenv. Run by natlab inside
the internet's namespace; never on its own. Must not import lattice.
"""

from __future__ import annotations

import argparse
import heapq
import os
import selectors
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQA_CFG_MASK, NFQA_CFG_FLAGS = 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGEN = struct.Struct("!BBH")  # family, version, res_id (big endian)


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(kind: int, queue: int, attrs: bytes, seq: int) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind,
                       NLM_F_REQUEST, seq, 0) + body


def _packet_ids(data: bytes):
    """The packet ids in a batch of NFQNL_MSG_PACKET messages."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            pos = offset + _NLMSG.size + _NFGEN.size
            end = offset + length
            while pos + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFQA_PACKET_HDR:
                    yield struct.unpack_from("!I", data, pos + 4)[0]
                    break
                pos += (alen + 3) & ~3
        offset += (length + 3) & ~3


def serve(queue: int, delay_s: float) -> None:
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    nl.bind((0, 0))
    seq = 1
    for attrs in (_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)),
                  _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
                  + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 1 << 16))
                  + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
                  + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))):
        nl.send(_message(NFQNL_MSG_CONFIG, queue, attrs, seq))
        seq += 1
    nl.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(nl, selectors.EVENT_READ)
    due: list[tuple[float, int]] = []
    print(f"natlab-delay: queue {queue}, {delay_s * 1000:g} ms", file=sys.stderr, flush=True)
    while True:
        timeout = None if not due else max(0.0, due[0][0] - time.monotonic())
        for _ in sel.select(timeout):
            while True:
                try:
                    data = nl.recv(1 << 16)
                except BlockingIOError:
                    break
                now = time.monotonic()
                for pid in _packet_ids(data):
                    heapq.heappush(due, (now + delay_s, pid))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _at, pid = due[0]
            verdict = _message(NFQNL_MSG_VERDICT, queue,
                               _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pid)), seq)
            try:
                nl.send(verdict)
            except BlockingIOError:  # the kernel is busy: this one again on the next turn
                break
            heapq.heappop(due)
            seq += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="natlab-delay", description=__doc__.split("\n")[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--ms", type=float, required=True)
    args = parser.parse_args(argv)
    os.nice(-5) if os.geteuid() == 0 else None
    serve(args.queue, args.ms / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
