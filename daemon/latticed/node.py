"""The composition root: a typed record of a node's services, and `serve_node`, the one
trio nursery that starts them.

Order (tailscale's lesson: the socket first, so clients see STARTING rather than
"no daemon"): identity -> local RPC socket -> replicated state from disk -> the libp2p
host (its modules imported in a worker thread: the import alone takes ~0.5 s, and the
socket answers meanwhile) -> NAT manager -> DHT -> state sync and heartbeat -> jobs ->
peer-event fan-out, RTT pings, bootstrap keepers -> RUNNING -> mDNS. Shutdown is
cancellation of the nursery.

Only the four modules that import libp2p (`lattice.net.host`, `nat`, `holepunch`,
`mdns`) are imported lazily; their types are named here for the type checker only.
"""

from __future__ import annotations

import functools
import importlib
import logging
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import trio

from lattice.core.connections import WaterMarks
from lattice.core.governor import VolunteerConfig
from lattice.core.identity import Identity
from lattice.core.state import StateLimits, StateStore
from lattice.jobs import JobsConfig, JobSupervisor, MergeConfig, serve_jobs
from lattice.jobs.attach import AttachConfig
from lattice.net.blob import BlobConfig, DhtProviders
from lattice.net.bulk import BulkListener
from lattice.net.connmgr import ConnectionManager, serve_connection_manager
from lattice.net.crdt_sync import CrdtSync, FileStateLog, SyncConfig, open_state, serve_crdt_sync
from lattice.net.dht import KademliaDHT
from lattice.net.gossip_avg import BulkTensorTransport, TensorTransport
from lattice.net.gossip_party import GossipConfig
from lattice.net.membership import MembershipConfig, MembershipService, serve_membership
from lattice.net.modelstore import ModelsConfig, ModelService
from lattice.net.nat_config import NatConfig
from lattice.net.shaping import GovernedNetwork
from latticed import discovery, metrics, presence, statedir
from latticed.config import Config
from latticed.discovery import DiscoveryConfig
from latticed.events import EventBus
from latticed.governor import Governor, serve_governor
from latticed.localapi import build_handlers
from latticed.rpc_server import RpcConfig, RpcServer, SocketInUse

if TYPE_CHECKING:
    from lattice.net.host import Libp2pNode, RoutineFailureFilter
    from lattice.net.nat import NatManager

log = logging.getLogger("latticed")

STARTING, RUNNING, STOPPING = "starting", "running", "stopping"


class StartupError(RuntimeError):
    """This configuration cannot run here (a taken port, a live socket): exit 1."""


@dataclass
class Node:
    """Every service of a running node. Those started after the socket are None until
    they are up; the local API answers NOT_READY for them meanwhile (`require_*`)."""

    config: Config
    identity: Identity
    identity_created: bool
    bus: EventBus
    state: str = STARTING
    started_monotonic: float = field(default_factory=time.monotonic)
    ready_seconds: float | None = None
    rpc: RpcServer | None = None
    store: StateStore | None = None
    state_log: FileStateLog | None = None
    host: Libp2pNode | None = None
    network: GovernedNetwork | None = None
    """The host as our protocols use it: metered by protocol, job transfers shaped by
    the governor."""
    nat: NatManager | None = None
    dht: KademliaDHT | None = None
    sync: CrdtSync | None = None
    membership: MembershipService | None = None
    connections: ConnectionManager | None = None
    jobs: JobSupervisor | None = None
    models: ModelService | None = None
    bulk: BulkListener | None = None
    governor: Governor | None = None
    metrics: metrics.MetricsEndpoint | None = None
    libp2p_log_filters: list[RoutineFailureFilter] = field(default_factory=list)

    @classmethod
    def create(cls, config: Config) -> Node:
        """A node with its identity loaded (created on first start) and no service
        running yet; raises `statedir.StateDirError`."""
        identity, created = statedir.load_or_create_identity(config.state_dir)
        return cls(config, identity, created, EventBus(config["rpc.subscriber_queue"]))

    def set_state(self, state: str) -> None:
        self.state = state
        self.bus.publish("daemon", {"event": "state", "state": state})
        log.info("state=%s", state)


async def _import(module: str) -> ModuleType:
    """Import ``module`` in a worker thread (libp2p takes ~1 s to import: the socket
    answers meanwhile). A stop signal does not wait for it: the thread is abandoned and
    dies with the process."""
    return await trio.to_thread.run_sync(importlib.import_module, module,
                                         abandon_on_cancel=True)


