"""`/lattice/observe/1` message checks: what a peer sends is refused with the protocol's
own error before anything builds an address or dials out of it."""

from __future__ import annotations

import pytest

from lattice.core import reachability as rc
from lattice.core.identity import Identity

SID = b"\x01" * rc.OBSERVE_ID_BYTES


def test_an_old_observers_answers_still_decode():
    # "no_helper" and a missing "error" are what observers of earlier versions said
    msg = {"type": "observed", "id": SID, "addr": ["198.18.0.101", 4001], "relays": [],
           "dialback": {"status": "no_helper", "helper": "", "addr": None}}
    answer = rc.decode_observed(rc.check_message(msg))
    assert answer.dialback == "no_helper" and answer.dialback_error == ""
    msg["dialback"] = {"status": "failed", "helper": "x", "addr": None, "error": "new-kind"}
    assert rc.decode_observed(msg).dialback_error == "timeout"


def test_a_relay_listed_under_a_bad_peer_id_is_a_protocol_error():
    good = Identity.generate().peer_id
    ok = {"type": "observed", "id": SID, "addr": None,
          "relays": [{"peer": good, "addrs": [["198.18.0.11", 4001]]}]}
    assert rc.decode_observed(ok).relays[0].peer == good
    bad = dict(ok, relays=[{"peer": "not-a-peer", "addrs": [["198.18.0.11", 4001]]}])
    with pytest.raises(rc.ObserveProtocolError):
        rc.decode_observed(bad)
