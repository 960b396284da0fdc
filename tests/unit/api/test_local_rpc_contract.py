"""The local RPC contract: params checking, framing limits, error codes, exported schema."""

import json
from pathlib import Path

import msgpack
import pytest

from lattice.api.errors import ERROR_CLASSES, ErrorCode, InvalidParamsError, error_from_wire
from lattice.api.framing import (
    BadFrame,
    Frame,
    FrameDecoder,
    OversizedFrame,
    StreamDecoder,
    Unrecoverable,
    frame,
    is_plain_stream,
)
from lattice.api.methods import METHODS, schema_json

ROOT = Path(__file__).resolve().parents[3]


def test_params_are_type_checked_and_defaults_filled():
    m = METHODS["peers.connect"]
    assert m.bind({"addr": "/ip4/1.2.3.4/tcp/1/p2p/x"}) == {"addr": "/ip4/1.2.3.4/tcp/1/p2p/x", "timeout": 10.0}
    assert m.bind({"addr": "a", "timeout": 3}) == {"addr": "a", "timeout": 3.0}
    for bad in ({}, {"addr": 5}, {"addr": "a", "timeout": "soon"}, {"addr": "a", "extra": 1},
                {"addr": "a", "timeout": True}, {"addr": "x" * 5000}, "a", 7,
                ["a", 1.0, "extra"], [], [5]):
        with pytest.raises(InvalidParamsError):
            m.bind(bad)


def test_params_may_come_by_position_in_the_tables_order():
    # plain msgpack-RPC clients (neovim's) send params as an array
    m = METHODS["peers.connect"]
    assert [p.name for p in m.params] == ["addr", "timeout"]
    assert m.bind(["/ip4/1.2.3.4/tcp/1/p2p/x"]) == {"addr": "/ip4/1.2.3.4/tcp/1/p2p/x", "timeout": 10.0}
    assert m.bind(["a", 3]) == {"addr": "a", "timeout": 3.0}
    assert METHODS["status"].bind([]) == {} == METHODS["status"].bind(None)


def test_every_client_method_name_is_unique_and_maps_to_the_table():
    from lattice.client._methods import METHOD_MAP

    clients = [m.client for m in METHODS.values() if m.client is not None]
    assert len(clients) == len(set(clients))
    for name, (rpc, params) in METHOD_MAP.items():
        assert tuple(p.name for p in METHODS[rpc].params) == params
        assert METHODS[rpc].client == name


def test_a_plain_stream_is_told_from_frames_by_its_first_byte():
    assert is_plain_stream(msgpack.packb([0, 1, "status", []])[0])
    assert is_plain_stream(msgpack.packb([0, 1, "status", {}] + [None] * 20)[0])  # array16
    assert not is_plain_stream(frame([0, 1, "status", {}])[0])


def test_a_plain_stream_splits_messages_across_any_chunking():
    data = b"".join(msgpack.packb([0, i, "status", []]) for i in range(3))
    dec = StreamDecoder(1024)
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
    assert [g.value[1] for g in got] == [0, 1, 2]


@pytest.mark.parametrize("data", [msgpack.packb([0, 1, "status", ["x" * 5000]]), b"\x94\xc1",
                                  b"\x94\x00\x01\xa6status" + b"\x91" * 100 + b"\xc0"])
def test_an_oversized_or_garbled_plain_stream_is_unrecoverable_and_stays_so(data):
    dec = StreamDecoder(1024)
    events = dec.feed(data)
    assert [type(e) for e in events] == [Unrecoverable]
    assert dec.feed(msgpack.packb([0, 2, "status", []])) == []


def test_list_params_must_hold_strings():
    with pytest.raises(InvalidParamsError):
        METHODS["subscribe"].bind({"topics": ["peers", 3]})
    assert METHODS["subscribe"].bind({"topics": ["peers"]}) == {"topics": ["peers"]}


def test_decoder_splits_frames_across_arbitrary_chunking():
    data = frame([0, 1, "status", {}]) + frame([0, 2, "peers.list", {}])
    dec = FrameDecoder(1024)
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
    assert [g.value for g in got] == [[0, 1, "status", {}], [0, 2, "peers.list", {}]]


def test_oversized_frame_is_skipped_without_buffering_and_stream_stays_in_sync():
    big = frame([0, 1, "status", {"x": "y" * 5000}])
    dec = FrameDecoder(1024)
    events = dec.feed(big[:100])
    assert isinstance(events[0], OversizedFrame) and events[0].length > 1024
    assert dec.buffered == 0
    events = dec.feed(big[100:] + frame([0, 2, "status", {}]))
    assert [type(e) for e in events] == [Frame] and events[0].value[1] == 2


def test_garbage_body_is_a_bad_frame_and_the_next_frame_still_parses():
    body = b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    dec = FrameDecoder(1024)
    events = dec.feed(len(body).to_bytes(4, "big") + body + frame([0, 7, "status", {}]))
    assert isinstance(events[0], BadFrame)
    assert isinstance(events[1], Frame) and events[1].value[1] == 7


def test_absurd_length_is_unrecoverable():
    assert isinstance(FrameDecoder(1024).feed(b"\xff\xff\xff\xff")[0], Unrecoverable)


def test_every_error_code_round_trips_to_its_class():
    for code, cls in ERROR_CLASSES.items():
        exc = error_from_wire(cls("boom").to_wire())
        assert type(exc) is cls and exc.code == code and str(exc) == "boom"
    unknown = error_from_wire({"code": 999, "message": "new"})
    assert "999" in str(unknown)


def test_codes_are_stable():
    # Released codes never change meaning; other-language clients hard-code them.
    assert ErrorCode.METHOD_NOT_FOUND == 3 and ErrorCode.INVALID_PARAMS == 4
    assert ErrorCode.FRAME_TOO_LARGE == 5 and ErrorCode.PEER_UNREACHABLE == 11


def test_exported_schema_is_current():
    current = (ROOT / "proto" / "local-rpc.json").read_text()
    assert current == schema_json(), (
        "proto/local-rpc.json is stale: run `python -m lattice.api > proto/local-rpc.json`")
    assert {m["name"] for m in json.loads(current)["methods"]} == set(METHODS)
