"""proto/holepunch.md and proto/observe.md stay in step with the code's limits."""

import re
from pathlib import Path

import pytest

from lattice.core import holepunch as hp
from lattice.core import reachability as rc

PROTO = Path(__file__).resolve().parents[3] / "proto"


def table_row(doc: str, name: str) -> str:
    text = (PROTO / doc).read_text()
    match = re.search(rf"^\| {re.escape(name)} \| (.+?) \|$", text, re.MULTILINE)
    assert match, f"no row {name!r} in proto/{doc}"
    return match.group(1)


@pytest.mark.parametrize(("name", "value"), [
    ("frame, bytes", hp.MAX_MESSAGE),
    ("addresses per side", hp.MAX_ADDRS),
    ("session id, bytes", hp.ID_BYTES),
    ("reason, chars", hp.MAX_REASON_CHARS),
    ("exchange timeout, s", hp.EXCHANGE_TIMEOUT),
    ("round timeout, s", hp.ROUND_TIMEOUT),
    ("rounds", hp.MAX_ROUNDS),
    ("LAN addresses per side", hp.MAX_LOCAL_ADDRS),
    ("birthday ports asked, at most", hp.MAX_BIRTHDAY_PORTS),
    ("birthday probes asked, at most", hp.MAX_BIRTHDAY_PROBES),
    ("birthday SYNs per second, at most", hp.MAX_BIRTHDAY_RATE),
])
def test_holepunch_limits_table_matches_the_code(name, value):
    assert table_row("holepunch.md", name) == str(value)


def test_holepunch_session_cap_matches_the_driver_default():
    from lattice.net.nat.holepunch import HolePunchConfig

    assert table_row("holepunch.md", "sessions at once (both roles)") == str(
        HolePunchConfig().max_concurrent)


@pytest.mark.parametrize(("name", "value"), [
    ("frame, bytes", rc.OBSERVE_MAX_MESSAGE),
    ("request id, bytes", rc.OBSERVE_ID_BYTES),
    ("dial-back addresses", rc.MAX_DIALBACK_ADDRS),
    ("relays listed", rc.MAX_RELAYS_LISTED),
    ("peer id, chars", rc.MAX_PEER_ID_CHARS),
    ("verdict window, results", rc.WINDOW),
    ("results kept", rc.MAX_RESULTS),
])
def test_observe_limits_table_matches_the_code(name, value):
    assert table_row("observe.md", name) == str(value)


def test_protocol_ids_are_the_documented_ones():
    assert hp.PROTOCOL_ID in (PROTO / "holepunch.md").read_text().splitlines()[0]
    assert rc.OBSERVE_PROTOCOL_ID in (PROTO / "observe.md").read_text().splitlines()[0]
