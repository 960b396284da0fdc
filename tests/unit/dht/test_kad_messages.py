"""`/lattice/kad/1` messages: what parses, what is a protocol violation, and that the
spec in proto/dht.md lists exactly the fields the code accepts."""

import re
from pathlib import Path

import pytest

from lattice.core import codec
from lattice.core.identity import Identity
from lattice.core.kademlia import (
    ENVELOPE_FIELDS,
    MAX_PEERS_PER_MESSAGE,
    REQUEST_FIELDS,
    RESPONSE_FIELDS,
    MalformedMessage,
    Mode,
    PeerInfo,
    make_message,
    parse_message,
)
from lattice.core.records import DOMAIN, sign_record

ROOT = Path(__file__).resolve().parents[3]
ME = PeerInfo(Identity(bytes(32)).peer_id, ("/ip4/127.0.0.1/tcp/4001",), Mode.CLIENT)
OTHER = PeerInfo(Identity(bytes([1] * 32)).peer_id)


def wire(msg):
    return codec.unpack(codec.pack(msg.to_wire()))


@pytest.mark.parametrize("mtype,response,body", [
    ("PING", False, {}),
    ("FIND_NODE", False, {"target": bytes(32)}),
    ("FIND_NODE", True, {"closer": [OTHER]}),
    ("GET_VALUE", False, {"key": "/v/a"}),
    ("GET_VALUE", True, {"records": [], "closer": []}),
    ("PUT_VALUE", True, {"ok": False, "reason": "expired"}),
    ("GET_PROVIDERS", True, {"providers": [{"k": 1}], "closer": [OTHER]}),
])
def test_messages_round_trip(mtype, response, body):
    msg = make_message(mtype, 7, response, ME, **body)
    assert parse_message(wire(msg)) == msg


def _ping():
    return wire(make_message("PING", 1, False, ME))


@pytest.mark.parametrize("mutate", [
    lambda m: "PING",
    lambda m: m | {"type": "STORE"},
    lambda m: m | {"response": 1},
    lambda m: m | {"id": -1},
    lambda m: m | {"id": 1 << 64},
    lambda m: m | {"id": True},
    lambda m: m | {"extra": 0},
    lambda m: {k: v for k, v in m.items() if k != "sender"},
    lambda m: m | {"sender": m["sender"] | {"mode": "relay"}},
    lambda m: m | {"sender": m["sender"] | {"peer_id": "QmNotAnEd25519Key"}},
    lambda m: m | {"sender": m["sender"] | {"addrs": ["x"] * 17}},
    lambda m: m | {"sender": m["sender"] | {"addrs": ["x" * 300]}},
    lambda m: m | {"type": "FIND_NODE", "target": bytes(31)},
    lambda m: m | {"type": "GET_VALUE", "key": "k" * 600},
    lambda m: m | {"type": "FIND_NODE", "response": True,
                   "closer": [OTHER.to_wire()] * (MAX_PEERS_PER_MESSAGE + 1)},
    lambda m: m | {"type": "GET_VALUE", "response": True, "records": ["r"], "closer": []},
])
def test_garbage_is_a_protocol_violation(mutate):
    with pytest.raises(MalformedMessage):
        parse_message(mutate(_ping()))


def _spec_table(text, heading):
    """Rows `| TYPE | field: kind, ... |` of the table under ``heading``."""
    section = text.split(heading, 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([A-Z_]+)`\s*\|(.*)\|\s*$", line)
        if m:
            fields = {}
            for part in filter(None, (p.strip() for p in m.group(2).split(","))):
                if part == "—":
                    continue
                name, kind = (x.strip(" `") for x in part.split(":", 1))
                fields[name] = kind
            rows[m.group(1)] = fields
    return rows


def test_spec_lists_the_fields_the_code_accepts():
    text = (ROOT / "proto" / "dht.md").read_text()
    assert _spec_table(text, "### Requests") == REQUEST_FIELDS
    assert _spec_table(text, "### Responses") == RESPONSE_FIELDS
    for name in ENVELOPE_FIELDS:
        assert f"`{name}`" in text
    assert DOMAIN in text


def test_spec_golden_vector_matches():
    text = (ROOT / "proto" / "dht.md").read_text()
    vector = text.split("<!-- golden-record -->", 1)[1].split("```", 2)[1]
    fields = dict(line.split(" = ", 1) for line in vector.strip().splitlines()[1:])
    seed = bytes.fromhex(fields["seed"])
    record = sign_record(Identity(seed), fields["key"], bytes.fromhex(fields["value"]),
                         float(fields["expires_at"]))
    assert record.publisher == fields["publisher"]
    assert record.signature.hex() == fields["signature"]
