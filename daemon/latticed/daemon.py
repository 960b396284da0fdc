"""The composition root: one trio nursery running every service of a node.

Order (tailscale's lesson: the socket first, so clients see STARTING rather than
"no daemon"): state dir lock and identity -> local RPC socket -> the libp2p host
(imported in a worker thread: the import alone takes ~0.5 s) -> peer-event fan-out,
bootstrap keepers, RTT pinger -> state RUNNING. Shutdown is cancellation of the nursery.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import time
from typing import Any

import trio

from lattice.api.errors import (
    InvalidArgumentError,
    NotFoundError,
    NotReadyError,
    PeerUnreachableError,
)
from lattice.api.methods import EVENT_TOPICS, schema
from lattice.net.streams import PeerError  # no libp2p import: safe before the host is up

from latticed import __version__
from latticed import statedir
from latticed.config import Config
from latticed.events import EventBus
from latticed.rpc_server import ClientConnection, RpcServer

log = logging.getLogger("latticed")

STARTING, RUNNING, STOPPING = "starting", "running", "stopping"
RELAY_KEY = "lattice:circuit-relay-v2"  # relays provide this name in the DHT


async def _import(module: str) -> Any:
    """Import ``module`` in a worker thread (libp2p takes ~1 s to import: the socket
    answers meanwhile). A stop signal does not wait for it: the thread is abandoned and
    dies with the process."""
    return await trio.to_thread.run_sync(importlib.import_module, module,
                                         abandon_on_cancel=True)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = STARTING
        self.started_at = time.time()
        self._monotonic_start = time.monotonic()
        self.bus = EventBus(config["rpc.subscriber_queue"])
        self.identity, self.identity_created = statedir.load_or_create_identity(config.state_dir)
        self.node: Any = None  # lattice.net.host.Libp2pNode once the host is up
        self.rpc: RpcServer | None = None
        self._peer_gone: dict[str, trio.Event] = {}
        self._net_errors: tuple[type[BaseException], ...] = ()
        self._libp2p_log_filters: list[Any] = []
        self.ready_seconds: float | None = None
        self.store: Any = None       # lattice.core.state.StateStore
        self.state_log: Any = None   # its file log in the state dir
        self.sync: Any = None        # lattice.net.crdt_sync.CrdtSync once peers can sync
        self.dht: Any = None         # lattice.net.dht.KademliaDHT
        self.jobs: Any = None        # lattice.net.jobs.JobsService
        self.nat: Any = None         # lattice.net.nat.NatManager
        self.bulk_listener: Any = None  # lattice.net.bulk.BulkListener (side channel)

    # -- lifecycle ------------------------------------------------------------------
    def set_state(self, state: str) -> None:
        self.state = state
        self.bus.publish("daemon", {"event": "state", "state": state})
        log.info("state=%s", state)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        async with trio.open_nursery() as nursery:
            self.rpc = RpcServer(cfg.socket, self.handlers(), self.bus,
                                 max_frame=cfg["rpc.max_frame_bytes"],
                                 max_clients=cfg["rpc.max_clients"])
            await nursery.start(self.rpc.serve)
            log.info("local RPC socket %s (starting)", cfg.socket)

            host_mod = await _import("lattice.net.host")
            crdt = await _import("lattice.net.crdt_sync")
            self._open_state(crdt)
            self._libp2p_log_filters = host_mod.quiet_libp2p_logging(
                logging.getLogger("latticed").getEffectiveLevel())
            self._net_errors = host_mod.PEER_ERRORS
            async with host_mod.open_libp2p_node(
                    self.identity, cfg["node.listen"],
                    max_connections=cfg["limits.max_connections"],
                    event_buffer=cfg["rpc.subscriber_queue"]) as (node, peer_events):
                self.node = node
                nat_mod = await _import("lattice.net.nat")
                self.nat = await nursery.start(functools.partial(
                    nat_mod.serve_nat, node, config=nat_mod.NatConfig.from_mapping(
                        {k: v for k, v in cfg.as_dict().items()
                         if k.startswith(("nat.", "relay."))}),
                    bootstrap=cfg["node.bootstrap"]))
                dht_mod = await _import("lattice.net.dht")
                self.dht = await self._start_dht(nursery, dht_mod, node)
                self.sync = await nursery.start(functools.partial(
                    crdt.serve_crdt_sync, node, self.store, config=crdt.SyncConfig(
                        anti_entropy_interval=cfg["state.anti_entropy_interval_s"]),
                    history_is_new=self.identity_created))
                nursery.start_soon(functools.partial(
                    crdt.serve_heartbeat, self.store, self._member_record,
                    interval=cfg["state.heartbeat_interval_s"], sync=self.sync))
                self.jobs = await self._start_jobs(nursery)
                nursery.start_soon(self._fan_out_peer_events, peer_events)
                nursery.start_soon(self._measure_rtts)
                for addr in cfg["node.bootstrap"]:
                    nursery.start_soon(self._keep_bootstrap_peer, addr)
                self.ready_seconds = time.monotonic() - self._monotonic_start
                log.info("peer id %s listening on %s", self.identity.peer_id,
                         ", ".join(node.listen_addrs()))
                self.set_state(RUNNING)
                task_status.started(self)
                if cfg["node.mdns"]:  # after RUNNING: zeroconf's start-up blocks ~1.7 s
                    mdns = await _import("lattice.net.mdns")
                    await nursery.start(functools.partial(
                        mdns.serve_mdns, node, on_found=self._lan_peer_found))
                try:
                    await trio.sleep_forever()
                finally:
                    self.state = STOPPING
                    self.bus.publish("daemon", {"event": "state", "state": STOPPING})
                    if self.state_log is not None:
                        self.state_log.close()
                    if self.dht is not None:
                        self._save_dht_state()

    # -- DHT ------------------------------------------------------------------------------
    @property
    def _dht_state_path(self) -> Any:
        return self.config.state_dir / "dht.state"

    async def _start_dht(self, nursery: trio.Nursery, dht_mod: Any, node: Any) -> Any:
        """Serve the DHT, rejoining from the routing table and records saved by the last
        run (a corrupt file is logged and ignored), then bootstrap in the background."""
        cfg = self.config
        mode = "server" if cfg["dht.mode"] == "auto" else cfg["dht.mode"]
        config = dht_mod.DHTConfig(
            mode=dht_mod.Mode(mode), replication=cfg["dht.replication"],
            request_timeout=cfg["dht.request_timeout_s"],
            refresh_interval=cfg["dht.refresh_interval_s"],
            republish_interval=cfg["dht.republish_interval_s"],
            max_records_total=cfg["dht.max_records_total"])
        try:
            state = self._dht_state_path.read_bytes()
        except FileNotFoundError:
            state = None
        start = functools.partial(dht_mod.serve_dht, node, self.identity, config=config,
                                  address_book=node, self_addrs=node.dialable_addrs)
        try:
            dht = await nursery.start(functools.partial(start, state=state))
        except dht_mod.StateError as e:
            log.warning("ignoring unreadable DHT state %s: %s", self._dht_state_path, e)
            dht = await nursery.start(functools.partial(start, state=None))
        nursery.start_soon(self._dht_bootstrap_and_persist, dht)
        if cfg["dht.mode"] == "auto" and self.nat is not None:
            nursery.start_soon(self._dht_mode_follows_reachability, dht)
        if self.nat is not None:
            nursery.start_soon(self._relays_through_dht, dht)
        return dht

    async def _lan_peer_found(self, peer_id: str, addrs: list[str]) -> None:
        """A daemon found by mDNS joins our DHT routing table (on a LAN without any
        bootstrap peer it is how the DHT gets going); with a table still short of a
        bucket, we also look ourselves up through it."""
        if self.dht is None:
            return
        if len(self.dht.table) < self.dht.config.k:
            size = await self.dht.bootstrap([(peer_id, addrs)])
            log.info("dht: routing table holds %d peers after meeting %s on the LAN",
                     size, peer_id)

    async def _relays_through_dht(self, dht: Any) -> None:
        """Relays announce themselves as providers of RELAY_KEY; daemons behind a NAT
        look them up, so relays are found beyond the bootstrap peers. Every minute: the
        announcement is cheap to repeat and a NATed daemon's candidates age out."""
        provided = False
        while True:
            try:
                if self.nat.relaying and not provided:
                    await dht.provide(RELAY_KEY)
                    provided = True
                elif not self.nat.relaying and provided:
                    dht.unprovide(RELAY_KEY)
                    provided = False
                if self.nat.status().get("reachability") != "public":
                    found = await dht.find_providers(RELAY_KEY)
                    self.nat.learn_relays([(p.peer_id, [a.split("/p2p/")[0] for a in p.addrs])
                                           for p in found])
            except (ValueError, PeerError) as e:  # RecordError is a ValueError
                log.warning("relay discovery through the DHT failed: %s", e)
            await trio.sleep(60)

    async def _dht_mode_follows_reachability(self, dht: Any) -> None:
        """A daemon others cannot dial must not answer as a DHT server (its peers would
        keep it in their tables and time out on it); and members should see how we are
        reachable. Both follow the NAT manager's verdict."""
        while True:
            reach = self.nat.status()
            private = reach.get("reachability") == "private"
            wanted = "client" if private else "server"
            if dht.statistics().get("mode") != wanted:
                log.info("dht: switching to %s mode (reachability %s)", wanted,
                         reach.get("reachability"))
                dht.set_mode(wanted)
            self._publish_reachability(reach)
            await self.nat.wait_reachability_change()

    def _publish_reachability(self, reach: dict[str, Any]) -> None:
        from lattice.core.state import LocalStateError, Set
        if self.sync is None:
            return
        try:
            self.sync.write([Set("member/peer_id", self.identity.peer_id)]
                            + [Set(f"member/{k}", v) for k, v in self._reachability().items()])
        except LocalStateError as e:
            log.warning("could not publish reachability in our member record: %s", e)

    def _reachability(self) -> dict[str, Any]:
        """The member-record fields that say how peers reach us."""
        reach = self.nat.status() if self.nat is not None else {}
        words = reach.get("reachability", "unknown")
        if words == "private" and reach.get("nat") not in (None, "unknown", "none"):
            words = f"private-{reach['nat']}"
        addrs = self.nat.advertised_addrs() if self.nat is not None \
            else self.node.advertised_addrs()
        return {"reachability": words[:32], "addrs": list(addrs)[:16]}

    async def _dht_bootstrap_and_persist(self, dht: Any) -> None:
        peers = []
        for addr in self.config["node.bootstrap"]:
            base, _, peer_id = addr.rpartition("/p2p/")
            peers.append((peer_id, [base]))
        # The bootstrap keepers dial in parallel; the DHT pings and looks itself up.
        # The first node of a network has nobody to ask: its bootstrap ends at once
        # (and it counts as joined; mDNS may add peers later).
        size = await dht.bootstrap(peers)
        if size:
            log.info("dht: routing table holds %d peers after bootstrap", size)
        # Peers that join after us only reach our table if we look again: a few early
        # self-lookups (cheap: they ask only the closest peers; the full random-walk
        # refresh waits refresh_interval, 10 min by default) fill the table while the
        # network is forming, and put us in our neighbours' tables.
        from lattice.core.kademlia import peer_hash
        for delay in (3.0, 10.0, 30.0):
            await trio.sleep(delay)
            await dht.find_closest_peers(peer_hash(self.identity.peer_id))
        log.info("dht: routing table holds %d peers", dht.statistics()["routing_table_size"])
        while True:
            await trio.sleep(300)  # persist the routing table so a restart rejoins fast
            self._save_dht_state()

    def _save_dht_state(self) -> None:
        path = self._dht_state_path
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self.dht.export_state())
        os.replace(tmp, path)

    def _require_dht(self) -> Any:
        if self.dht is None:
            raise NotReadyError("the DHT is still starting; retry in a moment")
        return self.dht

    @staticmethod
    def _dht_key(key: str) -> str:
        from lattice.core.records import user_key
        return key if key.startswith("/") else user_key(key)

    async def rpc_dht_put(self, client: ClientConnection, key: str, value: Any,
                          ttl: float) -> dict[str, Any]:
        from lattice.core.records import RecordError
        dht = self._require_dht()
        if not (0 < ttl <= 7 * 86400) or math.isnan(ttl):
            raise InvalidArgumentError("ttl must be in (0, 604800] seconds")
        try:
            result = await dht.put(self._dht_key(key), value, ttl)
        except (RecordError, ValueError) as e:
            raise InvalidArgumentError(f"record refused: {e}") from None
        return {"key": result.record.key, "publisher": result.record.publisher,
                "expires_at": result.record.expires_at, "stored_at": len(result.stored_at),
                "hops": result.hops}

    async def rpc_dht_get(self, client: ClientConnection, key: str,
                          fresh: bool = False) -> dict[str, Any]:
        from lattice.core.codec import DecodeError, unpack
        from lattice.core.records import RecordError
        dht = self._require_dht()
        try:
            result = await dht.get_result(self._dht_key(key), fresh=fresh)
        except (RecordError, ValueError) as e:
            raise InvalidArgumentError(f"bad key: {e}") from None
        records = []
        for r in result.records:
            try:
                value = unpack(r.value)
            except DecodeError:
                continue  # signed but not msgpack: not ours to show
            records.append({"publisher": r.publisher, "value": value, "expires_at": r.expires_at})
        return {"key": self._dht_key(key), "records": records, "hops": result.hops}

    async def rpc_dht_provide(self, client: ClientConnection, name: str) -> dict[str, Any]:
        from lattice.core.records import RecordError
        try:
            result = await self._require_dht().provide(name)
        except (RecordError, ValueError) as e:
            raise InvalidArgumentError(str(e)) from None
        return {"name": name, "stored_at": len(result.stored_at), "hops": result.hops}

    async def rpc_dht_find_providers(self, client: ClientConnection, name: str) -> list[dict[str, Any]]:
        providers = await self._require_dht().find_providers(name)
        return [{"peer_id": p.peer_id, "addrs": p.addrs, "expires_at": p.expires_at}
                for p in providers]

    async def rpc_peers_find(self, client: ClientConnection, peer_id: str) -> dict[str, Any]:
        from lattice.core.identity import InvalidPeerId, public_key_from_peer_id
        dht_mod = importlib.import_module("lattice.net.dht")
        try:
            public_key_from_peer_id(peer_id)
        except InvalidPeerId as e:
            raise InvalidArgumentError(str(e)) from None
        try:
            addrs = await self._require_dht().find_peer(peer_id)
        except dht_mod.PeerNotFound:
            raise NotFoundError(f"no route to {peer_id} found in the DHT") from None
        return {"peer_id": peer_id, "addrs": addrs}

    # -- jobs -----------------------------------------------------------------------------
    async def _start_jobs(self, nursery: trio.Nursery) -> Any:
        cfg = self.config
        jobs_mod = await _import("lattice.net.jobs")
        blob_mod = importlib.import_module("lattice.net.blob")
        config = jobs_mod.JobsConfig(
            accept_tasks=tuple(cfg["jobs.accept_tasks"]),
            allowed_plugins=tuple(cfg["jobs.allowed_plugins"]),
            max_jobs=cfg["jobs.max_jobs"], compute_threads=cfg["jobs.compute_threads"],
            checkpoint_every=cfg["jobs.checkpoint_every"], max_params=cfg["jobs.max_params"],
            blob=blob_mod.BlobConfig(max_store_bytes=cfg["blobs.max_store_bytes"]))
        transport = None
        if cfg["bulk.direct"]:
            self.bulk_listener = await self._start_bulk_listener(nursery)
            if self.bulk_listener is not None:
                gossip_mod = importlib.import_module("lattice.net.gossip_avg")
                transport = gossip_mod.BulkTensorTransport(listener=self.bulk_listener)
        jobs = await nursery.start(functools.partial(
            jobs_mod.serve_jobs, self.node, self.store, self.sync, config=config,
            checkpoint_dir=cfg.state_dir / "jobs", blob_dir=cfg.state_dir / "blobs",
            providers=blob_mod.DhtProviders(self.dht), transport=transport))
        jobs.subscribe(lambda note: self.bus.publish("jobs", {"event": "progress", **note}))
        return jobs

    async def _start_bulk_listener(self, nursery: trio.Nursery) -> Any:
        """The side channel for large tensors, bound next to the libp2p listener. With a
        wildcard listen address it advertises `[bulk] advertise`, else the host's
        interface addresses (as the DHT does); with none of those it stays off (tensors
        then go over the libp2p stream) rather than advertise what peers cannot reach."""
        bulk = await _import("lattice.net.bulk")
        ips = []
        for addr in self.node.listen_addrs():
            parts = addr.split("/")
            if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
                ips.append(parts[2])
        host = ips[0] if ips else "127.0.0.1"
        advertise_ips = list(self.config["bulk.advertise"]) or list(dict.fromkeys(
            a.split("/")[2] for a in self.node.dialable_addrs()
            if a.split("/")[1] in ("ip4", "ip6")))
        if not advertise_ips:
            log.warning("bulk side channel off: listening on a wildcard address and "
                        "[bulk] advertise is empty")
            return None
        port = self.config["bulk.port"]
        if not self.config["bulk.advertise"] and host not in ("0.0.0.0", "::"):
            return await nursery.start(functools.partial(bulk.serve_bulk_listener, host, port))
        # wildcard bind: peers are told the configured IPs, so the port must be known
        # up front; with port 0, ask the OS for a free one first (a tiny race we accept)
        if port == 0:
            import socket
            with socket.socket() as probe:
                probe.bind(("0.0.0.0", 0))
                port = probe.getsockname()[1]
        listener = await nursery.start(functools.partial(
            bulk.serve_bulk_listener, "0.0.0.0", port,
            advertise=[(ip, port) for ip in advertise_ips]))
        return listener

    def _require_jobs(self) -> Any:
        if self.jobs is None:
            raise NotReadyError("the job runner is still starting; retry in a moment")
        return self.jobs

    async def rpc_jobs_submit(self, client: ClientConnection, spec: dict[str, Any]) -> dict[str, Any]:
        from lattice.core.jobs import JobSpecError
        jobs = self._require_jobs()
        await self._wait_writable()
        try:
            job_id = jobs.submit(spec)
        except JobSpecError as e:
            raise InvalidArgumentError(f"bad job spec: {e}", data={"field": e.field}) from None
        return {"job_id": job_id}

    async def rpc_jobs_list(self, client: ClientConnection) -> list[dict[str, Any]]:
        return self._require_jobs().list()

    async def rpc_jobs_get(self, client: ClientConnection, job_id: str) -> dict[str, Any]:
        jobs_mod = importlib.import_module("lattice.net.jobs")
        try:
            return self._require_jobs().get(job_id)
        except jobs_mod.JobNotFound:
            raise NotFoundError(f"no job {job_id}") from None

    async def rpc_jobs_cancel(self, client: ClientConnection, job_id: str) -> dict[str, Any]:
        from lattice.api.errors import PermissionDeniedError
        jobs_mod = importlib.import_module("lattice.net.jobs")
        jobs = self._require_jobs()
        await self._wait_writable()
        try:
            return {"cancelled": jobs.cancel(job_id)}
        except jobs_mod.JobNotFound:
            raise NotFoundError(f"no job {job_id}") from None
        except jobs_mod.NotSubmitter as e:
            raise PermissionDeniedError(f"only the submitter may cancel: {e}") from None

    async def rpc_jobs_stats(self, client: ClientConnection) -> dict[str, Any]:
        return self._require_jobs().statistics()

    async def rpc_models_list(self, client: ClientConnection) -> dict[str, Any]:
        return self._require_jobs().models()

    async def rpc_models_read(self, client: ClientConnection, model_id: str, offset: int,
                              length: int) -> dict[str, Any]:
        jobs_mod = importlib.import_module("lattice.net.jobs")
        blob_mod = importlib.import_module("lattice.net.blob")
        if offset < 0 or not (0 < length <= 1 << 20):
            raise InvalidArgumentError("offset must be >= 0 and length in (0, 1 MiB]")
        try:
            data = await self._require_jobs().fetch_model(model_id)
        except (jobs_mod.JobNotFound, ValueError):
            raise NotFoundError(f"no model {model_id}") from None
        except blob_mod.BlobNotFound:
            raise PeerUnreachableError(f"no provider delivered model {model_id}") from None
        return {"model_id": model_id, "size": len(data), "offset": offset,
                "data": data[offset:offset + length]}

    # -- replicated state ---------------------------------------------------------------
    def _open_state(self, crdt: Any) -> None:
        """Load the replicated state from the state dir before the network is up, so a
        restarted daemon has its state at once (peers then fill in what it missed)."""
        from lattice.core.state import StateLimits
        limits = StateLimits(heartbeat_timeout=self.config["state.heartbeat_timeout_s"])
        self.store, self.state_log = crdt.open_state(
            self.identity, self.config.state_dir / "state.log", now=time.time(), limits=limits)
        self.store.subscribe(self._on_state_change)

    def _on_state_change(self, ev: Any) -> None:
        self.bus.publish("state", {"event": "change", "path": ev.path, "value": ev.value,
                                   "author": ev.author})

    def _member_record(self) -> dict[str, Any]:
        """Our whole member record, as of now (the heartbeat's first write)."""
        return {
            "name": self.config["node.name"][:64],
            "version": __version__,
            **self._reachability(),
            "capabilities": {"cpus": os.cpu_count() or 1,
                             "tasks": list(self.config["jobs.accept_tasks"])[:64]},
        }

    # -- services ---------------------------------------------------------------------
    async def _fan_out_peer_events(self, events: trio.MemoryReceiveChannel) -> None:
        async with trio.open_nursery() as nursery:
            async for ev in events:
                if ev.kind == "disconnected":
                    gone = self._peer_gone.pop(ev.peer_id, None)
                    if gone is not None:
                        gone.set()
                else:
                    nursery.start_soon(self._measure_one, ev.peer_id)
                    if self.sync is not None:
                        self.sync.peer_connected(ev.peer_id)
                log.info("peer=%s %s (%s %s)", ev.peer_id, ev.kind, ev.direction, ev.addr)
                self.bus.publish("peers", {"event": ev.kind, "peer_id": ev.peer_id,
                                           "direction": ev.direction, "addr": ev.addr})

    async def _measure_one(self, peer_id: str) -> None:
        await self.node.measure_rtt(peer_id)

    async def _measure_rtts(self) -> None:
        """Re-measure each connected peer's RTT once per ping interval, spread over
        the interval: all at once, every daemon of a network pinged all its peers in
        the same instant, a burst of stream setups that delayed everything else."""
        interval = self.config["limits.ping_interval_s"]
        async with trio.open_nursery() as nursery:
            while True:
                peers = self.node.connected_peers()
                if not peers:
                    await trio.sleep(interval)
                    continue
                for peer_id in peers:
                    await trio.sleep(interval / len(peers))
                    nursery.start_soon(self._measure_one, peer_id)

    def wait_disconnected(self, peer_id: str) -> trio.Event:
        return self._peer_gone.setdefault(peer_id, trio.Event())

    async def _keep_bootstrap_peer(self, addr: str) -> None:
        """Dial a bootstrap peer and redial with exponential backoff whenever it drops."""
        peer_id = addr.rsplit("/p2p/", 1)[-1]
        backoff = 0.25
        max_backoff = self.config["limits.bootstrap_retry_max_s"]
        while True:
            if peer_id in self.node.connected_peers():
                backoff = 0.25
                gone = self.wait_disconnected(peer_id)
                if peer_id in self.node.connected_peers():
                    await gone.wait()
                continue
            try:
                await self.node.connect(addr)
                log.info("bootstrap peer=%s connected", peer_id)
                continue
            except self._net_errors as e:
                log.warning("bootstrap peer=%s unreachable (%s); retry in %.1f s",
                            peer_id, e, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)

    # -- RPC handlers -----------------------------------------------------------------
    def handlers(self) -> dict[str, Any]:
        return {
            "api.info": self.rpc_api_info,
            "status": self.rpc_status,
            "peers.list": self.rpc_peers_list,
            "peers.connect": self.rpc_peers_connect,
            "subscribe": self.rpc_subscribe,
            "unsubscribe": self.rpc_unsubscribe,
            "members.list": self.rpc_members_list,
            "state.get": self.rpc_state_get,
            "state.set": self.rpc_state_set,
            "state.stats": self.rpc_state_stats,
            "dht.put": self.rpc_dht_put,
            "dht.get": self.rpc_dht_get,
            "dht.provide": self.rpc_dht_provide,
            "dht.find_providers": self.rpc_dht_find_providers,
            "peers.find": self.rpc_peers_find,
            "jobs.submit": self.rpc_jobs_submit,
            "jobs.list": self.rpc_jobs_list,
            "jobs.get": self.rpc_jobs_get,
            "jobs.cancel": self.rpc_jobs_cancel,
            "jobs.stats": self.rpc_jobs_stats,
            "models.list": self.rpc_models_list,
            "models.read": self.rpc_models_read,
        }

    def _require_node(self) -> Any:
        if self.node is None:
            raise NotReadyError("the daemon is still starting; retry in a moment")
        return self.node

    async def rpc_api_info(self, client: ClientConnection) -> dict[str, Any]:
        return {**schema(), "version": __version__}

    async def rpc_status(self, client: ClientConnection) -> dict[str, Any]:
        node = self.node
        return {
            "peer_id": self.identity.peer_id,
            "version": __version__,
            "name": self.config["node.name"],
            "state": self.state,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._monotonic_start, 3),
            "ready_s": self.ready_seconds,
            "listen_addrs": node.listen_addrs() if node else [],
            "advertised_addrs": node.advertised_addrs() if node else [],
            "observed_addrs": node.observed_addrs() if node else [],
            "reachability": self.nat.status() if self.nat else None,
            "peers": len(node.connected_peers()) if node else 0,
            "net": {"stream_retries": node.stream_retries,
                    "peer_events_dropped": node.dropped_events,
                    "libp2p_routine_failures": sum(f.demoted for f in self._libp2p_log_filters),
                    } if node else None,
            "state_dir": str(self.config.state_dir),
            "socket": str(self.config.socket),
            "rpc": self.rpc.stats.as_dict() if self.rpc else {},
            "events": {"subscribers": self.bus.subscribers, "published": self.bus.published,
                       "dropped": self.bus.dropped},
            "state_sync": self._state_summary(),
            "dht": self._dht_summary(),
        }

    def _dht_summary(self) -> dict[str, Any] | None:
        if self.dht is None:
            return None
        st = self.dht.statistics()
        keep = ("mode", "routing_table_size", "joined", "records_stored", "providers_stored",
                "own_records", "rejected")
        return {k: st[k] for k in keep if k in st}

    def _state_summary(self) -> dict[str, Any] | None:
        if self.store is None:
            return None
        st = self.store.statistics()
        return {"authors": st["authors"], "members_alive": sum(
            1 for m in self.store.members(time.time()).values() if m.get("alive")),
            "banned": st["banned"],
            # False just after a restart, until a peer confirms our own history
            "writable": self.sync is not None and self.sync.writable}

    async def rpc_peers_list(self, client: ClientConnection) -> list[dict[str, Any]]:
        node = self._require_node()
        rows = node.connections()
        if self.nat is not None:
            for row in rows:  # why a relayed peer is not direct (lattice.net.nat)
                if row["connection"] == "relayed":
                    row["why_relayed"] = self.nat.why_relayed(row["peer_id"])
        return rows

    async def rpc_peers_connect(self, client: ClientConnection, addr: str,
                                timeout: float) -> dict[str, Any]:
        node = self._require_node()
        if not (0 < timeout <= 120) or math.isnan(timeout):
            raise InvalidArgumentError("timeout must be in (0, 120] seconds")
        host_mod = importlib.import_module("lattice.net.host")
        t0 = time.perf_counter()
        try:
            peer_id = await (self.nat or node).connect(addr, timeout=timeout)
        except host_mod.DialError as e:
            msg = str(e)
            if msg.startswith("not a dialable multiaddr") or "this daemon itself" in msg:
                raise InvalidArgumentError(msg) from None
            raise PeerUnreachableError(msg) from None
        return {"peer_id": peer_id, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}

    async def rpc_subscribe(self, client: ClientConnection, topics: list[str]) -> dict[str, Any]:
        unknown = sorted(set(topics) - set(EVENT_TOPICS))
        if unknown or not topics:
            raise InvalidArgumentError(
                f"unknown topic(s) {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(EVENT_TOPICS)}")
        sub = self.bus.subscribe(topics)
        # every topic starts with the full state (tailscale's watch stream does the same)
        if "daemon" in topics:
            self.bus.deliver(sub, {"topic": "daemon", "event": "snapshot", "state": self.state})
        if "peers" in topics:
            self.bus.deliver(sub, {"topic": "peers", "event": "snapshot",
                                   "peers": self.node.connections() if self.node else []})
        if "jobs" in topics:
            self.bus.deliver(sub, {"topic": "jobs", "event": "snapshot",
                                   "jobs": self.jobs.list() if self.jobs else []})
        if "state" in topics:
            self.bus.deliver(sub, {"topic": "state", "event": "snapshot",
                                   "state": self.store.get("", time.time()) if self.store else None})
        client.start_subscription(sub)
        return {"subscription": sub.id, "topics": sorted(topics)}

    def _require_store(self) -> Any:
        if self.store is None:
            raise NotReadyError("the replicated state is still loading; retry in a moment")
        return self.store

    async def rpc_members_list(self, client: ClientConnection) -> dict[str, Any]:
        return self._require_store().members(time.time())

    async def rpc_state_get(self, client: ClientConnection, path: str) -> Any:
        from lattice.core.state import StatePathError
        try:
            return self._require_store().get(path, time.time())
        except StatePathError as e:
            raise NotFoundError(str(e)) from None

    async def rpc_state_set(self, client: ClientConnection, path: str, value: Any) -> dict[str, Any]:
        from lattice.core.state import LocalStateError, Set
        if self.sync is None:
            raise NotReadyError("state sync is not running yet")
        changes = [Set(path, value)]
        if path.startswith("member/") and path != "member/peer_id":
            # a member record always names its author; before the first heartbeat it
            # may not yet, so say it in the same signed update
            changes.insert(0, Set("member/peer_id", self.identity.peer_id))
        await self._wait_writable()
        try:
            env = self.sync.write(changes)
        except LocalStateError as e:
            raise InvalidArgumentError(str(e)) from None
        return {"seq": env.seq if env is not None else None}

    async def _wait_writable(self) -> None:
        """Writes a caller will read back wait until our own history is confirmed
        (`CrdtSync.write`): at most `initial_sync_timeout` after a restart, never for a
        new identity."""
        if self.sync is not None:
            await self.sync.wait_writable()

    async def rpc_state_stats(self, client: ClientConnection) -> dict[str, Any]:
        self._require_store()
        out = {"store": self.store.statistics()}
        if self.sync is not None:
            out["sync"] = self.sync.statistics()
        if self.state_log is not None:
            out["log"] = self.state_log.statistics()
        return out

    async def rpc_unsubscribe(self, client: ClientConnection, subscription: int) -> dict[str, Any]:
        return {"stopped": client.stop_subscription(subscription)}
