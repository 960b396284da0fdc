"""`/lattice/observe/1` message checks: what a peer sends is refused with the protocol's
own error before anything builds an address or dials out of it."""

from __future__ import annotations

import pytest

from lattice.core import reachability as rc
from lattice.core.identity import Identity

SID = b"\x01" * rc.OBSERVE_ID_BYTES


@pytest.mark.parametrize("peer", ["x", "", "0OIl", "/ip4/1.2.3.4", "1" * 128, 7, None,
                                  "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"])
def test_a_dialback_naming_something_other_than_a_peer_id_is_a_protocol_error(peer):
    msg = {"type": "dialback", "id": SID, "peer": peer, "addrs": [["198.18.0.10", 4001]]}
    with pytest.raises(rc.ObserveProtocolError):
        rc.decode_dialback(rc.check_message(msg))


def test_a_relay_listed_under_a_bad_peer_id_is_a_protocol_error():
    good = Identity.generate().peer_id
    ok = {"type": "observed", "id": SID, "addr": None,
          "relays": [{"peer": good, "addrs": [["198.18.0.11", 4001]]}]}
    assert rc.decode_observed(ok).relays[0].peer == good
    bad = dict(ok, relays=[{"peer": "not-a-peer", "addrs": [["198.18.0.11", 4001]]}])
    with pytest.raises(rc.ObserveProtocolError):
        rc.decode_observed(bad)
