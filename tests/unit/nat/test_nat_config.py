"""NatConfig: the daemon's [nat]/[relay] keys, defaults that bound a volunteer's relay,
and errors that name the key."""

import pytest

from lattice.net.nat_config import NatConfig


def test_daemon_keys_map_onto_fields():
    cfg = NatConfig.from_mapping({"nat.upnp": True, "nat.max_relays": 3,
                                  "relay.service": "off", "relay.max_circuits": 8,
                                  "relay.max_circuit_bytes": 1 << 20})
    assert (cfg.upnp, cfg.max_relays, cfg.relay_service, cfg.relay_max_circuits,
            cfg.relay_max_circuit_bytes) == (True, 3, "off", 8, 1 << 20)
    assert NatConfig.from_mapping({}) == NatConfig()


def test_unknown_keys_and_bad_values_are_named():
    with pytest.raises(ValueError, match=r"nat.bogus"):
        NatConfig.from_mapping({"nat.bogus": 1})
    with pytest.raises(ValueError, match=r"relay.service"):
        NatConfig.from_mapping({"relay.service": "sometimes"})
    with pytest.raises(ValueError, match=r"relay.max_circuits"):
        NatConfig.from_mapping({"relay.max_circuits": -1})


def test_defaults_carry_control_traffic_and_small_jobs_but_bound_the_uplink():
    cfg = NatConfig()
    assert not cfg.upnp and cfg.relay_service == "auto"
    limits = cfg.relay_limits()
    assert limits.data >= 16 << 20  # a small model's averaging rounds fit one circuit
    assert limits.duration >= 600
    # at most this much of a volunteer's uplink per circuit lifetime, all circuits
    assert cfg.relay_max_circuits * limits.data <= 4 << 30
    assert limits.max_reservations == cfg.relay_max_reservations
    assert limits.max_circuit_conns == cfg.relay_max_circuits_per_peer


def test_the_relay_patch_refuses_a_py_libp2p_it_was_not_written_for():
    from lattice.net.nat.relay_hop import (
        SUPPORTED_LIBP2P,
        UnsupportedLibp2pError,
        check_libp2p_version,
    )

    assert check_libp2p_version() in SUPPORTED_LIBP2P  # what pyproject.toml pins
    with pytest.raises(UnsupportedLibp2pError, match=r"py-libp2p 0\.9\.0 is installed.*libp2p=="):
        check_libp2p_version("0.9.0")
