"""Effective configuration: defaults < TOML file < LATTICE_* environment < flags.

Owns which dataclass fields are config keys (`SECTIONS`: each service declares its
values once, default and doc, in its own config dataclass; `latticed.settings` derives
the table from them), loading from each source, validation with messages that name the
key, and `--print-config`. Adding a setting is a field with a doc in the service's
dataclass plus one `expose(...)` here; `daemon/latticed.toml` annotates them for people
and a test keeps the two in step.
"""

from __future__ import annotations

import os
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lattice.api import paths
from lattice.core.config_errors import InvalidSetting
from lattice.core.connections import WaterMarks
from lattice.core.governor import VolunteerConfig
from lattice.core.state import StateLimits
from lattice.jobs import JobsConfig, MergeConfig
from lattice.jobs.attach import AttachConfig
from lattice.net.blob import BlobConfig
from lattice.net.crdt_sync import SyncConfig
from lattice.net.dht import DHTConfig
from lattice.net.gossip_party import GossipConfig
from lattice.net.membership import MembershipConfig
from lattice.net.modelstore import ModelsConfig
from lattice.net.nat_config import NatConfig
from latticed.discovery import DiscoveryConfig, SideChannelConfig
from latticed.metrics import MetricsConfig, parse_listen
from latticed.presence import PresenceConfig
from latticed.rpc_server import RpcConfig
from latticed.settings import (
    ENV_PREFIX,
    ConfigError,
    Exposed,
    Section,
    Setting,
    build,
    coerce,
    derive,
    expose,
)

__all__ = ["ENV_PREFIX", "SECTIONS", "SETTINGS", "BY_KEY", "Config", "ConfigError",
           "Setting", "load"]

T = TypeVar("T")


@dataclass(frozen=True)
class NodeConfig:
    """The daemon's identity and addresses (section ``[node]``)."""

    state_dir: Path | None = None
    """Where identity, lock, socket and state live (default: $XDG_STATE_HOME/lattice)."""
    socket: Path | None = None
    """The local RPC socket (default: <state_dir>/latticed.sock)."""
    name: str = ""
    """A human-readable name shown to other members."""
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    """Multiaddrs to listen on (TCP)."""
    bootstrap: tuple[str, ...] = ()
    """Peers to dial at start and keep connected (multiaddrs ending in /p2p/<peer id>)."""
    mdns: bool = True
    """Find daemons on the local network by mDNS."""


@dataclass(frozen=True)
class LogConfig:
    """Section ``[log]``."""

    level: str = "info"
    """debug | info | warning | error"""


def _xdg_config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lattice" / "latticed.toml"


def _multiaddr_list(*, need_peer_id: bool) -> Callable[[str, Any], list[str]]:
    def check(key: str, value: Any) -> list[str]:
        import multiaddr  # light (no libp2p); only imported when validating

        out = []
        for item in value:
            try:
                m = multiaddr.Multiaddr(item)
            except Exception as e:  # noqa: BLE001 - the multiaddr package raises many unrelated types
                raise ConfigError(key, f"{item!r} is not a multiaddr ({e})") from None
            protos = [p.name for p in m.protocols()]
            if need_peer_id and "p2p" not in protos:
                raise ConfigError(key, f"{item!r} must end in /p2p/<peer id>")
            if not need_peer_id and "tcp" not in protos:
                raise ConfigError(key, f"{item!r}: only TCP listen addresses are supported")
            out.append(item)
        return out
    return check


def _loopback_listen(key: str, value: Any) -> str:
    if value == "":
        return ""
    try:
        parse_listen(value)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
    return str(value)


def _sec(name: str, owner: type, *fields: Exposed | str) -> Section:
    return Section(name, owner, tuple(expose(f) if isinstance(f, str) else f for f in fields))


def _all_of(owner: type, *, but: tuple[str, ...] = ()) -> tuple[str, ...]:
    import dataclasses
    return tuple(f.name for f in dataclasses.fields(owner) if f.init and f.name not in but)