async def serve_node(node: Node, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """Run every service of ``node`` until cancelled; hands the node back once RUNNING.

    Failure policy: `StartupError` for a configuration that cannot run here (before
    RUNNING); a service's bug propagates and stops the node (crash-only at the top)."""
    cfg = node.config
    async with trio.open_nursery() as nursery:
        rpc = cfg.build(RpcConfig)
        node.rpc = RpcServer(cfg.socket, build_handlers(node), node.bus,
                             max_frame=rpc.max_frame_bytes, max_clients=rpc.max_clients,
                             max_in_flight=rpc.max_in_flight, max_fds=rpc.max_passed_fds,
                             read_gid=cfg.read_gid)
        try:
            await nursery.start(node.rpc.serve)
        except SocketInUse as e:
            raise StartupError(str(e)) from None
        log.info("local RPC socket %s (starting)", cfg.socket)
        node.governor = await nursery.start(functools.partial(
            serve_governor, cfg.build(VolunteerConfig), compute_threads=cfg["jobs.compute_threads"],
            state_dir=cfg.state_dir))
        if cfg["metrics.listen"]:
            node.metrics = await _start_metrics(node, nursery)

        host_mod = await _import("lattice.net.host")
        node.store, node.state_log = open_state(
            node.identity, cfg.state_dir / "state.log", now=time.time(),
            limits=cfg.build(StateLimits))
        node.store.subscribe(lambda ev: node.bus.publish(
            "state", {"event": "change", "path": ev.path, "value": ev.value,
                      "author": ev.author}))
        node.libp2p_log_filters = host_mod.quiet_libp2p_logging(
            logging.getLogger("latticed").getEffectiveLevel())
        try:
            async with host_mod.open_libp2p_node(
                    node.identity, cfg["node.listen"],
                    max_connections=cfg.build(DiscoveryConfig).max_connections) as host:
                node.host = host
                node.network = GovernedNetwork(host, node.governor)
                try:
                    await _start_services(node, nursery, host_mod)
                    node.ready_seconds = time.monotonic() - node.started_monotonic
                    log.info("peer id %s listening on %s", node.identity.peer_id,
                             ", ".join(host.listen_addrs()))
                    node.set_state(RUNNING)
                    task_status.started(node)
                    if cfg["node.mdns"]:  # after RUNNING: zeroconf's start-up blocks ~1.7 s
                        mdns = await _import("lattice.net.mdns")
                        await nursery.start(functools.partial(
                            mdns.serve_mdns, host, on_found=functools.partial(
                                discovery.lan_peer_found, node)))
                    await trio.sleep_forever()
                finally:
                    node.state = STOPPING
                    node.bus.publish("daemon", {"event": "state", "state": STOPPING})
                    if node.state_log is not None:
                        node.state_log.close()
                    if node.dht is not None:
                        discovery.save_dht_state(node)
        except host_mod.ListenError as e:  # raised by open_libp2p_node only
            raise StartupError(str(e)) from None


async def _start_services(node: Node, nursery: trio.Nursery, host_mod: ModuleType) -> None:
    """Everything that runs on the host, in dependency order."""
    cfg, host, network = node.config, node.host, node.network
    assert host is not None and network is not None and node.store is not None
    nat_mod = await _import("lattice.net.nat")
    node.nat = await nursery.start(functools.partial(
        nat_mod.serve_nat, host, config=cfg.build(NatConfig), bootstrap=cfg["node.bootstrap"],
        budget=network.budget_for("relay")))
    node.dht = await discovery.start_dht(node, nursery)
    node.sync = await nursery.start(functools.partial(
        serve_crdt_sync, network, node.store,
        config=cfg.build(SyncConfig),
        history_is_new=node.identity_created))
    membership: MembershipService = await nursery.start(functools.partial(
        serve_membership, host, config=cfg.build(MembershipConfig), clock=time.time))
    node.membership = membership
    node.store.set_liveness(membership.liveness)
    nursery.start_soon(presence.serve_heartbeat, node)
    node.jobs = await _start_jobs(node, nursery)
    node.models = node.jobs.services.models
    nursery.start_soon(presence.fan_out_peer_events, node,
                       host.peer_events(buffer=cfg["rpc.subscriber_queue"]))
    if cfg.build(presence.PresenceConfig).ping_interval > 0:
        nursery.start_soon(presence.measure_rtts, node)
    node.connections = await nursery.start(functools.partial(
        serve_connection_manager, host, cfg.build(WaterMarks),
        protected=functools.partial(presence.protected_peers, node),
        before_close=membership.say_bye))
    for addr in cfg["node.bootstrap"]:
        nursery.start_soon(discovery.keep_bootstrap_peer, node, addr, host_mod.PEER_ERRORS)


async def _start_jobs(node: Node, nursery: trio.Nursery) -> JobSupervisor:
    cfg, network, governor = node.config, node.network, node.governor
    assert network is not None and node.dht is not None and node.store is not None
    assert governor is not None
    blob = cfg.build(BlobConfig, keep_free_bytes=int(governor.config.keep_free_gb * 1e9))
    config = cfg.build(JobsConfig, gossip=cfg.build(GossipConfig), blob=blob,
                       models=cfg.build(ModelsConfig), merge=cfg.build(MergeConfig),
                       attach=cfg.build(AttachConfig))
    transport: TensorTransport | None = None
    if cfg["bulk.direct"]:
        node.bulk = await discovery.start_bulk_listener(node, nursery)
        if node.bulk is not None:
            transport = BulkTensorTransport(listener=node.bulk,
                                            budget=network.budget_for("bulk-side-channel"))
    jobs: JobSupervisor = await nursery.start(functools.partial(
        serve_jobs, network, node.store, node.sync, config=config,
        checkpoint_dir=cfg.state_dir / "jobs", blob_dir=cfg.state_dir / "blobs",
        providers=DhtProviders(node.dht), transport=transport,
        compute=governor.compute, governance=governor))
    jobs.subscribe(lambda note: node.bus.publish("jobs", {"event": "progress", **note}))
    return jobs


async def _start_metrics(node: Node, nursery: trio.Nursery) -> metrics.MetricsEndpoint:
    """The opt-in Prometheus endpoint; a scrape reads `status`, connections and jobs."""
    from latticed.localapi.system import node_status

    async def snapshot() -> dict[str, Any]:
        status = node_status(node)
        status["connections"] = node.host.connections() if node.host else []
        status["jobs"] = node.jobs.list() if node.jobs else []
        return status

    registry = metrics.MetricsRegistry(snapshot)
    metrics.feed_status(registry)
    metrics.feed_governor(registry, node.governor)
    endpoint: metrics.MetricsEndpoint = await nursery.start(functools.partial(
        metrics.serve_metrics, node.config["metrics.listen"], registry))
    return endpoint
