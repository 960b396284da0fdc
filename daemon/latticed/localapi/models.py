"""Models: `models.list`, `models.read`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lattice.api.errors import InvalidArgumentError, NotFoundError, PeerUnreachableError
from lattice.net.blob import BlobNotFound, is_blob_id
from lattice.jobs import JobNotFound

from latticed.localapi.jobs import require_jobs
from latticed.rpc_server import ClientConnection, Handler

if TYPE_CHECKING:
    from latticed.node import Node

MAX_READ_BYTES = 1 << 20


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


HANDLERS: dict[str, Handler] = {
    "models.list": models_list,
    "models.read": models_read,
}
