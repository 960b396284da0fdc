"""The local RPC face of the model store: `models.import`, `models.export`,
`models.merge`, `models.verify`, `models.info`, `models.stats`.

Owns `ModelApi` (a handler per method, `handlers()` for the daemon's table) and the one
mapping of the store's errors to typed RPC errors. Imports nothing heavy at module
level: the daemon builds its handler table before its socket is up, and the store
(numpy, the merge engine) is imported on the first call. Must not import libp2p.

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
from typing import Any

from lattice.api.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    PeerUnreachableError,
    PermissionDeniedError,
)




def _absolute(path: str) -> str:
    if not os.path.isabs(path):
        raise InvalidArgumentError(f"{path!r}: give an absolute path (the daemon opens it, not the client)")
    return path


async def _translated(op: Awaitable[Any], path: str | None = None) -> Any:
    """The service's errors as typed RPC errors (the one place they are mapped)."""
    from lattice.learn.merge import MergeInputError
    from lattice.learn.mergespec import MergeSpecError
    from lattice.learn.modelfile import ModelFormatError
    from lattice.net.blob import BlobNotFound, BlobStoreFull
    from lattice.net.modelstore import ModelNotFound, ModelUnavailable

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


class ModelApi:
    """The `models.*` RPC handlers over a `ModelService`; ``service()`` returns it or
    raises NotReadyError while the daemon starts."""

    def __init__(self, service: Callable[[], Any]) -> None:
        self._service = service

    def handlers(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        return {"models.import": self.import_model, "models.export": self.export_model,
                "models.merge": self.merge, "models.verify": self.verify, "models.info": self.info,
                "models.stats": self.stats}

    async def stats(self, client: Any) -> dict[str, Any]:
        return self._service().statistics()

    async def import_model(self, client: Any, path: str, name: str | None = None) -> dict[str, Any]:
        return await _translated(self._service().import_path(_absolute(path), name), path)

    async def export_model(self, client: Any, model_id: str, path: str, shard_bytes: int | None = None
                           ) -> dict[str, Any]:
        if shard_bytes is not None and shard_bytes < 1 << 20:
            raise InvalidArgumentError("shard_bytes must be at least 1 MiB")
        return await _translated(self._service().export(model_id, _absolute(path), shard_bytes=shard_bytes), path)

    async def merge(self, client: Any, spec: dict[str, Any] | None = None, config: str | None = None,
                    name: str | None = None) -> dict[str, Any]:
        from lattice.learn.mergespec import MergeSpec, MergeSpecError

        service = self._service()

        async def run() -> dict[str, Any]:
            if (spec is None) == (config is None):
                raise MergeSpecError("give either spec or config")
            if config is not None:
                parsed = MergeSpec.from_yaml(config, _resolver(service))
            else:
                parsed = _spec_from_map(spec).with_ids(_resolver(service))  # type: ignore[arg-type]
            return await service.merge(parsed, name=name)

        return await _translated(run())

    async def verify(self, client: Any, model_id: str, tensors: list[str] | None = None) -> dict[str, Any]:
        return await _translated(self._service().verify(model_id, tensors))

    async def info(self, client: Any, model_id: str) -> dict[str, Any]:
        return await _translated(self._service().info(model_id))


def _resolver(service: Any) -> Callable[[str], str]:
    from lattice.learn.mergespec import MergeSpecError
    from lattice.net.modelstore import ModelNotFound

    def resolve(ref: str) -> str:
        try:
            return service.resolve(ref)
        except ModelNotFound as e:
            raise MergeSpecError(str(e)) from None
    return resolve


def _spec_from_map(doc: dict[str, Any]) -> Any:
    """The spec the CLI sends: method, models, base, weights, dtype, parameters."""
    from lattice.learn.mergespec import MergeSpec, MergeSpecError

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
