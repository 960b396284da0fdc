"""The DHT's inbound side: serving other nodes' requests on `/lattice/kad/1` streams
(proto/dht.md, "Messages" and "Records").

Owns `KadServer`: one stream per requester, requests answered one at a time until EOF
or ``server_idle_timeout``, at most ``max_inbound_streams`` at once; what others store
goes into the node's stores within their quotas. Must not import libp2p.

Failure policy (`KadServer.handle_stream`): anything the peer sent that does not parse
(`parse_peer_input`) or does not come from the stream's own peer resets the stream and
penalizes the peer through the node (counted in ``rejected``); a penalized peer's new
streams are reset at once. A forged or malformed record in a store request is refused
(``ok: false``) and penalizes its sender too. A requester that goes away ends only its
own stream. Anything else is our bug and propagates.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Protocol

import trio

from lattice.core.kademlia import (
    MAX_RECORDS_PER_MESSAGE,
    Message,
    Mode,
    PeerInfo,
    RoutingTable,
    key_hash,
    make_message,
    parse_message,
    target_from_bytes,
)
from lattice.core.penalties import PenaltyBox
from lattice.core.records import (
    NS_PROVIDERS,
    BadSignature,
    Malformed,
    Record,
    RecordError,
    RecordStore,
    StoreOutcome,
    split_key,
    validate_record,
)
from lattice.net.dht_addresses import Addresses
from lattice.net.dht_client import FramedStream, discard
from lattice.net.dht_config import DHTConfig
from lattice.net.streams import PeerError, RemoteProtocolError, Stream, parse_peer_input

log = logging.getLogger("lattice.net.dht")

# Answers carrying records stop growing past this, well under the 1 MiB frame limit.
_MAX_ANSWER_RECORD_BYTES = 640 * 1024
# store outcomes that refuse a record, as the `reason` a PUT_VALUE answer gives
_REFUSALS = {StoreOutcome.FULL: "store_full", StoreOutcome.PUBLISHER_QUOTA: "publisher_quota",
             StoreOutcome.SOURCE_QUOTA: "ip_quota"}


class Node(Protocol):
    """What the inbound side needs from the DHT node it serves for."""

    config: DHTConfig
    table: RoutingTable
    records: RecordStore
    providers: RecordStore
    penalties: PenaltyBox
    rejected: Counter[str]
    addrs: Addresses

    def observe(self, info: PeerInfo) -> None: ...

    def penalize(self, peer_id: str, reason: str) -> None: ...

    def self_info(self) -> PeerInfo: ...

    def source_of(self, peer_id: str) -> str: ...

    def wall(self) -> float: ...


class KadServer:
    """Answers `/lattice/kad/1` requests for one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config
        self.inbound_streams = 0
        self.requests_in: Counter[str] = Counter()

    async def handle_stream(self, raw_stream: Stream) -> None:
        """Serve requests on one inbound stream, one at a time, until EOF or idle."""
        node = self.node
        stream = FramedStream(raw_stream)
        remote = stream.remote_peer_id
        if node.penalties.is_penalized(remote, trio.current_time()):
            node.rejected["penalized_peer"] += 1
            await stream.reset()
            return
        if self.inbound_streams >= self.config.max_inbound_streams:
            node.rejected["inbound_streams_full"] += 1
            await stream.reset()
            return
        self.inbound_streams += 1
        try:
            while True:
                raw = None
                with trio.move_on_after(self.config.server_idle_timeout):
                    raw = await stream.recv(self.config.max_message_bytes)
                if raw is None:
                    break
                request = parse_peer_input(parse_message, raw)
                if request.response or request.sender.peer_id != remote:
                    raise RemoteProtocolError("not a request from the stream's peer")
                self.requests_in[request.type] += 1
                node.observe(request.sender)
                await stream.send(self._answer(request, remote))
        except RemoteProtocolError as e:
            node.penalize(remote, "malformed_message")
            log.info("peer=%s sent a malformed request: %s", remote, e)
            await stream.reset()
        except PeerError:
            pass  # the requester went away; nothing of ours is pending
        finally:
            self.inbound_streams -= 1
        await discard(stream, graceful=True)

    def statistics(self) -> dict[str, Any]:
        return {"requests_in": dict(self.requests_in), "inbound_streams": self.inbound_streams,
                "max_inbound_streams": self.config.max_inbound_streams}

    def _answer(self, request: Message, remote: str) -> dict[str, Any]:
        body: dict[str, Any]
        t = request.type
        now = self.node.wall()
        if t == "PING":
            body = {}
        elif t == "FIND_NODE":
            body = {"closer": self._closer(target_from_bytes(request.body["target"]), remote)}
        elif t in ("GET_VALUE", "GET_PROVIDERS"):
            key = request.body["key"]
            want_provider = t == "GET_PROVIDERS"
            if _namespace_of(key) is None or (_namespace_of(key) == NS_PROVIDERS) != want_provider:
                raise RemoteProtocolError(f"{t} for key {key[:64]!r}")
            store = self.node.providers if want_provider else self.node.records
            records = _bounded_wire(store.get(key, now))
            body = {"providers" if want_provider else "records": records,
                    "closer": self._closer(key_hash(key), remote)}
        elif t in ("PUT_VALUE", "ADD_PROVIDER"):
            ok, reason = self._store_incoming(request.body["record"], t == "ADD_PROVIDER",
                                              remote, now)
            body = {"ok": ok, "reason": reason}
        else:  # parse_message admits only known types
            raise AssertionError(t)
        return make_message(t, request.id, True, self.node.self_info(), **body).to_wire()

    def _store_incoming(self, raw: Any, provider: bool, remote: str, now: float) -> tuple[bool, str]:
        node = self.node
        try:
            record = parse_peer_input(validate_record, raw, now, self.config.limits,
                                      keep=(RecordError,))
        except RecordError as e:
            if isinstance(e, (BadSignature, Malformed)):
                node.penalize(remote, e.reason)  # honest peers validate before sending
            else:
                node.rejected[e.reason] += 1
            return False, e.reason
        if (record.namespace == NS_PROVIDERS) != provider:
            node.rejected["wrong_namespace"] += 1
            return False, "wrong_namespace"
        store = node.providers if provider else node.records
        reason = _REFUSALS.get(store.put(record, now, node.source_of(remote)))
        if reason is not None:
            node.rejected[reason] += 1
            return False, reason
        return True, ""

    def _closer(self, target: int, remote: str) -> list[PeerInfo]:
        return [PeerInfo(p, tuple(self.node.addrs.known(p)[:16]), Mode.SERVER)
                for p in self.node.table.closest(target, self.config.k, exclude={remote})]


def _namespace_of(key: str) -> str | None:
    try:
        return split_key(key)[0]
    except Malformed:
        return None


def _bounded_wire(records: list[Record]) -> list[dict[str, Any]]:
    out, size = [], 0
    for r in records[:MAX_RECORDS_PER_MESSAGE]:
        size += len(r.value) + len(r.key) + 256
        if size > _MAX_ANSWER_RECORD_BYTES:
            break
        out.append(r.to_wire())
    return out
