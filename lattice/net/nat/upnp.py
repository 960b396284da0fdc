"""UPnP port mapping of our listen port on the gateway, when configured (off by default).

Owns `Upnp` (its state for `lattice status`), `serve_upnp` (map, then renew the lease;
never on the startup path: discovery takes ~1 s, more with no gateway) and `upnp_map`,
the blocking miniupnpc call made in a worker thread. Must not import latticed or libp2p.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from lattice.core.holepunch import Addr

log = logging.getLogger("lattice.net.nat")

_LEASE_S = 3600
_RENEW_S = 1800


@dataclass
class Upnp:
    enabled: bool = False
    state: str = "off"  # off | searching | mapped | none | failed
    external: Addr | None = None
    detail: str = ""


async def serve_upnp(state: Upnp, port: int | None, on_mapped: Callable[[], None]) -> None:
    """Keep ``port`` mapped while it works, updating ``state``; returns when the gateway
    is missing or refuses (said in ``state.detail``, logged once, no traceback)."""
    if port is None:
        state.state, state.detail = "failed", "not listening"
        return
    while True:
        result = await trio.to_thread.run_sync(upnp_map, port, abandon_on_cancel=True)
        state.state, state.external, state.detail = result
        if state.state != "mapped":
            log.info("upnp: %s", state.detail)
            return
        assert state.external is not None
        log.info("upnp: mapped %s:%d -> port %d", *state.external, port)
        on_mapped()
        await trio.sleep(_RENEW_S)


def upnp_map(port: int) -> tuple[str, Addr | None, str]:
    """Blocking (worker thread): find a gateway, map TCP ``port`` to us for an hour."""
    try:
        import miniupnpc
    except ImportError:
        return "failed", None, "miniupnpc is not installed"
    upnp = miniupnpc.UPnP()
    upnp.discoverdelay = 500  # ms; discover() takes ~4 s anyway when nobody answers
    # miniupnpc raises a bare Exception for every failure (discover() even raises one
    # saying "Success" when nobody answered), so none is told apart by its text: a
    # discovery that raised found nothing; selectigd()'s message goes to the user as is.
    try:
        found = upnp.discover()
    except Exception as e:  # noqa: BLE001 - see above
        log.debug("upnp: discover() raised %r", e)
        found = 0
    if not found:
        return "none", None, "no UPnP gateway found"
    try:
        upnp.selectigd()
    except Exception as e:  # noqa: BLE001 - see above
        return "none", None, f"no usable UPnP gateway: {e}"
    try:
        external = upnp.externalipaddress()
        upnp.addportmapping(port, "TCP", upnp.lanaddr, port, "latticed", "", _LEASE_S)
    except Exception as e:  # noqa: BLE001 - see above
        return "failed", None, f"gateway {upnp.lanaddr} refused the mapping: {e}"
    if not external:
        return "failed", None, f"gateway {upnp.lanaddr} gave no external address"
    return "mapped", (str(external), port), f"gateway {upnp.lanaddr}"
