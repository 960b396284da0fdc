"""Which network a connection comes from, for quotas that one holder of many addresses
must share (DHT records per source, side-channel handshakes per source).

Owns `source_group`. Pure: must not import trio, libp2p or sockets.
"""

from __future__ import annotations

import ipaddress

V4_PREFIX = 24
V6_PREFIX = 48


def source_group(origin: str | None, peer_id: str = "", *, v4_prefix: int = V4_PREFIX,
                 v6_prefix: int = V6_PREFIX) -> str:
    """The quota a connection is charged to. ``origin`` is where it comes from: an IP
    address counts as its network (an IPv4 /24 or IPv6 /48 by default: whoever holds
    one address of a prefix can usually use them all; an IPv4-mapped IPv6 address as
    IPv4); any other name (``relay:<peer id>`` for a relayed connection) is used as it
    is; None (unknown) charges the peer itself."""
    if origin is None:
        return f"peer:{peer_id}"
    try:
        addr = ipaddress.ip_address(origin.split("%")[0])
    except ValueError:
        return origin
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
