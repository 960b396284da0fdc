"""The typed methods both clients offer, derived from the method table.

Sync and async clients differ only in whether `call` blocks or awaits, so each maps a
Python method name to the (method, params) pair here. The names come from
`lattice.api.methods` (`Method.client`): the table is the only list of methods."""

from __future__ import annotations

from typing import Any

from lattice.api.methods import METHODS

# python name -> (rpc method, parameter names in the table's order)
METHOD_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    m.client: (m.name, tuple(p.name for p in m.params))
    for m in METHODS.values() if m.client is not None
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
