"""The daemon itself: `api.info`, `status`, `subscribe`, `unsubscribe`."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from lattice.api.errors import InvalidArgumentError
from lattice.api.methods import EVENT_TOPICS, schema
from latticed import __version__
from latticed.rpc_server import ClientConnection, Handler

if TYPE_CHECKING:
    from latticed.node import Node


async def api_info(node: Node, client: ClientConnection) -> dict[str, Any]:
    return {**schema(), "version": __version__}


async def status(node: Node, client: ClientConnection) -> dict[str, Any]:
    return node_status(node)


def node_status(node: Node) -> dict[str, Any]:
    """What `status` answers (the metrics endpoint reads it too)."""
    host, cfg = node.host, node.config
    return {
        "peer_id": node.identity.peer_id,
        "version": __version__,
        "name": cfg["node.name"],
        "state": node.state,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - node.started_monotonic, 3),
        "ready_s": node.ready_seconds,
        "listen_addrs": host.listen_addrs() if host else [],
        "advertised_addrs": host.advertised_addrs() if host else [],
        "observed_addrs": host.observed_addrs() if host else [],
        "reachability": node.nat.status() if node.nat else None,
        "peers": len(host.connected_peers()) if host else 0,
        "connections": node.connections.statistics() if node.connections else None,
        "membership": node.membership.statistics() if node.membership else None,
        "net": {"stream_retries": host.stream_retries,
                "peer_events_dropped": host.events.dropped,
                "libp2p_routine_failures": sum(f.demoted for f in node.libp2p_log_filters),
                } if host else None,
        "state_dir": str(cfg.state_dir),
        "socket": str(cfg.socket),
        "rpc": node.rpc.stats.as_dict() if node.rpc else {},
        "events": {"subscribers": node.bus.subscribers, "published": node.bus.published,
                   "dropped": node.bus.dropped},
        "state_sync": _state_summary(node),
        "dht": _dht_summary(node),
        "bulk": node.bulk.statistics() if node.bulk else None,
        "transfers": node.network.statistics() if node.network else None,
        "jobs_here": _participations(node),
        "governor": node.governor.status() if node.governor else None,
        "metrics": node.metrics.statistics() if node.metrics else None,
    }


def _dht_summary(node: Node) -> dict[str, Any] | None:
    if node.dht is None:
        return None
    st = node.dht.statistics()
    keep = ("mode", "routing_table_size", "joined", "records_stored", "providers_stored",
            "own_records", "rejected", "record_store", "provider_store", "penalized_now")
    return {k: st[k] for k in keep if k in st}


def _participations(node: Node) -> dict[str, int] | None:
    return node.jobs.participation_states() if node.jobs is not None else None


def _state_summary(node: Node) -> dict[str, Any] | None:
    if node.store is None:
        return None
    st = node.store.statistics()
    sync = node.sync.statistics()["sync"] if node.sync is not None else {}
    # every envelope refused (bad signature, out of bounds, quota...) and every sync
    # session refused, by reason
    rejected = {**st["rejected"], **{f"refused_{k}": v for k, v in st["refused"].items()}}
    if sync.get("sessions_refused"):
        rejected["session_refused"] = sync["sessions_refused"]
    return {"authors": st["authors"], "members_alive": sum(
        1 for m in node.store.members(time.time()).values() if m.get("alive")),
        "banned": st["banned"],
        "sessions": sync.get("sessions"), "sessions_opened": sync.get("sessions_opened"),
        "rejected": rejected,
        # quotas (proto/crdt-sync.md): use and limit, and what they turned away
        "state_bytes": st["held_bytes"], "max_state_bytes": st["max_state_bytes"],
        "max_authors": st["max_authors"], "evicted": st["evicted"],
        "refused": sum(st["refused"].values()),
        "jobs": st["views"]["jobs"], "max_jobs_per_author": node.store.limits.max_jobs_per_author,
        # False just after a restart, until a peer confirms our own history
        "writable": node.sync is not None and node.sync.writable}


async def subscribe(node: Node, client: ClientConnection, topics: list[str]) -> dict[str, Any]:
    unknown = sorted(set(topics) - set(EVENT_TOPICS))
    if unknown or not topics:
        raise InvalidArgumentError(
            f"unknown topic(s) {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(EVENT_TOPICS)}")
    bus = node.bus
    sub = bus.subscribe(topics)
    # every topic starts with the full state (tailscale's watch stream does the same)
    if "daemon" in topics:
        bus.deliver(sub, {"topic": "daemon", "event": "snapshot", "state": node.state})
    if "peers" in topics:
        bus.deliver(sub, {"topic": "peers", "event": "snapshot",
                          "peers": node.host.connections() if node.host else []})
    if "jobs" in topics:
        bus.deliver(sub, {"topic": "jobs", "event": "snapshot",
                          "jobs": node.jobs.list() if node.jobs else []})
    if "state" in topics:
        bus.deliver(sub, {"topic": "state", "event": "snapshot",
                          "state": node.store.get("", time.time()) if node.store else None})
    client.start_subscription(sub)
    return {"subscription": sub.id, "topics": sorted(topics)}


async def unsubscribe(node: Node, client: ClientConnection, subscription: int) -> dict[str, Any]:
    return {"stopped": client.stop_subscription(subscription)}


HANDLERS: dict[str, Handler] = {
    "api.info": api_info,
    "status": status,
    "subscribe": subscribe,
    "unsubscribe": unsubscribe,
}
