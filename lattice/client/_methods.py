"""The typed methods both clients offer, written once over an abstract `call`.

Sync and async clients differ only in whether `call` blocks or awaits, so each method
here returns the (method, params) pair and a result adapter."""

from __future__ import annotations

from typing import Any

# name -> (rpc method, python parameter names in order)
METHOD_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "api_info": ("api.info", ()),
    "status": ("status", ()),
    "peers": ("peers.list", ()),
    "connect_peer": ("peers.connect", ("addr", "timeout")),
    "members": ("members.list", ()),
    "state_get": ("state.get", ("path",)),
    "state_set": ("state.set", ("path", "value")),
    "state_stats": ("state.stats", ()),
    "dht_put": ("dht.put", ("key", "value", "ttl")),
    "dht_get": ("dht.get", ("key", "fresh")),
    "dht_provide": ("dht.provide", ("name",)),
    "find_providers": ("dht.find_providers", ("name",)),
    "find_peer": ("peers.find", ("peer_id",)),
    "submit_job": ("jobs.submit", ("spec", "allow", "private")),
    "join_job": ("jobs.join", ("job_id", "token")),
    "jobs": ("jobs.list", ()),
    "job": ("jobs.get", ("job_id",)),
    "cancel_job": ("jobs.cancel", ("job_id",)),
    "jobs_stats": ("jobs.stats", ()),
    "models": ("models.list", ()),
    "read_model": ("models.read", ("model_id", "offset", "length")),
}


def params_for(python_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    method, names = METHOD_MAP[python_name]
    if len(args) > len(names):
        raise TypeError(f"{python_name}() takes at most {len(names)} positional arguments")
    params = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"{python_name}() got an unexpected keyword argument {k!r}")
        params[k] = v
    return method, {k: v for k, v in params.items() if v is not None}