SECTIONS: tuple[Section, ...] = (
    _sec("node", NodeConfig, "state_dir", "socket", "name",
         expose("listen", check=_multiaddr_list(need_peer_id=False)),
         expose("bootstrap", check=_multiaddr_list(need_peer_id=True)), "mdns"),
    _sec("log", LogConfig, expose("level", choices=("debug", "info", "warning", "error"))),
    _sec("rpc", RpcConfig, expose("max_frame_bytes", minimum=1024),
         expose("max_clients", minimum=1), expose("max_in_flight", minimum=1),
         "read_group", expose("subscriber_queue", minimum=1),
         expose("max_passed_fds", minimum=1)),
    _sec("limits", DiscoveryConfig, expose("max_connections", minimum=1),
         expose("bootstrap_retry_max", "bootstrap_retry_max_s", minimum=0.1),
         expose("bootstrap_min_peers", minimum=0)),
    _sec("limits", PresenceConfig, expose("ping_interval", "ping_interval_s", minimum=0.0)),
    _sec("state", PresenceConfig,
         expose("heartbeat_interval", "heartbeat_interval_s", minimum=0.0)),
    _sec("state", StateLimits, expose("heartbeat_timeout", "heartbeat_timeout_s", minimum=1.0)),
    _sec("state", SyncConfig,
         expose("anti_entropy_interval", "anti_entropy_interval_s", minimum=0.5),
         expose("idle_timeout", "session_idle_timeout_s", minimum=3.0),
         expose("hello_timeout", "session_hello_timeout_s", minimum=1.0),
         expose("max_sessions", minimum=1), expose("mesh_degree", minimum=1),
         expose("gossip_interval", "gossip_interval_s", minimum=0.1)),
    _sec("state", StateLimits, expose("max_authors", minimum=1),
         expose("max_state_bytes", minimum=1 << 20), expose("max_jobs_per_author", minimum=1),
         expose("peer_authors_burst", minimum=1), expose("peer_authors_per_s", minimum=0.0),
         expose("peer_bytes_burst", minimum=1), expose("peer_bytes_per_s", minimum=0.0)),
    _sec("membership", MembershipConfig,
         expose("probe_interval", "probe_interval_s", minimum=0.1),
         expose("probe_timeout", "probe_timeout_s", minimum=0.05),
         expose("suspicion_timeout", "suspicion_timeout_s", minimum=0.1),
         expose("max_entries", minimum=16)),
    _sec("connections", WaterMarks, expose("low", "low_water", minimum=1),
         expose("high", "high_water", minimum=1), expose("grace", "grace_s", minimum=0.0)),
    _sec("nat", NatConfig, "upnp",
         expose("reachability", choices=("auto", "public", "private")), "holepunch",
         expose("max_relays", minimum=0), expose("dialback_timeout_s", minimum=0.1),
         expose("dialback_max_concurrent", minimum=1),
         expose("dialback_min_interval_s", minimum=0.0),
         expose("recheck_interval_s", minimum=1.0), expose("penalty_s", minimum=1.0),
         expose("holepunch_retry_s", minimum=1.0), expose("holepunch_retry_max_s", minimum=1.0),
         "birthday", expose("birthday_ports", minimum=1), expose("birthday_probes", minimum=1),
         expose("birthday_rate", minimum=1.0)),
    _sec("relay", NatConfig, expose("relay_service", "service", choices=("auto", "on", "off")),
         *(expose(f"relay_{name}", name, minimum=0) for name in (
             "max_reservations", "max_circuits", "max_circuits_per_peer", "max_circuit_bytes",
             "max_circuit_duration_s"))),
    _sec("dht", DiscoveryConfig, expose("dht_mode", "mode", choices=("server", "client", "auto"))),
    _sec("dht", DHTConfig, expose("replication", minimum=1),
         expose("request_timeout", "request_timeout_s", minimum=0.1),
         expose("refresh_interval", "refresh_interval_s", minimum=1.0),
         expose("republish_interval", "republish_interval_s", minimum=1.0),
         expose("max_records_total", minimum=1), expose("max_records_per_publisher", minimum=1),
         expose("max_records_per_ip", minimum=1), expose("source_prefix_v4", minimum=8),
         expose("source_prefix_v6", minimum=16),
         expose("penalty_backoff", "penalty_backoff_s", minimum=1.0)),
    _sec("jobs", JobsConfig, "accept_tasks", "allowed_plugins", expose("max_jobs", minimum=0),
         expose("join_timeout", "join_timeout_s", minimum=1.0),
         expose("compute_threads", minimum=1), expose("checkpoint_every", minimum=0),
         expose("max_params", minimum=1), expose("progress_rate", minimum=0.01)),
    _sec("jobs", AttachConfig, expose("attach_timeout", "attach_timeout_s", minimum=1.0)),
    _sec("jobs", MergeConfig, expose("max_bytes", "merge_max_bytes", minimum=0),
         expose("straggler_min", "merge_straggler_min_s", minimum=0.0),
         expose("straggler_factor", "merge_straggler_factor", minimum=1.0),
         expose("prefetch_bytes", "merge_prefetch_bytes", minimum=0),
         expose("check_tensors", "merge_check_tensors", minimum=0)),
    _sec("gossip", GossipConfig, expose("accept_timeout", "accept_timeout_s", minimum=0.1),
         expose("hold_timeout", "hold_timeout_s", minimum=0.1),
         expose("step_timeout", "step_timeout_s", minimum=0.1),
         expose("max_payload_bytes", minimum=1 << 20),
         expose("penalty_backoff", "penalty_backoff_s", minimum=1.0)),
    _sec("bulk", SideChannelConfig, "direct", expose("port", minimum=0), "advertise",
         expose("max_handshakes", minimum=1), expose("max_handshakes_per_ip", minimum=1),
         expose("hello_timeout", "hello_timeout_s", minimum=0.1)),
    _sec("blobs", BlobConfig, expose("max_store_bytes", minimum=1 << 20)),
    _sec("models", ModelsConfig, expose("compute_threads", minimum=1),
         expose("fetch_timeout", "fetch_timeout_s", minimum=1.0),
         expose("fetch_parallel", minimum=1),
         expose("shard_bytes", "export_shard_bytes", minimum=1 << 20)),
    _sec("volunteer", VolunteerConfig,
         *_all_of(VolunteerConfig, but=("duty_burst_s", "rate_burst_s"))),
    _sec("metrics", MetricsConfig, expose("listen", check=_loopback_listen)),
)
SETTINGS: list[Setting] = derive(SECTIONS)
BY_KEY = {s.key: s for s in SETTINGS}


