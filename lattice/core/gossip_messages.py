"""Pure wire format of `/lattice/gossip-avg/2` (proto/gossip-avg.md): the limits, the
control messages and the ``arrays`` header (named `lattice.core.arrays` specs), with the
parsers a receiver runs over them.

Owns what a well-formed message is. Every parser takes a decoded frame from a peer and
returns it checked (only the fields the spec names, defaults filled in) or raises
`GossipFormatError`; nothing the caller reads afterwards can raise. The driver
(`lattice.net.gossip_avg`) runs them through `lattice.net.streams.parse_peer_input`.
Must not import trio, libp2p or sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

import numpy as np

from lattice.core.arrays import ArrayFormatError, ArrayLimits, ArraySpec, parse_array_spec

PROTOCOL = "/lattice/gossip-avg/2"
VERSION = 2
MAX_CONTROL_BYTES = 64 * 1024
MAX_ITEMS = 16
MAX_NAME_CHARS = 64
MAX_REASON_CHARS = 64
MAX_SAMPLES = 2**53
MAX_TRANSPORTS = 8
MAX_JOB_CHARS = 128
MAX_XID_CHARS = 64
MAX_CODEC_CHARS = 64
OUTCOMES = ("committed", "aborted", "pending", "unknown")


class GossipFormatError(ValueError):
    """A message or header from the peer that does not follow proto/gossip-avg.md (or
    asks for more than our limits)."""


# -- control messages -----------------------------------------------------------------


def _is_id(value: Any, max_chars: int) -> TypeGuard[str]:
    return (isinstance(value, str) and 0 < len(value) <= max_chars and value.isascii()
            and value.isprintable())


def _version(value: Any) -> int:
    if value != VERSION or type(value) is not int:
        raise GossipFormatError(f"unsupported version {str(value)[:16]!r}")
    return value


def _job(value: Any) -> str:
    if not _is_id(value, MAX_JOB_CHARS):
        raise GossipFormatError("bad job id")
    return value


def _samples(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_SAMPLES:
        raise GossipFormatError("samples must be an integer in [0, 2^53]")
    return value


def _codec(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_CODEC_CHARS:
        raise GossipFormatError("codec must be a short string")
    return value


def _transport(value: Any) -> str:
    if not _is_id(value, 32):
        raise GossipFormatError("a transport name is a short string")
    return value


def _transports(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_TRANSPORTS:
        raise GossipFormatError(f"transports must be a list of at most {MAX_TRANSPORTS}")
    return [_transport(v) for v in value]


def _reason(value: Any) -> str:
    # a reason only reaches our logs: keep what is printable, never refuse a message for it
    return value[:MAX_REASON_CHARS] if isinstance(value, str) else "?"


def _outcome(value: Any) -> str:
    if not isinstance(value, str) or value not in OUTCOMES:
        raise GossipFormatError(f"outcome must be one of {OUTCOMES}")
    return value


_Field = tuple[Callable[[Any], Any], Any]  # (check, default; _REQUIRED if none)
_REQUIRED = object()

# message type -> field -> (check, default); "xid" is checked against the exchange.
FIELDS: dict[str, dict[str, _Field]] = {
    "offer": {"v": (_version, _REQUIRED), "job": (_job, _REQUIRED),
              "samples": (_samples, _REQUIRED), "codec": (_codec, _REQUIRED),
              "transports": (_transports, ["framed"])},
    "status": {"v": (_version, _REQUIRED), "job": (_job, _REQUIRED)},
    "accept": {"samples": (_samples, _REQUIRED), "transport": (_transport, "framed")},
    "busy": {"reason": (_reason, "?")},
    "commit": {},
    "ack": {},
    "abort": {"reason": (_reason, "?")},
    "outcome": {"outcome": (_outcome, _REQUIRED)},
}


def parse_message(msg: Any, kinds: tuple[str, ...], xid: str | None) -> dict[str, Any]:
    """``msg`` checked as one of ``kinds``, belonging to exchange ``xid`` (None: any
    well-formed xid, for the first message of a stream). Returns ``t``, ``xid`` and
    the type's fields, defaults filled in; fields the spec does not name are dropped."""
    if not isinstance(msg, dict) or msg.get("t") not in kinds:
        got = msg.get("t") if isinstance(msg, dict) else type(msg).__name__
        raise GossipFormatError(f"expected one of {kinds}, got {str(got)[:32]!r}")
    t = msg["t"]
    if not _is_id(msg.get("xid"), MAX_XID_CHARS) or (xid is not None and msg["xid"] != xid):
        raise GossipFormatError("message for another exchange id")
    out: dict[str, Any] = {"t": t, "xid": msg["xid"]}
    for name, (check, default) in FIELDS[t].items():
        if name in msg:
            out[name] = check(msg[name])
        elif default is _REQUIRED:
            raise GossipFormatError(f"{t!r} needs {name!r}")
        else:
            out[name] = default
    return out


# -- the arrays header ----------------------------------------------------------------


def array_item(name: str, spec: ArraySpec) -> list[Any]:
    """The header entry for one of our arrays: ``[name, spec]``."""
    return [name, spec.to_wire()]


def parse_array_header(header: Any, *, expect: Mapping[str, np.dtype] | None,
                       max_bytes: int) -> list[tuple[str, ArraySpec]]:
    """Validate an ``arrays`` header before anything is allocated: (name, spec) per
    array, in order. Each spec passes `parse_array_spec` within ``max_bytes`` (so it
    can be allocated), and so does their sum. Raises GossipFormatError."""
    if not isinstance(header, dict) or header.get("t") != "arrays":
        raise GossipFormatError("expected an 'arrays' header")
    items = header.get("items")
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise GossipFormatError(f"'items' must be a list of at most {MAX_ITEMS}")
    limits = ArrayLimits(max_bytes=max_bytes)
    out: list[tuple[str, ArraySpec]] = []
    names: set[str] = set()
    total = 0
    for item in items:
        if not (isinstance(item, list) and len(item) == 2):
            raise GossipFormatError("each item is [name, {dtype, shape, nbytes}]")
        name, wire = item
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or name in names:
            raise GossipFormatError("bad or duplicate array name")
        try:
            spec = parse_array_spec(wire, limits)
        except ArrayFormatError as e:
            raise GossipFormatError(f"array {name!r}: {e}") from None
        if expect is not None and (name not in expect or np.dtype(expect[name]) != spec.numpy_dtype):
            raise GossipFormatError(f"unexpected array {name!r} of {spec.dtype}")
        total += spec.nbytes
        if total > max_bytes:
            raise GossipFormatError(f"arrays exceed {max_bytes} bytes")
        names.add(name)
        out.append((name, spec))
    if expect is not None and names != set(expect):
        raise GossipFormatError(f"arrays {sorted(names)}, expected {sorted(expect)}")
    return out
