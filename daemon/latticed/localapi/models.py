"""Models: `models.list`, `models.read`, and the model store's `models.import`,
`models.export`, `models.merge`, `models.verify`, `models.info`, `models.stats`.

Paths. `models.import PATH` and `models.export -o PATH` are opened by the daemon
itself. The socket admits only the daemon's own uid or root (proto/local-rpc.md), so
the daemon reads and writes nothing its client could not, except that a root client is
held to the daemon's permissions. A path must be absolute (the client resolves it); a
missing or unreadable one is a typed error saying the daemon could not open it (in a
container, the path is the container's).
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from lattice.api.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    NotReadyError,
    PeerUnreachableError,
    PermissionDeniedError,
)
from lattice.jobs import JobNotFound
from lattice.learn.merge import MergeInputError
from lattice.learn.mergespec import MergeSpec, MergeSpecError
from lattice.learn.modelfile import ModelFormatError
from lattice.net.blob import BlobNotFound, BlobStoreFull, is_blob_id
from lattice.net.modelstore import ModelNotFound, ModelService, ModelUnavailable

from latticed.localapi.jobs import require_jobs
from latticed.rpc_server import ClientConnection, Handler

if TYPE_CHECKING:
    from latticed.node import Node

MAX_READ_BYTES = 1 << 20


def require_models(node: Node) -> ModelService:
    if node.models is None:
        raise NotReadyError("the model store is still starting; retry in a moment")
    return node.models


async def models_list(node: Node, client: ClientConnection) -> dict[str, Any]:
    return require_jobs(node).models()


async def models_read(node: Node, client: ClientConnection, model_id: str, offset: int,
                      length: int) -> dict[str, Any]:
    if offset < 0 or not (0 < length <= MAX_READ_BYTES):
        raise InvalidArgumentError("offset must be >= 0 and length in (0, 1 MiB]")
    if not is_blob_id(model_id):
        raise InvalidArgumentError(f"not a model id (64 hex digits): {model_id!r}")
    try:
        data = await require_jobs(node).fetch_model(model_id)
    except JobNotFound:
        raise NotFoundError(f"no model {model_id}") from None
    except BlobNotFound:
        raise PeerUnreachableError(f"no provider delivered model {model_id}") from None
    return {"model_id": model_id, "size": len(data), "offset": offset,
            "data": data[offset:offset + length]}


async def models_stats(node: Node, client: ClientConnection) -> dict[str, Any]:
    return require_models(node).statistics()


async def models_import(node: Node, client: ClientConnection, path: str,
                        name: str | None = None) -> dict[str, Any]:
    return await _translated(require_models(node).import_path(_absolute(path), name), path)


async def models_export(node: Node, client: ClientConnection, model_id: str, path: str,
                        shard_bytes: int | None = None) -> dict[str, Any]:
    if shard_bytes is not None and shard_bytes < 1 << 20:
        raise InvalidArgumentError("shard_bytes must be at least 1 MiB")
    return await _translated(require_models(node).export(
        model_id, _absolute(path), shard_bytes=shard_bytes), path)


async def models_merge(node: Node, client: ClientConnection, spec: dict[str, Any] | None = None,
                       config: str | None = None, name: str | None = None) -> dict[str, Any]:
    service = require_models(node)

    async def run() -> dict[str, Any]:
        if (spec is None) == (config is None):
            raise MergeSpecError("give either spec or config")
        if config is not None:
            parsed = MergeSpec.from_yaml(config, _resolver(service))
        else:
            assert spec is not None
            parsed = _spec_from_map(spec).with_ids(_resolver(service))
        return await service.merge(parsed, name=name)

    return await _translated(run())


async def models_verify(node: Node, client: ClientConnection, model_id: str,
                        tensors: list[str] | None = None) -> dict[str, Any]:
    return await _translated(require_models(node).verify(model_id, tensors))


async def models_info(node: Node, client: ClientConnection, model_id: str) -> dict[str, Any]:
    return await _translated(require_models(node).info(model_id))


HANDLERS: dict[str, Handler] = {
    "models.list": models_list,
    "models.read": models_read,
    "models.import": models_import,
    "models.export": models_export,
    "models.merge": models_merge,
    "models.verify": models_verify,
    "models.info": models_info,
    "models.stats": models_stats,
}


def _absolute(path: str) -> str:
    if not os.path.isabs(path):
        raise InvalidArgumentError(f"{path!r}: give an absolute path (the daemon opens it, not the client)")
    return path


async def _translated(op: Awaitable[Any], path: str | None = None) -> Any:
    """The service's errors as typed RPC errors (the one place they are mapped)."""
    uid = os.getuid()
    try:
        return await op
    except (ModelNotFound, BlobNotFound) as e:
        raise NotFoundError(str(e)) from None
    except ModelUnavailable as e:
        raise PeerUnreachableError(str(e)) from None
    except FileExistsError as e:
        raise ConflictError(str(e)) from None
    except FileNotFoundError as e:
        raise NotFoundError(f"the daemon found no {e.filename or path} (paths are opened by the daemon, "
                            "on its machine)") from None
    except PermissionError as e:
        raise PermissionDeniedError(f"the daemon (uid {uid}) cannot open {e.filename or path}") from None
    except IsADirectoryError as e:
        raise InvalidArgumentError(str(e)) from None
    except BlobStoreFull as e:
        raise ConflictError(f"the model store is full: {e}") from None
    except (ModelFormatError, MergeSpecError, MergeInputError) as e:
        raise InvalidArgumentError(str(e)) from None
    except OSError as e:
        raise InvalidArgumentError(f"the daemon could not use {path}: {e}") from None


def _resolver(service: Any) -> Callable[[str], str]:
    def resolve(ref: str) -> str:
        try:
            return service.resolve(ref)
        except ModelNotFound as e:
            raise MergeSpecError(str(e)) from None
    return resolve


def _spec_from_map(doc: dict[str, Any]) -> Any:
    """The spec the CLI sends: method, models, base, weights, dtype, parameters."""
    allowed = {"method", "models", "base", "weights", "dtype", "parameters"}
    unknown = set(doc) - allowed
    if unknown:
        raise MergeSpecError(f"unknown spec field(s): {', '.join(sorted(map(str, unknown)))}")
    method, models = doc.get("method"), doc.get("models")
    if not isinstance(method, str) or not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise MergeSpecError("spec needs method (str) and models (list of ids or names)")
    weights = doc.get("weights")
    if weights is not None and (not isinstance(weights, list) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
        raise MergeSpecError("weights must be a list of numbers")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergeSpecError("parameters must be a map")
    base = doc.get("base")
    if base is not None and not isinstance(base, str):
        raise MergeSpecError("base must be a model id or name")
    return MergeSpec.from_arguments(method, models, base=base, weights=weights, dtype=doc.get("dtype"), **params)

