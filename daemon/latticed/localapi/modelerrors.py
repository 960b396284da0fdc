"""The model store's errors as typed RPC errors: the one place they are mapped, for
`models.*` and for merge jobs (`jobs.submit` with ``kind: merge``)."""

from __future__ import annotations

import os
from collections.abc import Awaitable
from typing import TypeVar

from lattice.api.errors import (
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    PeerUnreachableError,
    PermissionDeniedError,
)
from lattice.learn.merge import MergeInputError
from lattice.learn.mergespec import MergeSpecError
from lattice.learn.modelfile import ModelFormatError
from lattice.net.blob import BlobNotFound, BlobStoreFull
from lattice.net.modelstore import ModelNotFound, ModelUnavailable

T = TypeVar("T")


async def translated(op: Awaitable[T], path: str | None = None) -> T:
    """``await op``, its model-store errors raised as typed RPC errors (``path``: the
    file the daemon was asked to open, for the messages)."""
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
