"""`NatConfig`: the daemon's `[nat]` and `[relay]` settings, validated.

Owns the defaults, their checks and the mapping from the daemon's dotted keys. Must not
import latticed; imports libp2p only for the relay's `RelayLimits`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from libp2p.relay.circuit_v2.resources import RelayLimits

from lattice.core.holepunch import MAX_BIRTHDAY_PORTS, MAX_BIRTHDAY_PROBES, MAX_BIRTHDAY_RATE


@dataclass(frozen=True)
class NatConfig:
    """`[nat]` and `[relay]` settings (names as in the daemon's config file)."""

    # [nat]
    upnp: bool = False  # try a UPnP port mapping (off: most gateways have it off too)
    reachability: str = "auto"  # auto (from dial-backs) | public | private: set, not probed
    holepunch: bool = True  # upgrade relayed connections we accept to direct ones
    max_relays: int = 2  # relays we keep a reservation on while not publicly reachable
    max_observers: int = 4  # peers whose view of our address we keep
    observe_interval_s: float = 300.0  # refresh each observation this often
    dialback_timeout_s: float = 3.0  # our dial-back of one address a requester asked
    dialback_max_concurrent: int = 4  # dial-backs we make at once (then "busy")
    dialback_min_interval_s: float = 1.0  # per requester, between dial-backs we make
    recheck_interval_s: float = 600.0  # re-verify reachability once known
    penalty_s: float = 60.0  # a peer that broke observe/holepunch is ignored, doubling
    holepunch_retry_s: float = 30.0  # a relayed peer's punch is tried again, doubling...
    holepunch_retry_max_s: float = 1800.0  # ...up to this
    # birthday probing against a symmetric NAT (proto/holepunch.md): connections the
    # symmetric side opens, probes the other side sends, SYNs a second, both bounded
    birthday: bool = True
    birthday_ports: int = 256
    birthday_probes: int = 1024
    birthday_rate: float = 500.0
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
            raise ValueError(f"relay.service must be auto, on or off, not {self.relay_service!r}")
        if self.reachability not in ("auto", "public", "private"):
            raise ValueError(f"nat.reachability must be auto, public or private, "
                             f"not {self.reachability!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"{setting_name(f.name)} must not be negative, got {v}")
        for name in ("dialback_timeout_s", "observe_interval_s", "penalty_s",
                     "dialback_max_concurrent", "holepunch_retry_s", "birthday_ports",
                     "birthday_probes", "birthday_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{setting_name(name)} must be positive")
        for name, cap in (("birthday_ports", MAX_BIRTHDAY_PORTS),
                          ("birthday_probes", MAX_BIRTHDAY_PROBES),
                          ("birthday_rate", MAX_BIRTHDAY_RATE)):
            if getattr(self, name) > cap:
                raise ValueError(f"{setting_name(name)} must be at most {cap}")

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
