"""Connectivity across NATs: reachability, relays (both roles), dialing by peer id, hole
punching, UPnP. The face of a package split by protocol:

- `observe`      `/lattice/observe/1` both sides: observations, dial-backs, the verdict
- `relay_hop`    Circuit Relay v2 hop/stop: py-libp2p's, patched, version-checked
- `reservations` relays we know and slots on them (Circuit Relay v2 client)
- `dialing`      reaching a peer by id, directly or through a relay
- `upnp`         a UPnP port mapping, when configured
- `holepunch`    `/lattice/holepunch/1` both sides, with `tcp_punch` (the sockets of a
                 punch and of birthday probing) and `punch_history` (outcomes, retries)
- `manager`      `NatManager` composing them, `serve_nat` running them

`NatConfig` (the `[nat]` and `[relay]` settings) lives in `lattice.net.nat_config`, so
that reading a config does not import libp2p.

Must not import latticed. proto/observe.md and proto/holepunch.md are the protocols.
"""

from lattice.net.nat.manager import NatManager as NatManager
from lattice.net.nat.manager import serve_nat as serve_nat
from lattice.net.nat.observe import OBSERVE_PROTOCOL_ID as OBSERVE_PROTOCOL_ID
from lattice.net.nat.relay_hop import UnsupportedLibp2pError as UnsupportedLibp2pError
from lattice.net.nat.reservations import Reservation as Reservation
from lattice.net.nat_config import NatConfig as NatConfig

__all__ = ["NatConfig", "NatManager", "serve_nat", "OBSERVE_PROTOCOL_ID",
           "UnsupportedLibp2pError", "Reservation"]
