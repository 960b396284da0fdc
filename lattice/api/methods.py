"""The local RPC method table, declared once.

The daemon refuses to start if a method here has no handler; the clients' typed methods
(`Method.client`), the CLI and `proto/local-rpc.json` (exported by `schema()`) all derive
from this table. Params travel as a msgpack map ``{name: value}`` or, as plain
msgpack-RPC clients send them, an array in the order the table lists; each is
type-checked before a handler runs, and the server refuses a ``write`` method to a
client that only has read access.
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
    "list": (list,),
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
        if self.type == "list[str]" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise InvalidParamsError(f"parameter {self.name!r} must be a list of strings")
        if self.max_len is not None and hasattr(value, "__len__") and len(value) > self.max_len:
            raise InvalidParamsError(
                f"parameter {self.name!r} is longer than {self.max_len}")
        return float(value) if self.type == "float" and isinstance(value, (int, float)) else value


READ = "read"
WRITE = "write"
"""Access levels: ``write`` methods change daemon or network state; a client with read
access only (`rpc.read_group`) may call ``read`` methods."""


@dataclass(frozen=True)
class Method:
    name: str
    doc: str
    params: tuple[Param, ...] = ()
    result: str = "map"
    access: str = READ
    since: int = 1
    streams: bool = False  # True: the method starts notifications on this connection
    client: str | None = None
    """The clients' Python method name (`lattice.Client.<client>`); None: not offered
    as a plain call (subscriptions have their own API)."""

    def bind(self, params: Any) -> dict[str, Any]:
        """Validated keyword arguments for the handler, or InvalidParamsError. ``params``
        is a map by name, or an array by position (msgpack-RPC's own form)."""
        if params is None:
            params = {}
        if isinstance(params, list):
            if len(params) > len(self.params):
                raise InvalidParamsError(
                    f"{self.name}: at most {len(self.params)} positional parameter(s), "
                    f"got {len(params)}")
            params = {p.name: v for p, v in zip(self.params, params)}
        if not isinstance(params, dict):
            raise InvalidParamsError(
                f"{self.name}: params must be a map of name to value or an array")
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
    Method("api.info", "The method table, error codes and versions (this schema).",
           client="api_info"),
    Method("status", "Peer id, version, uptime, addresses, daemon state, subsystems.",
           client="status"),
    Method("peers.list", "Connected peers: peer_id, addrs, direction, connection, rtt_ms.",
           result="list",
           client="peers"),
    Method("peers.connect", "Dial a peer by multiaddr (must end in /p2p/<peer id>).",
           params=(Param("addr", "str", "multiaddr to dial", max_len=1024),
                   Param("timeout", "float", "seconds", required=False, default=10.0)),
           access=WRITE,
           client="connect_peer"),
    Method("subscribe", "Stream events as notifications [2, 'event', {...}]. Topics: "
           "'peers' (connected/disconnected), 'daemon' (state), 'state' (replicated state "
           "changes: path, value, author), 'jobs' (job progress and status). Each topic starts with a snapshot event.",
           params=(Param("topics", "list[str]", "topics to receive", max_len=16),),
           streams=True),
    Method("unsubscribe", "Stop a subscription on this connection.",
           params=(Param("subscription", "int", "id returned by subscribe"),)),
    Method("members.list", "Members of the network from the replicated state, with liveness.",
           result="map",
           client="members"),
    Method("state.get", "Any part of the replicated state: '' (all), members[/<peer>], "
           "jobs[/<id>], models/<id>, counters/<name>, authors/<peer>/<root>/<key>.",
           params=(Param("path", "str", "state path", required=False, default="",
                         max_len=1024),),
           result="any",
           client="state_get"),
    Method("state.set", "Write a value into this daemon's own record (schema-checked: "
           "member/<field>, counters/<name>, ...). Just after a restart it may wait up to "
           "10 s for a peer to confirm this daemon's own history.",
           params=(Param("path", "str", "<root>/<key>", max_len=1024),
                   Param("value", "any", "msgpack value")),
           access=WRITE,
           client="state_set"),
    Method("state.stats", "Replication statistics: sessions, bytes, rejections by reason.",
           client="state_stats"),
    Method("dht.put", "Sign and store a small msgpack value under KEY for TTL seconds; "
           "several publishers may write one key (one record each).",
           params=(Param("key", "str", "a name (stored as /v/<name>) or a full /ns/name key",
                         max_len=512),
                   Param("value", "any", "msgpack value (size-limited)"),
                   Param("ttl", "float", "seconds until expiry", required=False, default=3600.0)),
           access=WRITE,
           client="dht_put"),
    Method("dht.get", "Every live record under KEY, one per publisher, with hop count "
           "(0: answered from this daemon's own replica).",
           params=(Param("key", "str", "as for dht.put", max_len=512),
                   Param("fresh", "bool", "ask the network even when this daemon holds a "
                         "replica", required=False, default=False)),
           client="dht_get"),
    Method("dht.provide", "Announce that this daemon provides NAME (a blob, a job).",
           params=(Param("name", "str", "what we provide", max_len=512),), access=WRITE,
           client="dht_provide"),
    Method("dht.find_providers", "Live providers of NAME with their addresses.",
           params=(Param("name", "str", "what to find", max_len=512),), result="list",
           client="find_providers"),
    Method("peers.find", "Resolve a peer id to its addresses through the DHT.",
           params=(Param("peer_id", "str", "12D3KooW...", max_len=128),),
           client="find_peer"),
    Method("jobs.submit", "Submit a job; returns its id (and, if private, the token its "
           "joiners need; proto/jobs.md). kind 'train' (the default): task, min_peers, steps, "
           "batch, lr, momentum, sync_every, algorithm (gossip|noloco|none), partition "
           "(iid|dirichlet:ALPHA), compression (none|fp16|int8|topk:R), seed, ... kind 'merge': "
           "method, models (ids or names), base, weights, parameters, dtype, or config (mergekit "
           "YAML text); name, min_peers, max_peers, join_window, merge_timeout. A merge's inputs "
           "are checked first (an input that cannot be merged is INVALID_ARGUMENT naming the "
           "tensor). kind 'attach': a user's own training loop (name, min_peers, sync_every, "
           "algorithm, compression, overlap, init, ...; then attach.open).",
           params=(Param("spec", "map", "the job spec"),
                   Param("allow", "list[str]", "only these peer ids may take part",
                         required=False, max_len=256),
                   Param("private", "bool", "only peers given the returned token may take part",
                         required=False, default=False)), access=WRITE,
           client="submit_job"),
    Method("jobs.join", "This daemon's local user takes part in a job now (a private one: "
           "with the token its submitter handed out); its kind then knows a user asked (an "
           "attach job runs only where one did). Waits up to TIMEOUT s for the job to reach "
           "this daemon; returns its summary and whether we joined (false: we take part "
           "already).",
           params=(Param("job_id", "str", "job id", max_len=128),
                   Param("token", "str", "the job's token", required=False, max_len=128),
                   Param("timeout", "float", "seconds to wait for the job to be known here",
                         required=False, default=30.0)),
           access=WRITE, client="join_job"),
    Method("jobs.list", "Every job in the replicated state, newest first.", result="list",
           client="jobs"),
    Method("jobs.get", "One job: summary, spec, participants, totals, models.",
           params=(Param("job_id", "str", "job id", max_len=128),),
           client="job"),
    Method("jobs.cancel", "Cancel a job this daemon submitted.",
           params=(Param("job_id", "str", "job id", max_len=128),), access=WRITE,
           client="cancel_job"),
    Method("jobs.stats", "The job runner's statistics.",
           client="jobs_stats"),
    Method("attach.open", "Attach a training loop to an attach job (lattice.attach, "
           "lattice.torch) and join it. The request must pass a sealed memfd (SCM_RIGHTS) "
           "holding the model's parameters as float32 in TENSORS order (proto/attach.md). "
           "Returns the session id and the job's spec; then call attach.wait.",
           params=(Param("job_id", "str", "job id", max_len=128),
                   Param("tensors", "list", "[[name, dtype, shape], ...] in slot order",
                         max_len=1 << 16)),
           access=WRITE),
    Method("attach.wait", "Wait until the session is ready (the job started and the start "
           "weights are in the slot) or, with until='done', the job's model is known; at "
           "most TIMEOUT s (attach.max_wait). Returns the session's state, rank, roster, "
           "whether the slot was loaded, and the model id once known.",
           params=(Param("session", "str", "from attach.open", max_len=64),
                   Param("until", "str", "ready | done", required=False, default="ready",
                         max_len=8),
                   Param("timeout", "float", "seconds", required=False, default=30.0)),
           access=WRITE),
    Method("attach.sync", "The loop finished a round: its parameters are in the slot. "
           "Returns once the daemon averaged (or, with overlap, applied the last round's "
           "average and snapshotted): round, outcome, whether the slot changed.",
           params=(Param("session", "str", "from attach.open", max_len=64),
                   Param("steps", "int", "the loop's steps so far"),
                   Param("samples", "int", "samples trained on so far"),
                   Param("loss", "float", "the round's mean loss", required=False)),
           access=WRITE),
    Method("attach.finish", "The loop is done: the slot becomes this daemon's final "
           "contribution and the job goes to its merge. Returns the final's blob id.",
           params=(Param("session", "str", "from attach.open", max_len=64),
                   Param("steps", "int", "the loop's steps in all"),
                   Param("samples", "int", "samples trained on in all")),
           access=WRITE),
    Method("attach.detach", "End the session without a final: this daemon leaves the job "
           "(as when the loop's connection closes).",
           params=(Param("session", "str", "from attach.open", max_len=64),),
           access=WRITE),
    Method("models.list", "The model registry: model id -> producer, job, metrics.",
           client="models"),
    Method("governor.pause", "Pause job compute (the daemon stays in the network: state sync, "
           "DHT, relaying) until governor.resume, or for for_s seconds. Survives a restart. "
           "Returns the governor's block of status.",
           params=(Param("for_s", "float", "seconds, in (0, 366 days] (absent: until resumed)",
                         required=False),
                   Param("reason", "str", "shown in status", required=False, default="",
                         max_len=200)),
           access=WRITE, client="pause"),
    Method("governor.resume", "Lift a pause by the user; other reasons (battery, schedule, ...) "
           "still hold. Returns the governor's block of status.", access=WRITE,
           client="resume"),
    Method("governor.stats", "The governor's settings and counters: compute steps and CPU "
           "seconds, duty-cycle waits, pauses by reason, bytes and refusals at the transfer "
           "gates, signal read errors, what each compute thread applied.",
           client="governor_stats"),
    Method("models.read", "Bytes of a model's canonical .safetensors file, fetched from any "
           "provider on first use; read it in chunks.",
           params=(Param("model_id", "str", "sha256 hex", max_len=128),
                   Param("offset", "int", "byte offset", required=False, default=0),
                   Param("length", "int", "bytes (at most 1 MiB)", required=False,
                         default=1 << 20)),
           client="read_model"),
    Method("models.import", "Import a model the daemon reads from PATH: a .safetensors file, a "
           "Hugging Face directory (model.safetensors.index.json and shards) or an .npz. Tensors "
           "are kept exactly (every dtype, BF16 included) and stored as content-addressed pieces; "
           "returns the model id and its registry record.",
           params=(Param("path", "str", "absolute path on the daemon's machine", max_len=4096),
                   Param("name", "str", "a name for the registry (default: the file name)",
                         required=False, max_len=128)),
           access=WRITE,
           client="import_model"),
    Method("models.export", "Write a model to PATH on the daemon's machine: one canonical "
           ".safetensors file when PATH ends in .safetensors, else a Hugging Face directory "
           "(sharded with an index when larger than shard_bytes).",
           params=(Param("model_id", "str", "model id or registry name", max_len=128),
                   Param("path", "str", "absolute path on the daemon's machine", max_len=4096),
                   Param("shard_bytes", "int", "bytes per shard (default: [models] "
                         "export_shard_bytes)", required=False)),
           access=WRITE,
           client="export_model"),
    Method("models.merge", "Merge models on this daemon (proto/merge.md): either spec {method, "
           "models, base, weights, dtype, parameters} or config, a mergekit YAML text. The result "
           "is a new model that records how it was made; returns its id and record.",
           params=(Param("spec", "map", "method, models, base, weights, dtype, parameters",
                         required=False),
                   Param("config", "str", "mergekit YAML", required=False, max_len=256 * 1024),
                   Param("name", "str", "a name for the registry", required=False, max_len=128)),
           access=WRITE,
           client="merge_models"),
    Method("models.verify", "Recompute a merged model's tensors (all, or those matching the glob "
           "patterns) from its inputs and say whether every byte matches.",
           params=(Param("model_id", "str", "model id or registry name", max_len=128),
                   Param("tensors", "list[str]", "glob patterns of tensor names", required=False,
                         max_len=64)),
           client="verify_model"),
    Method("models.info", "A model's format, metadata, record and tensors (dtype, shape).",
           params=(Param("model_id", "str", "model id or registry name", max_len=128),),
           client="model_info"),
    Method("models.stats", "The model store's counters and limits.",
           client="models_stats"),
]

METHODS: dict[str, Method] = {m.name: m for m in _METHOD_LIST}

EVENT_TOPICS = ("peers", "daemon", "state", "jobs")


def schema() -> dict[str, Any]:
    """The language-neutral contract (what `api.info` returns, minus runtime versions)."""
    return {
        "api_version": API_VERSION,
        "framing": "4-byte big-endian length, then one msgpack value; or, when a "
                   "connection's first byte starts a msgpack array, a plain msgpack-RPC "
                   "stream (proto/local-rpc.md)",
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

