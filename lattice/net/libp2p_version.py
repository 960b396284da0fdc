"""The installed py-libp2p version, for the modules that patch its private API
(`lattice.net.nat.relay_hop`, `lattice.net.yamux_credit`) and check what they were
written for."""

from __future__ import annotations

from importlib import metadata


def installed_libp2p() -> str:
    """py-libp2p's distribution version, or "unknown" when it has no metadata."""
    try:
        return metadata.version("libp2p")
    except metadata.PackageNotFoundError:
        return "unknown"
