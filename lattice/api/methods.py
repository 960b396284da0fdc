"""The local RPC method table, declared once.

The daemon refuses to start if a method here has no handler; clients, the CLI and
`proto/local-rpc.json` (exported by `schema()`) all derive from this table. Params
travel as one msgpack map ``{name: value}``; each is type-checked before a handler runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lattice.api.errors import ERROR_CLASSES, InvalidParamsError

API_VERSION = 1

_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "bytes": (bytes,),
    "list[str]": (list,),
    "map": (dict,),
    "any": (object,),
}


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    doc: str
    required: bool = True
    default: Any = None
    max_len: int | None = None  # for str/bytes/list: a bound on length

    def check(self, value: Any) -> Any:
        allowed = _TYPES[self.type]
        if self.type in ("int", "float") and isinstance(value, bool):
            raise InvalidParamsError(f"parameter {self.name!r} must be {self.type}, got bool")
        if not isinstance(value, allowed):
            raise InvalidParamsError(
                f"parameter {self.name!r} must be {self.type}, got {type(value).__name__}")
        if self.type == "list[str]" and not all(isinstance(v, str) for v in value):
            raise InvalidParamsError(f"parameter {self.name!r} must be a list of strings")
        if self.max_len is not None and hasattr(value, "__len__") and len(value) > self.max_len:
            raise InvalidParamsError(
                f"parameter {self.name!r} is longer than {self.max_len}")
        return float(value) if self.type == "float" else value


@dataclass(frozen=True)
class Method:
    name: str
    doc: str
    params: tuple[Param, ...] = ()
    result: str = "map"
    access: str = "read"  # "read" | "write": write methods change daemon or network state
    since: int = 1
    streams: bool = False  # True: the method starts notifications on this connection

    def bind(self, params: Any) -> dict[str, Any]:
        """Validated keyword arguments for the handler, or InvalidParamsError."""
        if params is None or params == []:
            params = {}
        if not isinstance(params, dict):
            raise InvalidParamsError(f"{self.name}: params must be a map of name to value")
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known), key=str)
        if unknown:
            raise InvalidParamsError(f"{self.name}: unknown parameter(s) {', '.join(map(str, unknown))}")
        out = {}
        for p in self.params:
            if p.name in params and params[p.name] is not None:
                out[p.name] = p.check(params[p.name])
            elif p.required:
                raise InvalidParamsError(f"{self.name}: missing parameter {p.name!r}")
            else:
                out[p.name] = p.default
        return out


_METHOD_LIST = [
    Method("api.info", "The method table, error codes and versions (this schema)."),
    Method("status", "Peer id, version, uptime, addresses, daemon state, subsystems."),
    Method("peers.list", "Connected peers: peer_id, addrs, direction, connection, rtt_ms.",
           result="list"),
    Method("peers.connect", "Dial a peer by multiaddr (must end in /p2p/<peer id>).",
           params=(Param("addr", "str", "multiaddr to dial", max_len=1024),
                   Param("timeout", "float", "seconds", required=False, default=10.0)),
           access="write"),
    Method("subscribe", "Stream events as notifications [2, 'event', {...}]. Topics: "
           "'peers' (connected/disconnected), 'daemon' (state), 'state' (replicated state "
           "changes: path, value, author), 'jobs' (job progress and status). Each topic starts with a snapshot event.",
           params=(Param("topics", "list[str]", "topics to receive", max_len=16),),
           streams=True),
    Method("unsubscribe", "Stop a subscription on this connection.",
           params=(Param("subscription", "int", "id returned by subscribe"),)),
    Method("members.list", "Members of the network from the replicated state, with liveness.",
           result="map"),
    Method("state.get", "Any part of the replicated state: '' (all), members[/<peer>], "
           "jobs[/<id>], models/<id>, counters/<name>, authors/<peer>/<root>/<key>.",
           params=(Param("path", "str", "state path", required=False, default="",
                         max_len=1024),),
           result="any"),
    Method("state.set", "Write a value into this daemon's own record (schema-checked: "
           "member/<field>, counters/<name>, ...). Just after a restart it may wait up to "
           "10 s for a peer to confirm this daemon's own history.",
           params=(Param("path", "str", "<root>/<key>", max_len=1024),
                   Param("value", "any", "msgpack value")),
           access="write"),
    Method("state.stats", "Replication statistics: sessions, bytes, rejections by reason."),
    Method("dht.put", "Sign and store a small msgpack value under KEY for TTL seconds; "
           "several publishers may write one key (one record each).",
           params=(Param("key", "str", "a name (stored as /v/<name>) or a full /ns/name key",
                         max_len=512),
                   Param("value", "any", "msgpack value (size-limited)"),
                   Param("ttl", "float", "seconds until expiry", required=False, default=3600.0)),
           access="write"),
    Method("dht.get", "Every live record under KEY, one per publisher, with hop count "
           "(0: answered from this daemon's own replica).",
           params=(Param("key", "str", "as for dht.put", max_len=512),
                   Param("fresh", "bool", "ask the network even when this daemon holds a "
                         "replica", required=False, default=False))),
    Method("dht.provide", "Announce that this daemon provides NAME (a blob, a job).",
           params=(Param("name", "str", "what we provide", max_len=512),), access="write"),
    Method("dht.find_providers", "Live providers of NAME with their addresses.",
           params=(Param("name", "str", "what to find", max_len=512),), result="list"),
    Method("peers.find", "Resolve a peer id to its addresses through the DHT.",
           params=(Param("peer_id", "str", "12D3KooW...", max_len=128),)),
    Method("jobs.submit", "Submit a train job; returns its id (and, if private, the token "
           "its joiners need). Spec fields: task, min_peers, "
           "steps, batch, lr, momentum, sync_every, algorithm (gossip|noloco|none), "
           "partition (iid|dirichlet:ALPHA), compression (none|fp16|int8|topk:R), seed, ...",
           params=(Param("spec", "map", "the job spec"),
                   Param("allow", "list[str]", "only these peer ids may take part",
                         required=False, max_len=256),
                   Param("private", "bool", "only peers given the returned token may take part",
                         required=False, default=False)), access="write"),
    Method("jobs.join", "Take part in a job now (a private one: with the token its submitter "
           "handed out); returns whether we joined (false: we take part already).",
           params=(Param("job_id", "str", "job id", max_len=128),
                   Param("token", "str", "the job's token", required=False, max_len=128)),
           access="write"),
    Method("jobs.list", "Every job in the replicated state, newest first.", result="list"),
    Method("jobs.get", "One job: summary, spec, participants, totals, models.",
           params=(Param("job_id", "str", "job id", max_len=128),)),
    Method("jobs.cancel", "Cancel a job this daemon submitted.",
           params=(Param("job_id", "str", "job id", max_len=128),), access="write"),
    Method("jobs.stats", "The job runner's statistics."),
    Method("models.list", "The model registry: model id -> producer, job, metrics."),
    Method("models.read", "Bytes of a model's canonical .safetensors file, fetched from any "
           "provider on first use; read it in chunks.",
           params=(Param("model_id", "str", "sha256 hex", max_len=128),
                   Param("offset", "int", "byte offset", required=False, default=0),
                   Param("length", "int", "bytes (at most 1 MiB)", required=False,
                         default=1 << 20))),
]

METHODS: dict[str, Method] = {m.name: m for m in _METHOD_LIST}

EVENT_TOPICS = ("peers", "daemon", "state", "jobs")


def schema() -> dict[str, Any]:
    """The language-neutral contract (what `api.info` returns, minus runtime versions)."""
    return {
        "api_version": API_VERSION,
        "framing": "4-byte big-endian length, then one msgpack value (proto/local-rpc.md)",
        "methods": [
            {
                "name": m.name,
                "doc": m.doc,
                "access": m.access,
                "since": m.since,
                "streams": m.streams,
                "result": m.result,
                "params": [
                    {"name": p.name, "type": p.type, "required": p.required, "doc": p.doc,
                     **({"default": p.default} if not p.required else {}),
                     **({"max_len": p.max_len} if p.max_len is not None else {})}
                    for p in m.params
                ],
            }
            for m in _METHOD_LIST
        ],
        "errors": [
            {"code": int(code), "name": cls.code.name, "class": cls.__name__,
             "doc": cls.__doc__}
            for code, cls in sorted(ERROR_CLASSES.items())
        ],
        "event_topics": list(EVENT_TOPICS),
    }


def schema_json() -> str:
    import json
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"

