"""The connectivity manager's and the relay hop's settings (daemon sections ``[nat]`` and
``[relay]``): `NatConfig`, validated. Apart from `lattice.net.nat` so that reading a
config does not import libp2p (only `relay_limits` does, when a relay is built). Each
field's docstring is its doc in ``latticed --print-config`` and `daemon/latticed.toml`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lattice.core.config_errors import InvalidSetting
from lattice.core.holepunch import MAX_BIRTHDAY_PORTS, MAX_BIRTHDAY_PROBES, MAX_BIRTHDAY_RATE

if TYPE_CHECKING:
    from libp2p.relay.circuit_v2.resources import RelayLimits


@dataclass(frozen=True)
class NatConfig:
    """`[nat]` and `[relay]` settings (names as in the daemon's config file)."""

    # [nat]
    upnp: bool = False
    """try a UPnP port mapping on the gateway (off: most gateways have it off too)"""
    reachability: str = "auto"
    """auto: learn from peers' dial-backs whether others can reach us; public / private:
    take this as the verdict (private: never relay for others, always keep relay
    reservations)"""
    holepunch: bool = True
    """upgrade relayed connections to direct ones by hole punching when both NATs allow it"""
    max_relays: int = 2
    """relays holding a reservation for us while we are not publicly reachable"""
    max_observers: int = 4
    """peers whose view of our address we keep"""
    observe_interval_s: float = 300.0
    """refresh each observation this often"""
    dialback_timeout_s: float = 3.0
    """how long our dial-back of one address a peer asked us to test may take"""
    dialback_max_concurrent: int = 4
    """dial-backs we make for others at once (each only to the asking peer's own IP)"""
    dialback_min_interval_s: float = 1.0
    """per asking peer, the least time between two dial-backs we make for it"""
    recheck_interval_s: float = 600.0
    """re-verify our reachability this often"""
    penalty_s: float = 60.0
    """a peer that broke the observe or hole-punch protocol is ignored this long, doubling
    per offence"""
    holepunch_retry_s: float = 30.0
    """a peer still reached only through a relay is hole-punched again after this, doubling"""
    holepunch_retry_max_s: float = 1800.0
    """the longest wait between two hole punches of one relayed peer"""
    # birthday probing against a symmetric NAT (proto/holepunch.md): connections the
    # symmetric side opens, probes the other side sends, SYNs a second, both bounded
    birthday: bool = True
    """against a symmetric NAT, birthday probing: the symmetric side opens many
    connections, the other probes many ports"""
    birthday_ports: int = 256
    """connections our side opens when its NAT is the symmetric one (at most 1024)"""
    birthday_probes: int = 1024
    """ports our side probes when the peer's NAT is the symmetric one (at most 4096)"""
    birthday_rate: float = 500.0
    """SYNs a second, either side, while birthday probing (at most 2000)"""
    # [relay] (the hop service for others, when we are publicly reachable)
    relay_service: str = "auto"
    """serve as a Circuit Relay v2 hop: auto (when publicly reachable) | on | off"""
    relay_max_reservations: int = 64
    """peers holding a relay slot on us"""
    relay_max_circuits: int = 32
    """relayed connections through this daemon at once (with max_circuit_bytes, this
    bounds what relaying costs the uplink)"""
    relay_max_circuits_per_peer: int = 4
    """relayed connections per reserving peer"""
    relay_max_circuit_bytes: int = 64 << 20
    """bytes per relayed connection, both directions (bulk transfers go direct or
    elsewhere)"""
    relay_max_circuit_duration_s: int = 1800
    """seconds per relayed connection"""
    relay_reservation_ttl_s: int = 3600
    """how long a reservation on us lasts before the peer must refresh it"""

    def __post_init__(self) -> None:
        if self.relay_service not in ("auto", "on", "off"):
            raise InvalidSetting("relay_service", f"(relay.service) must be auto, on or off, "
                                                  f"not {self.relay_service!r}")
        if self.reachability not in ("auto", "public", "private"):
            raise InvalidSetting("reachability", f"(nat.reachability) must be auto, public "
                                                 f"or private, not {self.reachability!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise InvalidSetting(f.name, f"({setting_name(f.name)}) must not be "
                                             f"negative, got {v}")
        for name in ("dialback_timeout_s", "observe_interval_s", "penalty_s",
                     "dialback_max_concurrent", "holepunch_retry_s", "birthday_ports",
                     "birthday_probes", "birthday_rate"):
            if getattr(self, name) <= 0:
                raise InvalidSetting(name, f"({setting_name(name)}) must be positive")
        for name, cap in (("birthday_ports", MAX_BIRTHDAY_PORTS),
                          ("birthday_probes", MAX_BIRTHDAY_PROBES),
                          ("birthday_rate", MAX_BIRTHDAY_RATE)):
            if getattr(self, name) > cap:
                raise InvalidSetting(name, f"({setting_name(name)}) must be at most {cap}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NatConfig:
        """From ``{"nat.upnp": True, "relay.max_circuits": 8, ...}`` (the daemon's keys;
        bare field names work too). Unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            section, _, name = key.rpartition(".")
            field_name = name if section in ("", "nat") else f"{section}_{name}"
            if section == "relay" and name == "service":
                field_name = "relay_service"
            if field_name not in known:
                unknown.append(key)
                continue
            kwargs[field_name] = value
        if unknown:
            raise ValueError(f"unknown NAT/relay setting(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)

    def relay_limits(self) -> RelayLimits:
        from libp2p.relay.circuit_v2.resources import RelayLimits  # only where relaying runs

        return RelayLimits(duration=self.relay_max_circuit_duration_s,
                           data=self.relay_max_circuit_bytes,
                           max_circuit_conns=self.relay_max_circuits_per_peer,
                           max_reservations=self.relay_max_reservations,
                           reservation_ttl=self.relay_reservation_ttl_s)


def setting_name(field_name: str) -> str:
    """The daemon's key for a field: ``relay_max_circuits`` -> ``relay.max_circuits``."""
    if field_name.startswith("relay_"):
        return "relay." + field_name[len("relay_"):]
    return "nat." + field_name
