"""Effective configuration: defaults < TOML file < LATTICE_* environment < flags.

Owns the table of every setting (key, type, default, doc), loading from each source,
validation with messages that name the key, and `--print-config` rendering. Adding a
setting is one `Setting(...)` line; the annotated `daemon/latticed.toml` documents them
and a test keeps the two in step.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lattice.api import paths
from lattice.core.governor import VolunteerConfig, VolunteerConfigError

ENV_PREFIX = "LATTICE_"


class ConfigError(ValueError):
    """Bad configuration: names the key, the source and what is wrong."""

    def __init__(self, key: str, message: str, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"{key}: {message}{where}")
        self.key = key


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
            except Exception as e:  # the multiaddr package raises many unrelated types
                raise ConfigError(key, f"{item!r} is not a multiaddr ({e})") from None
            protos = [p.name for p in m.protocols()]
            if need_peer_id and "p2p" not in protos:
                raise ConfigError(key, f"{item!r} must end in /p2p/<peer id>")
            if not need_peer_id and "tcp" not in protos:
                raise ConfigError(key, f"{item!r}: only TCP listen addresses are supported")
            out.append(item)
        return out
    return check


def _one_of(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        v = str(value).lower()
        if v not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return v
    return check


def _at_least(n: float) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if value < n:
            raise ConfigError(key, f"must be at least {n}, got {value}")
        return value
    return check


@dataclass(frozen=True)
class Setting:
    key: str            # "section.name"
    type: type          # str, int, float, bool, list, Path
    default: Any
    doc: str
    check: Callable[[str, Any], Any] | None = None
    env: str = ""       # environment variable; derived from the key when empty

    @property
    def env_name(self) -> str:
        if self.env:
            return self.env
        section, name = self.key.split(".", 1)
        tail = name if section == "node" else f"{section}_{name}"
        return ENV_PREFIX + tail.upper()


def _loopback_listen(key: str, value: Any) -> str:
    if value == "":
        return value
    from latticed.metrics import parse_listen  # imports prometheus_client: only when on
    try:
        parse_listen(value)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
    return value


_VOLUNTEER = VolunteerConfig()  # the [volunteer] defaults are the dataclass's


def _volunteer(name: str, type_: type, doc: str) -> Setting:
    """A [volunteer] setting: default from `VolunteerConfig`, checked by it after loading."""
    return Setting(f"volunteer.{name}", type_, getattr(_VOLUNTEER, name), doc)


SETTINGS: list[Setting] = [
    Setting("node.state_dir", Path, None,
            "where identity, lock, socket and state live (default: $XDG_STATE_HOME/lattice)"),
    Setting("node.socket", Path, None, "local RPC socket (default: <state_dir>/latticed.sock)"),
    Setting("node.name", str, "", "a human-readable name shown to other members"),
    Setting("node.listen", list, ["/ip4/0.0.0.0/tcp/4001"], "multiaddrs to listen on",
            _multiaddr_list(need_peer_id=False)),
    Setting("node.bootstrap", list, [], "peers to dial at start and keep connected "
            "(multiaddrs ending in /p2p/<peer id>)", _multiaddr_list(need_peer_id=True)),
    Setting("node.mdns", bool, True, "find daemons on the local network by mDNS"),
    Setting("log.level", str, "info", "debug | info | warning | error",
            _one_of("debug", "info", "warning", "error")),
    Setting("rpc.max_frame_bytes", int, 4 << 20, "largest accepted local RPC frame",
            _at_least(1024)),
    Setting("rpc.max_clients", int, 64, "concurrent local RPC connections", _at_least(1)),
    Setting("rpc.max_in_flight", int, 32, "requests one local connection may have in "
            "flight at once (OVERLOADED beyond)", _at_least(1)),
    Setting("rpc.read_group", str, "", "a group (name or gid) whose members may use the "
            "socket with read access only (status, peers, jobs list...); the socket becomes "
            "mode 0660 with that group. Empty: only our uid and root"),
    Setting("rpc.subscriber_queue", int, 256,
            "events buffered per subscriber before it is marked lagging", _at_least(1)),
    Setting("limits.max_connections", int, 256, "peer connections kept at most", _at_least(1)),
    Setting("limits.bootstrap_retry_max_s", float, 30.0,
            "longest wait between redials of a lost bootstrap peer", _at_least(0.1)),
    Setting("limits.ping_interval_s", float, 15.0, "how often peers' RTT is measured",
            _at_least(1.0)),
    Setting("state.heartbeat_interval_s", float, 0.0,
            "refresh our member record's heartbeat this often, seconds (0: only when the "
            "record is written; [membership] says who is alive)", _at_least(0.0)),
    Setting("state.heartbeat_timeout_s", float, 60.0,
            "a member the failure detector has no news of is shown dead when its heartbeat "
            "is older than this", _at_least(1.0)),
    Setting("state.mesh_degree", int, 6, "sync sessions each new update is pushed to",
            _at_least(1)),
    Setting("state.gossip_interval_s", float, 1.0, "how often updates are announced to "
            "sessions outside the mesh", _at_least(0.1)),
    Setting("state.anti_entropy_interval_s", float, 10.0,
            "mean seconds between catch-up exchanges with a random peer", _at_least(0.5)),
    Setting("state.session_idle_timeout_s", float, 60.0,
            "a sync session whose peer sends nothing (not even a keepalive) for this long "
            "ends", _at_least(3.0)),
    Setting("state.max_authors", int, 4096, "authors whose state we keep (at most 8192)",
            _at_least(1)),
    Setting("state.max_state_bytes", int, 32 << 20, "replicated state kept for others, "
            "bytes: beyond it unreferenced authors are evicted, else new state refused",
            _at_least(1 << 20)),
    Setting("state.max_jobs_per_author", int, 16, "jobs of one submitter shown (its newest)",
            _at_least(1)),
    Setting("state.peer_authors_burst", int, 256, "new authors one peer may introduce at once",
            _at_least(1)),
    Setting("state.peer_authors_per_s", float, 4.0, "...and per second after that",
            _at_least(0.0)),
    Setting("state.peer_bytes_burst", int, 4 << 20, "state bytes one peer may add at once",
            _at_least(1)),
    Setting("state.peer_bytes_per_s", float, 64 << 10, "...and per second after that",
            _at_least(0.0)),
    Setting("membership.probe_interval_s", float, 3.0, "probe one connected peer this "
            "often (SWIM)", _at_least(0.1)),
    Setting("membership.probe_timeout_s", float, 2.0, "a probe unanswered this long makes "
            "its peer suspect", _at_least(0.05)),
    Setting("membership.suspicion_timeout_s", float, 15.0, "a suspect that does not refute "
            "within this is declared dead", _at_least(0.1)),
    Setting("membership.max_entries", int, 4096, "members whose liveness we track",
            _at_least(16)),
    Setting("connections.low_water", int, 32, "the connection manager trims down to this "
            "many connections", _at_least(1)),
    Setting("connections.high_water", int, 64, "...once there are more than this many "
            "(kept: DHT neighbours, sync mesh, relays, job partners)", _at_least(1)),
    Setting("connections.grace_s", float, 30.0, "a new connection is not trimmed for this "
            "long", _at_least(0.0)),
    Setting("nat.upnp", bool, False, "try a UPnP port mapping on the gateway"),
    Setting("nat.holepunch", bool, True, "upgrade relayed connections to direct ones by "
            "hole punching when both NATs allow it"),
    Setting("nat.max_relays", int, 2, "relays holding a reservation for us while we are "
            "not publicly reachable", _at_least(0)),
    Setting("nat.dialback_timeout_s", float, 3.0, "how long a helper's dial-back of one of "
            "our addresses may take", _at_least(0.1)),
    Setting("nat.recheck_interval_s", float, 600.0, "re-verify our reachability this often",
            _at_least(1.0)),
    Setting("relay.service", str, "auto", "serve as a Circuit Relay v2 hop: auto (when "
            "publicly reachable) | on | off", _one_of("auto", "on", "off")),
    Setting("relay.max_reservations", int, 64, "peers holding a relay slot on us", _at_least(0)),
    Setting("relay.max_circuits", int, 32, "relayed connections through this daemon at once "
            "(with max_circuit_bytes, this bounds what relaying costs the uplink)", _at_least(0)),
    Setting("relay.max_circuits_per_peer", int, 4, "relayed connections per reserving peer",
            _at_least(0)),
    Setting("relay.max_circuit_bytes", int, 64 << 20, "bytes per relayed connection, both "
            "directions (bulk transfers go direct or elsewhere)", _at_least(0)),
    Setting("relay.max_circuit_duration_s", int, 1800, "seconds per relayed connection",
            _at_least(0)),
    Setting("dht.mode", str, "auto", "server: answer DHT queries; client: only ask "
            "(for daemons that others cannot dial); auto: client once reachability says "
            "we are behind a NAT, server otherwise",
            _one_of("server", "client", "auto")),
    Setting("dht.replication", int, 20, "a put is stored at this many closest peers",
            _at_least(1)),
    Setting("dht.request_timeout_s", float, 5.0, "one DHT request's deadline", _at_least(0.1)),
    Setting("dht.refresh_interval_s", float, 600.0, "random-walk refresh of the routing table",
            _at_least(1.0)),
    Setting("dht.republish_interval_s", float, 3600.0, "our records and provider "
            "announcements are re-sent this often", _at_least(1.0)),
    Setting("dht.max_records_total", int, 20000, "records stored for others, at most",
            _at_least(1)),
    Setting("jobs.accept_tasks", list, ["digits-softmax", "digits-mlp", "breast-cancer-logreg"],
            "training tasks this daemon volunteers for (advertised in its member record)"),
    Setting("jobs.allowed_plugins", list, [], "plugin tasks (entry points in group "
            "lattice.tasks, installed on this machine) this daemon may run"),
    Setting("jobs.max_jobs", int, 1, "jobs joined or running at once", _at_least(0)),
    Setting("jobs.join_timeout_s", float, 600.0, "a job joined but given no roster within "
            "this long is left (it would hold a slot forever)", _at_least(1.0)),
    Setting("jobs.compute_threads", int, 1, "worker threads for training math", _at_least(1)),
    Setting("jobs.progress_rate", float, 2.0, "progress writes per second one whole job "
            "may cost the network (shared by its participants)", _at_least(0.01)),
    Setting("jobs.checkpoint_every", int, 20, "rounds between checkpoints (0: only at the end)",
            _at_least(0)),
    Setting("jobs.max_params", int, 50_000_000, "largest model (parameters) this daemon "
            "trains", _at_least(1)),
    Setting("bulk.direct", bool, True, "move large tensors over an AES-GCM side channel "
            "(raw TCP, keys from the Noise-authenticated stream) instead of the libp2p stream"),
    Setting("bulk.port", int, 0, "TCP port of the side channel (0: any free port)",
            _at_least(0)),
    Setting("bulk.advertise", list, [], "IP addresses peers reach the side channel at "
            "(default: the listen addresses, 0.0.0.0 replaced by the host's interface addresses)"),
    Setting("blobs.max_store_bytes", int, 4 << 30, "disk used for model blobs, at most",
            _at_least(1 << 20)),
    Setting("models.compute_threads", int, 1, "worker threads for importing, merging and "
            "exporting models", _at_least(1)),
    Setting("models.fetch_timeout_s", float, 120.0, "one model piece from the network, at most",
            _at_least(1.0)),
    Setting("models.fetch_parallel", int, 4, "model pieces fetched at once", _at_least(1)),
    Setting("models.export_shard_bytes", int, 4 << 30, "models export DIR starts a new "
            "shard after this many bytes", _at_least(1 << 20)),
    _volunteer("run_when", str, "compute always, or only when the user is idle: always | idle"),
    _volunteer("idle_after_min", float, "minutes without user input before the machine is idle"),
    _volunteer("pause_if_busy_percent", float, "pause compute while other programs use more "
               "than this share of all CPUs (0: never)"),
    _volunteer("busy_window_s", float, "other programs' CPU use is averaged over this long"),
    _volunteer("pause_on_battery", bool, "pause compute on battery"),
    _volunteer("priority", str, "compute threads' CPU priority: idle (SCHED_IDLE) | low "
               "(nice 19) | normal"),
    _volunteer("max_cores", int, "cores compute may run on (0: all)"),
    _volunteer("cpu_percent", float, "share of those cores' time compute may use, averaged "
               "over a minute"),
    _volunteer("compute_schedule", str, "when compute may run: 'mon-fri 18:00-08:00; sat,sun' "
               "('': any time)"),
    _volunteer("network_schedule", str, "when transfers may run ('': any time)"),
    _volunteer("max_memory_mb", float, "memory job compute may use, MB (0: no cap)"),
    _volunteer("keep_free_gb", float, "disk space the blob store always leaves free, GB"),
    _volunteer("upload_mbit_s", float, "upload rate limit for transfers, Mbit/s (0: none)"),
    _volunteer("download_mbit_s", float, "download rate limit for transfers, Mbit/s (0: none)"),
    _volunteer("monthly_data_gb", float, "transfers stop after this much a month, GB (0: no cap)"),
    _volunteer("data_reset_day", int, "day of the month (1-28) the data allowance starts over"),
    _volunteer("signal_interval_s", float, "how often battery, input and CPU load are read"),
    Setting("metrics.listen", str, "", "Prometheus text endpoint on loopback, host:port "
            "('': off)", _loopback_listen),
]
BY_KEY = {s.key: s for s in SETTINGS}


def _coerce(setting: Setting, value: Any, source: str) -> Any:
    t = setting.type
    key = setting.key
    if value is None:
        return None
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"must be true or false, got {value!r}", source)
    if t is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"must be an integer, got {value!r}", source)
        try:
            return int(value) if isinstance(value, (int, str)) else _bad(key, "an integer", value, source)
        except ValueError:
            raise ConfigError(key, f"must be an integer, got {value!r}", source) from None
    if t is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"must be a number, got {value!r}", source)
        try:
            return float(value) if isinstance(value, (int, float, str)) else _bad(key, "a number", value, source)
        except ValueError:
            raise ConfigError(key, f"must be a number, got {value!r}", source) from None
    if t is list:
        if isinstance(value, str):  # from the environment: comma or space separated
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings, got {value!r}", source)
        return value
    if t is Path:
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise ConfigError(key, f"must be a path, got {value!r}", source)
        return Path(value).expanduser()
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}", source)
    return value


def _bad(key: str, what: str, value: Any, source: str) -> Any:
    raise ConfigError(key, f"must be {what}, got {value!r}", source)


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
        return self._values["node.state_dir"]

    @property
    def socket(self) -> Path:
        return self._values["node.socket"]

    @property
    def read_gid(self) -> int | None:
        """`rpc.read_group` as a gid (checked when the config is loaded)."""
        return _group_id(self._values["rpc.read_group"])

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

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
            lines.append(f"{name} = {_toml_value(self._values[s.key])}  # {self.sources[s.key]}")
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
def volunteer_config(values: Config | dict[str, Any]) -> VolunteerConfig:
    """The `[volunteer]` section as the governor takes it."""
    data = values.as_dict() if isinstance(values, Config) else values
    return VolunteerConfig.from_mapping({k: v for k, v in data.items()
                                         if k.startswith("volunteer.")})


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
                values[key] = _coerce(BY_KEY[key], value, str(path))
                sources[key] = f"file {path}"

    for s in SETTINGS:
        if s.env_name in env:
            values[s.key] = _coerce(s, env[s.env_name], f"environment {s.env_name}")
            sources[s.key] = f"environment {s.env_name}"

    for key, value in flags.items():
        if value is None:
            continue
        s = BY_KEY[key]
        values[key] = _coerce(s, value, "command line")
        sources[key] = "command line"

    for s in SETTINGS:
        if s.check is not None and values[s.key] is not None:
            values[s.key] = s.check(s.key, values[s.key])
    try:
        volunteer_config(values)
    except VolunteerConfigError as e:
        raise ConfigError(e.key, str(e).removeprefix(e.key).strip(),
                          sources.get(e.key, "")) from None

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
