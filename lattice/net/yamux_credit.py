"""Yamux receive credit released as go-yamux releases it: once half the window is consumed.

Owns `release_credit_like_go_yamux`, applied once by `lattice.net.host` at import.

py-libp2p 0.8.1's `YamuxStream._auto_tune_and_send_window_update` runs after every read
and, besides go-yamux's rule (grow the window when the consumed credit reaches half of
it), has a "partial slack" branch that sends a WINDOW_UPDATE whenever *any* credit was
consumed: one more Noise-encrypted frame written for every message read. Our protocols
exchange many small messages on long-lived streams (state sync, membership, averaging
offers): in a 12-daemon train job those frames were ~15 % of each daemon's busy CPU.
(`PY_YAMUX_RELEASE_ON_READ=0`, which host.py used to set, only disables a later branch;
the partial-slack one still fires.)

The override defers the call while the consumed credit stays under the threshold, and
otherwise runs py-libp2p's own method (its full grow and window auto-tuning). A sender
then always holds at least half a window of credit: no stall is possible that go-yamux
would not have. Private py-libp2p API used (0.8.1): `YamuxStream.
_auto_tune_and_send_window_update`, `._grow_threshold`, `.target_recv_window`,
`.recv_window`, `._pending_recv_release`, `.window_lock`, `.conn.stream_buffers`,
`.stream_id`. On any other py-libp2p version nothing is patched (py-libp2p's own rule is
correct, only chattier) and the log says so.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from libp2p.stream_muxer.yamux.yamux import YamuxStream

from lattice.net.libp2p_version import installed_libp2p

log = logging.getLogger("lattice.net.yamux_credit")

WRITTEN_FOR = ("0.8.1",)
_PATCHED = "_lattice_credit_like_go_yamux"


def _deferring(original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    async def release(self: Any, *, bytes_read: int = 0) -> None:
        threshold = self._grow_threshold()
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        owed = self.target_recv_window - (self.recv_window + buffered)
        if (threshold > 0 and owed < threshold
                and self._pending_recv_release + bytes_read < threshold
                and not self.window_lock.locked()):
            self._pending_recv_release += bytes_read  # released with the next full grow
            return
        await original(self, bytes_read=bytes_read)

    setattr(release, _PATCHED, True)
    return release


def release_credit_like_go_yamux(installed: str | None = None) -> bool:
    """Patch `YamuxStream` (once); False (nothing patched) on a py-libp2p version this
    was not written for."""
    if installed is None:
        installed = installed_libp2p()
    if installed not in WRITTEN_FOR:
        log.info("py-libp2p %s: yamux credit left to its own rule (this override was "
                 "written for %s)", installed, ", ".join(WRITTEN_FOR))
        return False
    current = YamuxStream._auto_tune_and_send_window_update
    if not getattr(current, _PATCHED, False):
        YamuxStream._auto_tune_and_send_window_update = _deferring(current)  # type: ignore[method-assign,assignment]
    return True
