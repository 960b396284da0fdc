"""The NAT manager's and the relay hop's settings (daemon sections ``[nat]`` and
``[relay]``), apart from `lattice.net.nat` so that reading a config does not import
libp2p (only `relay_limits` does, when a relay is built)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lattice.core.config_errors import InvalidSetting

if TYPE_CHECKING:
    from libp2p.relay.circuit_v2.resources import RelayLimits


@dataclass(frozen=True)
class NatConfig:
    """`[nat]` and `[relay]` settings (names as in the daemon's config file)."""

    # [nat]
    upnp: bool = False  # try a UPnP port mapping (off: most gateways have it off too)
    holepunch: bool = True  # upgrade relayed connections we accept to direct ones
    max_relays: int = 2  # relays we keep a reservation on while not publicly reachable
    max_observers: int = 4  # peers whose view of our address we keep
    observe_interval_s: float = 300.0  # refresh each observation this often
    dialback_timeout_s: float = 3.0  # a helper's dial-back of one address
    recheck_interval_s: float = 600.0  # re-verify reachability once known
    # [relay] (the hop service for others, when we are publicly reachable)
    relay_service: str = "auto"  # auto (when reachable) | on | off
    relay_max_reservations: int = 64  # peers holding a slot on us
    relay_max_circuits: int = 32  # relayed connections through us at once
    relay_max_circuits_per_peer: int = 4  # per reserving peer
    relay_max_circuit_bytes: int = 64 << 20  # per circuit, both directions
    relay_max_circuit_duration_s: int = 1800  # per circuit
    relay_reservation_ttl_s: int = 3600

    def __post_init__(self) -> None:
        if self.relay_service not in ("auto", "on", "off"):
            raise InvalidSetting("relay_service", f"must be auto, on or off, not {self.relay_service!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise InvalidSetting(f.name, f"({_setting_name(f.name)}) must not be negative, got {v}")
        for name in ("dialback_timeout_s", "observe_interval_s"):
            if getattr(self, name) <= 0:
                raise InvalidSetting(name, f"(nat.{name}) must be positive")

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
        from libp2p.relay.circuit_v2.resources import (
            RelayLimits,  # only where relaying runs
        )

        return RelayLimits(duration=self.relay_max_circuit_duration_s,
                           data=self.relay_max_circuit_bytes,
                           max_circuit_conns=self.relay_max_circuits_per_peer,
                           max_reservations=self.relay_max_reservations,
                           reservation_ttl=self.relay_reservation_ttl_s)


def _setting_name(field_name: str) -> str:
    if field_name.startswith("relay_"):
        return "relay." + field_name[len("relay_"):]
    return "nat." + field_name


