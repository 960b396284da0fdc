"""Prometheus metrics: the catalog of what a volunteer or an operator can watch, the
registry services feed it through, and an opt-in text endpoint on loopback
(``[metrics] listen = "127.0.0.1:9464"``; off by default).

Owns the catalog (`FAMILIES`: each metric's name, type, help and labels, declared
once), `MetricsRegistry` (a *feed* is a function called at scrape time with that
scrape's status snapshot, returning ``(label values, value)`` samples for one family:
services hand over what their ``statistics()`` already count, nothing is pushed from
hot paths), the feeds that read the daemon's ``status`` dict and the governor, and
`serve_metrics` (HTTP/1.1 GET /metrics, one request per connection). The exposition
format is written by ``prometheus_client`` (the reference implementation: escaping,
``_total`` suffixes, content type; it is already a dependency of libp2p); its own
threaded HTTP server is not used. Must not import libp2p.

Failure policy: a feed that raises is a bug in that feed; the scrape is a documented
boundary, so the error is logged with its traceback, counted in
``lattice_metrics_feed_errors_total{family}``, and the other families still answer.
A client that sends a bad request gets 400/404/405 (or 403 for a Host header that is
not loopback: a web page must not read metrics through DNS rebinding) and is closed.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("latticed.metrics")

MAX_REQUEST_HEAD = 8 * 1024  # a scraper's GET is a few hundred bytes
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 8          # concurrent scrapes; more get 503

Sample = tuple[tuple[str, ...], float]
Snapshot = Mapping[str, Any]
Feed = Callable[[Snapshot], Iterable[Sample]]


@dataclass(frozen=True)
class Family:
    name: str
    type: str  # counter | gauge
    help: str
    labels: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family("lattice_info", "gauge", "This daemon: 1, labelled with its version and peer id.",
           ("version", "peer_id")),
    Family("lattice_uptime_seconds", "gauge", "Seconds since the daemon started."),
    Family("lattice_peers", "gauge", "Connected peers by connection kind.", ("connection",)),
    Family("lattice_transfer_bytes_total", "counter", "Bytes moved to and from peers, by "
           "protocol (or side channel, relay) and direction (in | out).",
           ("protocol", "direction")),
    Family("lattice_transfers_refused_total", "counter", "Job transfers refused while the "
           "volunteer's limits pause them, by protocol.", ("protocol",)),
    Family("lattice_relay_reservations", "gauge", "Peers holding a relay slot on this daemon."),
    Family("lattice_relay_circuits", "gauge", "Relayed connections through this daemon now."),
    Family("lattice_relay_circuits_opened_total", "counter", "Relayed connections through "
           "this daemon since it started."),
    Family("lattice_relay_circuits_refused_total", "counter", "Relay circuits refused, by "
           "reason.", ("reason",)),
    Family("lattice_relay_bytes_total", "counter", "Bytes relayed for others."),
    Family("lattice_dht_routing_table_peers", "gauge", "Peers in the DHT routing table."),
    Family("lattice_dht_records", "gauge", "DHT records held, by kind (stored for others, "
           "providers, own).", ("kind",)),
    Family("lattice_state_members_alive", "gauge", "Members whose heartbeat is fresh."),
    Family("lattice_state_sync_sessions_open", "gauge", "Replicated-state sync sessions open "
           "now."),
    Family("lattice_state_sync_sessions_total", "counter", "Replicated-state sync sessions "
           "opened."),
    Family("lattice_state_sync_rejections_total", "counter", "Replicated-state updates "
           "refused, by reason.", ("reason",)),
    Family("lattice_jobs", "gauge", "Jobs in the replicated state, by status.", ("status",)),
    Family("lattice_jobs_participations", "gauge", "This daemon's job participations by "
           "state (running, paused, merging...).", ("state",)),
    Family("lattice_compute_seconds_total", "counter", "CPU seconds job compute has used."),
    Family("lattice_governor_compute_paused", "gauge", "1 while job compute is paused."),
    Family("lattice_governor_pause_reason", "gauge", "1 for each reason compute is paused "
           "now (user, battery, schedule, user_active, busy).", ("reason",)),
    Family("lattice_governor_transfers_paused", "gauge", "1 while transfers are paused "
           "(transfer schedule, data cap)."),
    Family("lattice_governor_data_used_bytes", "gauge", "Bytes counted against this "
           "period's data allowance."),
    Family("lattice_governor_transfer_bytes_total", "counter", "Bytes through the "
           "governor's transfer gates, by direction (up | down).", ("direction",)),
    Family("lattice_rpc_requests_total", "counter", "Local RPC requests."),
    Family("lattice_rpc_errors_total", "counter", "Local RPC errors by error code name.",
           ("code",)),
    Family("lattice_events_dropped_total", "counter", "Events dropped for slow subscribers."),
    Family("lattice_metrics_feed_errors_total", "counter", "Feeds that raised during a "
           "scrape (a bug; the log has the traceback).", ("family",)),
)
BY_NAME = {f.name: f for f in FAMILIES}


class MetricsRegistry:
    """Feeds by family; `render` asks each at scrape time."""

    def __init__(self, snapshot: Callable[[], Awaitable[Snapshot]] | None = None) -> None:
        self._snapshot = snapshot
        self._feeds: dict[str, list[Feed]] = {f.name: [] for f in FAMILIES}
        self.feed_errors: Counter[str] = Counter()
        self.scrapes = 0
        self._prom = CollectorRegistry(auto_describe=False)
        self._current: Snapshot = {}
        self._prom.register(self)  # prometheus_client calls collect() below

    def feed(self, family: str, fn: Feed) -> None:
        """Add a source of samples for ``family`` (a name in `FAMILIES`)."""
        if family not in self._feeds:
            raise ValueError(f"no metric family {family!r} in the catalog")
        self._feeds[family].append(fn)

    async def render(self) -> bytes:
        """The text exposition of every family, fed now."""
        self.scrapes += 1
        snapshot = await self._snapshot() if self._snapshot is not None else {}
        self._current = snapshot  # no checkpoint until generate_latest has read it
        try:
            return generate_latest(self._prom)
        finally:
            self._current = {}

    def collect(self) -> Iterable[Metric]:
        for fam in FAMILIES:
            if fam.name == "lattice_metrics_feed_errors_total":
                continue  # last, so it counts this scrape's errors
            yield self._family(fam, self._samples(fam))
        errors = BY_NAME["lattice_metrics_feed_errors_total"]
        yield self._family(errors, [((name,), n) for name, n in sorted(self.feed_errors.items())])

    def _samples(self, fam: Family) -> list[Sample]:
        out: list[Sample] = []
        for fn in self._feeds[fam.name]:
            try:
                out.extend(fn(self._current))
            except Exception:  # the documented boundary: one broken feed, not the scrape
                log.exception("metrics: the feed of %s raised", fam.name)
                self.feed_errors[fam.name] += 1
        return out

    @staticmethod
    def _family(fam: Family, samples: list[Sample]) -> Metric:
        cls = CounterMetricFamily if fam.type == "counter" else GaugeMetricFamily
        metric = cls(fam.name, fam.help, labels=list(fam.labels))
        for labels, value in samples:
            metric.add_metric(list(labels), float(value))
        return metric


# -- feeds -------------------------------------------------------------------------------------

# RpcStats fields counting refusals made before a client could be answered, by the
# code they stand for; every error answered is in RpcStats.errors by code name
_RPC_REFUSAL_FIELDS = {"refused_overloaded": "OVERLOADED",
                       "refused_credentials": "PERMISSION_DENIED"}


def feed_status(registry: MetricsRegistry) -> None:
    """Families read from the daemon's ``status`` dict (what `lattice status --json`
    shows), plus ``connections`` (``peers.list``) and ``jobs`` (``jobs.list``) when the
    snapshot has them."""
    def one(value: Any) -> list[Sample]:
        return [] if value is None else [((), value)]

    registry.feed("lattice_info", lambda s: [((s["version"], s["peer_id"]), 1)] if s else [])
    registry.feed("lattice_uptime_seconds", lambda s: one(s.get("uptime_s")))
    registry.feed("lattice_peers", lambda s: sorted(
        Counter((c.get("connection") or "unknown",) for c in s.get("connections") or []).items()))

    def relay(s: Snapshot, key: str) -> list[Sample]:
        service = (s.get("reachability") or {}).get("relay_service") or {}
        return one(service.get(key))
    registry.feed("lattice_relay_reservations", lambda s: relay(s, "reservations"))
    registry.feed("lattice_relay_circuits", lambda s: relay(s, "circuits"))
    registry.feed("lattice_relay_circuits_opened_total", lambda s: relay(s, "circuits_total"))
    registry.feed("lattice_relay_bytes_total", lambda s: relay(s, "bytes_relayed"))
    registry.feed("lattice_relay_circuits_refused_total", lambda s: sorted(
        ((reason,), n) for reason, n in (((s.get("reachability") or {}).get("relay_service")
                                          or {}).get("refused") or {}).items()))

    def transfers(s: Snapshot) -> Mapping[str, Any]:
        return s.get("transfers") or {}
    registry.feed("lattice_transfer_bytes_total", lambda s: [
        ((label, direction), n) for label, by_direction in sorted(transfers(s).get("bytes", {}).items())
        for direction, n in sorted(by_direction.items())])
    registry.feed("lattice_transfers_refused_total", lambda s: sorted(
        ((protocol,), n) for protocol, n in transfers(s).get("refused", {}).items()))

    registry.feed("lattice_dht_routing_table_peers",
                  lambda s: one((s.get("dht") or {}).get("routing_table_size")))
    registry.feed("lattice_dht_records", lambda s: [
        ((kind,), (s.get("dht") or {})[field]) for kind, field in
        (("stored", "records_stored"), ("providers", "providers_stored"), ("own", "own_records"))
        if field in (s.get("dht") or {})])
    registry.feed("lattice_state_members_alive",
                  lambda s: one((s.get("state_sync") or {}).get("members_alive")))
    registry.feed("lattice_state_sync_sessions_open",
                  lambda s: one((s.get("state_sync") or {}).get("sessions")))
    registry.feed("lattice_state_sync_sessions_total",
                  lambda s: one((s.get("state_sync") or {}).get("sessions_opened")))
    registry.feed("lattice_state_sync_rejections_total", lambda s: sorted(
        ((reason,), n) for reason, n in ((s.get("state_sync") or {}).get("rejected") or {}).items()))
    registry.feed("lattice_jobs_participations", lambda s: sorted(
        ((state,), n) for state, n in ((s.get("jobs_here") or {}).items())))
    registry.feed("lattice_jobs", lambda s: sorted(
        Counter((j.get("status") or "unknown",) for j in s.get("jobs") or []).items()))
    registry.feed("lattice_rpc_requests_total", lambda s: one((s.get("rpc") or {}).get("requests")))
    def rpc_errors(s: Snapshot) -> list[Sample]:
        rpc = s.get("rpc") or {}
        by_code: Counter[str] = Counter(rpc.get("errors") or {})
        for field, code in _RPC_REFUSAL_FIELDS.items():
            by_code[code] += rpc.get(field, 0)
        return [((code,), n) for code, n in sorted(by_code.items()) if n]
    registry.feed("lattice_rpc_errors_total", rpc_errors)
    registry.feed("lattice_events_dropped_total",
                  lambda s: one((s.get("events") or {}).get("dropped")))


def feed_governor(registry: MetricsRegistry, governor: Any) -> None:
    """Families of a `latticed.governor.Governor`."""
    from lattice.core.governor import COMPUTE_REASONS

    registry.feed("lattice_compute_seconds_total", lambda s: [((), governor.compute.cpu_seconds)])
    registry.feed("lattice_governor_compute_paused",
                  lambda s: [((), 0 if governor.state.compute else 1)])
    registry.feed("lattice_governor_pause_reason", lambda s: [
        ((kind,), 1 if kind in {r.kind for r in governor.state.compute_reasons} else 0)
        for kind in COMPUTE_REASONS])
    registry.feed("lattice_governor_transfers_paused",
                  lambda s: [((), 0 if governor.state.network else 1)])
    registry.feed("lattice_governor_data_used_bytes",
                  lambda s: [((), governor.data.used(governor.clock()))])
    registry.feed("lattice_governor_transfer_bytes_total", lambda s: [
        (("up",), governor.upload.bytes), (("down",), governor.download.bytes)])


# -- the endpoint -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsConfig:
    """Section ``[metrics]``."""

    listen: str = ""
    """Prometheus text endpoint on loopback, host:port ('': off)."""


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:9464`` / ``[::1]:9464`` / ``localhost:9464`` -> (host, port); the host
    must be loopback: metrics name this daemon's peers and jobs."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(f"{host} is not a loopback address")
        except ValueError as e:
            raise ValueError(f"{text!r}: metrics listen only on loopback "
                             f"(127.0.0.1, ::1, localhost): {e}") from None
    return host, int(port_text)


def _host_is_loopback(header: str) -> bool:
    host = header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    else:
        host = host.rpartition(":")[0] if host.count(":") == 1 else host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsEndpoint:
    """The handle `serve_metrics` gives back: where it listens and what it served."""

    def __init__(self, registry: MetricsRegistry, host: str) -> None:
        self.registry = registry
        self.host = host
        self.port = 0
        self.counts: Counter[str] = Counter()
        self._slots = trio.CapacityLimiter(MAX_CONNECTIONS)

    def statistics(self) -> dict[str, Any]:
        return {"listen": f"{self.host}:{self.port}", "scrapes": self.registry.scrapes,
                "feed_errors": dict(self.registry.feed_errors), **self.counts}

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            self._slots.acquire_on_behalf_of_nowait(stream)
        except trio.WouldBlock:
            self.counts["refused_busy"] += 1
            await _respond(stream, 503, b"too many scrapes at once\n")
            return
        try:
            await self._serve_one(stream)
        finally:
            self._slots.release_on_behalf_of(stream)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        head = b""
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            while b"\r\n\r\n" not in head and len(head) <= MAX_REQUEST_HEAD:
                try:
                    chunk = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    break
                head += chunk
        if b"\r\n\r\n" not in head or len(head) > MAX_REQUEST_HEAD:
            self.counts["bad_requests"] += 1
            await _respond(stream, 400, b"bad request\n")
            return
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {k.strip().lower(): v for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self.counts["bad_requests"] += 1
            await _respond(stream, 400, b"bad request\n")
        elif not _host_is_loopback(headers.get("host", "127.0.0.1")):
            self.counts["refused_host"] += 1
            await _respond(stream, 403, b"metrics answer only to a loopback Host\n")
        elif parts[0] != "GET":
            self.counts["bad_requests"] += 1
            await _respond(stream, 405, b"only GET\n", extra=b"Allow: GET\r\n")
        elif parts[1].split("?", 1)[0] != "/metrics":
            self.counts["not_found"] += 1
            await _respond(stream, 404, b"see /metrics\n")
        else:
            body = await self.registry.render()
            await _respond(stream, 200, body, content_type=CONTENT_TYPE_LATEST)


_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 503: "Service Unavailable"}


async def _respond(stream: trio.SocketStream, status: int, body: bytes, *,
                   content_type: str = "text/plain; charset=utf-8", extra: bytes = b"") -> None:
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode() + extra + b"\r\n"
    try:
        await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the scraper went away: nothing to tell it
    finally:
        await stream.aclose()


async def serve_metrics(listen: str, registry: MetricsRegistry, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on ``listen`` (loopback host:port; port 0 picks one) until
    cancelled; hands back the `MetricsEndpoint`. Failure policy: see the module
    docstring."""
    host, port = parse_listen(listen)
    endpoint = MetricsEndpoint(registry, host)
    listeners = await trio.open_tcp_listeners(port, host=host)
    endpoint.port = listeners[0].socket.getsockname()[1]
    log.info("metrics on http://%s:%d/metrics", host, endpoint.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, endpoint.handle, listeners)
        task_status.started(endpoint)