class Config:
    """The effective configuration. ``config["node.listen"]`` or ``config.node.listen``."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str]) -> None:
        self._values = values
        self.sources = sources

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, section: str) -> Any:
        prefix = section + "."
        if not any(k.startswith(prefix) for k in self._values):
            raise AttributeError(section)
        from types import SimpleNamespace
        return SimpleNamespace(**{k[len(prefix):]: v for k, v in self._values.items()
                                  if k.startswith(prefix)})

    @property
    def state_dir(self) -> Path:
        path: Path = self._values["node.state_dir"]  # a Path setting: the type is checked on load
        return path

    @property
    def socket(self) -> Path:
        path: Path = self._values["node.socket"]
        return path

    @property
    def read_gid(self) -> int | None:
        """`rpc.read_group` as a gid (checked when the config is loaded)."""
        return _group_id(self._values["rpc.read_group"])

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def build(self, owner: type[T], **overrides: Any) -> T:
        """The service config ``owner`` (a dataclass named in `SECTIONS`) with this
        config's values for its exposed fields, then ``overrides``."""
        built: T = build(owner, SETTINGS, self._values, **overrides)
        return built

    def to_toml(self) -> str:
        """The effective config as TOML, each value annotated with where it came from."""
        lines: list[str] = []
        section = None
        for s in SETTINGS:
            sec, name = s.key.split(".", 1)
            if sec != section:
                if lines:
                    lines.append("")
                lines.append(f"[{sec}]")
                section = sec
            lines.extend(textwrap.wrap(s.doc, 88, initial_indent="# ", subsequent_indent="# "))
            value = self._values[s.key]
            if value is None:  # TOML has no null: an unset optional path
                lines.append(f"# {name} =  ({self.sources[s.key]})")
                continue
            lines.append(f"{name} = {_toml_value(value)}  # {self.sources[s.key]}")
        return "\n".join(lines) + "\n"


