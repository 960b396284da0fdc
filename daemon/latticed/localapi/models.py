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

import os
from typing import TYPE_CHECKING, Any

from lattice.api.errors import (
    InvalidArgumentError,
    NotFoundError,
    NotReadyError,
    PeerUnreachableError,
)
from lattice.jobs import JobNotFound
from lattice.learn.mergespec import MergeSpec, MergeSpecError
from lattice.net.blob import BlobNotFound, is_blob_id
from lattice.net.modelstore import ModelService
from latticed.localapi.jobs import require_jobs
from latticed.localapi.modelerrors import translated
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
    return await translated(require_models(node).import_path(_absolute(path), name), path)


async def models_export(node: Node, client: ClientConnection, model_id: str, path: str,
                        shard_bytes: int | None = None) -> dict[str, Any]:
    if shard_bytes is not None and shard_bytes < 1 << 20:
        raise InvalidArgumentError("shard_bytes must be at least 1 MiB")
    return await translated(require_models(node).export(
        model_id, _absolute(path), shard_bytes=shard_bytes), path)


async def models_merge(node: Node, client: ClientConnection, spec: dict[str, Any] | None = None,
                       config: str | None = None, name: str | None = None) -> dict[str, Any]:
    service = require_models(node)

    async def run() -> dict[str, Any]:
        if (spec is None) == (config is None):
            raise MergeSpecError("give either spec or config")
        if config is not None:
            parsed = MergeSpec.from_yaml(config, service.resolve)
        else:
            assert spec is not None
            parsed = MergeSpec.from_request(spec).with_ids(service.resolve)
        return await service.merge(parsed, name=name)

    return await translated(run())


async def models_verify(node: Node, client: ClientConnection, model_id: str,
                        tensors: list[str] | None = None) -> dict[str, Any]:
    return await translated(require_models(node).verify(model_id, tensors))


async def models_info(node: Node, client: ClientConnection, model_id: str) -> dict[str, Any]:
    return await translated(require_models(node).info(model_id))


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
