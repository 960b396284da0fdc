"""What a DHT node keeps across restarts (proto/dht.md, "Maintenance"): its routing
table with the peers' addresses, its own records and the names it provides.

Owns the file format (`encode_state` / `decode_state`) and what survives a restart:
peers that parse (the driver inserts them unverified: the first failed request drops
them), our own records still valid, provider names. Pure: must not import trio,
libp2p or sockets, and never reads the clock (``now`` is passed in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lattice.core import codec
from lattice.core.kademlia import MalformedMessage, Mode, parse_peer_info
from lattice.core.records import Record, RecordError, RecordLimits, validate_record

STATE_VERSION = 1
MAX_STATE_BYTES = 64 << 20
MAX_PEERS = 4096
MAX_ADDRS = 16


class StateError(ValueError):
    """Persisted DHT state that does not decode (the daemon should start empty)."""


@dataclass(frozen=True)
class DhtState:
    peers: list[tuple[str, tuple[str, ...]]]  # (peer id, addresses), closest buckets first
    records: list[Record]  # our own, still valid
    providing: list[str]  # names we announce (provider keys without the namespace)


def encode_state(state: DhtState) -> bytes:
    return codec.pack({
        "version": STATE_VERSION,
        "peers": [{"peer_id": p, "addrs": list(addrs)[:MAX_ADDRS]} for p, addrs in state.peers],
        "records": [r.to_wire() for r in state.records],
        "providing": list(state.providing),
    })


def decode_state(data: bytes, *, now: float, publisher: str, limits: RecordLimits,
                 max_records: int) -> DhtState:
    """What `encode_state` wrote, checked: at most `MAX_PEERS` peers (a bad entry is a
    StateError: the file is not ours), at most ``max_records`` records and names;
    records that no longer validate (expired while we were down, limits tightened) or
    are not ``publisher``'s are dropped. Raises StateError."""
    try:
        state = codec.unpack(data, max_bytes=MAX_STATE_BYTES)
    except codec.DecodeError as e:
        raise StateError(f"DHT state does not decode: {e}") from None
    if (not isinstance(state, dict) or state.get("version") != STATE_VERSION
            or not isinstance(state.get("peers"), list)
            or not isinstance(state.get("records"), list)
            or not isinstance(state.get("providing"), list)):
        raise StateError("DHT state has an unknown layout")
    peers = [_peer(raw) for raw in state["peers"][:MAX_PEERS]]
    records = []
    for raw in state["records"][:max_records]:
        try:
            record = validate_record(raw, now, limits)
        except RecordError:
            continue
        if record.publisher == publisher:
            records.append(record)
    names = [n for n in state["providing"][:max_records] if isinstance(n, str) and n]
    return DhtState(peers, records, names)


def _peer(raw: Any) -> tuple[str, tuple[str, ...]]:
    if not isinstance(raw, dict) or set(raw) != {"peer_id", "addrs"}:
        raise StateError("bad peer entry in DHT state")
    try:
        info = parse_peer_info({**raw, "mode": Mode.SERVER.value})
    except MalformedMessage:
        raise StateError("bad peer entry in DHT state") from None
    return info.peer_id, info.addrs