def _group_id(group: str) -> int | None:
    """A group name or numeric gid as a gid; None for ""; ConfigError if unknown."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    import grp
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError("rpc.read_group", f"no group named {group!r} on this system") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_together(owner: type, values: dict[str, Any], sources: dict[str, str]) -> None:
    """Build ``owner`` once, so what its own checks refuse (``__post_init__``: ranges
    that depend on each other, schedules) is a config error naming the key."""
    mine = [s for s in SETTINGS if s.owner is owner]
    try:
        build(owner, SETTINGS, values)
    except InvalidSetting as e:
        named = [s for s in mine if s.field == e.field] or mine
        raise ConfigError(named[0].key, e.reason, sources[named[0].key]) from None


def load(*, config_file: Path | None, flags: dict[str, Any],
         environ: dict[str, str] | None = None) -> Config:
    """Merge the sources. ``flags`` maps setting keys to values given on the command line
    (absent or None means not given). Raises ConfigError."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
    sources = {s.key: "default" for s in SETTINGS}

    path = config_file
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = Path(env[ENV_PREFIX + "CONFIG"])
    implicit = path is None
    if path is None:
        path = _xdg_config_file()
    if path is not None and (path.exists() or not implicit):
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("config", f"file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(section, "expected a [section] table", str(path))
            for name, value in table.items():
                key = f"{section}.{name}"
                if key not in BY_KEY:
                    raise ConfigError(key, "unknown setting", str(path))
                values[key] = coerce(BY_KEY[key], value, str(path))
                sources[key] = f"file {path}"

    for s in SETTINGS:
        if s.env_name in env:
            values[s.key] = coerce(s, env[s.env_name], f"environment {s.env_name}")
            sources[s.key] = f"environment {s.env_name}"

    for key, value in flags.items():
        if value is None:
            continue
        s = BY_KEY[key]
        values[key] = coerce(s, value, "command line")
        sources[key] = "command line"

    for s in SETTINGS:
        try:
            values[s.key] = s.validate(values[s.key])
        except ConfigError as e:
            raise ConfigError(e.key, str(e).removeprefix(f"{e.key}: "), sources[s.key]) from None
    for owner in dict.fromkeys(section.owner for section in SECTIONS):
        _check_together(owner, values, sources)

    if values["node.state_dir"] is None:
        values["node.state_dir"] = paths.default_state_dir()
        sources["node.state_dir"] = "default ($XDG_STATE_HOME/lattice)"
    values["node.state_dir"] = Path(values["node.state_dir"]).expanduser().absolute()
    if values["node.socket"] is None:
        values["node.socket"] = paths.socket_in(values["node.state_dir"])
        sources["node.socket"] = "default (<state_dir>/latticed.sock)"
    values["node.socket"] = Path(values["node.socket"]).expanduser().absolute()
    _group_id(values["rpc.read_group"])  # an unknown group is a config error, now
    # sun_path is 108 bytes on Linux; a longer path fails later with an obscure error
    if len(os.fsencode(str(values["node.socket"]))) > 107:
        raise ConfigError("node.socket", f"path {values['node.socket']} is longer than "
                          "the 107 bytes a Unix socket path may have; choose a shorter one")
    return Config(values, sources)
