"""Shared state: signed per-author pycrdt documents, merged into views at read time.

The public face of `lattice.core.state` (the modules are private). Must not import
trio, libp2p, sockets or read the clock. Protocol: proto/crdt-sync.md.
"""

from lattice.core.jobs import STATUS_ORDER as STATUS_ORDER  # (the job lifecycle owns it)
from lattice.core.state.envelope import KIND_DELTA as KIND_DELTA
from lattice.core.state.envelope import KIND_SNAPSHOT as KIND_SNAPSHOT
from lattice.core.state.envelope import Envelope as Envelope
from lattice.core.state.envelope import EnvelopeError as EnvelopeError
from lattice.core.state.envelope import open_envelope as open_envelope
from lattice.core.state.envelope import seal as seal
from lattice.core.state.limits import StateLimits as StateLimits
from lattice.core.state.log import LogFormatError as LogFormatError
from lattice.core.state.schema import Change as Change
from lattice.core.state.schema import Delete as Delete
from lattice.core.state.schema import OutOfBounds as OutOfBounds
from lattice.core.state.schema import Set as Set
from lattice.core.state.store import AuthorBanned as AuthorBanned
from lattice.core.state.store import ChangeEvent as ChangeEvent
from lattice.core.state.store import LocalStateError as LocalStateError
from lattice.core.state.store import ReceiveResult as ReceiveResult
from lattice.core.state.store import StateStore as StateStore
from lattice.core.state.sync import PROTOCOL_ID as PROTOCOL_ID
from lattice.core.state.sync import SyncHub as SyncHub
from lattice.core.state.sync import SyncProtocolError as SyncProtocolError
from lattice.core.state.sync import SyncSession as SyncSession
from lattice.core.state.views import StatePathError as StatePathError
from lattice.core.state.views import join_status as join_status

__all__ = [
    "KIND_DELTA", "KIND_SNAPSHOT", "Envelope", "EnvelopeError", "open_envelope", "seal",
    "StateLimits", "LogFormatError", "Change", "Delete", "OutOfBounds", "Set",
    "AuthorBanned", "ChangeEvent", "LocalStateError", "ReceiveResult", "StateStore", "PROTOCOL_ID",
    "SyncHub", "SyncProtocolError", "SyncSession", "STATUS_ORDER", "StatePathError",
    "join_status",
]
